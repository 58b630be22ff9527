"""Building blocks of train.py's training loop, apart from the Trainer itself: process layout (DDP), EMA,
optimizer and LR schedule, resume checks, stop signals, logging and device-side step statistics.
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

from config import Config, ConfigError, from_dict, parse_overrides, to_dict, validate
from utils import CheckpointError, check_cuda_index, get_device, list_checkpoints, load_checkpoint, save_loss_plot

# Resuming may change these; any other change under seed/data/model/diffusion means another experiment.
RESUME_FIXED = ("seed", "data.", "model.", "diffusion.")
RESUME_MUTABLE = ("data.num_workers", "data.root", "data.download")
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
    n updates so far, so early averages are not dominated by the random init. Device-side: `skip`
    (0-dim float, 1 = skip) turns an update into a no-op without a host sync."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        device = next(self.model.parameters()).device
        self.num_updates = torch.zeros((), dtype=torch.float64, device=device)

    def current_decay(self) -> torch.Tensor:
        if not self.warmup:
            return torch.full_like(self.num_updates, self.decay)
        n = self.num_updates
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        weight = 1 - self.current_decay()                       # ema <- ema + weight * (param - ema)
        if skip is not None:
            weight = weight * (1 - skip)
        ema_params = list(self.model.parameters())
        # A list of 0-dim tensor weights keeps this on the device (a tensor "Scalar" would call .item()).
        torch._foreach_lerp_(ema_params, list(model.parameters()), [weight.float()] * len(ema_params))
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1 if skip is None else 1 - skip.double()


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
    """AdamW (identical to Adam at weight_decay 0). The fused kernel also takes a found_inf flag, which
    skips a non-finite step on the device; foreach is the fallback where fused is unsupported."""
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), foreach=True, **kwargs)


# ----------------------------------------------------------------------------- resume checks
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_differences(old: dict, new: Config) -> list[str]:
    """'key: old -> new' for every changed key that defines the experiment (seed, data, model, diffusion)."""
    flat_old, flat_new = _flatten(to_dict(from_dict(old))), _flatten(to_dict(new))
    return [f"  {key}: {flat_old[key]!r} -> {flat_new[key]!r}" for key in sorted(flat_new)
            if key.startswith(RESUME_FIXED) and key not in RESUME_MUTABLE and flat_old[key] != flat_new[key]]


def loadable_checkpoints(folder: Path, exclude: Optional[Path] = None) -> list[tuple[Path, int]]:
    """(path, step) of the step files in folder that load, newest first."""
    good = []
    for path in reversed(list_checkpoints(folder)):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            good.append((path, int(load_checkpoint(path)["step"])))
        except (CheckpointError, KeyError, TypeError, ValueError):
            pass
    return good


def load_resume_checkpoint(path: str | Path) -> dict:
    """The checkpoint to resume from; on failure a CheckpointError naming the older files that load."""
    path = Path(path)
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        reason = str(err).split(" Other checkpoints in")[0].split(" Train one first")[0]
        good = loadable_checkpoints(path.parent, exclude=path)
        if good:
            names = ", ".join(f"{p} (step {s})" for p, s in good)
            hint = (f" These older checkpoints load: {names}. Resume from the newest with: "
                    f"python train.py --resume {good[0][0]}")
        else:
            hint = " No other checkpoint in that folder loads: start the run again without --resume."
        raise CheckpointError(f"cannot resume: {reason}{hint}") from None


def config_for_resume(ckpt: dict, overrides: list[str]) -> Config:
    """The checkpoint's own config with command-line overrides applied (for --resume PATH without --config)."""
    def merge(base: dict, extra: dict) -> dict:
        for key, value in extra.items():
            nested = isinstance(value, dict) and isinstance(base.get(key), dict)
            base[key] = merge(base[key], value) if nested else value
        return base
    return validate(from_dict(merge(to_dict(from_dict(ckpt["config"])), parse_overrides(overrides))))


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
    """TensorBoard scalars/images, the tqdm bar and results/plots/<run>/loss.png (`results_root`: train.py's
    RESULTS_ROOT, passed in so that train.py stays the one place that names the output folders)."""

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


# ----------------------------------------------------------------------------- device-side step bookkeeping
class LaggedRead:
    """Host value of a device scalar without a sync: on CUDA the copy lands in pinned memory and is read
    once its event has completed (a step or so late, fine for a stop check on a value that only grows);
    on CPU the tensor is read directly."""

    def __init__(self, device: torch.device):
        self.cuda, self.value, self.pending = device.type == "cuda", 0.0, []

    def __call__(self, tensor: torch.Tensor) -> float:
        if not self.cuda:
            return float(tensor)
        while self.pending and self.pending[0][1].query():
            self.value = float(self.pending.pop(0)[0])
        if len(self.pending) < 4:  # the GPU is far behind: skip this copy, a later one will land
            host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event))
        return self.value


class LossWatch:
    """Flags a loss that explodes while staying finite (divergence that the NaN guard alone sees too late):
    loss > max(FACTOR x its running level, FLOOR). The running level is an EMA of the healthy losses only,
    so a diverging run cannot drag it up; it lags above a falling loss, which makes the rule conservative.
    FLOOR: an epsilon-prediction model that outputs zeros has loss 1, so no healthy run stays above it
    for long. Device-side (no host sync); `level` 0 = no healthy loss seen yet (nothing is flagged)."""

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


class StepStats:
    """Per-step numbers kept on the device between two log points (reading them is a host sync)."""

    def __init__(self, capacity: int, device: torch.device):
        self.loss = torch.full((capacity,), float("nan"), device=device)  # mean loss per step, NaN = skipped
        self.q_sum, self.q_count = torch.zeros(4, device=device), torch.zeros(4, device=device)
        self.grad_norm_sum, self.grad_norm_max = torch.zeros((), device=device), torch.zeros((), device=device)
        self.skipped, self.n = torch.zeros((), device=device), 0
        self.bad = torch.zeros(capacity, device=device)  # 1 = an unhealthy step (non-finite or exploding loss)

    def record(self, loss, q_sum, q_count, grad_norm, skip, bad) -> None:
        ok = skip == 0
        self.bad[self.n] = bad
        self.loss[self.n] = torch.where(ok, loss, float("nan"))
        self.q_sum += torch.where(ok, q_sum, 0.0)
        self.q_count += torch.where(ok, q_count, 0.0)
        norm = torch.where(ok, grad_norm, 0.0)
        self.grad_norm_sum += norm
        torch.maximum(self.grad_norm_max, norm, out=self.grad_norm_max)
        self.skipped += skip
        self.n += 1

    def reset(self) -> None:
        for t in (self.q_sum, self.q_count, self.grad_norm_sum, self.grad_norm_max, self.skipped):
            t.zero_()
        self.loss.fill_(float("nan"))
        self.bad.zero_()
        self.n = 0

