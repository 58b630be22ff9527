"""The run's folder on disk: where runs live, the lock that keeps a second train.py off a run, clearing or
refusing an existing run, which checkpoint --resume means, and which step files hold good weights (kept
by the rotation, named after a divergence). Library code of training/trainer.py.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from config import ConfigError
from storage.checkpoints import list_checkpoints
from storage.files import check_output_folder, check_output_path, remove_temp_files
from storage.paths import RESULTS as RESULTS_ROOT
from storage.paths import RunPaths


# ----------------------------------------------------------------------------- run lock
class RunLockedError(ConfigError):
    """Another live process trains the same run folder."""


class RunLock:
    """An exclusive fcntl.flock on <run folder>/.lock, which holds "PID host" for the message. The kernel
    drops the lock when its process dies (even by kill -9), so a lock file left by a dead process is simply
    taken over. The file itself stays: deleting it could let two processes lock two different files."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path, self.fd, self.created_folder = Path(folder) / self.NAME, None, not Path(folder).exists()

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no lock, as before
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise RunLockedError(f"{self.path.parent}/ is in use by another train.py (PID {pid} on {host}), "
                                 f"which holds {self.path}: wait for it to finish or stop it, or train under "
                                 f"another name with run_name=NEW_NAME") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Unlock; a folder this lock created and nothing else filled is removed again (a run that failed
        during setup leaves no trace)."""
        if self.fd is None:
            return
        folder = self.path.parent
        if self.created_folder and [p.name for p in folder.iterdir()] == [self.NAME]:
            self.path.unlink(missing_ok=True)
            folder.rmdir()
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None


def lock_run_dir(run_dir: Path, info) -> Optional[RunLock]:
    """Rank 0 locks the run folder (RunLock), so a second train.py of the same run refuses instead of
    overwriting this one's files; then it clears temp files that killed saves left there. `info`: DistInfo."""
    lock = error = None
    check_output_folder(run_dir)  # the lock file too stays inside checkpoints/
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as err:
            error = err
    if info.enabled:  # every rank stops if rank 0 could not lock
        flag = torch.tensor([float(error is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=info.control)
        if flag.item() and error is None:
            error = RunLockedError(f"{run_dir}/ is in use by another train.py (see rank 0's message)")
    if error is not None:
        raise error
    if info.is_main and (removed := remove_temp_files(run_dir)):
        tqdm.write(f"note: removed {len(removed)} temp file(s) of interrupted saves from {run_dir}/")
    return lock


def run_files(run_name: str) -> list[Path]:
    """What training writes in the run's folders, so what a fresh run would replace: checkpoints and post-hoc
    EMA snapshots, sample grids, the loss plot, TensorBoard logs (sample.py's own folders are not among them)."""
    paths = RunPaths(run_name)
    found = sorted(paths.ema_snapshots.glob("ema_*.pt")) + list_checkpoints(paths.checkpoints)
    found += sorted(paths.images.glob("step_*.png")) + sorted(paths.logs.glob("*"))
    rewritten = [paths.checkpoints / "last.pt", paths.plots / "loss.png"]
    return found + [p for p in rewritten if p.exists() or p.is_symlink()]


def check_run_folders(run_name: str, resuming: bool) -> None:
    """No folder of the run leads out of checkpoints/ or results/ through a link, and (resuming) the files
    every save replaces are no links (storage.files.check_output_path): refused before any long work. A
    fresh run finds no such file: it refuses them as an earlier run's, or deletes them with --overwrite."""
    paths = RunPaths(run_name)
    for folder in (paths.checkpoints, paths.ema_snapshots, paths.images, paths.plots, paths.logs):
        check_output_folder(folder)
    for path in (paths.checkpoints / "last.pt", paths.plots / "loss.png") if resuming else ():
        check_output_path(path, replace=True)


def prepare_run_dir(run_name: str, info, resuming: bool, overwrite: bool) -> None:
    """A fresh run over files of an earlier one (run_files: checkpoints, grids, plot, logs): a ConfigError
    unless `overwrite`, which deletes them (rank 0, after every rank has looked). First check_run_folders."""
    check_run_folders(run_name, resuming)
    existing = run_files(run_name)
    if info.enabled:
        dist.barrier(group=info.control)
    if existing and not resuming and not overwrite:
        shown = ", ".join(map(str, existing[:2])) + (f" and {len(existing) - 2} more" if len(existing) > 2 else "")
        raise ConfigError(f"run_name={run_name} already holds a run ({shown}). Continue it with --resume, start "
                          f"a separate run with run_name=NEW_NAME, or pass --overwrite to delete it and start over.")
    if existing and not resuming and info.is_main:
        for path in existing:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)  # a link goes, never what it points to


def end_message(run_name: str, step: int, interrupted: Optional[str], saved: bool, wall: float,
                launcher: Optional[str]) -> Optional[str]:
    """What rank 0 prints when a run ends: where its files are, or how to resume it (`launcher`: the
    torchrun command line of a DDP run, None = python train.py). None after stop_at."""
    last = RunPaths(run_name).checkpoints / "last.pt"
    if interrupted == "stop_at":
        return None
    if interrupted and not saved:
        return f"stopped by {interrupted} before the first step: nothing was saved"
    if interrupted:
        return (f"stopped by {interrupted} at step {step}: saved {last}\n"
                f"resume with: {launcher or 'python train.py'} --resume {last}")
    return (f"finished {run_name}: step {step} in {wall / 60:.1f} min | checkpoint {last} | "
            f"samples {RunPaths(run_name).images}/ | loss plot {RunPaths(run_name).plots}/loss.png | "
            f"tensorboard --logdir {RESULTS_ROOT / 'logs'} | sample with: python sample.py --checkpoint {last}")


# ----------------------------------------------------------------------------- checkpoint files


def start_message(cfg, *, step: int, params: int, items: int, world_size: int, device: torch.device, amp: str,
                  channels_last: bool) -> str:
    """The line a run starts with: what trains, on what, and where its checkpoints go."""
    where = f"resuming at step {step}" if step else "starting"
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    return (f"training {cfg.run_name}: {where} of {cfg.train.max_steps} | {params / 1e6:.2f}M parameters | "
            f"{items} items, batch {cfg.train.batch_size} x {cfg.train.grad_accum} accum x {world_size} "
            f"process(es) | {device}{threads}, amp {amp}, {'channels_last' if channels_last else 'NCHW'} | "
            f"checkpoints in {RunPaths(cfg.run_name).checkpoints}/")


class CheckpointHealth:
    """Which checkpoints of a run hold good weights. The loss of the step after a checkpoint is the verdict
    on its weights (that loss is computed with exactly them); a diverging run must neither rotate away nor
    fail to name the last checkpoint it could be resumed from."""

    def __init__(self, run_dir: Path, keep_last: int, resumed_from: Optional[Path], start_step: int):
        self.run_dir, self.keep_last, self.resumed_from, self.start_step = run_dir, keep_last, resumed_from, start_step
        self.saved = [start_step] if resumed_from is not None else []  # steps saved by this process (rank 0)
        self.bad: set[int] = set()                                     # steps with an unhealthy loss
        self.seen_through = start_step                                 # steps whose loss is known

    def record(self, step: int, bad: bool) -> None:
        self.seen_through = step
        if bad:
            self.bad.add(step)

    def good_step(self) -> Optional[int]:
        """The newest step saved (or resumed from) whose next step had a finite, non-exploding loss."""
        return next((s for s in reversed(self.saved) if s < self.seen_through and s + 1 not in self.bad), None)

    def rotate(self, step: int) -> None:
        """Keep the keep_last newest step files, and always the newest good one."""
        ours = [p for p in list_checkpoints(self.run_dir) if int(p.stem.split("_")[1]) <= step]
        keep, good = set(ours[-self.keep_last:]), self.good_step()
        if good is not None:
            keep.add(self.run_dir / f"step_{good:07d}.pt")
        for old in ours:
            if old not in keep:
                old.unlink(missing_ok=True)

    def good_path(self, good: Optional[int], last_saved: Optional[int]) -> Optional[Path]:
        """The file holding step `good`: its step file, or the file this run resumed from if that was not
        overwritten since (a last.pt is rewritten by every save)."""
        if good is None:
            return None
        step_file = self.run_dir / f"step_{good:07d}.pt"
        if step_file.is_file():
            return step_file
        resumed = self.resumed_from
        if good == self.start_step and resumed is not None and resumed.is_file() and (
                last_saved == good or resumed.resolve() != (self.run_dir / "last.pt").resolve()):
            return resumed
        return None

    def hint(self, last_saved: Optional[int]) -> str:
        """What to do after a divergence: resume from the last good checkpoint, or start again."""
        good, advice = self.good_step(), ("lower train.lr or set train.grad_clip (and use train.amp=bf16 or off "
                                          "rather than fp16)")
        path = self.good_path(good, last_saved)
        if path is not None:
            after = [s for s in self.saved if s > good]
            later = (f"; the checkpoints saved after it (step {after[0]}{f'-{after[-1]}' if len(after) > 1 else ''}, "
                     f"and so last.pt) hold weights of the unhealthy steps" if after else "")
            return (f"The last good checkpoint is {path} (step {good}: the step after it still had a normal "
                    f"loss){later}. To continue from it, {advice}, then run with --resume {path}.")
        if good is not None:
            return f"The last good checkpoint (step {good}) is no longer on disk: {advice} and start again."
        if self.saved:
            return (f"No checkpoint of this run is known to be good: the step after each one saved "
                    f"({', '.join(map(str, self.saved[-5:]))}) already had a non-finite or exploding loss. "
                    f"{advice[0].upper() + advice[1:]} and start again.")
        return f"No checkpoint was written yet: {advice} and start again."
