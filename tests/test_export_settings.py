"""Export round trip of every sampler setting a checkpoint records (export.py -> sample.py --pretrained).

Every distilled student is trailing-spaced, and 2-D or unclipped models record clip_x0=false: the export must
carry both, and the export must sample what the checkpoint samples."""
import pytest
import torch

pytest.importorskip("diffusers")

import export  # noqa: E402
import interop.pretrained as pretrained  # noqa: E402
from config import SPACINGS, load_config, to_dict  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from model import build_model  # noqa: E402
from safety import DIGITS, TINY  # noqa: E402
from sampling.generation import generate  # noqa: E402
from storage.checkpoints import save_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exported(tmp_path, overrides):
    """(cfg, ema model, cfg and model read back from the export) of a random tiny digits checkpoint."""
    cfg = load_config(DIGITS, TINY + overrides)
    torch.manual_seed(0)
    ema = build_model(cfg)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    save_checkpoint({"step": 3, "config": to_dict(cfg), "model": ema.state_dict(), "ema": ema.state_dict()},
                    tmp_path / "c.pt")
    assert export.main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "exp")]) == 0
    back, _, back_cfg = pretrained.load_pretrained(str(tmp_path / "exp"))
    return cfg, ema.eval(), back_cfg, back.eval()


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("clip", [True, False])
def test_spacing_and_clipping_survive_the_export_and_sample_the_same(tmp_path, spacing, clip):
    cfg, ema, back_cfg, back = exported(tmp_path, [f"diffusion.timestep_spacing={spacing}",
                                                   f"sample.clip_x0={str(clip).lower()}"])
    assert (back_cfg.diffusion.timestep_spacing, back_cfg.sample.clip_x0) == (spacing, clip)
    assert (back_cfg.diffusion.schedule, back_cfg.diffusion.objective) == (cfg.diffusion.schedule,
                                                                         cfg.diffusion.objective)

    def draw(model, c):
        d = Diffusion.from_config(c.diffusion)
        return generate(model, d, c, 3, 3, seed=5, sampler="ddim", steps=4, eta=0.0, progress=False, amp="off",
                        timestep_spacing=c.diffusion.timestep_spacing, clip_x0=c.sample.clip_x0)
    ours, theirs = draw(ema, cfg), draw(back, back_cfg)
    assert (ours - theirs).abs().max() < 1e-5  # the same weights in both layouts: float summation order only


@pytest.mark.xfail(strict=True, reason="export drops sample.{sampler,steps,eta,guidance_scale} (issue #23)")
def test_the_sampling_defaults_survive_the_export(tmp_path):
    _, _, back_cfg, _ = exported(tmp_path, ["sample.sampler=ddim", "sample.steps=3", "sample.eta=0.5",
                                            "diffusion.timestep_spacing=trailing"])
    assert (back_cfg.sample.sampler, back_cfg.sample.steps, back_cfg.sample.eta) == ("ddim", 3, 0.5)
