"""Safety table of the training runtime (issue #12): run lock, temp files, unreadable and incomplete resume
checkpoints, divergence; plus unit tests of the checkpoint file helpers in utils.py."""
from __future__ import annotations

import argparse
import fcntl
import functools
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from config import load_config, to_dict
from model import build_model
from safety import DIGITS, REPO, TINY, Case, run_case
from storage.checkpoints import CheckpointError, copy_checkpoint, load_checkpoint, loadable_checkpoints, save_checkpoint
from storage.files import remove_temp_files

HELD = []  # lock files this test process holds (closed after each test)


@pytest.fixture(autouse=True)
def release_held_locks():
    yield
    while HELD:
        os.close(HELD.pop())


def hold_lock(run: str):
    """Setup: this test process holds checkpoints/<run>/.lock (as a live train.py would) over a run's files."""
    def setup(root: Path):
        folder = root / "checkpoints" / run
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"the other run's checkpoint")
        (folder / ".step_0000009.pt.0123456789ab.tmp").write_bytes(b"the other run's save in progress")
        (root / "results" / "logs" / run).mkdir(parents=True)
        (root / "results" / "logs" / run / "events.out").write_bytes(b"the other run's log")
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()} otherhost\n".encode())
        HELD.append(fd)
    return setup


def stale_lock_and_temp_files(root: Path):
    """A lock file left by a dead process, the temp file of a killed save, and a user's own .tmp file."""
    folder = root / "checkpoints" / "stale"
    folder.mkdir(parents=True)
    (folder / ".lock").write_text("999999 deadhost\n")
    (folder / ".last.pt.0123456789ab.tmp").write_bytes(b"half a checkpoint")
    (folder / ".step_0000002.pt.k3j_9x2q.tmp").write_bytes(b"half a checkpoint (tempfile.mkstemp's names)")
    (folder / "notes.tmp").write_text("mine")
    (root / ".last.pt.0123456789ab.tmp").write_text("outside the run folder: not ours to delete")


def empty_checkpoint(root: Path):
    (root / "checkpoints" / "empty").mkdir(parents=True)
    (root / "checkpoints" / "empty" / "last.pt").write_bytes(b"")


def unsafe_checkpoint(root: Path):
    torch.save({"config": {}, "model": {}, "args": argparse.Namespace(lr=1)}, root / "foreign.pt")


def weights_only_checkpoint(root: Path):
    """What an export or a hand-made file holds: config and weights, no training state."""
    cfg = load_config(DIGITS, TINY)
    net = build_model(cfg)
    torch.save({"format_version": 1, "step": 5, "config": to_dict(cfg), "model": net.state_dict()},
               root / "weights.pt")


def diverging_resume(root: Path):
    """A healthy 8-step run with checkpoints at 4 and 8 (the resume below diverges from step 8)."""
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, "run_name=dv",
                    "train.max_steps=8", "train.ckpt_every=4"], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


@functools.cache
def trained_run() -> Path:
    """A healthy 4-step tiny run, trained once per test process (the doctored cases copy its last.pt)."""
    root = Path(tempfile.mkdtemp(prefix="trained_run_"))
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, "run_name=t",
                    "train.max_steps=4"], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return root / "checkpoints" / "t" / "last.pt"


def doctored(change):
    """Setup: checkpoints/t/last.pt, a real checkpoint of train.py with `change(ckpt dict)` applied (a hand edit)."""
    def setup(root: Path):
        ckpt = torch.load(trained_run(), weights_only=True)
        change(ckpt)
        (root / "checkpoints" / "t").mkdir(parents=True)
        torch.save(ckpt, root / "checkpoints" / "t" / "last.pt")
    return setup


def set_entry(key, value):
    return doctored(lambda ckpt: ckpt.update({key: value}))


def nan_weights(ckpt):
    ckpt["model"]["conv_in.weight"] = ckpt["model"]["conv_in.weight"] * float("nan")


def two_step_run(run: str, then=None):
    """Setup: a 2-step run `run` (checkpoints/<run>/last.pt, loss plot, grid), then `then(root)`."""
    def setup(root: Path):
        subprocess.run([sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, f"run_name={run}",
                        "train.max_steps=2"], cwd=root, check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        if then is not None:
            then(root)
    return setup


def user_file(name: str, link: str = ""):
    """Setup: the user's file `name` (outside the run folders); with `link`, a symlink `link` -> it."""
    def setup(root: Path):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("the user's file")
        if link:
            (root / link).parent.mkdir(parents=True, exist_ok=True)
            (root / link).unlink(missing_ok=True)
            (root / link).symlink_to(root / name)
    return setup


def linked_folder(link: str, target: str):
    """Setup: the run folder `link` is a symlink to the folder `target` outside results/ and checkpoints/."""
    def setup(root: Path):
        (root / target).mkdir(parents=True)
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(root / target, target_is_directory=True)
    return setup


FULL_DISK = str(REPO / "tests" / "full_disk")  # its sitecustomize makes fsync of matching files fail (ENOSPC)


def full_disk(match: str) -> dict:
    return {"PYTHONPATH": FULL_DISK, "DDPM_TEST_FULL_DISK": match}


TRAIN = ["train.py", "--config", DIGITS, *TINY]
RESUME = ["train.py", "--resume", "checkpoints/t/last.pt", "train.max_steps=6"]
KEEP_RUN = ("checkpoints/t/*",)
NOTHING_WRITTEN = ("checkpoints/t/step_*", "results")
CASES = [
    Case("second-run-refused-while-locked", TRAIN + ["run_name=lk", "train.max_steps=2"], 1,
         rf"checkpoints/lk/ is in use by another train\.py \(PID {os.getpid()} on otherhost\)", hold_lock("lk"),
         keep=("checkpoints/lk/*", "checkpoints/lk/.*.tmp", "results/logs/lk/*"), absent=("results/images/lk",)),
    Case("stale-lock-taken-over-temp-files-cleaned", TRAIN + ["run_name=stale", "train.max_steps=1"], 0,
         r"removed 2 temp file", stale_lock_and_temp_files, keep=("checkpoints/stale/notes.tmp", ".*.tmp"),
         absent=("checkpoints/stale/.*.pt.*.tmp",)),
    Case("resume-from-empty-checkpoint", ["train.py", "--resume", "checkpoints/empty/last.pt"], 1,
         r"empty \(0 bytes\).*start the run again without --resume", empty_checkpoint,
         keep=("checkpoints/empty/last.pt",)),
    Case("resume-from-unsafe-file", ["train.py", "--resume", "foreign.pt"], 1,
         r"^(?!.*weights_only)(?=.*not a ddpm-lab checkpoint and may be unsafe)", unsafe_checkpoint,
         keep=("foreign.pt",)),
    Case("resume-from-weights-only-file", ["train.py", "--resume", "weights.pt"], 1,
         r"weights\.pt: it has no ema, ema_num_updates, optimizer, lr_scheduler, rng, data_state entries",
         weights_only_checkpoint, keep=("weights.pt",)),
    Case("diverging-resume-keeps-the-last-good-checkpoint",
         ["train.py", "--resume", "checkpoints/dv/last.pt", "train.lr=1e6", "train.ckpt_every=1", "train.keep_last=3",
          "train.max_steps=40", "train.max_nonfinite=4"], 1,
         r"last good checkpoint is checkpoints/dv/step_0000008\.pt \(step 8.*--resume checkpoints/dv/step_0000008\.pt",
         diverging_resume, keep=("checkpoints/dv/step_0000008.pt",)),
    # The training state inside a checkpoint is validated at load, before anything is written.
    Case("resume-negative-step", RESUME, 1, r"'checkpoints/t/last\.pt' holds an invalid step: -3, not a whole number",
         set_entry("step", -3), keep=KEEP_RUN, absent=NOTHING_WRITTEN),
    Case("resume-huge-step", RESUME, 1, r"invalid step: 10{30}, not a whole number in 0\.\.2\*\*63-1",
         set_entry("step", 10 ** 30), keep=KEEP_RUN, absent=NOTHING_WRITTEN),
    Case("resume-text-step", RESUME, 1, r"invalid step: 'four'", set_entry("step", "four"), keep=KEEP_RUN,
         absent=NOTHING_WRITTEN),
    Case("resume-garbage-rng", RESUME, 1, r"invalid rng: not a dict", set_entry("rng", "garbage"), keep=KEEP_RUN,
         absent=NOTHING_WRITTEN),
    Case("resume-rng-of-wrong-size", RESUME, 1, r"invalid rng: the state of rank 0 is malformed \(RuntimeError",
         doctored(lambda c: c["rng"]["ranks"][0].update(torch=torch.zeros(3, dtype=torch.uint8))), keep=KEEP_RUN,
         absent=NOTHING_WRITTEN),
    Case("resume-garbage-data-state", RESUME, 1, r"invalid data_state: position is None",
         set_entry("data_state", {"epoch": 0}), keep=KEEP_RUN, absent=NOTHING_WRITTEN),
    Case("resume-negative-data-position", RESUME, 1, r"invalid data_state: position is -7",
         doctored(lambda c: c["data_state"].update(position=-7)), keep=KEEP_RUN, absent=NOTHING_WRITTEN),
    Case("resume-nan-weights", RESUME, 1, r"model weights hold NaN or inf in 1 tensor \(conv_in\.weight\).*cannot "
         r"recover", doctored(nan_weights), keep=KEEP_RUN, absent=NOTHING_WRITTEN),
    Case("resume-from-raw-pickle", ["train.py", "--resume", "raw.pt"], 1, r"\A(?!.*truncated).*'raw\.pt' is a raw "
         r"pickle file", lambda root: (root / "raw.pt").write_bytes(pickle.dumps({"step": 1})), keep=("raw.pt",)),
    Case("resume-from-legacy-format-unsafe-file", ["train.py", "--resume", "old.pt"], 1,
         r"\A(?!.*truncated).*'old\.pt' is not a ddpm-lab checkpoint and may be unsafe",
         lambda root: torch.save({"config": {}, "model": {}, "args": argparse.Namespace()}, root / "old.pt",
                                 _use_new_zipfile_serialization=False), keep=("old.pt",)),
    # the output guard (storage.files.write_output): links out, files of an earlier run, a full disk
    Case("fresh-run-over-an-earlier-loss-plot", TRAIN + ["run_name=lp", "train.max_steps=1"], 1,
         r"run_name=lp already holds a run \(results/plots/lp/loss\.png\).*--overwrite",
         user_file("results/plots/lp/loss.png"), keep=("results/plots/lp/loss.png",)),
    Case("fresh-run-over-earlier-logs", TRAIN + ["run_name=lg", "train.max_steps=1"], 1,
         r"already holds a run \(results/logs/lg/events\.out", user_file("results/logs/lg/events.out"),
         keep=("results/logs/lg/*",)),
    Case("resume-loss-plot-is-a-link-out", ["train.py", "--resume", "checkpoints/sl/last.pt", "train.max_steps=3"], 1,
         r"'results/plots/sl/loss\.png' is a symbolic link",
         two_step_run("sl", user_file("outside.png", "results/plots/sl/loss.png")), keep=("outside.png",)),
    Case("plots-folder-is-a-link-out", TRAIN + ["run_name=pl", "train.max_steps=1"], 1,
         r"outside 'results' \(through the link 'results/plots/pl'\)", linked_folder("results/plots/pl", "elsewhere"),
         absent=("elsewhere/*",)),
    Case("logs-folder-is-a-link-out", TRAIN + ["run_name=ll", "train.max_steps=1"], 1,
         r"through the link 'results/logs/ll'", linked_folder("results/logs/ll", "elsewhere"), absent=("elsewhere/*",)),
    Case("disk-full-at-a-checkpoint-save", ["train.py", "--resume", "checkpoints/df/last.pt", "train.max_steps=4"], 1,
         r"error: no space left on device writing 'checkpoints/df/step_0000004\.pt' \([\d.]+ [KMG]B free\): free "
         r"some space",
         two_step_run("df"), keep=("checkpoints/df/last.pt", "checkpoints/df/step_0000002.pt"),
         absent=("checkpoints/df/.*.tmp",), env=full_disk("checkpoints/df/")),
    Case("disk-full-at-a-training-grid", TRAIN + ["run_name=dg", "train.max_steps=2"], 1,
         r"no space left on device writing 'results/images/dg/step_0000002\.png'", env=full_disk("step_0000002.png"),
         absent=("results/images/dg/step_0000002.png",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_safety_train(case, tmp_path):
    run_case(case, tmp_path)


# ----------------------------------------------------------------------------- checkpoint files (utils.py)
def test_checkpoints_are_written_with_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"step": 1}, tmp_path / "a.pt")
        copy_checkpoint(tmp_path / "a.pt", tmp_path / "b.pt")
        os.umask(0o077)
        save_checkpoint({"step": 1}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert [oct(os.stat(tmp_path / n).st_mode & 0o777) for n in ("a.pt", "b.pt", "c.pt")] == ["0o644", "0o644", "0o600"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]  # no temp file left


def test_remove_temp_files_takes_only_the_save_pattern(tmp_path):
    names = [".last.pt.0123456789ab.tmp", ".step_0000002.pt.k3j_9x2q.tmp", "notes.tmp", ".hidden.tmp", "last.pt"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_temp_files(tmp_path)) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\)"),
    (b"\x00garbage" * 10, r"corrupt or truncated \(80 bytes"),
    ("cut", r"corrupt or truncated \(2000 bytes"),
    ("unsafe", r"not a ddpm-lab checkpoint and may be unsafe to load \(it holds a argparse.Namespace object\)"),
])
def test_unreadable_checkpoints_are_one_clear_error(tmp_path, content, message):
    save_checkpoint({"step": 1, "config": {}, "model": {"w": torch.zeros(1000)}}, tmp_path / "good.pt")
    if content == "cut":
        content = (tmp_path / "good.pt").read_bytes()[:2000]
    elif content == "unsafe":
        torch.save({"config": {}, "model": {}, "args": argparse.Namespace()}, tmp_path / "bad.pt")
        content = (tmp_path / "bad.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path / "bad.pt")
    text = str(info.value)
    assert "\n" not in text and "weights_only" not in text and "good.pt" in text
    assert loadable_checkpoints(tmp_path) == ["good.pt"]
