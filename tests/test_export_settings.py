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
from sampling.generation import generate, sampling_settings  # noqa: E402
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


def test_the_sampling_defaults_survive_the_export(tmp_path):
    _, _, back_cfg, _ = exported(tmp_path, ["sample.sampler=ddim", "sample.steps=3", "sample.eta=0.5",
                                            "diffusion.timestep_spacing=trailing"])
    assert (back_cfg.sample.sampler, back_cfg.sample.steps, back_cfg.sample.eta) == ("ddim", 3, 0.5)


# ---------------------------------------------------------------- what sample.py --pretrained does with the export
def draw_as_sample_py(model, diffusion, cfg, labels=None):
    """Samples with the settings sample.py takes from a config when no sampling flag is given."""
    kw = sampling_settings(cfg, diffusion.num_timesteps)
    if labels is None:
        kw.pop("guidance_scale")
    return generate(model, diffusion, cfg, 3, 3, seed=7, progress=False, amp="off", labels=labels, **kw)


def exported_as_loaded(tmp_path, overrides):
    """exported(), plus the Diffusion load_pretrained builds (what sample.py --pretrained samples with)."""
    cfg, ema, back_cfg, back = exported(tmp_path, overrides)
    _, diffusion, _ = pretrained.load_pretrained(str(tmp_path / "exp"))
    return cfg, ema, back_cfg, back, diffusion


DIFFUSIONS = {  # every diffusion setting the export writes to scheduler_config.json, off its default
    "linear-eps-fixed_large": ["diffusion.schedule=linear", "diffusion.objective=eps", "diffusion.var_type=fixed_large",
                               "diffusion.beta_start=0.0002", "diffusion.beta_end=0.03"],
    "cosine-v-fixed_small": ["diffusion.schedule=cosine", "diffusion.objective=v", "diffusion.var_type=fixed_small"],
    "linear-x0-fixed_small": ["diffusion.schedule=linear", "diffusion.objective=x0", "diffusion.var_type=fixed_small"],
}


@pytest.mark.parametrize("case", DIFFUSIONS)
def test_every_diffusion_setting_survives_the_export_and_ddpm_samples_the_same(tmp_path, case):
    cfg, ema, back_cfg, back, diffusion = exported_as_loaded(tmp_path, DIFFUSIONS[case] + [
        "sample.sampler=ddpm", "diffusion.timestep_spacing=linspace", "sample.clip_x0=false"])
    for key in ("num_timesteps", "schedule", "beta_start", "beta_end", "objective", "var_type", "timestep_spacing"):
        assert getattr(back_cfg.diffusion, key) == pytest.approx(getattr(cfg.diffusion, key)), key
    assert back_cfg.sample.clip_x0 is False
    ours_d = Diffusion.from_config(cfg.diffusion)
    assert torch.equal(diffusion.betas, ours_d.betas) and diffusion.objective == cfg.diffusion.objective
    # ddpm (all T steps, the var_type's noise), the sampler passed
    ours = generate(ema, ours_d, cfg, 3, 3, seed=7, sampler="ddpm", steps=None, progress=False, amp="off",
                    clip_x0=cfg.sample.clip_x0)
    theirs = generate(back, diffusion, back_cfg, 3, 3, seed=7, sampler="ddpm", steps=None, progress=False,
                      amp="off", clip_x0=back_cfg.sample.clip_x0)
    assert (ours - theirs).abs().max() < 1e-6  # measured 0.0 on CPU (bitwise); margin for summation order


# Each case: overrides off the defaults load_pretrained gives back (ddim, steps = min(50, T) = 20, eta 0, no
# guidance; digits.yaml's 2 is reset to 1 here), and the sample settings that must come back (the last four in
# scheduler_config.json's _ddpm_lab_sample, interop/diffusers.py SAMPLE_KEY).
BASE = ["sample.steps=20", "sample.guidance_scale=1.0"]
SETTINGS = [
    pytest.param(["diffusion.timestep_spacing=trailing"], {}, id="trailing"),
    pytest.param(["diffusion.timestep_spacing=linspace"], {}, id="linspace"),
    pytest.param(["diffusion.timestep_spacing=trailing", "sample.clip_x0=false"], {"clip_x0": False},
                 id="trailing-noclip"),
    pytest.param(["diffusion.timestep_spacing=linspace", "sample.clip_x0=false"], {"clip_x0": False},
                 id="linspace-noclip"),
    # a distilled 2-step student's grid: deterministic DDIM, 2 steps, trailing
    pytest.param(["sample.steps=2", "diffusion.timestep_spacing=trailing"], {"steps": 2}, id="student-steps"),
    pytest.param(["sample.eta=0.5"], {"eta": 0.5}, id="eta"),
    pytest.param(["sample.sampler=dpmpp2m"], {"sampler": "dpmpp2m"}, id="sampler"),
    pytest.param(["model.num_classes=3", "sample.guidance_scale=3.0"], {"guidance_scale": 3.0}, id="guidance"),
]


@pytest.mark.parametrize("overrides, expected", SETTINGS)
def test_the_export_samples_what_the_checkpoint_samples_with_its_recorded_settings(tmp_path, overrides, expected):
    """sample.py --pretrained EXPORT (no sampling flags) draws what sample.py --checkpoint CKPT draws: every
    recorded setting comes back equal, and the same seed gives the same samples."""
    cfg, ema, back_cfg, back, diffusion = exported_as_loaded(tmp_path, BASE + overrides)
    for key, value in expected.items():
        assert getattr(cfg.sample, key) == value  # the case really sets it
    assert back_cfg.diffusion.timestep_spacing == cfg.diffusion.timestep_spacing
    for key in ("sampler", "steps", "eta", "guidance_scale", "clip_x0"):
        assert getattr(back_cfg.sample, key) == getattr(cfg.sample, key), key
    labels = [0, 1, 2] if cfg.model.num_classes else None
    ours = draw_as_sample_py(ema, Diffusion.from_config(cfg.diffusion), cfg, labels)
    theirs = draw_as_sample_py(back, diffusion, back_cfg, labels)
    assert (ours - theirs).abs().max() < 1e-6  # measured 0.0 on CPU (bitwise); margin for summation order


# ---------------------------------------------------------------- as a user meets it: the same PNGs, byte for byte
def run(workdir, *argv) -> str:
    import os
    import subprocess
    import sys

    from safety import REPO
    proc = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=workdir, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def same_pngs_from_export(workdir, checkpoint: str) -> list[str]:
    """export.py the checkpoint, then sample.py with no sampling flag from both: the PNGs must be equal bytes.
    Returns the default folders sample.py chose for the two (their names carry the settings used)."""
    run(workdir, "export.py", "--checkpoint", checkpoint, "--out", "exp")
    run(workdir, "sample.py", "--checkpoint", checkpoint, "--out", "a", "--amp", "off")
    run(workdir, "sample.py", "--pretrained", "exp", "--out", "b", "--amp", "off")
    names = sorted(p.name for p in (workdir / "a").glob("*.png"))
    assert names and names == sorted(p.name for p in (workdir / "b").glob("*.png"))
    for name in names:
        assert (workdir / "a" / name).read_bytes() == (workdir / "b" / name).read_bytes(), name
    run(workdir, "sample.py", "--pretrained", "exp", "--amp", "off")
    return [p.name for p in (workdir / "results" / "images" / "pretrained_exp").iterdir()]


def test_a_guided_class_conditional_export_samples_the_checkpoints_pngs(workdir):
    run(workdir, "train.py", "--config", DIGITS, *TINY, "run_name=g", "model.num_classes=10", "train.max_steps=2",
        "sample.guidance_scale=2", "sample.eta=0.5", "sample.steps=3", "diffusion.timestep_spacing=linspace")
    assert same_pngs_from_export(workdir, "checkpoints/g/last.pt") == ["ddim_3_0_eta0.5_g2"]


def test_a_distilled_students_export_samples_its_few_step_pngs(workdir):
    run(workdir, "train.py", "--config", DIGITS, *TINY, "run_name=t", "train.max_steps=2")
    run(workdir, "distill.py", "--teacher", "checkpoints/t/last.pt", "--start-steps", "8", "--steps", "2",
        "--round-steps", "1")
    assert same_pngs_from_export(workdir, "checkpoints/t_distill/last.pt") == ["ddim_2_0"]


@pytest.mark.parametrize("recorded, words", [
    ({"sampler": "euler"}, "_ddpm_lab_sample sampler 'euler'"), ({"steps": "4"}, "sample.steps"),
    ({"steps": 10 ** 6}, "steps = 1000000"), ({"eta": -1}, "eta = -1"), ({"guidance_scale": float("nan")}, "finite"),
    ({"batch_size": 0}, "batch_size"), ({"seed": 1}, "only the keys"), ([1, 2], "only the keys")])
def test_a_hand_edited_recorded_setting_is_one_clear_error(tmp_path, recorded, words):
    import json

    from config import ConfigError
    exported(tmp_path, [])
    path = tmp_path / "exp" / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_ddpm_lab_sample": recorded}))
    with pytest.raises(ConfigError, match=words):
        pretrained.load_pretrained(str(tmp_path / "exp"))


def test_a_diffusers_folder_without_the_recorded_settings_samples_with_the_defaults(tmp_path):
    import json
    exported(tmp_path, ["sample.steps=3", "sample.eta=0.5"])
    path = tmp_path / "exp" / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    del config["_ddpm_lab_sample"]
    path.write_text(json.dumps(config))
    back_cfg = pretrained.load_pretrained(str(tmp_path / "exp"))[2]
    assert (back_cfg.sample.sampler, back_cfg.sample.steps, back_cfg.sample.eta) == ("ddim", 20, 0.0)
