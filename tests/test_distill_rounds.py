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
from model import UNet, build_model
from torch.optim.optimizer import register_optimizer_step_pre_hook
from training.distillation import distillation_target, distillation_weight, student_loss, student_triples
from training.trainer import train

ROUND_STEPS = 3


@pytest.fixture(scope="module")
def recorded():
    """What the run did, recorded through public hooks only (not DistillTrainer's internals): before each
    optimizer step the parameters and the LR (a global AdamW pre-hook), and every U-Net call (x, t, grad
    enabled) and every model-output conversion (t, whether the output carries a gradient: the student's)."""
    rec = {"steps": [], "unet": [], "x0": []}

    def pre_step(opt, args, kwargs):
        group = opt.param_groups[0]
        rec["steps"].append(([p.detach().clone() for p in group["params"]], group["lr"]))

    forward, convert = UNet.forward, Diffusion.predict_x0_eps

    def unet_forward(self, x, t, y=None):
        rec["unet"].append((x.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return forward(self, x, t, y)

    def predict_x0_eps(self, model_out, xt, t, clip_x0=False):
        rec["x0"].append((torch.as_tensor(t).detach().clone(), model_out.requires_grad))
        return convert(self, model_out, xt, t, clip_x0)

    handle = register_optimizer_step_pre_hook(pre_step)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNet, "forward", unet_forward)
        mp.setattr(Diffusion, "predict_x0_eps", predict_x0_eps)
        yield rec
    handle.remove()


@pytest.fixture(scope="module")
def run(tmp_path_factory, recorded):
    """checkpoints/t_distill/ of a two-round distillation of a 2-step teacher (absolute path)."""
    root, cwd, threads = tmp_path_factory.mktemp("rounds"), Path.cwd(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        os.chdir(root)
        train(load_config(DIGITS, TINY + ["run_name=t", "train.max_steps=2"]))
        recorded["steps"].clear(), recorded["unet"].clear(), recorded["x0"].clear()  # the teacher's training
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


def named(params, ckpt):
    """{name: tensor} of the optimizer's parameter list (model.parameters() order) for the checkpoint's model."""
    names = [n for n, _ in build_model(load_config(DIGITS, TINY)).named_parameters()]
    assert len(names) == len(params) and set(names) <= set(ckpt["ema"])
    return dict(zip(names, params))


def test_each_round_trains_from_the_weights_the_previous_round_saved(run, recorded):
    """The parameters the first optimizer step of each round sees (the student's initial weights) are exactly
    round 1: the teacher checkpoint's EMA; round 2: the EMA steps_0004.pt saved (not the raw student, not the
    first teacher): [PD] Alg. 2, the student of a round is the next round's initial student."""
    teacher, first = load_checkpoint(run.parent / "t" / "last.pt"), load_checkpoint(run / "steps_0004.pt")
    steps = recorded["steps"]
    assert len(steps) == 2 * ROUND_STEPS
    for start, weights in ((0, teacher["ema"]), (ROUND_STEPS, first["ema"])):
        params = named(steps[start][0], first)
        assert all(torch.equal(p, weights[k]) for k, p in params.items()), f"round from step {start}"
    params = named(steps[ROUND_STEPS][0], first)  # the seeds differ, so the equalities above discriminate
    assert any(not torch.equal(p, first["model"][k]) for k, p in params.items())
    assert any(not torch.equal(p, teacher["ema"][k]) for k, p in params.items())


def test_round_two_repeats_round_ones_lr_schedule(run, recorded):
    """The LR of every optimizer step of round 2 is round 1's at the same step of its round (warm-up 1/2, 1,
    then cosine): the schedule restarts; the first step of each round is in warm-up (lr / 2)."""
    lrs = [lr for _, lr in recorded["steps"]]
    lr = load_checkpoint(run / "last.pt")["config"]["train"]["lr"]
    assert lrs[:ROUND_STEPS] == pytest.approx(lrs[ROUND_STEPS:])
    assert lrs[0] == lrs[ROUND_STEPS] == pytest.approx(lr / 2) and lrs[1] == pytest.approx(lr)


def test_the_student_is_trained_at_the_teachers_first_t_of_its_rounds_grid(run, recorded):
    """Each student call (grad enabled) sees the x_t and t of the teacher's first DDIM step just before it
    (t, not t_mid or t_next), the t is one of its round's student steps, and its output is converted at t."""
    calls, d = recorded["unet"], Diffusion(20, "cosine")
    grids = [{t for t, _, _ in student_triples(d, n, 8)} for n in (4, 2)]
    students = [i for i, (_, _, grad) in enumerate(calls) if grad]
    assert len(students) == 2 * ROUND_STEPS
    for k, i in enumerate(students):
        (x, t, _), (x1, t1, g1), (_, t2, g2) = calls[i], calls[i - 2], calls[i - 1]
        assert not g1 and not g2 and torch.equal(x, x1) and torch.equal(t, t1) and (t2 < t).all()
        assert set(t.tolist()) <= grids[k // ROUND_STEPS]
    converted = [t for t, grad in recorded["x0"] if grad]
    assert len(converted) == len(students)
    assert all(torch.equal(c, calls[i][1]) for c, i in zip(converted, students))


def test_the_loss_of_a_known_case_is_weighted_and_converted_at_t():
    """student_loss by hand: v-objective x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, weight max(SNR(t), 1)."""
    d = Diffusion(20, "cosine", objective="v")
    t, t_mid, t_next = torch.tensor([19, 6, 3]), torch.tensor([15, 4, 2]), torch.tensor([11, 2, -1])
    g = torch.Generator().manual_seed(1)
    xt, out = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    x0_target, weight = distillation_target(d, lambda x, s: 0.5 * x, xt, t, t_mid, t_next)
    abar = d.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x0 = abar.sqrt() * xt.double() - (1 - abar).sqrt() * out.double()
    snr = (abar / (1 - abar)).flatten().clamp(min=1.0)
    expected = snr * (x0 - x0_target.double()).pow(2).flatten(1).mean(1)
    loss = student_loss(d, out, xt, t, x0_target, weight)
    assert torch.allclose(loss.double(), expected, rtol=1e-4)
    assert snr[0] == 1 and 2 < snr[1] < 3 < 8 < snr[2] < 9  # truncated at t=19; t_mid's or t_next's differ
