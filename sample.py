"""Sample from a trained checkpoint: image grids, per-image PNGs (for FID), animations, 2-D plots.

    python sample.py --sampler ddim                      # newest checkpoint under checkpoints/
    python sample.py --config configs/digits.yaml --steps 25 --animation
    python sample.py --checkpoint checkpoints/digits/last.pt --class-label 3 --guidance-scale 2
    python sample.py --forward --config configs/digits.yaml   # the forward-process figure
    python sample.py --pretrained google/ddpm-cifar10-32 --num-samples 16
    python sample.py --inpaint img.png --mask bottom       # editing: also --init-image, --interpolate, --invert

Model, diffusion and sampling defaults come from the config stored inside the checkpoint, so no model
flags are needed. Outputs go to results/images/<run_name>/<sampler>_<steps>_<seed>/ (see --out).
Every sample has its own seeded noise (generation.py): sample i of a seed is the same image at any
--batch-size, in sample.py and evaluate.py alike.

Output folders never lose a file sample.py did not write in the same call: each run lists its files in
ddpm-lab-samples.json there. A non-empty --out is refused without --overwrite, which then replaces only the
files an earlier run listed (and refuses if a new file would replace one it did not list). When the default
folder already holds files, the samples go to the next free <folder>-2, -3, ... instead (--overwrite: replace
the earlier run's files there).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from condition_images import display_inputs, plan_conditions, save_comparison
from conditioning import conditioned
from config import AMP_MODES, SAMPLERS, SPACINGS, ConfigError, load_config
from dataset import DatasetMissingError
from diffusion import Diffusion, build_diffusion
from edit_runs import add_edit_args, edit_mode, plan_edit
from generation import SampleError, check_eta, generate, parse_class_labels, plan_labels, sampling_settings
from loading import load_for_sampling, resolve_checkpoint
from output_folders import MANIFEST, check_out_dir, free_default_folder, start_out_dir  # noqa: F401
from paths import RunPaths
from utils import (CheckpointError, get_device, image_grid, output_folder_problem, save_image_grid,
                   save_scatter_plot, to_uint8_images)

FORWARD_TIMESTEPS = (0, 100, 250, 500, 750, 999)  # for T = 1000; scaled to other T


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        return int(text)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Unset sampling flags take the checkpoint's `sample` config section.")
    p.add_argument("--checkpoint", help="checkpoint file (default: checkpoints/<run_name>/last.pt of --config, "
                   "else the newest checkpoint under checkpoints/)")
    p.add_argument("--config", help="YAML preset whose run_name picks the checkpoint folder")
    p.add_argument("--pretrained", metavar="NAME_OR_PATH", help="a converted diffusers DDPM (export.py)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--ema-length", type=float, metavar="SIGMA_REL", help="a post-hoc EMA of this relative "
                   "length (e.g. 0.08), rebuilt from the run's snapshots (needs train.ema_profiles)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=positive, help="sampling steps (ddpm always uses all T)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 ancestral-like")
    p.add_argument("--timestep-spacing", choices=SPACINGS)
    p.add_argument("--num-samples", type=positive, help="samples; with --inpaint/--init-image: results per input")
    p.add_argument("--batch-size", type=positive)
    p.add_argument("--seed", type=int, help="default: the config's seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--class-label", help="class-conditional models: one label or a list ('3' or '1,4,7'); "
                   "default: one row per class")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (1 = plain conditional)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="autocast; auto = bf16 on GPUs and on CPUs with native bf16, else off (fp32)")
    p.add_argument("--out", help="output folder (default results/images/<run_name>/<sampler>_<steps>_<seed>, "
                   "or the next free <folder>-2, -3, ... when that one holds files)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder, replacing "
                   "only the files an earlier sample.py run wrote there (listed in its " + MANIFEST + ")")
    p.add_argument("--condition", metavar="IMG", help="image-conditioned models (data.task): an image or folder "
                   "to upscale (superres: low-res images of the trained size) or colorize (any image, made grey); "
                   "default: held-out images of the data set, shown next to their targets")
    p.add_argument("--animation", action="store_true", help="also write animation.gif and trajectory.png")
    p.add_argument("--forward", action="store_true",
                   help="only draw the forward process (results/plots/<run_name>/forward_noise.png)")
    add_edit_args(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- image outputs
def save_samples(x: torch.Tensor, out_dir: Path, nrow: Optional[int] = None) -> list[Path]:
    """grid.png plus one exact-size PNG per sample (000000.png ...): 'L' for 1 channel, RGB for 3."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = to_uint8_images(x).permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    files = []
    for i, image in enumerate(images):
        files.append(out_dir / f"{i:06d}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(files[-1])
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
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


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


def image_panels(rows: list[torch.Tensor], col_titles: list[str], path: Path) -> Path:
    """rows: list of (K, C, H, W) tensors in [-1, 1], one subplot per image, titled columns."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(col_titles), figsize=(1.3 * len(col_titles), 1.3 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(to_uint8_images(row).permute(0, 2, 3, 1).numpy()):
            axes[r, c].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            axes[r, c].set(xticks=[], yticks=[], title=col_titles[c] if r == 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_trajectory(rec: Recorder, path: Path, num_rows: int = 4, num_cols: int = 8) -> Path:
    """A few samples (rows) at ~8 recorded steps from noise to image (columns)."""
    cols = sorted(set(np.linspace(0, len(rec.frames) - 1, num_cols).round().astype(int).tolist()))
    rows = [torch.stack([rec.frames[c][1][r] for c in cols]) for r in range(min(num_rows, len(rec.items)))]
    return image_panels(rows, [rec.frames[c][0] for c in cols], path)


# ----------------------------------------------------------------------------- 2-D toy outputs
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
    out_dir.mkdir(parents=True, exist_ok=True)
    save_scatter_plot(data, x, out_dir / "scatter.png")  # axes fitted to the points (train.py's plot too)
    lim = _limits(data)  # the GIFs keep fixed limits that also cover N(0, I), so every frame has the same axes
    np.save(out_dir / "samples.npy", x.numpy())
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


# ----------------------------------------------------------------------------- forward-process figure
def forward_figure(cfg, diffusion: Diffusion, num_images: int = 4, seed: int = 0) -> Path:
    """results/plots/<run_name>/forward_noise.png: real data noised to t = 0 ... T-1 (columns); images
    (test split, no flips) one per row, 2-D toy data as the whole cloud in one row of scatter panels."""
    from dataset import build_dataset
    T, diffusion = diffusion.num_timesteps, diffusion.cpu()
    ts = sorted({min(T - 1, round(t * T / 1000)) for t in FORWARD_TIMESTEPS})
    dataset, g = build_dataset(cfg.data, train=False), torch.Generator().manual_seed(seed)
    path = RunPaths(cfg.run_name).plots / "forward_noise.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.model.kind == "mlp":
        x0 = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 2)
    else:
        x0 = torch.stack([dataset[i][0] for i in torch.randperm(len(dataset), generator=g)[:num_images]])
    noise = torch.randn(x0.shape, generator=g)  # the same noise in every column
    columns = [diffusion.q_sample(x0, torch.full((len(x0),), t), noise) for t in ts]
    if cfg.model.kind != "mlp":
        rows = [torch.stack([col[k] for col in columns]) for k in range(len(x0))]  # (len(ts), C, H, W) each
        return image_panels(rows, [f"t = {t}" for t in ts], path)
    _hstack(_scatter_frames(columns, [f"t = {t}" for t in ts], _limits(x0))).save(path)
    return path


# ----------------------------------------------------------------------------- command line
def load_source(args, device: torch.device):
    """(model, diffusion, cfg, run folder name) from --pretrained (export.py, optional) or a checkpoint."""
    if args.pretrained:
        import pretrained  # the diffusers conversion (export.py's too); looked up here so tests can patch it
        try:
            model, diffusion, cfg = pretrained.load_pretrained(args.pretrained, device)
        except (OSError, ValueError, RuntimeError) as e:  # unknown name, offline hub, unconvertible folder
            raise SampleError(f"could not load pretrained model '{args.pretrained}': {e}") from None
        name = Path(args.pretrained).resolve().name if Path(args.pretrained).exists() else args.pretrained
        run_name = "pretrained_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)  # a name, never a path
        return model.to(device).eval(), diffusion.to(device), cfg, run_name
    path = resolve_checkpoint(args.checkpoint, args.config)
    length = getattr(args, "ema_length", None)
    model, diffusion, cfg, ckpt = load_for_sampling(path, device, use_ema=args.ema, ema_length=length)
    what = f"post-hoc EMA {length:g}" if length is not None else "EMA" if args.ema else "raw"
    print(f"checkpoint {path}: step {ckpt.get('step')}, {what} weights")
    return model, diffusion, cfg, cfg.run_name


def settings(args, cfg, diffusion: Diffusion) -> dict:
    """Sampling keyword arguments: flags over the checkpoint's `sample` section (generation.sampling_settings,
    shared with evaluate.py), plus the class labels and --amp."""
    labels = parse_class_labels(args.class_label, cfg.model.num_classes, _class_names(cfg))
    kw = sampling_settings(cfg, diffusion.num_timesteps, args.sampler, args.steps, args.eta,
                           args.timestep_spacing, args.guidance_scale)
    return dict(kw, labels=labels, amp=args.amp)


def _class_names(cfg) -> list[str]:
    try:
        from dataset import dataset_info
        return dataset_info(cfg.data).class_names
    except Exception:  # names are a convenience; integer labels always work
        return []


def out_folder(args, run: str, kw: dict, num_steps: int, seed: int, conditional: bool) -> Path:
    """--out, else results/images/<run>/<settings>: the base name; see free_default_folder."""
    if args.out:
        return Path(args.out)
    name = f"{kw['sampler']}_{num_steps}_{seed}"
    if kw["eta"] and kw["sampler"] == "ddim":
        name += f"_eta{kw['eta']:g}"
    if conditional and kw["guidance_scale"] != 1.0:
        name += f"_g{kw['guidance_scale']:g}"
    if kw["labels"] is not None:
        name += "_y" + "-".join(map(str, dict.fromkeys(kw["labels"])))
    if getattr(args, "ema_length", None) is not None:
        name += f"_phema{args.ema_length:g}"
    return RunPaths(run).images / name


def planned_files(cfg, num_samples: int, animation: bool) -> list[str]:
    """The names sample.py will write into its output folder (known before sampling, to check them first)."""
    if cfg.model.kind == "mlp":
        names = ["scatter.png", "samples.npy", "forward.gif"]
    else:
        names = ["grid.png"] + [f"{i:06d}.png" for i in range(num_samples)] + (["trajectory.png"] if animation else [])
    return names + (["animation.gif"] if animation else [])


def check_ema_length(args) -> None:
    """--ema-length: a valid sigma_rel, with a train.py checkpoint's EMA weights (checked before loading)."""
    if args.ema_length is None:
        return
    from posthoc_ema import ema_length_problem
    conflict = "--pretrained" if args.pretrained else (None if args.ema else "--no-ema")
    problem = ema_length_problem(args.ema_length, conflict, "a train.py run")
    if problem:
        raise SampleError(problem)


def run_sampling(args) -> list[Path]:
    try:
        device = get_device(args.device)
    except RuntimeError as e:  # unknown name, or CUDA asked for but absent
        raise SampleError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    check_eta(args.eta)
    check_ema_length(args)
    if args.out and output_folder_problem(args.out):  # before loading anything
        raise SampleError(f"--out {output_folder_problem(args.out)}: choose another output folder")
    model, diffusion, cfg, run = load_source(args, device)
    if edit_mode(args):
        if args.condition or conditioned(cfg):
            raise SampleError("the editing modes run models without an image condition (data.task=generate): "
                              "drop --condition / the editing flag")
        return run_editing(args, model, diffusion, cfg, run)
    kw, seed = settings(args, cfg, diffusion), cfg.seed if args.seed is None else args.seed
    conds = plan_conditions(args, cfg)  # image-conditioned models: --condition's images or held-out ones
    num_samples = len(conds.cond) if conds else args.num_samples or cfg.sample.num_samples
    batch_size = args.batch_size or cfg.sample.batch_size
    timesteps = diffusion.sampling_timesteps(kw["sampler"], kw["steps"], kw["timestep_spacing"])
    out_dir = out_folder(args, run, kw, len(timesteps), seed, cfg.model.num_classes > 0)
    if conds and not args.out:
        out_dir = out_dir.with_name(f"{out_dir.name}_{cfg.data.task}")
    if not args.out and not args.overwrite:
        out_dir = free_default_folder(out_dir)
    if conds and conds.labels is not None and cfg.model.num_classes and kw["labels"] is None:  # their own classes
        kw["labels"] = conds.labels.tolist()
    kw["labels"], nrow = plan_labels(cfg.model.num_classes, kw["labels"], num_samples)
    names = planned_files(cfg, num_samples, args.animation)
    stale = check_out_dir(out_dir, names, args.overwrite)
    first_batch = min(batch_size, num_samples)  # the animation shows (part of) the first batch
    max_items = first_batch if cfg.model.kind == "mlp" else 16
    rec = Recorder(timesteps, first_batch, max_items=max_items) if args.animation else None
    print(f"sampling {num_samples} with {kw['sampler']} ({len(timesteps)} steps), seed {seed}, on {device}")
    x = generate(model, diffusion, cfg, num_samples, batch_size, seed, callback=rec,
                 conditions=conds.cond if conds else None, **kw)
    start_out_dir(out_dir, names, stale)
    if cfg.model.kind == "mlp":
        from dataset import sample_toy2d
        data = sample_toy2d(cfg.data.toy_distribution, len(x), torch.Generator().manual_seed(seed + 1))
        return save_toy_outputs(x, data, diffusion.cpu(), out_dir, rec, seed)
    paths = save_samples(x, out_dir, nrow)
    if conds:  # grid.png: condition | bicubic | output | target
        save_comparison(conds, x, cfg, out_dir / "grid.png")
    if rec is not None:
        shown = display_inputs(conds, cfg)[rec.items] if conds else None
        paths += [save_animation(rec, out_dir / "animation.gif", shown),
                  save_trajectory(rec, out_dir / "trajectory.png")]
    return paths


def run_editing(args, model, diffusion: Diffusion, cfg, run: str) -> list[Path]:
    """--inpaint, --init-image, --interpolate, --invert (edit_runs.py): every input and flag is checked, and
    the output folder too (same manifest rules as sampling), before the model runs."""
    seed = cfg.seed if args.seed is None else args.seed
    job = plan_edit(edit_mode(args), args, model, diffusion, cfg, _class_names(cfg), seed)
    out_dir = Path(args.out) if args.out else RunPaths(run).images / job.folder
    if not args.out and not args.overwrite:
        out_dir = free_default_folder(out_dir)
    names = job.names + (["animation.gif", "trajectory.png"] if args.animation else [])
    stale = check_out_dir(out_dir, names, args.overwrite)
    n = sum(name[:6].isdigit() for name in job.names)  # outputs; the first batch's are recorded (--animation)
    rec = Recorder(job.timesteps, min(args.batch_size or cfg.sample.batch_size, n)) if args.animation else None
    print(f"{job.mode.replace('_', '-')}: on {diffusion.betas.device}, seed {seed}")
    x = job.run(rec)
    start_out_dir(out_dir, names, stale)
    paths = job.save(x, out_dir)
    if rec is not None:
        paths += [save_animation(rec, out_dir / "animation.gif"), save_trajectory(rec, out_dir / "trajectory.png")]
    return paths


def run_forward(args) -> list[Path]:
    """--forward needs only a config (and the data): from --config, else from the checkpoint/pretrained."""
    if args.config and not (args.checkpoint or args.pretrained):
        cfg = load_config(args.config)
        diffusion = build_diffusion(cfg)
    else:
        _, diffusion, cfg, _ = load_source(args, torch.device("cpu"))
    return [forward_figure(cfg, diffusion, seed=cfg.seed if args.seed is None else args.seed)]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        edit_mode(args)  # refuses mixed modes before anything is loaded
        paths = run_forward(args) if args.forward else run_sampling(args)
    except (SampleError, ConfigError, CheckpointError, DatasetMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    images = [p for p in paths if re.fullmatch(r"\d{6}\.png", p.name)]
    for p in [p for p in paths if p not in images]:
        print(f"wrote {p}")
    if images:
        print(f"wrote {len(images)} images {images[0]} ... {images[-1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
