"""Post-hoc EMA (EDM2; posthoc_ema.py): the power-function identities, reconstruction of an EMA length from two
tracked profiles, exact resume with profiles on, and sample.py / evaluate.py --ema-length."""
import contextlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from safety import DIGITS, TINY, Case, run_case
from sampling.posthoc import gamma_to_sigma_rel, posthoc_coefficients, reconstruct_weights, sigma_rel_to_gamma
from storage.checkpoints import load_checkpoint
from training.ema import PowerFunctionEMA
from training.trainer import train

TRACKED, TARGET = [0.05, 0.10], 0.075


# ----------------------------------------------------------------------------- the maths
def test_sigma_rel_and_gamma_round_trip_with_the_papers_values():
    # EDM2 (Section 3.1) pairs sigma_rel 0.05 with gamma 16.97 and 0.10 with gamma 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.01, 0.05, 0.075, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.3)


def impulse_responses(steps: int, sigma_rels: list[float], every: int):
    """Track EMAs of a 'network' whose weights at step t are the one-hot vector e_t: an EMA then holds its
    own weight profile (the weight of each step's parameters), so profiles can be compared exactly."""
    net = torch.nn.Linear(steps, 1, bias=False)
    ema = PowerFunctionEMA(net, sigma_rels)
    snapshots = {}
    for t in range(1, steps + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, t - 1] = 1.0
        ema.update(net, t)
        if t % every == 0:
            snapshots[t] = [average[0][0].double().clone() for average in ema.averages]
    return snapshots


def test_power_ema_weights_are_the_bin_integrals_of_tau_to_the_gamma_and_a_constant_stays_constant():
    T = 300
    profile = impulse_responses(T, [0.1], every=T)[T][0].numpy()
    gamma, tau = sigma_rel_to_gamma(0.1), np.arange(1, T + 1)
    exact = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)  # integral over [tau-1, tau]
    assert np.abs(profile - exact).max() < 1e-7                               # float32 accumulation
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(0.7)
        net.bias.fill_(-1.5)
    ema = PowerFunctionEMA(net, TRACKED)
    with torch.no_grad():
        net.weight.fill_(0.25)   # the initial copy gets weight 0: step 1 has beta = 0
        net.bias.fill_(3.0)
    for t in range(1, 200):
        ema.update(net, t)
    for average in ema.averages:
        assert torch.allclose(average[0], torch.full((2, 3), 0.25), atol=1e-6)
        assert torch.allclose(average[1], torch.full((2,), 3.0), atol=1e-6)


def test_reconstruction_from_two_profiles_matches_a_directly_tracked_third():
    # Profiles 0.05 and 0.10 snapshotted every 10 of 400 steps; sigma_rel 0.075 tracked directly as well.
    T, every = 400, 10
    snaps = impulse_responses(T, TRACKED + [TARGET], every)
    steps = sorted(snaps)
    coefficients = posthoc_coefficients([s for s in steps for _ in TRACKED], TRACKED * len(steps), T, TARGET)
    rebuilt = sum(coefficients[2 * i + k] * snaps[s][k] for i, s in enumerate(steps) for k in range(2))
    direct = snaps[T][2]
    assert coefficients.sum() == pytest.approx(1.0)
    # Total variation between the weight profiles: |rebuilt - direct| <= TV * max |theta| for ANY weight
    # sequence. Measured 5.4e-4 with 40 snapshots (the L2 fit of the continuous profiles is that close when
    # snapshots are dense, as EDM2 reports); the bound leaves room for float32 rounding of the snapshots.
    tv = (rebuilt - direct).abs().sum().item()
    assert tv < 2e-3
    for stored in snaps[T][:2]:   # either tracked profile alone is far off (TV ~0.2): the fit does the work
        assert (stored - direct).abs().sum().item() > 50 * tv


def test_reconstruct_weights_of_a_random_walk_from_checkpoint_and_snapshot_files(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ema, direct = PowerFunctionEMA(net, TRACKED), PowerFunctionEMA(net, [TARGET])
    for t in range(1, 201):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)     # a random walk: the EMA length matters
        ema.update(net, t)
        direct.update(net, t)
        if t % 5 == 0 and t < 200:
            ema.write_snapshot(tmp_path, t)
    ckpt = {"step": 200, "phema": ema.state_dict()}
    weights, summary = reconstruct_weights(ckpt, tmp_path, TARGET, net.state_dict())
    assert summary["snapshot_steps"][-1] == 200 and len(summary["snapshot_steps"]) == 40
    for name, value in zip(direct.names, direct.averages[0]):
        spread = (value - ema.averages[0][direct.names.index(name)]).abs().max().item()
        error = (weights[name] - value).abs().max().item()
        assert error < 0.02 * spread + 1e-6, (name, error, spread)  # 50x closer than the 0.05 profile
    with pytest.raises(ValueError, match="--ema-length = 0.3 "):
        reconstruct_weights(ckpt, tmp_path, 0.3, net.state_dict())


# ----------------------------------------------------------------------------- config and training
def test_config_checks_the_profiles_and_the_snapshot_interval():
    for bad, match in [("train.ema_profiles=[0.3]", "sigma_rel must be in"),
                       ("train.ema_profiles=[0.05,0.05]", "twice"),
                       ("train.ema_snapshot_every=0", "ema_snapshot_every")]:
        with pytest.raises(ConfigError, match=match):
            load_config(DIGITS, TINY + [bad])
    assert load_config(DIGITS, TINY).train.ema_profiles == []  # off by default


PROFILES = ["train.ema_profiles=[0.05,0.1]", "train.ema_snapshot_every=3", "train.max_steps=12",
            "train.ckpt_every=4", "data.num_workers=0"]


def test_resume_with_profiles_is_bitwise_exact_and_off_leaves_checkpoints_as_before(workdir):
    from test_train import assert_resume_exact, assert_same_state
    train(load_config(DIGITS, TINY + PROFILES + ["run_name=straight"]))
    train(load_config(DIGITS, TINY + PROFILES + ["run_name=resumed"]), stop_at=5)
    train(load_config(DIGITS, TINY + PROFILES + ["run_name=resumed"]), resume=True)
    a, b = (load_checkpoint(Path("checkpoints") / run / "last.pt") for run in ("straight", "resumed"))
    assert_resume_exact(a, b)
    assert_same_state(a["phema"], b["phema"])
    assert a["phema"]["snapshot_steps"] == [3, 6, 9, 12]
    for step in (3, 6, 9, 12):
        name = f"checkpoints/{{}}/ema/ema_{step:07d}.pt"
        assert_same_state(torch.load(name.format("straight"), weights_only=True),
                          torch.load(name.format("resumed"), weights_only=True))
    train(load_config(DIGITS, TINY + ["train.max_steps=2", "run_name=off"]))
    assert "phema" not in load_checkpoint("checkpoints/off/last.pt") and not Path("checkpoints/off/ema").exists()


def test_a_fresh_run_over_old_snapshots_needs_overwrite_which_removes_them(workdir):
    # Snapshots of an earlier run would otherwise be overwritten one by one and mixed into the new run's.
    old = Path("checkpoints/snap/ema/ema_0000003.pt")
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier run's snapshot")
    cfg = load_config(DIGITS, TINY + PROFILES + ["run_name=snap", "train.max_steps=2"])
    with pytest.raises(ConfigError, match="already holds a run .*ema_0000003.pt.*--overwrite"):
        train(cfg)
    assert old.read_bytes() == b"an earlier run's snapshot"
    train(cfg, overwrite=True)
    assert not old.exists() and sorted(p.name for p in old.parent.iterdir()) == ["ema_0000002.pt"]


# ----------------------------------------------------------------------------- the command line
_CACHE: dict[str, Path] = {}


def trained_runs(workdir: Path) -> None:
    """checkpoints/ph (profiles on, snapshots every 2 of 6 steps) and checkpoints/plain (off), trained once
    per session and copied into each case's folder."""
    if "root" not in _CACHE:
        root = Path(workdir).parent / "posthoc_runs"
        root.mkdir(exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with contextlib.chdir(root):
            common = TINY + ["train.max_steps=6", "data.num_workers=0"]
            train(load_config(DIGITS, common + ["run_name=ph", "train.ema_profiles=[0.05,0.1]",
                                                "train.ema_snapshot_every=2"]))
            train(load_config(DIGITS, common + ["run_name=plain"]))
        torch.set_num_threads(threads)
        _CACHE["root"] = root
    shutil.copytree(_CACHE["root"] / "checkpoints", Path(workdir) / "checkpoints")


def without_snapshot(workdir: Path) -> None:
    trained_runs(workdir)
    (Path(workdir) / "checkpoints/ph/ema/ema_0000002.pt").unlink()


SAMPLE = ["sample.py", "--device", "cpu", "--num-samples", "2", "--out", "out"]
EVAL = ["evaluate.py", "--device", "cpu", "--num-samples", "4", "--results-dir", "res"]
KEEP = ("checkpoints/*/*.pt", "checkpoints/*/ema/*.pt")
CASES = [
    Case("sample-ema-length", [*SAMPLE, "--checkpoint", "checkpoints/ph/last.pt", "--ema-length", "0.08"], 0,
         r"post-hoc EMA sigma_rel=0\.08 at step 6: from 3 snapshot.*wrote 2 images", trained_runs, keep=KEEP),
    Case("sample-ema-length-out-of-range", [*SAMPLE, "--checkpoint", "checkpoints/ph/last.pt",
                                            "--ema-length", "0.5"], 1,
         r"error: --ema-length = 0\.5 .*in \(0, 0\.2887\)",
         trained_runs, keep=KEEP, absent=("out",)),
    Case("sample-ema-length-without-profiles", [*SAMPLE, "--checkpoint", "checkpoints/plain/last.pt",
                                                "--ema-length", "0.08"], 1,
         r"error: the checkpoint tracked no post-hoc EMA profiles.*train\.ema_profiles", trained_runs, keep=KEEP,
         absent=("out",)),
    Case("sample-ema-length-missing-snapshot", [*SAMPLE, "--checkpoint", "checkpoints/ph/last.pt",
                                                "--ema-length", "0.08"], 1,
         r"error: post-hoc EMA snapshot '.*ema_0000002\.pt' is missing", without_snapshot, keep=KEEP, absent=("out",)),
    Case("sample-ema-length-no-ema", [*SAMPLE, "--checkpoint", "checkpoints/ph/last.pt", "--no-ema",
                                      "--ema-length", "0.08"], 1, r"error: --ema-length .*drop --no-ema", trained_runs,
         keep=KEEP, absent=("out",)),
    Case("evaluate-ema-length-out-of-range", [*EVAL, "--checkpoint", "checkpoints/ph/last.pt", "--ema-length", "0"],
         1, r"error: --ema-length = 0 ", trained_runs, keep=KEEP, absent=("res",)),
    Case("evaluate-ema-length-without-profiles", [*EVAL, "--checkpoint", "checkpoints/plain/last.pt",
                                                  "--ema-length", "0.08"], 1,
         r"error: the checkpoint tracked no post-hoc EMA profiles", trained_runs, keep=KEEP, absent=("res",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ema_length_command_line(case, tmp_path):
    run_case(case, tmp_path)


def test_sampled_images_follow_the_ema_length(tmp_path):
    """--ema-length changes the weights: 0.05 and 0.25 give different samples from the same seed, and the
    length of a tracked profile reproduces that profile's own weights."""
    trained_runs(tmp_path)
    from sampling.loading import load_for_sampling
    ckpt_path = tmp_path / "checkpoints/ph/last.pt"
    ckpt = load_checkpoint(ckpt_path)
    short = load_for_sampling(ckpt_path, ema_length=0.05)[0].state_dict()
    long = load_for_sampling(ckpt_path, ema_length=0.25)[0].state_dict()
    assert not torch.equal(short["conv_in.weight"], long["conv_in.weight"])
    # The tracked 0.05 profile at the checkpoint's step is itself a candidate: the fit recovers it.
    tracked = ckpt["phema"]["averages"][0]["conv_in.weight"]
    assert torch.allclose(short["conv_in.weight"], tracked, atol=1e-5 * max(1.0, tracked.abs().max().item()))
    assert not math.isclose(float((long["conv_in.weight"] - tracked).abs().max()), 0.0, abs_tol=1e-6)
