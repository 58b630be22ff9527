"""Pictures: image grids, the loss plot, 2-D scatter plots, GIFs of the reverse process, trajectories and the
forward-process figure."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffusion import Diffusion
from storage.files import check_output_path, write_output
from storage.paths import RunPaths

FORMATS = {".png": "PNG", ".gif": "GIF"}


def save_pil(image: Image.Image, path: str | Path, replace: bool = True, **params) -> Path:
    """A PIL image through the output guard (storage.files.write_output: atomic, no link out, a full disk as
    one line); `replace`: the caller checked the folder (run folder, sample.py's manifest) or has the flag."""
    fmt = FORMATS[Path(path).suffix.lower()]
    return write_output(path, lambda f: image.save(f, format=fmt, **params), replace=replace)


def save_figure(fig, path: str | Path, replace: bool = True, **params) -> Path:
    """A matplotlib figure through the output guard (see save_pil); the format from the suffix."""
    return write_output(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:], **params), replace=replace)



def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255] (the quantization sample files and FID use)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

def image_grid(x: torch.Tensor, nrow: Optional[int] = None, min_cell: int = 64):
    """(B, C, H, W) images in [-1, 1] -> one RGB PIL image grid (nrow per row, default square-ish); tiny
    images are upscaled (nearest) so that an 8x8 digit is still visible. train.py's and sample.py's grids."""
    import torchvision.utils as vutils
    from PIL import Image

    nrow = nrow or max(1, int(round(len(x) ** 0.5)))
    scale = max(1, -(-min_cell // x.shape[-1]))  # ceil
    if scale > 1:
        x = torch.nn.functional.interpolate(x.float(), scale_factor=scale, mode="nearest")
    grid = vutils.make_grid(to_uint8_images(x.cpu()), nrow=nrow, padding=2, pad_value=255)  # always 3 channels
    return Image.fromarray(grid.permute(1, 2, 0).numpy())

def save_image_grid(x: torch.Tensor, path: str | Path, nrow: Optional[int] = None,
                    min_cell: int = 64) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one PNG grid (see image_grid)."""
    return save_pil(image_grid(x, nrow, min_cell), path)

def _smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Debiased exponential moving average that steps over NaNs (skipped steps)."""
    alpha, acc, weight, out = 2.0 / (span + 1), 0.0, 0.0, np.full_like(values, np.nan)
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, weight = (1 - alpha) * acc + alpha * v, (1 - alpha) * weight + alpha
        out[i] = acc / weight if weight > 0 else np.nan
    return out

def save_loss_plot(losses, path: str | Path, first_step: int = 1, title: str = "training loss",
                   max_points: int = 5000) -> Path:
    """Per-step losses (NaN = skipped step) as a faint raw curve plus a smoothed one, log-scaled.
    Long runs are binned to max_points means so the plot stays fast."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend needed

    y = np.asarray(losses, dtype=np.float64)
    x = first_step + np.arange(len(y))
    if len(y) > max_points:
        bins = -(-len(y) // max_points)
        cut = len(y) // bins * bins
        with np.errstate(all="ignore"):  # all-NaN bins stay NaN
            y = np.nanmean(y[:cut].reshape(-1, bins), axis=1)
        x = x[:cut].reshape(-1, bins).mean(axis=1)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="raw")
    ax.plot(x, _smooth(y, max(5, len(y) // 50)), color="tab:blue", linewidth=1.8, label="smoothed")
    finite = y[np.isfinite(y)]
    if len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min():  # diffusion losses fall fast
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)

def save_scatter_plot(data: torch.Tensor, samples: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Two panels on the same axes: (N, 2) data points and (M, 2) generated points."""
    from matplotlib.figure import Figure

    data, samples = data.detach().float().cpu().numpy(), samples.detach().float().cpu().numpy()
    both = np.concatenate([data, samples[np.isfinite(samples).all(axis=1)]])
    low, high = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    pad = 0.1 * (high - low).max()
    fig = Figure(figsize=(9, 4.5), dpi=110)
    for ax, points, name in zip(fig.subplots(1, 2), (data, samples), ("data", "samples")):
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color="tab:blue" if name == "data" else "tab:orange")
        ax.set(xlim=(low[0] - pad, high[0] + pad), ylim=(low[1] - pad, high[1] + pad), aspect="equal",
               title=f"{name} ({len(points)} points)")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


FORWARD_TIMESTEPS = (0, 100, 250, 500, 750, 999)  # for T = 1000; scaled to other T


def save_samples(x: torch.Tensor, out_dir: Path, nrow: Optional[int] = None) -> list[Path]:
    """grid.png plus one exact-size PNG per sample (000000.png ...): 'L' for 1 channel, RGB for 3."""
    images = to_uint8_images(x).permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    files = [save_pil(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), out_dir / f"{i:06d}.png")
             for i, image in enumerate(images)]
    return [save_image_grid(x, out_dir / "grid.png", nrow=nrow)] + files


class Recorder:
    """Sampler callback keeping x_t and predicted x0 of `max_items` samples at up to `max_frames` of the
    sampler's `timesteps`, spaced more densely near t = 0 where the image forms."""

    def __init__(self, timesteps: list[int], batch_size: int, max_frames: int = 60, max_items: int = 16):
        n = len(timesteps)
        keep = np.round((n - 1) * np.linspace(0, 1, max_frames) ** 0.6) if n > max_frames else np.arange(n)
        self.keep = set(keep.astype(int).tolist())
        # The state after step i sits at the next timestep; after the last step it is the output x0.
        self.labels = [f"t = {t}" for t in timesteps[1:]] + ["output"]
        self.items = torch.linspace(0, batch_size - 1, min(max_items, batch_size)).round().long().unique()
        self.frames: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (label, x_t, x0_pred)

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if i in self.keep:
            idx = self.items.to(x_t.device)
            self.frames.append((self.labels[i], x_t[idx].float().cpu(), x0_pred[idx].float().cpu()))


def _grid_image(x: torch.Tensor, min_cell: int = 64) -> Image.Image:
    """(B, C, H, W) in [-1, 1] -> square-ish RGB grid, small images upscaled (nearest)."""
    return image_grid(x.clamp(-1, 1), min_cell=min_cell).convert("RGB")


def save_gif(frames: list[Image.Image], path: Path, ms: int = 80, hold_ms: int = 2000) -> Path:
    """Looping GIF; the last frame stays up for hold_ms."""
    durations = [ms] * (len(frames) - 1) + [hold_ms]
    return save_pil(frames[0], path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def save_animation(rec: Recorder, path: Path, condition: Optional[torch.Tensor] = None) -> Path:
    """Reverse process as a GIF: x_t (left) next to the predicted x0 (right), labeled with t; an
    image-conditioned model's condition (the recorded samples') on the far left."""
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    frames, cond = [], _grid_image(condition) if condition is not None else None
    for label, x_t, x0 in rec.frames:
        panels = [(cond, "condition")] if cond else []
        panels += [(_grid_image(x_t), f"x_t   {label}"), (_grid_image(x0), "predicted x0")]
        frame = Image.new("RGB", (sum(p.width + 10 for p, _ in panels) - 10, panels[0][0].height + 22), "white")
        draw, left = ImageDraw.Draw(frame), 0
        for panel, title in panels:
            frame.paste(panel, (left, 22))
            draw.text((left + 4, 3), title, fill="black", font=font)
            left += panel.width + 10
        frames.append(frame)
    return save_gif(frames, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_panels(rows: list[torch.Tensor], col_titles: list[str], path: Path, replace: bool = True) -> Path:
    """rows: list of (K, C, H, W) tensors in [-1, 1], one subplot per image, titled columns."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(col_titles), figsize=(1.3 * len(col_titles), 1.3 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(to_uint8_images(row).permute(0, 2, 3, 1).numpy()):
            axes[r, c].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            axes[r, c].set(xticks=[], yticks=[], title=col_titles[c] if r == 0 else "")
    try:
        return save_figure(fig, path, replace, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def save_trajectory(rec: Recorder, path: Path, num_rows: int = 4, num_cols: int = 8) -> Path:
    """A few samples (rows) at ~8 recorded steps from noise to image (columns)."""
    cols = sorted(set(np.linspace(0, len(rec.frames) - 1, num_cols).round().astype(int).tolist()))
    rows = [torch.stack([rec.frames[c][1][r] for c in cols]) for r in range(min(num_rows, len(rec.items)))]
    return image_panels(rows, [rec.frames[c][0] for c in cols], path)


def _limits(data: torch.Tensor) -> tuple[float, float]:
    """Fixed square axis limits covering the data (robust to outliers) and the N(0, I) noise."""
    lo = min(torch.quantile(data, 0.005).item(), -3.5)
    hi = max(torch.quantile(data, 0.995).item(), 3.5)
    pad = 0.1 * (hi - lo)
    return lo - pad, hi + pad


def _scatter_frames(point_sets: list[torch.Tensor], titles: list[str], lim) -> list[Image.Image]:
    """One fixed-limits scatter plot per (n, 2) point set, rendered to an RGB image."""
    plt, frames = _pyplot(), []
    for points, title in zip(point_sets, titles):
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.scatter(*points.T.numpy(), s=2, alpha=0.5)
        ax.set(xlim=lim, ylim=lim, aspect="equal", title=title)
        fig.canvas.draw()
        frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).convert("RGB"))
        plt.close(fig)
    return frames


def _hstack(images: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (sum(im.width for im in images), images[0].height), "white")
    for k, image in enumerate(images):
        canvas.paste(image, (k * images[0].width, 0))
    return canvas


def save_toy_outputs(x: torch.Tensor, data: torch.Tensor, diffusion: Diffusion, out_dir: Path,
                     rec: Optional[Recorder], seed: int) -> list[Path]:
    """scatter.png (data | samples), forward.gif (data -> noise), animation.gif (noise -> data)."""
    save_scatter_plot(data, x, out_dir / "scatter.png")  # axes fitted to the points (train.py's plot too)
    lim = _limits(data)  # the GIFs keep fixed limits that also cover N(0, I), so every frame has the same axes
    write_output(out_dir / "samples.npy", lambda f: np.save(f, x.numpy()), replace=True)  # folder checked
    T = diffusion.num_timesteps
    ts = sorted(set(np.linspace(0, T - 1, min(40, T)).round().astype(int).tolist()))
    noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(seed))
    noisy = [diffusion.q_sample(data, torch.full((len(data),), t), noise) for t in ts]
    paths = [out_dir / "scatter.png", out_dir / "samples.npy",
             save_gif(_scatter_frames(noisy, [f"forward  t = {t}" for t in ts], lim), out_dir / "forward.gif")]
    if rec is not None:
        frames = _scatter_frames([f[1] for f in rec.frames], [f"reverse  {f[0]}" for f in rec.frames], lim)
        paths.append(save_gif(frames, out_dir / "animation.gif"))
    return paths


def forward_figure(cfg, diffusion: Diffusion, num_images: int = 4, seed: int = 0, replace: bool = False) -> Path:
    """results/plots/<run_name>/forward_noise.png: real data noised to t = 0 ... T-1 (columns); images
    (test split, no flips) one per row, 2-D toy data as the whole cloud in one row of scatter panels.
    An existing figure is replaced only with `replace` (sample.py --overwrite)."""
    from dataset import build_dataset
    path = check_output_path(forward_figure_path(cfg.run_name), replace=replace)  # before the data is read
    T, diffusion = diffusion.num_timesteps, diffusion.cpu()
    ts = sorted({min(T - 1, round(t * T / 1000)) for t in FORWARD_TIMESTEPS})
    dataset, g = build_dataset(cfg.data, train=False), torch.Generator().manual_seed(seed)
    if cfg.model.kind == "mlp":
        x0 = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 2)
    else:
        x0 = torch.stack([dataset[i][0] for i in torch.randperm(len(dataset), generator=g)[:num_images]])
    noise = torch.randn(x0.shape, generator=g)  # the same noise in every column
    columns = [diffusion.q_sample(x0, torch.full((len(x0),), t), noise) for t in ts]
    if cfg.model.kind != "mlp":
        rows = [torch.stack([col[k] for col in columns]) for k in range(len(x0))]  # (len(ts), C, H, W) each
        return image_panels(rows, [f"t = {t}" for t in ts], path, replace)
    return save_pil(_hstack(_scatter_frames(columns, [f"t = {t}" for t in ts], _limits(x0))), path, replace)


def forward_figure_path(run_name: str) -> Path:
    return RunPaths(run_name).plots / "forward_noise.png"
