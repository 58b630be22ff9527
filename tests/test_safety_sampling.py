"""Safety table of the samplers' options (issue #13): an option the chosen sampler does not use is refused
with one line, before any sampling, instead of vanishing (`--eta 0.5` with ddpm used to sample plain DDPM)."""
from pathlib import Path

import pytest

from safety import DIGITS, TINY, Case, run_case


def tiny_checkpoint(workdir: Path) -> None:
    """ckpt.pt: a tiny digits U-Net with its random initial weights (no training, no data needed)."""
    from config import load_config, to_dict
    from model import build_model
    from storage.checkpoints import save_checkpoint
    cfg = load_config(DIGITS, TINY)
    state = build_model(cfg).state_dict()
    save_checkpoint({"step": 0, "config": to_dict(cfg), "model": state, "ema": state}, workdir / "ckpt.pt")


SAMPLE = ["sample.py", "--checkpoint", "ckpt.pt", "--device", "cpu", "--num-samples", "2", "--out", "out"]
CASES = [
    Case("ddpm-eta", [*SAMPLE, "--sampler", "ddpm", "--eta", "0.5"], 1, r"error: .*eta.*ddpm.*ddim|error: .*ddpm.*eta.*ddim", tiny_checkpoint, keep=("ckpt.pt",), absent=("out",)),
    Case("ddpm-spacing", [*SAMPLE, "--sampler", "ddpm", "--timestep-spacing", "trailing"], 1,
         r"error: .*spacing.*ddpm", tiny_checkpoint, keep=("ckpt.pt",),
         absent=("out",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sampler_options(case, tmp_path):
    run_case(case, tmp_path)
