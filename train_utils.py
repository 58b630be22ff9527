"""Building blocks of the Trainer (trainer.py), apart from resuming (train_resume.py): process layout (DDP),
EMA, optimizer and LR schedule, run lock, stop signals, logging, and the health of the loss and checkpoints.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from config import Config, ConfigError
from utils import check_cuda_index, get_device, list_checkpoints, save_loss_plot

PLOT_EVERY_S = 30.0                           # loss.png refresh interval (also at every sample/checkpoint)


# ----------------------------------------------------------------------------- distributed
class DistInfo:
    """Rank layout. `control` is a gloo group for host-side agreement (stop flags, RNG states), so
    those never touch the GPU stream even when the gradients go over NCCL."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, control=None, owner=False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.control, self.owner = control, owner

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """One process unless a launcher (torchrun) set WORLD_SIZE > 1: then one GPU per process (LOCAL_RANK)
    over NCCL, or CPU processes over gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = get_device(device_name)
    except RuntimeError as err:
        raise ConfigError(str(err)) from None
    if world <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        check_cuda_index(local_rank, f"LOCAL_RANK={local_rank}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return DistInfo(rank, world, local_rank, control, owner), device


# ----------------------------------------------------------------------------- model helpers
class EMA:
    """Exponential moving average of the weights, with decay warm-up min(decay, (1 + n) / (10 + n)) over the
    n updates so far, so early averages are not dominated by the random init.

    Not torch.optim.swa_utils.AveragedModel (get_ema_multi_avg_fn): its first update copies the weights
    instead of averaging them into the initial copy, it has no decay warm-up, and its state dict (a
    `module.` prefix, an n_averaged buffer) is not the checkpoint format (`ema`: the bare network's keys,
    `ema_num_updates`). So: the public in-place Tensor.lerp_, one call per tensor."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1 - self.current_decay()                       # ema <- ema + weight * (param - ema)
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param, weight)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1


def lr_factor(tcfg) -> Callable[[int], float]:
    """LambdaLR factor at optimizer step s: linear warm-up over train.warmup_steps, then constant or cosine
    annealing to train.min_lr_ratio at train.max_steps. A closure (not an object), so LambdaLR saves no
    copy of it and a resumed run uses the current max_steps."""
    warmup, total, cosine, floor = tcfg.warmup_steps, tcfg.max_steps, tcfg.lr_schedule == "cosine", tcfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    """AdamW (identical to Adam at weight_decay 0): the fused kernel (one launch for all parameters) where
    this torch supports it for the device, else foreach."""
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), foreach=True, **kwargs)


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


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """First Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals to the caller
            self._previous.clear()
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                   "(Ctrl-C again aborts without saving)")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------- logging (rank 0)
class RunLogger:
    """TensorBoard scalars/images, the tqdm bar and results/plots/<run>/loss.png (`results_root`: trainer.py's
    RESULTS_ROOT, passed in so that one place names the output folders)."""

    def __init__(self, cfg: Config, start_step: int, history: list[float], results_root: Path):
        from torch.utils.tensorboard import SummaryWriter  # slow import: only on the logging rank
        self.log_dir = results_root / "logs" / cfg.run_name
        self.plot_path = results_root / "plots" / cfg.run_name / "loss.png"
        # purge_step hides events a crashed run wrote after the checkpoint we resume from.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else None)
        self.history, self.run_name, self._plotted_at = history, cfg.run_name, 0.0
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.run_name, unit="step",
                        dynamic_ncols=True)

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def plot(self, force: bool = False) -> None:
        if self.history and (force or time.monotonic() - self._plotted_at > PLOT_EVERY_S):
            save_loss_plot(self.history, self.plot_path, title=f"{self.run_name}: training loss")
            self._plotted_at = time.monotonic()

    def close(self) -> None:
        self.plot(force=True)
        self.bar.close()
        self.writer.close()


# ----------------------------------------------------------------------------- health of the loss and checkpoints
class LossWatch:
    """Flags a loss that explodes while staying finite (divergence that the NaN guard alone sees too late):
    loss > max(FACTOR x its running level, FLOOR). The running level is an EMA of the healthy losses only,
    so a diverging run cannot drag it up; it lags above a falling loss, which makes the rule conservative.
    FLOOR: an epsilon-prediction model that outputs zeros has loss 1, so no healthy run stays above it
    for long. `level` 0 = no healthy loss seen yet (nothing is flagged)."""

    FACTOR, FLOOR, ALPHA = 10.0, 1.0, 0.05

    def __init__(self, device: torch.device, level: float = 0.0):
        self.level = torch.full((), float(level), device=device)

    def __call__(self, loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """1.0 if `loss` (0-dim) explodes, else 0.0; a finite, healthy loss updates the level."""
        exploded = (self.level > 0) & (loss > torch.clamp(self.level * self.FACTOR, min=self.FLOOR))
        healthy = finite & ~exploded
        start = torch.where(self.level > 0, self.level + self.ALPHA * (loss - self.level), loss)
        self.level = torch.where(healthy, start, self.level)
        return exploded.float()

    @staticmethod
    def level_from_history(history: list[float]) -> float:
        """A level for runs resumed from checkpoints that did not store one: the median of recent losses."""
        recent = [v for v in history[-50:] if math.isfinite(v)]
        return sorted(recent)[len(recent) // 2] if recent else 0.0


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
