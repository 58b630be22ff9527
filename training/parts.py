"""Building blocks of the Trainer (trainer.py): process layout (DDP), EMA, optimizer and LR schedule, stop
signals, the exploding-loss watch and the step's numbers (wrapping, clipping, the one host read). Run folder
and checkpoint files: storage/; resuming: training/resume.py.
"""
from __future__ import annotations

import math
import os
import signal
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from config import ConfigError
from utils import check_cuda_index, get_device, get_rng_state


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


def agreed_code(code: int, info: DistInfo) -> int:
    """A stop code agreed on by all ranks (largest wins; collective on the control group under DDP)."""
    if info.enabled:
        flag = torch.tensor([code])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=info.control)
        code = int(flag)
    return code


def gather_rng_states(info: DistInfo) -> list[dict]:
    """Every rank's RNG states, for rank 0's checkpoint (a collective under DDP)."""
    if not info.enabled:
        return [get_rng_state()]
    states = [None] * info.world_size
    dist.all_gather_object(states, get_rng_state(), group=info.control)
    return states


def all_finite(modules: list[torch.nn.Module], info: DistInfo) -> bool:
    """Whether every parameter of `modules` is finite on every rank. All ranks get the same answer, so all
    raise or none: no rank may wait in a collective for one that raised."""
    finite = torch.stack([torch.isfinite(p).all() for m in modules for p in m.parameters()]).all()
    finite = finite.float().reshape(1).cpu()
    if info.enabled:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=info.control)
    return bool(finite)


# ----------------------------------------------------------------------------- model helpers


def warmup_length(tcfg) -> int:
    """Warm-up steps: train.warmup_steps, or with train.warmup_fraction set, that share of train.max_steps
    (rounded up, so a nonzero share warms up at least one step) capped by train.warmup_steps."""
    if tcfg.warmup_fraction is None:
        return tcfg.warmup_steps
    # round() first: a decimal share times a step count carries float noise (0.07 * 100 = 7.000000000000001),
    # which ceil alone would turn into one step more than the share.
    return min(tcfg.warmup_steps, math.ceil(round(tcfg.warmup_fraction * tcfg.max_steps, 6)))


def lr_factor(tcfg) -> Callable[[int], float]:
    """LambdaLR factor at optimizer step s: linear warm-up over warmup_length(tcfg) steps, then constant or
    cosine annealing to train.min_lr_ratio at train.max_steps. A closure (not an object), so LambdaLR saves no
    copy of it and a resumed run uses the current max_steps."""
    warmup, total, cosine, floor = warmup_length(tcfg), tcfg.max_steps, tcfg.lr_schedule == "cosine", tcfg.min_lr_ratio

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
        # Only a Ctrl-C (SIGINT) can be followed by another Ctrl-C; a SIGTERM (kill, SLURM, docker stop) comes
        # from elsewhere, and a second SIGTERM does not abort, so its line names no key to press.
        hint = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint{hint}")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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


# ----------------------------------------------------------------------------- the step's numbers
def wrap_model(net: torch.nn.Module, info: DistInfo, device: torch.device, compile: bool) -> torch.nn.Module:
    """The module the step calls: DDP around the bare network (under torchrun), then torch.compile if asked."""
    model = net
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if compile:
        model = torch.compile(model)
    return model


def unscale_and_clip(params: list, optimizer, scaler, grad_clip: float, device: torch.device) -> torch.Tensor:
    """Total gradient norm BEFORE clipping (what is logged); fp16: the gradients are unscaled first."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True).to(device)


def read_step(step_loss: torch.Tensor, grad_norm: torch.Tensor, by_t: torch.Tensor, loss_watch: LossWatch,
              info: DistInfo) -> list[float]:
    """The step's numbers on the host, in one read: loss, grad norm, the flags non-finite loss /
    non-finite gradient / exploding loss (DDP: agreed by all ranks, largest wins), loss sums and counts
    per quarter of t.

    Host syncs: this `.tolist()` is the step's one read on the host, and the skip of a non-finite step is a
    plain `if`. Earlier versions kept all of this on the device (lagged reads, fused AdamW's found_inf flag)
    to avoid that sync; no GPU measurement ever showed it mattered, so the simple form stays until one does
    (what to measure, on a GPU: bench/RESULTS.md, "One host sync per training step")."""
    finite = torch.isfinite(step_loss)
    flags = torch.stack([~finite, ~torch.isfinite(grad_norm), loss_watch(step_loss, finite).bool()])
    flags = flags.float()
    if info.enabled:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return torch.cat([torch.stack([step_loss, grad_norm.float()]), flags, by_t.flatten()]).tolist()
