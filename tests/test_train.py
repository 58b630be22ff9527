"""train.py: exact resume, checkpoints (corrupt files, config changes), NaN guard, SIGTERM, logs, helpers.

Every run is a tiny CPU config (8x8 digits, an 8-channel U-Net, T=20) in a temporary working directory,
so checkpoints/ and results/ of the repository are never touched.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import training.trainer as train_mod
from config import ConfigError, load_config
from dataset import build_dataset
from storage.checkpoints import CheckpointError, load_checkpoint
from train import main
from training.data_order import EpochBatches, KeyedItems
from training.ema import EMA
from training.parts import LossWatch, lr_factor, warmup_length
from training.trainer import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
TINY = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.dropout=0.1",
        "model.num_classes=0",
        "diffusion.num_timesteps=20", "train.batch_size=16", "train.warmup_steps=2", "train.amp=off",
        "train.log_every=4", "train.sample_every=1000", "train.ckpt_every=1000", "train.num_sample_images=4",
        "train.sample_steps=2", "sample.steps=2"]


def tiny(run_name, *extra):
    return load_config(DIGITS, TINY + [f"run_name={run_name}", *extra])


def ckpt(run_name, name="last.pt"):
    return load_checkpoint(Path("checkpoints") / run_name / name)


def assert_same_state(a, b):
    """Bitwise equality of two nested checkpoint structures (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def assert_resume_exact(straight, resumed):
    for key in ("model", "ema", "ema_num_updates", "optimizer", "lr_scheduler", "data_state", "step", "rng"):
        assert_same_state(straight[key], resumed[key])


pytestmark = pytest.mark.usefixtures("workdir")  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers
def test_lr_factor_warmup_then_cosine_to_floor():
    cfg = tiny("lr", "train.warmup_steps=4", "train.max_steps=14", "train.lr_schedule=cosine",
               "train.min_lr_ratio=0.1").train
    f = lr_factor(cfg)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    constant = lr_factor(tiny("lr", "train.warmup_steps=0", "train.lr_schedule=constant").train)
    assert constant(0) == constant(10 ** 6) == 1.0


def test_warmup_fraction_is_a_share_of_the_run_capped_by_warmup_steps():
    def warmup(*overrides):
        return warmup_length(tiny("lr", "train.warmup_steps=500", *overrides).train)
    assert warmup("train.max_steps=1000") == 500                                # unset: warmup_steps as is
    assert warmup("train.max_steps=1000", "train.warmup_fraction=0.05") == 50   # a 1000-step run warms up 5%
    assert warmup("train.max_steps=30000", "train.warmup_fraction=0.05") == 500  # long runs: the cap
    assert warmup("train.max_steps=10", "train.warmup_fraction=0.05") == 1      # rounded up, never 0
    assert warmup("train.max_steps=10", "train.warmup_fraction=0") == 0
    assert warmup("train.max_steps=100", "train.warmup_fraction=0.07") == 7      # float noise is not a step
    f = lr_factor(tiny("lr", "train.warmup_steps=500", "train.max_steps=1000", "train.warmup_fraction=0.05",
                       "train.lr_schedule=cosine").train)
    assert f(0) == pytest.approx(1 / 50) and f(49) == 1.0 and f(50) == 1.0
    assert f(525) == pytest.approx(0.5) and f(1000) == pytest.approx(0.0)    # cosine from step 50 to 1000
    with pytest.raises(ConfigError, match="train.warmup_fraction"):
        tiny("lr", "train.warmup_fraction=1.5")


def test_ema_decay_warmup():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # n = 0: decay min(0.9, 1/10) = 0.1 -> ema = 0.1 ema + 0.9 param
    for e, s, p in zip(ema.model.parameters(), start, net.parameters()):
        torch.testing.assert_close(e, 0.1 * s + 0.9 * p)
    assert ema.num_updates == 1  # a skipped step does not call update (test_nonfinite_step_is_skipped_...)
    for _ in range(100):
        ema.update(net)
    assert float(ema.current_decay()) == pytest.approx(0.9)  # (1+n)/(10+n) > 0.9 from n = 80 on


def test_epoch_batches_are_a_function_of_seed_epoch_and_rank():
    a, b = EpochBatches(50, 4, seed=7), EpochBatches(50, 4, seed=7)
    assert torch.equal(a.rank_indices(3), b.rank_indices(3))
    assert not torch.equal(a.rank_indices(0), a.rank_indices(1))
    assert not torch.equal(a.rank_indices(0), EpochBatches(50, 4, seed=8).rank_indices(0))
    full = list(a)
    a.start = 5  # a resume inside the epoch continues with exactly the remaining batches
    assert list(a) == full[5:] and len(a) == len(full) - 5 == 12 - 5
    ranks = [EpochBatches(50, 4, seed=7, rank=r, world_size=3) for r in range(3)]
    shards = [set(s.rank_indices(0).tolist()) for s in ranks]
    assert set().union(*shards) == set(range(50)) and all(len(s) >= 16 for s in shards)
    assert len({s.batches_per_epoch for s in ranks}) == 1
    with pytest.raises(ConfigError, match="train.batch_size"):
        EpochBatches(10, 8, seed=0, world_size=2)


def write_image_folder(root: Path, n: int = 20) -> Path:
    g = torch.Generator().manual_seed(0)
    root.mkdir()
    for i in range(n):
        pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img_{i:02d}.png")
    return root


def test_keyed_items_flips_depend_only_on_seed_epoch_and_index(workdir):
    cfg = tiny("flips", "data.dataset=folder", f"data.root={write_image_folder(workdir / 'imgs')}",
               "data.random_flip=true", "model.in_channels=3")
    plain = build_dataset(load_config(DIGITS, TINY + ["data.dataset=folder", "data.root=imgs",
                                                      "data.random_flip=false", "model.in_channels=3"]).data)
    items = KeyedItems(build_dataset(cfg.data), seed=0, augmented=True)

    def flips(epoch):
        out = []
        for i in range(len(items)):
            x, unflipped = items[(epoch, i)][0], plain[i][0]
            assert torch.equal(x, unflipped) or torch.equal(x, unflipped.flip(-1))
            out.append(not torch.equal(x, unflipped))
        return out

    torch.manual_seed(123)
    before = torch.get_rng_state()
    e0 = flips(0)
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG stream is untouched
    assert 0 < sum(e0) < len(e0) and flips(0) == e0 and flips(1) != e0
    keys = [[(0, i) for i in range(10)], [(0, i) for i in range(10, 20)]]
    loaded = [torch.cat([x for x, _ in torch.utils.data.DataLoader(items, batch_sampler=keys, num_workers=w)])
              for w in (0, 2)]
    assert torch.equal(loaded[0], loaded[1])  # workers see exactly the main process's flips


# ----------------------------------------------------------------------------- exact resume
def test_resume_is_bitwise_exact_across_epochs_with_dropout_labels_and_accumulation():
    # 1797 digits / 64 = 28 batches per epoch = 14 steps with grad_accum 2: 18 steps cross an epoch.
    extra = ["train.batch_size=64", "train.grad_accum=2", "train.max_steps=18", "train.lr_schedule=cosine",
             "model.num_classes=10", "train.cond_drop_prob=0.3", "train.amp=bf16", "train.ckpt_every=6"]
    straight = train(tiny("straight", *extra))
    assert straight["step"] == 18 and straight["interrupted"] is None and straight["exit_code"] == 0
    first = train(tiny("resumed", *extra), stop_at=7)
    assert first["step"] == 7 and first["interrupted"] == "stop_at" and first["exit_code"] == 0
    assert ckpt("resumed")["step"] == 7
    second = train(tiny("resumed", *extra), resume=True)
    assert second["start_step"] == 7 and second["step"] == 18
    a, b = ckpt("straight"), ckpt("resumed")
    assert a["data_state"]["epoch"] == 1  # the run crossed an epoch boundary
    assert_resume_exact(a, b)
    assert_same_state(ckpt("straight", "step_0000012.pt")["model"], ckpt("resumed", "step_0000012.pt")["model"])
    assert not torch.equal(a["model"]["conv_in.weight"], ckpt("resumed", "step_0000007.pt")["model"]["conv_in.weight"])


def test_resume_is_exact_with_random_flips_and_changed_num_workers(workdir):
    root = write_image_folder(workdir / "imgs")
    extra = ["data.dataset=folder", f"data.root={root}", "data.random_flip=true", "model.in_channels=3",
             "train.batch_size=4", "train.max_steps=9"]  # 5 batches per epoch
    train(tiny("straight", *extra, "data.num_workers=2"))
    train(tiny("resumed", *extra, "data.num_workers=2"), stop_at=3)
    train(tiny("resumed", *extra, "data.num_workers=0"), resume=True)  # num_workers may change on resume
    assert_resume_exact(ckpt("straight"), ckpt("resumed"))


# ----------------------------------------------------------------------------- checkpoints
def test_resume_refuses_changed_model_config_and_allows_train_changes(capsys):
    train(tiny("run", "train.max_steps=2"))
    with pytest.raises(ConfigError) as err:
        train(tiny("run", "train.max_steps=3", "model.channels=16", "diffusion.schedule=linear"), resume=True)
    assert "model.channels: 8 -> 16" in str(err.value) and "diffusion.schedule: 'cosine' -> 'linear'" in str(err.value)
    assert main(["--config", DIGITS, "--resume", *TINY, "run_name=run", "model.dropout=0.0"]) == 1
    assert "model.dropout: 0.1 -> 0.0" in capsys.readouterr().err
    summary = train(tiny("run", "train.max_steps=4", "train.log_every=1", "data.num_workers=0"), resume=True)
    assert summary["start_step"] == 2 and summary["step"] == 4 and ckpt("run")["config"]["train"]["max_steps"] == 4


def test_corrupt_last_checkpoint_names_the_older_files_that_load(capsys):
    train(tiny("c", "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=2"))
    folder = Path("checkpoints/c")
    assert sorted(p.name for p in folder.glob("*.pt")) == ["last.pt", "step_0000004.pt", "step_0000006.pt"]
    data = (folder / "last.pt").read_bytes()
    (folder / "last.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    assert main(["--resume", "checkpoints/c/last.pt"]) == 1
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err
    assert "step_0000006.pt (step 6)" in err and "step_0000004.pt (step 4)" in err
    assert "python train.py --resume checkpoints/c/step_0000006.pt" in err
    (folder / "step_0000006.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:
        train(tiny("c", "train.max_steps=8"), resume=True)
    assert "step_0000004.pt (step 4)" in str(info.value) and "step_0000006" not in str(info.value)
    assert load_checkpoint(folder / "step_0000004.pt")["step"] == 4
    assert main(["--resume", "checkpoints/c/step_0000004.pt", "train.max_steps=5"]) == 0  # the hint works
    assert ckpt("c")["step"] == 5


def test_missing_checkpoint_and_fresh_run_over_an_existing_one(capsys):
    assert main(["--config", DIGITS, "--resume", *TINY, "run_name=none"]) == 1
    assert "cannot resume" in capsys.readouterr().err
    train(tiny("twice", "train.max_steps=2"))
    with pytest.raises(ConfigError, match="--overwrite"):
        train(tiny("twice", "train.max_steps=2"))
    summary = train(tiny("twice", "train.max_steps=1", "train.ckpt_every=1"), overwrite=True)
    assert summary["start_step"] == 0
    assert sorted(p.name for p in Path("checkpoints/twice").glob("*.pt")) == ["last.pt", "step_0000001.pt"]


# ----------------------------------------------------------------------------- NaN guard
class NaNAt(torch.nn.Module):
    """Wraps a network; its output is NaN on the listed training forward calls (1-based = step)."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def forward(self, x, t, y=None):
        out = self.inner(x, t, y)
        if self.training:
            self.calls += 1
            if self.calls in self.bad_calls or (-1 in self.bad_calls and self.calls >= min(self.bad_calls - {-1})):
                out = out * float("nan")
        return out


def test_nonfinite_step_is_skipped_without_changing_any_state(monkeypatch):
    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: NaNAt(build(cfg), {3}))
    summary = train(tiny("nan", "train.max_steps=4", "train.ckpt_every=1", "train.keep_last=10"))
    assert summary["skipped_steps"] == 1 and summary["step"] == 4
    s2, s3, s4 = (ckpt("nan", f"step_000000{i}.pt") for i in (2, 3, 4))
    for key in ("model", "ema", "ema_num_updates"):
        assert_same_state(s2[key], s3[key])  # the NaN step changed nothing
    assert_same_state(s2["optimizer"]["state"], s3["optimizer"]["state"])  # Adam's moments and step count
    assert not torch.equal(s3["model"]["inner.conv_in.weight"], s4["model"]["inner.conv_in.weight"])
    assert s3["lr_scheduler"]["last_epoch"] == 3
    history = s4["log_state"]["loss_history"]
    assert torch.isnan(history[2]) and torch.isfinite(history[[0, 1, 3]]).all()


def test_nonfinite_streak_stops_with_message_and_keeps_last_good_checkpoint(monkeypatch, capsys):
    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: NaNAt(build(cfg), {-1, 3}))  # NaN from step 3 on
    with pytest.raises(NonFiniteLossError, match=r"train.max_nonfinite=3") as err:
        train(tiny("div", "train.max_steps=50", "train.ckpt_every=2", "train.max_nonfinite=3"))
    # Steps 3-5 had NaN losses, so the weights of steps 2 and 4 (the ones saved) are not known to be good.
    assert "stopping at step 5" in str(err.value) and "is known to be good" in str(err.value)
    assert "saved (2, 4) already had a non-finite" in str(err.value)
    good, last = ckpt("div", "step_0000002.pt"), ckpt("div")
    assert last["step"] == 4 and not Path("checkpoints/div/step_0000005.pt").exists()
    assert_same_state(good["model"], last["model"])  # steps 3-4 were skipped: the weights are step 2's
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert main(["--config", DIGITS, *TINY, "run_name=div2", "train.max_steps=50", "train.max_nonfinite=2"]) == 1
    assert "non-finite" in capsys.readouterr().err


class ExplodeAt(NaNAt):
    """Its output is 1000x too large (a finite, exploding loss) from the given training forward call on."""

    def forward(self, x, t, y=None):
        out = self.inner(x, t, y)
        if self.training:
            self.calls += 1
            if self.calls >= min(self.bad_calls):
                out = out * 1000.0
        return out


def test_loss_watch_flags_losses_far_above_their_running_level():
    watch, finite = LossWatch(torch.device("cpu")), torch.tensor(True)
    flags = [float(watch(torch.tensor(v), finite)) for v in (0.5, 0.4, 6.0, 3.9, 0.3)]
    assert flags == [0, 0, 1, 0, 0]  # 6 > 10 x ~0.5; 3.9 is below it
    level = float(watch.level)
    assert float(watch(torch.tensor(50.0), finite)) == 1 and float(watch.level) == level  # not dragged up
    assert float(watch(torch.tensor(float("nan")), torch.tensor(False))) == 0 and float(watch.level) == level
    low = LossWatch(torch.device("cpu"), level=0.01)
    assert float(low(torch.tensor(0.9), finite)) == 0 and float(low(torch.tensor(1.1), finite)) == 1  # the floor


def test_exploding_loss_stops_and_rotation_keeps_the_last_good_checkpoint(monkeypatch):
    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: ExplodeAt(build(cfg), {5}))  # from step 5 on
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny("boom", "train.max_steps=50", "train.ckpt_every=1", "train.keep_last=2", "train.max_nonfinite=3"))
    message = str(err.value)
    assert "stopping at step 7" in message and "exploding loss" in message
    # Step 5's loss was computed with step 4's weights: step 3 is the last checkpoint known to be good.
    assert "last good checkpoint is checkpoints/boom/step_0000003.pt (step 3" in message
    assert "--resume checkpoints/boom/step_0000003.pt" in message
    names = sorted(p.name for p in Path("checkpoints/boom").glob("*.pt"))
    assert names == ["last.pt", "step_0000003.pt", "step_0000006.pt", "step_0000007.pt"]
    assert ckpt("boom", "step_0000003.pt")["step"] == 3


def test_resume_of_a_weights_file_that_does_not_fit_its_config_is_one_error(capsys):
    train(tiny("fit", "train.max_steps=1"))
    state = ckpt("fit")
    state["model"]["conv_in.weight"] = state["model"]["conv_in.weight"][:4]
    torch.save(state, "edited.pt")
    assert main(["--resume", "edited.pt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot resume: the weights in the checkpoint do not fit") and "conv_in.weight" in err


def test_resume_with_channels_last_toggled_restores_the_optimizer_state_in_each_layout():
    extra = ["train.max_steps=3", "train.lr=3e-3", "model.dropout=0.0"]  # dropout masks follow the layout
    first = train(tiny("cl", *extra, "train.channels_last=true", "train.ckpt_every=2"), stop_at=2)
    assert first["step"] == 2
    moments = ckpt("cl", "step_0000002.pt")["optimizer"]["state"]
    assert any(v.dim() == 4 and not v.is_contiguous() for s in moments.values() for v in s.values())
    for run, flag in (("same", "true"), ("toggled", "false")):
        trainer = train_mod.Trainer(tiny(run, *extra, f"train.channels_last={flag}"),
                                    Path("checkpoints/cl/step_0000002.pt"), None, False, None)
        try:
            # the fused kernel is the one that pairs moments by memory position
            assert trainer.optimizer.defaults["fused"]
            for param, state in trainer.optimizer.state.items():
                assert all(v.stride() == param.stride() for v in state.values() if v.dim())
            trainer.run()
        finally:
            trainer.close()
    # Adam's moments after the resumed step (the weights themselves are no test: Adam's m / sqrt(v) turns
    # the tiny NCHW vs channels_last rounding differences of near-zero gradients into lr-sized steps).
    same, toggled = ckpt("same")["optimizer"]["state"], ckpt("toggled")["optimizer"]["state"]
    assert ckpt("toggled")["step"] == 3 and same.keys() == toggled.keys()
    for index in same:
        for key in ("exp_avg", "exp_avg_sq"):
            scale = same[index][key].abs().max().item()
            torch.testing.assert_close(toggled[index][key], same[index][key], rtol=1e-3, atol=1e-3 * scale)


# ----------------------------------------------------------------------------- signals, logs, outputs
def test_sigterm_finishes_the_step_saves_and_prints_the_resume_command(workdir):
    out = workdir / "out.txt"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, "run_name=sig",
           "train.max_steps=100000"]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while "training sig:" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = out.read_text()
    assert "resume with: python train.py --resume checkpoints/sig/last.pt" in text
    step = ckpt("sig")["step"]
    assert step >= 1 and Path(f"checkpoints/sig/step_{step:07d}.pt").is_file()
    assert main(["--resume", "checkpoints/sig/last.pt", f"train.max_steps={step + 2}"]) == 0
    assert ckpt("sig")["step"] == step + 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_only_ctrl_c_is_told_that_ctrl_c_again_aborts(workdir, sig):
    """A SIGTERM (kill, SLURM, docker stop) is not a key press: its line has no Ctrl-C hint; Ctrl-C's has."""
    out = workdir / "out.txt"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, "run_name=hint",
           "train.max_steps=100000"]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"\| [1-9]\d*/100000", out.read_text()) and proc.poll() is None \
                and time.monotonic() < deadline:  # steps are running: the handler is installed
            time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 128 + sig, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert f"{sig.name}: finishing the current step, then saving a checkpoint" in text
    assert ("Ctrl-C again" in text) == (sig == signal.SIGINT), text[-3000:]


def test_sigterm_to_the_process_group_with_data_workers_still_saves(workdir):
    """torchrun / SLURM signal the whole process group: the data workers must leave shutdown to the main
    process, which finishes the step and saves (before, a worker died first and the save never happened)."""
    out = workdir / "out.txt"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, "run_name=pg",
           "train.max_steps=100000", "data.num_workers=2"]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"\| [1-9]\d*/100000", out.read_text()) and proc.poll() is None \
                and time.monotonic() < deadline:  # steps are running, so the workers are up
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert "killed by signal" not in text and "resume with: python train.py --resume checkpoints/pg/last.pt" in text
    step = ckpt("pg")["step"]
    assert step >= 1 and load_checkpoint(Path(f"checkpoints/pg/step_{step:07d}.pt"))["step"] == step


def test_tensorboard_scalars_loss_plot_and_sample_grid_are_written():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(tiny("logs", "train.max_steps=8", "train.sample_every=4", "model.num_classes=10"))
    acc = EventAccumulator("results/logs/logs")
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "train/skipped_steps"} <= scalars
    assert {"loss_by_t/t0000-0004", "loss_by_t/t0015-0019"} <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [4, 8]
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    assert acc.Tags()["images"] == ["samples/ema_ddim"]
    for png in ("results/plots/logs/loss.png", "results/images/logs/step_0000004.png",
                "results/images/logs/step_0000008.png"):
        with Image.open(png) as im:
            assert im.width >= 64 and im.height >= 64


def test_toy2d_writes_a_scatter_plot():
    cfg = load_config(REPO / "configs" / "toy2d.yaml",
                      ["device=cpu", "run_name=toy", "train.max_steps=5", "diffusion.num_timesteps=20",
                       "train.sample_steps=5", "train.num_sample_images=100", "model.mlp_hidden=16",
                       "sample.sampler=ddim", "sample.steps=5"])
    summary = train(cfg)
    assert summary["step"] == 5 and torch.isfinite(torch.tensor(summary["final_loss"]))
    with Image.open("results/images/toy/step_0000005.png") as im:
        assert im.width > 400


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match=r"model.in_channels=3.*set model.in_channels=1"):
        train(tiny("bad", "model.in_channels=3"))
    with pytest.raises(ConfigError, match=r"model.num_classes=5.*10 classes"):
        train(tiny("bad", "model.num_classes=5"))
    with pytest.raises(ConfigError, match="has no class labels"):
        train(tiny("bad", "data.dataset=toy2d", "model.kind=mlp", "model.in_channels=2", "model.num_classes=3"))
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA GPU"):
        train(tiny("bad", "train.amp=fp16"))
    with pytest.raises(ConfigError, match="train.batch_size"):
        train(tiny("bad", "train.batch_size=4096"))


def test_cli_prints_user_errors_without_traceback(capsys):
    assert main(["--config", DIGITS, "train.no_such_key=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.no_such_key" in err and "Traceback" not in err
