"""Progressive distillation's round boundaries ([PD] Salimans & Ho 2022, Algorithm 2), checked against what each
reset should give, from the checkpoints distill.py writes: a straight run compared with a resumed one cannot
catch a bug that both share. Two rounds (8 -> 4 -> 2 steps) of 3 optimizer steps each."""
import os
from pathlib import Path

import pytest
import torch

import distill
from config import load_config
from diffusion import Diffusion
from safety import DIGITS, TINY
from storage.checkpoints import load_checkpoint
from training.distillation import distillation_target, distillation_weight
from training.trainer import train

ROUND_STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """checkpoints/t_distill/ of a two-round distillation of a 2-step teacher (absolute path)."""
    root, cwd, threads = tmp_path_factory.mktemp("rounds"), Path.cwd(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        os.chdir(root)
        train(load_config(DIGITS, TINY + ["run_name=t", "train.max_steps=2"]))
        assert distill.main(["--teacher", str(root / "checkpoints/t/last.pt"), "--start-steps", "8", "--steps", "2",
                             "--round-steps", str(ROUND_STEPS), "train.warmup_steps=2",
                             "train.lr_schedule=cosine"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root / "checkpoints" / "t_distill"


def test_round_two_starts_from_the_student_round_one_saved(run):
    """The student of round 1 (its EMA weights, saved as steps_0004.pt) is round 2's teacher and first student."""
    first, last = load_checkpoint(run / "steps_0004.pt"), load_checkpoint(run / "last.pt")
    assert (first["step"], last["step"]) == (ROUND_STEPS, 2 * ROUND_STEPS)
    assert all(torch.equal(last["teacher_model"][k], v) for k, v in first["ema"].items())
    assert any(not torch.equal(first["model"][k], v) for k, v in first["ema"].items())  # EMA != raw: a real test


def test_the_optimizer_ema_and_lr_schedule_restart_at_each_round(run):
    first, last = load_checkpoint(run / "steps_0004.pt"), load_checkpoint(run / "last.pt")
    # Adam's moments are cleared: each parameter's step count is the round's, not the run's
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {float(ROUND_STEPS)}
    assert last["ema_num_updates"] == first["ema_num_updates"] == ROUND_STEPS  # EMA warm-up restarts
    # the LR schedule (warm-up over 2 steps, then cosine over the round) restarts: after each round's last step
    # it stands at the first warm-up step of the next round, lr / 2, not at the end of a run-long schedule
    for ckpt in (first, last):
        lr = ckpt["config"]["train"]["lr"]
        assert ckpt["lr_scheduler"]["_last_lr"] == pytest.approx([lr / 2] * len(ckpt["lr_scheduler"]["_last_lr"]))
    assert last["distill"]["round"] == 1 and first["distill"]["round"] == 0


def test_the_truncated_snr_weight_is_taken_at_the_students_t():
    """[PD] Sec. 4: max(SNR(t), 1) at the student's t (not the teacher's t_mid or t_next), from alpha-bar."""
    d = Diffusion(20, "cosine", objective="v")
    t, t_mid, t_next = torch.tensor([19, 10, 3]), torch.tensor([14, 6, 1]), torch.tensor([9, 2, -1])
    abar = d.alphas_cumprod.double()
    expected = (abar[t] / (1 - abar[t])).clamp(min=1.0)
    assert torch.allclose(distillation_weight(d, t).double(), expected, rtol=1e-5)
    xt = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    _, weight = distillation_target(d, lambda x, s: torch.zeros_like(x), xt, t, t_mid, t_next)
    assert torch.allclose(weight.double(), expected, rtol=1e-5)
    assert not torch.allclose(expected, (abar[t_mid] / (1 - abar[t_mid])).clamp(min=1.0))
