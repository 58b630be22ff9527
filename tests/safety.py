"""The harness of the safety tables (issue #12): each case runs a real command in a fresh working folder
and checks what a user sees and keeps.

A case names the command (a script of the repository and its arguments), the exit code, a regex that
the output must match, and globs of files (relative to the working folder) whose bytes must not change.
An exit code of 1 also means: no traceback, and the error is one line (lines of warnings aside).
The test modules `test_safety_*.py` hold the tables; `run_case` is all they share.
"""
from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
# A tiny digits run on CPU: 8x8 images, an 8-channel U-Net, T=20 (a few seconds to train a few steps).
TINY = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.num_classes=0",
        "diffusion.num_timesteps=20", "train.batch_size=16", "train.warmup_steps=2", "train.amp=off",
        "train.log_every=4", "train.sample_every=1000", "train.ckpt_every=1000", "train.num_sample_images=4",
        "train.sample_steps=2", "sample.steps=2", "sample.num_samples=4", "sample.batch_size=4"]


@dataclass
class Case:
    id: str
    argv: list[str]                      # ["train.py", "--config", DIGITS, ...]: a script of the repo first
    rc: int = 1
    pattern: str = ""                    # regex searched (re.S | re.I) in stdout + stderr
    setup: Optional[Callable[[Path], None]] = None   # builds the user's files in the working folder
    keep: tuple[str, ...] = ()           # globs whose files must keep their bytes (and still exist)
    absent: tuple[str, ...] = ()         # globs that must match nothing afterwards (e.g. files written outside)
    env: dict = field(default_factory=dict)
    timeout: float = 300
    address_space: Optional[int] = None  # bytes: RLIMIT_AS of the command (`ulimit -v`), for cases that would
    #                                      allocate without bound: they fail fast instead of swapping the machine


def snapshot(root: Path, globs) -> dict[str, str]:
    files = {}
    for pattern in globs:
        for path in sorted(root.glob(pattern)):
            if path.is_file():
                files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def error_lines(text: str) -> list[str]:
    """The lines of output that are not warnings, progress bars (and their clearing: blanks, cursor moves) or blank."""
    skip = re.compile(r"warn|^(\s|\x1b\[[0-9;]*[A-Za-z])*$|it/s|s/it|\d+%\|", re.I)
    return [line for line in text.splitlines() if not skip.search(line)]


def run_case(case: Case, workdir: Path) -> subprocess.CompletedProcess:
    """Runs one case in `workdir` and asserts its contract; returns the finished process for more checks."""
    workdir.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(workdir)
    before = snapshot(workdir, case.keep)
    assert before or not case.keep, f"{case.id}: the setup made none of the files to keep {case.keep}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **case.env}
    script, *args = case.argv
    limit = case.address_space

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=case.timeout, stdin=subprocess.DEVNULL,
                          preexec_fn=cap_memory if limit else None)
    out = proc.stdout + proc.stderr
    assert proc.returncode == case.rc, f"{case.id}: exit {proc.returncode}, expected {case.rc}\n{out[-3000:]}"
    if case.pattern:
        assert re.search(case.pattern, out, re.S | re.I), f"{case.id}: no /{case.pattern}/ in\n{out[-3000:]}"
    if case.rc == 1:
        assert "Traceback" not in out, f"{case.id}: a traceback\n{out[-3000:]}"
        assert len(error_lines(proc.stderr)) == 1, f"{case.id}: the error is not one line\n{proc.stderr[-3000:]}"
    after = snapshot(workdir, case.keep)
    assert after == before, f"{case.id}: user files changed or vanished: {set(before.items()) ^ set(after.items())}"
    for pattern in case.absent:
        found = list(workdir.glob(pattern))
        assert not found, f"{case.id}: {found} should not exist"
    return proc
