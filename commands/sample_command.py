"""sample.py's command as library calls (see commands/__init__.py): parse, check, load the source once, run.

run_sampling takes an already loaded Source (app.py keeps one per run and reuses it) and a callback(i, t, x_t,
x0_pred) that sees the first batch's steps (the page's live previews); without them it is sample.py's run."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from config import AMP_MODES, SAMPLERS, SPACINGS, load_config
from diffusion import Diffusion, build_diffusion
from editing.modes import add_edit_args, edit_mode, plan_edit
from limits import add_limit_args, apply_limit_args, check_sampling
from sampling.conditioning import conditioned
from sampling.conditions import display_inputs, plan_conditions, save_comparison
from sampling.generation import (SampleError, check_flag_values, generate, parse_class_labels, plan_labels,
                                 sampling_settings)
from sampling.loading import load_for_sampling
from sampling.pictures import Recorder, forward_figure, save_animation, save_samples, save_toy_outputs, save_trajectory
from storage.checkpoints import resolve_checkpoint
from storage.files import output_folder_problem
from storage.outputs import MANIFEST, check_out_dir, free_default_folder, start_out_dir
from storage.paths import RunPaths
from utils import ArgumentParser, get_device

SAMPLING_FLAGS = ("seed", "steps", "eta", "guidance_scale", "num_samples", "batch_size")


@dataclass
class Source:
    """A loaded model with what sample.py knows of it: the run folder name its outputs go under."""
    model: torch.nn.Module
    diffusion: Diffusion
    cfg: object
    run: str
    device: torch.device
    distill: Optional[dict] = None    # a distill.py student's record (its teacher, rounds, step counts)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser(description: str, epilog: str) -> ArgumentParser:
    p = ArgumentParser(description=description, epilog=epilog)
    p.add_argument("--checkpoint", help="checkpoint file (default: checkpoints/<run_name>/last.pt of --config, "
                   "else the newest checkpoint under checkpoints/)")
    p.add_argument("--config", help="YAML preset whose run_name picks the checkpoint folder")
    p.add_argument("--pretrained", metavar="NAME_OR_PATH", help="a converted diffusers DDPM (export.py)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--ema-length", type=float, metavar="SIGMA_REL", help="a post-hoc EMA of this relative "
                   "length (e.g. 0.08), rebuilt from the run's snapshots (needs train.ema_profiles)")
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=_positive, help="sampling steps (ddpm always uses all T)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 ancestral-like")
    p.add_argument("--timestep-spacing", choices=SPACINGS)
    p.add_argument("--num-samples", type=_positive, help="samples; with --inpaint/--init-image/--condition: "
                   "results per input")
    p.add_argument("--batch-size", type=_positive)
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
    add_limit_args(p)
    return p


def check_request(args) -> None:
    """The checks of the flags alone, before anything is loaded: one editing mode, values in range, limits."""
    edit_mode(args)  # refuses mixed modes before anything is loaded
    check_flag_values(**{name: getattr(args, name) for name in SAMPLING_FLAGS})
    apply_limit_args(args)


def run_request(args, source: Optional[Source] = None, callback: Optional[Callable] = None) -> list[Path]:
    """The whole command after check_request: the forward figure, or sampling / an editing mode."""
    return run_forward(args) if args.forward else run_sampling(args, source, callback)


def parse_device(name: str) -> torch.device:
    try:
        return get_device(name)
    except RuntimeError as e:  # unknown name, or CUDA asked for but absent
        raise SampleError(f"--device {name}: {str(e).splitlines()[0]}") from None


def load_source(args, device: torch.device) -> Source:
    """The model from --pretrained (export.py, optional) or a checkpoint."""
    if args.pretrained:
        import interop.pretrained as pretrained  # looked up at call time: tests patch it
        try:
            model, diffusion, cfg = pretrained.load_pretrained(args.pretrained, device)
        except (OSError, ValueError, RuntimeError) as e:  # unknown name, offline hub, unconvertible folder
            raise SampleError(f"could not load pretrained model '{args.pretrained}': {e}") from None
        name = Path(args.pretrained).resolve().name if Path(args.pretrained).exists() else args.pretrained
        run_name = "pretrained_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)  # a name, never a path
        return Source(model.to(device).eval(), diffusion.to(device), cfg, run_name, device)
    path = resolve_checkpoint(args.checkpoint, args.config)
    length = getattr(args, "ema_length", None)
    model, diffusion, cfg, ckpt = load_for_sampling(path, device, use_ema=args.ema, ema_length=length)
    what = f"post-hoc EMA {length:g}" if length is not None else "EMA" if args.ema else "raw"
    print(f"checkpoint {path}: step {ckpt.get('step')}, {what} weights")
    return Source(model, diffusion, cfg, cfg.run_name, device, ckpt.get("distill"))


def settings(args, cfg, diffusion: Diffusion) -> dict:
    """Sampling keyword arguments: flags over the checkpoint's `sample` section (generation.sampling_settings,
    shared with evaluate.py), plus the class labels and --amp."""
    labels = parse_class_labels(args.class_label, cfg.model.num_classes, class_names(cfg))
    kw = sampling_settings(cfg, diffusion.num_timesteps, args.sampler, args.steps, args.eta,
                           args.timestep_spacing, args.guidance_scale)
    return dict(kw, labels=labels, amp=args.amp)


def class_names(cfg) -> list[str]:
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
    from sampling.posthoc import ema_length_problem
    conflict = "--pretrained" if args.pretrained else (None if args.ema else "--no-ema")
    problem = ema_length_problem(args.ema_length, conflict, "a train.py run")
    if problem:
        raise SampleError(problem)


def chain(*callbacks: Optional[Callable]) -> Optional[Callable]:
    """One callback(i, t, x_t, x0_pred) calling each given one (the animation's recorder, the page's previews)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None

    def call(*step) -> None:
        for c in given:
            c(*step)
    return call


def run_sampling(args, source: Optional[Source] = None, callback: Optional[Callable] = None) -> list[Path]:
    """Every flag and the output folder are checked before the model runs; then sample and write."""
    device = source.device if source is not None else parse_device(args.device)
    Diffusion.check_eta(None, args.eta, "--eta")
    check_ema_length(args)
    if args.out and output_folder_problem(args.out):  # before loading anything
        raise SampleError(f"--out {output_folder_problem(args.out)}: choose another output folder")
    source = source if source is not None else load_source(args, device)
    model, diffusion, cfg, run = source.model, source.diffusion, source.cfg, source.run
    if edit_mode(args):
        if args.condition or conditioned(cfg):
            raise SampleError("the editing modes run models without an image condition (data.task=generate): "
                              "drop --condition / the editing flag")
        return run_editing(args, model, diffusion, cfg, run, callback)
    kw, seed = settings(args, cfg, diffusion), cfg.seed if args.seed is None else args.seed
    conds = plan_conditions(args, cfg)  # image-conditioned models: --condition's images or held-out ones
    num_samples = len(conds.cond) if conds else args.num_samples or cfg.sample.num_samples
    batch_size = args.batch_size or cfg.sample.batch_size
    timesteps = diffusion.sampling_timesteps(kw["sampler"], kw["steps"], kw["timestep_spacing"])
    out_dir = sample_folder(args, run, kw, len(timesteps), seed, cfg, conds)
    check_sampling(cfg, num_samples, batch_size, len(timesteps), device, out_folder=out_dir,
                   guided=cfg.model.num_classes > 0 and kw["guidance_scale"] != 1.0)  # before any list of them
    if conds and conds.labels is not None and cfg.model.num_classes and kw["labels"] is None:  # their own classes
        kw["labels"] = conds.labels.tolist()
    kw["labels"], nrow = plan_labels(cfg.model.num_classes, kw["labels"], num_samples)
    names = planned_files(cfg, num_samples, args.animation)
    stale = check_out_dir(out_dir, names, args.overwrite)
    first_batch = min(batch_size, num_samples)  # the animation shows (part of) the first batch
    rec = Recorder(timesteps, first_batch, max_items=first_batch if cfg.model.kind == "mlp" else 16) \
        if args.animation else None
    print(f"sampling {num_samples} with {kw['sampler']} ({len(timesteps)} steps), seed {seed}, on {device}")
    x = generate(model, diffusion, cfg, num_samples, batch_size, seed, callback=chain(rec, callback),
                 conditions=conds.cond if conds else None, **kw)
    start_out_dir(out_dir, names, stale)
    return write_samples(x, cfg, diffusion, out_dir, rec, seed, nrow, conds)


def sample_folder(args, run: str, kw: dict, num_steps: int, seed: int, cfg, conds) -> Path:
    """The output folder: --out, else the settings' folder (with the task for a conditioned model), else the
    next free -2, -3, ... when that one holds files (see free_default_folder)."""
    out_dir = out_folder(args, run, kw, num_steps, seed, cfg.model.num_classes > 0)
    if conds and not args.out:
        out_dir = out_dir.with_name(f"{out_dir.name}_{cfg.data.task}")
    if not args.out and not args.overwrite:
        out_dir = free_default_folder(out_dir)
    return out_dir


def write_samples(x: torch.Tensor, cfg, diffusion: Diffusion, out_dir: Path, rec: Optional[Recorder], seed: int,
                  nrow: Optional[int], conds) -> list[Path]:
    """The PNGs and grid (images) or the scatter plots (2-D points), and the animation when recorded."""
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


def run_editing(args, model, diffusion: Diffusion, cfg, run: str, callback: Optional[Callable] = None) -> list[Path]:
    """--inpaint, --init-image, --interpolate, --invert (editing/modes.py): every input and flag is checked, and
    the output folder too (same manifest rules as sampling), before the model runs."""
    seed = cfg.seed if args.seed is None else args.seed
    job = plan_edit(edit_mode(args), args, model, diffusion, cfg, class_names(cfg), seed)
    out_dir = Path(args.out) if args.out else RunPaths(run).images / job.folder
    if not args.out and not args.overwrite:
        out_dir = free_default_folder(out_dir)
    names = job.names + (["animation.gif", "trajectory.png"] if args.animation else [])
    stale = check_out_dir(out_dir, names, args.overwrite)
    n = sum(name[:6].isdigit() for name in job.names)  # outputs; the first batch's are recorded (--animation)
    rec = Recorder(job.timesteps, min(args.batch_size or cfg.sample.batch_size, n)) if args.animation else None
    print(f"{job.mode.replace('_', '-')}: on {diffusion.betas.device}, seed {seed}")
    x = job.run(chain(rec, callback))
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
        source = load_source(args, torch.device("cpu"))
        cfg, diffusion = source.cfg, source.diffusion
    return [forward_figure(cfg, diffusion, seed=cfg.seed if args.seed is None else args.seed, replace=args.overwrite)]
