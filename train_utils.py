"""Building blocks of the Trainer (trainer.py): process layout (DDP), EMA, optimizer and LR schedule, stop
signals, logging (rank 0) and the exploding-loss watch. Run folder and checkpoint files: run_folder.py;
resuming: train_resume.py.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from condition_images import save_comparison
from conditioning import with_condition
from config import Config, ConfigError
from utils import check_cuda_index, get_device, get_rng_state, save_image_grid, save_loss_plot, save_scatter_plot

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
    """TensorBoard scalars/images, the tqdm bar and results/plots/<run>/loss.png (`results_root`:
    run_folder.RESULTS_ROOT, passed in so that one place names the output folders)."""

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

    def interval(self, step: int, losses: list[float], grad_norms: list[float], by_t: list[float], T: int,
                 scalars: dict) -> None:
        """Scalars of the steps since the last log: mean loss (NaN = skipped step), gradient norm (of the
        steps taken), loss per quarter of t (by_t: 4 sums, then 4 counts), plus `scalars`; the bar's postfix."""
        finite = [v for v in losses if math.isfinite(v)]
        scalars = {"train/loss": sum(finite) / len(finite) if finite else math.nan,
                   "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else math.nan,
                   "train/grad_norm_max": max(grad_norms, default=0.0), **scalars}
        for i in range(4):
            if by_t[4 + i]:
                scalars[f"loss_by_t/t{i * T // 4:04d}-{(i + 1) * T // 4 - 1:04d}"] = by_t[i] / by_t[4 + i]
        self.scalars(step, scalars)
        postfix = {"loss": f"{scalars['train/loss']:.4f}", "lr": f"{scalars['train/lr']:.2e}",
                   "img/s": f"{scalars['train/images_per_sec']:.0f}"}
        if scalars["train/skipped_steps"]:
            postfix["skipped"] = scalars["train/skipped_steps"]
        self.bar.set_postfix(postfix, refresh=False)
        self.plot()

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


@torch.no_grad()
def save_samples(diffusion, ema_model: torch.nn.Module, cfg: Config, path: Path, dataset, title: str,
                 conditions=None) -> None:
    """train.num_sample_images EMA samples (DDIM, train.sample_steps) from a generator seeded with cfg.seed,
    so the grids of a run are comparable over time: an image grid at `path`, or for the 2-D toy data a
    scatter plot next to the data. An image-conditioned model samples from `conditions` (held-out targets,
    condition_images.Conditions) and the grid shows condition | bicubic | output | target side by side.
    The caller forks the RNG and sets autocast."""
    n, toy, classes = cfg.train.num_sample_images, cfg.model.kind == "mlp", cfg.model.num_classes
    device = next(ema_model.parameters()).device
    model, y = ema_model, torch.arange(n, device=device) % classes if classes else None
    if conditions is not None:
        n, model = len(conditions.cond), with_condition(ema_model, conditions.cond.to(device))
        y = conditions.labels.to(device) if classes else None  # the held-out targets' own classes
    shape = (n, 2) if toy else (n, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    x = diffusion.sample(model, shape, "ddim", steps=cfg.train.sample_steps,
                         generator=torch.Generator().manual_seed(cfg.seed), y=y,
                         guidance_scale=cfg.sample.guidance_scale, clip_x0=cfg.sample.clip_x0 and not toy,
                         progress=False)
    if conditions is not None:
        save_comparison(conditions, x, cfg, path)
    elif toy:
        save_scatter_plot(torch.stack([dataset[i][0] for i in range(min(len(dataset), n))]), x, path, title)
    else:
        save_image_grid(x.float(), path, nrow=classes if classes and n >= classes else None)


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
