"""Safety table of the training runtime (issue #12): run lock, temp files, unreadable and incomplete resume
checkpoints, divergence; plus unit tests of the checkpoint file helpers in utils.py."""
from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
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


TRAIN = ["train.py", "--config", DIGITS, *TINY]
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
