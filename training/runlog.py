"""The run log: TensorBoard scalars and images, the loss plot, training-time sample grids."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import Config
from sampling.conditioning import with_condition
from sampling.conditions import save_comparison
from sampling.pictures import save_image_grid, save_loss_plot, save_scatter_plot
from storage.files import check_output_folder

PLOT_EVERY_S = 30.0                           # loss.png refresh interval (also at every sample/checkpoint)

class RunLogger:
    """TensorBoard scalars/images, the tqdm bar and results/plots/<run>/loss.png (`results_root`:
    run_folder.RESULTS_ROOT, passed in so that one place names the output folders)."""

    def __init__(self, cfg: Config, start_step: int, history: list[float], results_root: Path):
        from torch.utils.tensorboard import SummaryWriter  # slow import: only on the logging rank
        self.log_dir = check_output_folder(results_root / "logs" / cfg.run_name)  # no link out of results/
        self.plot_path = results_root / "plots" / cfg.run_name / "loss.png"
        # purge_step hides events a crashed run wrote after the checkpoint we resume from.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else None)
        self.history, self.run_name, self._plotted_at = history, cfg.run_name, 0.0
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.run_name, unit="step",
                        dynamic_ncols=True)

    def start_bar(self, desc: str, total: int, initial: int = 0) -> None:
        """A new progress bar (e.g. one per distillation round), the previous one left on screen as it ended."""
        self.bar.close()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

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
def save_training_grid(diffusion, ema_model: torch.nn.Module, cfg: Config, path: Path, dataset, title: str,
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


def reduce_interval(window: list, by_t: list[float], info) -> tuple[list[float], list[float]]:
    """The losses of the steps in `window` (NaN = a skipped step) and the loss sums / counts per quarter of t;
    under DDP the losses averaged and the sums added over the ranks (collective)."""
    n, losses = len(window), [loss for loss, _, _ in window]
    if info.enabled:
        packed = torch.tensor(losses + by_t)
        torch.distributed.all_reduce(packed, group=info.control)
        packed[:n] /= info.world_size
        losses, by_t = packed[:n].tolist(), packed[n:].tolist()
    return losses, by_t


def write_interval(trainer, window: list, losses: list[float], by_t: list[float], elapsed: float) -> None:
    """Rank 0: the interval into the loss history, the throughput and the run log (RunLogger.interval)."""
    tcfg, data = trainer.tcfg, trainer.data
    trainer.history.extend(losses)
    images = len(window) * tcfg.batch_size * tcfg.grad_accum * trainer.dist.world_size
    trainer.images_per_sec = images / max(elapsed, 1e-9)
    scalars = {"train/lr": trainer.scheduler.get_last_lr()[0], "train/images_per_sec": trainer.images_per_sec,
               "train/skipped_steps": trainer.skipped_total,
               "train/epoch": data.epoch + data.position / data.sampler.batches_per_epoch}
    if trainer.scaler is not None:
        scalars["train/grad_scale"] = trainer.scaler.get_scale()
    trainer.logger.interval(trainer.step, losses, [norm for _, norm, skip in window if not skip], by_t,
                            trainer.diffusion.num_timesteps, scalars)
