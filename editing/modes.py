"""The editing modes of sample.py: what each one checks, runs and writes.

    --inpaint IMG --mask MASK|center|left|right|top|bottom [--resample R --jump J]   RePaint
    --init-image IMG --strength S                                                    SDEdit (image-to-image)
    --interpolate A B --frames K  (or --interpolate --seeds S1 S2)                   slerp between DDIM noises
    --invert IMG                                                                     DDIM inversion + PSNR

`plan_edit` reads the inputs and checks every flag before any model evaluation (each bad input is one
SampleError line); the EditJob it returns names its output files (for sample.py's manifest check), runs,
and saves. Results do not depend on --batch-size: output j draws its noise from SampleNoise(seed, j), as
sampling does (sampling/generation.py), and for --num-samples K per input, output j is result j % K of input j // K.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from editing.algorithms import INPAINT_SAMPLERS, edit, inpaint, invert, repaint_evaluations, sdedit_timesteps
from limits import check_sampling
from sampling.generation import SampleError, SampleNoise, parse_class_labels, sampling_autocast, sampling_settings
from sampling.images import BUILTIN_MASKS, load_images, load_mask, mask_picture, psnr, save_png
from sampling.pictures import image_grid, save_pil
from storage.files import write_bytes_output

MODES = {"inpaint": "--inpaint", "init_image": "--init-image", "interpolate": "--interpolate", "invert": "--invert"}
ONLY_WITH = {"mask": "inpaint", "resample": "inpaint", "jump": "inpaint", "strength": "init_image",
             "seeds": "interpolate", "frames": "interpolate"}
# RePaint's resampling joins the generated region to the kept one (plain replacement, 1/1, leaves seams); 10/10
# gave the best label recovery in bench/RESULTS.md's editing table.
RESAMPLE, JUMP, FRAMES = 10, 10, 8


def add_edit_args(p) -> None:
    g = p.add_argument_group("editing a user's images (a trained image model; see docs/editing.md)")
    g.add_argument("--inpaint", metavar="IMG", help="image or folder to inpaint (RePaint), with --mask")
    g.add_argument("--mask", help="PNG of the image's size, WHITE = generate, black = keep (diffusers' "
                   f"convention); or a built-in region to generate: {', '.join(BUILTIN_MASKS)}")
    g.add_argument("--resample", type=int, help=f"RePaint: walks of each block of --jump steps (default {RESAMPLE})")
    g.add_argument("--jump", type=int, help=f"RePaint: steps per resampled block (default {JUMP})")
    g.add_argument("--init-image", metavar="IMG", help="image-to-image (SDEdit) from this image or folder")
    g.add_argument("--strength", type=float, help="--init-image: fraction of the noise levels to redo, in (0, 1] "
                   "(default 0.6; 1 = ignore the image)")
    g.add_argument("--interpolate", nargs="*", metavar="IMG", help="two images A B (inverted with DDIM), or none "
                   "with --seeds: slerp between their noises, DDIM (eta 0) frames; strip.png and interpolation.gif")
    g.add_argument("--seeds", nargs=2, type=int, metavar=("S1", "S2"), help="--interpolate between the noises "
                   "of sample 0 of these two seeds")
    g.add_argument("--frames", type=int, help=f"--interpolate: number of frames (default {FRAMES})")
    g.add_argument("--invert", metavar="IMG", help="DDIM-invert and reconstruct this image or folder; PSNR in "
                   "invert.json")


def edit_mode(args) -> Optional[str]:
    """The editing mode asked for (None: plain sampling); refuses two modes, or a mode's flag without it."""
    modes = [m for m in MODES if getattr(args, m) is not None]
    if len(modes) > 1:
        raise SampleError(f"{' and '.join(MODES[m] for m in modes)} are two editing modes at once: give one")
    mode = modes[0] if modes else None
    for name, owner in ONLY_WITH.items():
        if getattr(args, name) is not None and mode != owner:
            raise SampleError(f"--{name} belongs to {MODES[owner]}: drop --{name}, or add {MODES[owner]}")
    if mode in ("interpolate", "invert") and args.num_samples is not None:
        raise SampleError(f"--num-samples sets the results per input of --inpaint and --init-image; {MODES[mode]} "
                          "makes one per image (or --frames): drop --num-samples")
    if mode and args.forward:
        raise SampleError(f"--forward draws the forward process only: drop it, or drop {MODES[mode]}")
    if mode and args.animation and mode != "init_image":
        raise SampleError(f"--animation is written for sampling and --init-image only, not {MODES[mode]}: drop it")
    return mode


@dataclass
class EditJob:
    """One planned edit: `names` are its output files; run() samples, save(result, folder) writes them."""
    mode: str
    folder: str                       # the default output folder's name
    names: list[str]
    run: Callable[[Optional[Callable]], torch.Tensor]   # run(callback for the first batch) -> results
    save: Callable[[torch.Tensor, Path], list[Path]]
    timesteps: list[int] = field(default_factory=list)  # --init-image: the grid walked (for --animation)


# ----------------------------------------------------------------------------- checks shared by the modes
def _settings(args, cfg, diffusion, sampler: Optional[str]) -> dict:
    return sampling_settings(cfg, diffusion.num_timesteps, sampler, args.steps, args.eta, args.timestep_spacing,
                             args.guidance_scale)


def _check_ddim_only(args, mode: str) -> None:
    """Inversion is deterministic DDIM (eta 0), without guidance (its drift would break the reconstruction)."""
    if args.sampler not in (None, "ddim"):
        raise SampleError(f"{MODES[mode]} runs DDIM (inversion is its deterministic ODE); --sampler {args.sampler} "
                          "cannot be used: drop --sampler, or pass --sampler ddim")
    if args.eta not in (None, 0.0):
        raise SampleError(f"{MODES[mode]} runs DDIM with eta 0 (deterministic); drop --eta {args.eta:g}")
    if args.guidance_scale not in (None, 1.0) and (mode == "invert" or args.interpolate):
        raise SampleError(f"{MODES[mode]} inverts images with the unguided model, so guided sampling would not "
                          "give them back: drop --guidance-scale (or interpolate between --seeds)")


def _labels(args, cfg, class_names, count: int) -> Optional[torch.Tensor]:
    """--class-label cycled over the `count` outputs; None (the unconditional model) when not given."""
    labels = parse_class_labels(args.class_label, cfg.model.num_classes, class_names)
    return None if labels is None else torch.tensor([labels[i % len(labels)] for i in range(count)])


def _folder(mode: str, kw: dict, num_steps: int, seed: int, extra: str = "") -> str:
    name = f"{mode.replace('init_image', 'img2img')}_{kw['sampler']}_{num_steps}_{seed}{extra}"
    if kw["eta"]:
        name += f"_eta{kw['eta']:g}"
    return name + (f"_g{kw['guidance_scale']:g}" if kw["guidance_scale"] != 1.0 else "")


def _sample_names(n: int) -> list[str]:
    return [f"{i:06d}.png" for i in range(n)]


def _batched(fn: Callable, n: int, batch_size: int, seed: int, y: Optional[torch.Tensor],
             callback: Optional[Callable] = None) -> torch.Tensor:
    """fn(slice, noise, y, callback) over the n outputs in batches; output j's noise is SampleNoise(seed, j)."""
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        part = fn(slice(start, stop), SampleNoise(seed, range(start, stop)), None if y is None else y[start:stop],
                  callback if start == 0 else None)
        out.append(part.float().cpu())
    return torch.cat(out)


def _save_grid(rows: list[torch.Tensor], results: torch.Tensor, out_dir: Path) -> list[Path]:
    """grid.png with one row per input (its leading columns `rows`, then its results) and 000000.png ..."""
    k = len(results) // len(rows[0])
    cells = [torch.cat([*(r[i:i + 1] for r in rows), results[i * k:(i + 1) * k]]) for i in range(len(rows[0]))]
    grid = save_pil(image_grid(torch.cat(cells), nrow=len(rows) + k), out_dir / "grid.png")
    return [grid] + [save_png(x, out_dir / f"{j:06d}.png") for j, x in enumerate(results)]


def _guided(args, kw: dict) -> bool:
    """Classifier-free guidance doubles each batch (labels given, scale != 1)."""
    return args.class_label is not None and kw["guidance_scale"] != 1.0


def _check_image_model(cfg, mode: str) -> None:
    if cfg.model.kind == "mlp":
        raise SampleError(f"{MODES[mode]} edits images, but this checkpoint is a 2-D toy model (model.kind = mlp): "
                          "use an image model's checkpoint, or drop the editing flags")


def plan_edit(mode: str, args, model, diffusion, cfg, class_names=(), seed: int = 0) -> EditJob:
    """Reads the inputs and checks every flag for `mode`; nothing is evaluated yet."""
    _check_image_model(cfg, mode)
    plan = {"inpaint": _plan_inpaint, "init_image": _plan_img2img, "interpolate": _plan_interpolate,
            "invert": _plan_invert}[mode]
    return plan(args, model, diffusion, cfg, class_names, seed)


def _inputs(args, cfg, flag: str, path: str):
    x, files, sizes = load_images(path, cfg.model.in_channels, cfg.data.image_size, flag)
    print(f"{flag}: {len(files)} image{'s' * (len(files) > 1)} from '{path}'")
    return x, files, sizes


def _per_input(args) -> int:
    return args.num_samples or 1


def _check_cost(args, cfg, diffusion, mode: str, outputs: int, evaluations: int, batch: int = 0, guided=False,
                count_flag: str = "--num-samples", steps_flags: str = "--steps") -> None:
    """limits.check_sampling for an edit, before its inputs are repeated or its schedule is built; batch: one
    batch of this size whatever --batch-size says (--interpolate)."""
    check_sampling(cfg, outputs, batch or args.batch_size or cfg.sample.batch_size, evaluations,
                   diffusion.betas.device, guided=guided, what=MODES[mode], count_flag=count_flag,
                   steps_flags=steps_flags, out_folder=Path(args.out) if args.out else None,
                   batch_flag="" if batch else " or --batch-size")


# ----------------------------------------------------------------------------- --inpaint
def _repaint_params(args, num_steps: int) -> tuple[int, int]:
    """--resample/--jump, or the defaults fitted to short grids (a block must fit below the top)."""
    for name in ("resample", "jump"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SampleError(f"--{name} {getattr(args, name)} must be an integer >= 1 (1 = no {name})")
    resample = args.resample or (RESAMPLE if num_steps > 1 else 1)
    jump = args.jump or max(1, min(JUMP, num_steps - 1))
    if resample > 1 and jump >= num_steps:
        raise SampleError(f"--jump {jump} leaves no block to resample on a grid of {num_steps} steps: use "
                          f"--jump below {num_steps}, or more --steps")
    return resample, jump


def _plan_inpaint(args, model, diffusion, cfg, class_names, seed) -> EditJob:
    if args.mask is None:
        raise SampleError("--inpaint needs --mask: a PNG of the image's size (white = generate, black = keep) "
                          f"or a built-in region ({', '.join(BUILTIN_MASKS)})")
    if args.sampler is not None and args.sampler not in INPAINT_SAMPLERS:
        raise SampleError(f"--inpaint cannot use --sampler {args.sampler} (its multistep history breaks when the "
                          f"known pixels are re-noised): use --sampler {' or '.join(INPAINT_SAMPLERS)}")
    sampler = args.sampler or (cfg.sample.sampler if cfg.sample.sampler in INPAINT_SAMPLERS else "ddim")
    kw = _settings(args, cfg, diffusion, sampler)
    ts = diffusion.sampling_timesteps(kw["sampler"], kw["steps"], kw["timestep_spacing"])
    resample, jump = _repaint_params(args, len(ts))
    x, files, sizes = _inputs(args, cfg, "--inpaint", args.inpaint)
    k = _per_input(args)
    _check_cost(args, cfg, diffusion, "inpaint", len(x) * k, repaint_evaluations(len(ts), resample, jump),
                guided=_guided(args, kw), steps_flags="--steps or --resample / --jump")
    mask = load_mask(args.mask, cfg.data.image_size, sizes).expand(len(x), 1, -1, -1)
    src, keep = x.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    y, dev = _labels(args, cfg, class_names, len(src)), diffusion.betas.device

    def one(sl, noise, y_b, _):
        with sampling_autocast(dev, args.amp):
            return inpaint(diffusion, model, src[sl].to(dev), keep[sl].to(dev), resample=resample, jump=jump,
                           generator=noise, y=None if y_b is None else y_b.to(dev), **kw)
    bs = args.batch_size or cfg.sample.batch_size
    return EditJob("inpaint", _folder("inpaint", kw, len(ts), seed, f"_r{resample}j{jump}"), ["grid.png"]
                   + _sample_names(len(src)), lambda cb: _batched(one, len(src), bs, seed, y),
                   lambda r, out: _save_grid([x, mask_picture(x, mask)], r, out))


# ----------------------------------------------------------------------------- --init-image
def _plan_img2img(args, model, diffusion, cfg, class_names, seed) -> EditJob:
    strength = 0.6 if args.strength is None else args.strength
    if not 0 < strength <= 1:  # NaN too
        raise SampleError(f"--strength {strength:g} is outside (0, 1]: use e.g. 0.3 (keep most of the image) up "
                          "to 1 (ignore it)")
    kw = _settings(args, cfg, diffusion, args.sampler)
    ts = sdedit_timesteps(diffusion, strength, kw["sampler"], kw["steps"], kw["timestep_spacing"])
    x, files, _ = _inputs(args, cfg, "--init-image", args.init_image)
    k = _per_input(args)
    _check_cost(args, cfg, diffusion, "init_image", len(x) * k, len(ts), guided=_guided(args, kw),
                steps_flags="--steps or --strength")
    src = x.repeat_interleave(k, 0)
    y, dev = _labels(args, cfg, class_names, len(src)), diffusion.betas.device

    def one(sl, noise, y_b, callback):
        y_b = None if y_b is None else y_b.to(dev)
        with sampling_autocast(dev, args.amp):
            if callback is None:
                return edit(diffusion, model, src[sl].to(dev), strength, generator=noise, y=y_b, **kw)
            return _edit_recorded(diffusion, model, src[sl].to(dev), ts, noise, y_b, kw, callback)

    def noised():  # each input's starting point: its first output's first noise draw, as edit() makes it
        noise = SampleNoise(seed, range(0, len(src), k)).randn(x.shape, device=dev)
        return diffusion.q_sample(x.to(dev), diffusion.timestep_batch(ts[0], noise), noise).cpu()
    bs = args.batch_size or cfg.sample.batch_size
    return EditJob("init_image", _folder("init_image", kw, len(ts), seed, f"_s{strength:g}"),
                   ["grid.png"] + _sample_names(len(src)), lambda cb: _batched(one, len(src), bs, seed, y, cb),
                   lambda r, out: _save_grid([x, noised()], r, out), timesteps=ts)


def _edit_recorded(diffusion, model, x0, ts, noise, y, kw, callback) -> torch.Tensor:
    """edit()'s loop with a callback(i, t, x_t, x0_pred) for --animation (edit() takes none)."""
    x = diffusion.q_sample(x0, diffusion.timestep_batch(ts[0], x0), diffusion.draw_noise(x0.shape, noise))
    for rec in diffusion.sample_steps(model, x, ts, kw["sampler"], eta=kw["eta"], generator=noise, y=y,
                                      guidance_scale=kw["guidance_scale"], clip_x0=kw["clip_x0"], progress=False):
        x = rec.xt
        callback(rec.i, rec.t, rec.xt, rec.x0_pred)
    return x


# ----------------------------------------------------------------------------- --invert
def _plan_invert(args, model, diffusion, cfg, class_names, seed) -> EditJob:
    _check_ddim_only(args, "invert")
    kw = dict(_settings(args, cfg, diffusion, "ddim"), guidance_scale=1.0)
    ts = diffusion.sampling_timesteps("ddim", kw["steps"], kw["timestep_spacing"])
    x, files, _ = _inputs(args, cfg, "--invert", args.invert)
    _check_cost(args, cfg, diffusion, "invert", len(x), 2 * len(ts))  # inversion, then the reconstruction
    y, dev = _labels(args, cfg, class_names, len(x)), diffusion.betas.device
    noises = []

    def one(sl, _noise, y_b, _cb):  # fp32: the reconstruction error is what this mode measures
        y_b = None if y_b is None else y_b.to(dev)
        x_T = invert(diffusion, model, x[sl].to(dev), steps=kw["steps"], y=y_b, timestep_spacing=kw["timestep_spacing"])
        noises.append(x_T.float().cpu())
        return diffusion.sample(model, x_T.shape, "ddim", kw["steps"], eta=0.0, x_T=x_T, y=y_b, clip_x0=kw["clip_x0"],
                                timestep_spacing=kw["timestep_spacing"])

    def save(r, out):
        scores = psnr(x, r)
        for f, s in zip(files, scores):
            print(f"reconstruction of '{f}': PSNR {s:.2f} dB")
        record = {"steps": len(ts), "mean_psnr_db": sum(scores) / len(scores), "psnr_db": {
            f"{j:06d}.png": {"input": str(f), "psnr_db": s} for j, (f, s) in enumerate(zip(files, scores))}}
        write_bytes_output(out / "invert.json", json.dumps(record, indent=1).encode(), replace=True)  # folder checked
        print(f"mean PSNR {record['mean_psnr_db']:.2f} dB over {len(scores)} image(s), {len(ts)} DDIM steps")
        return _save_grid([x, torch.cat(noises).clamp(-1, 1)], r, out) + [out / "invert.json"]
    bs = args.batch_size or cfg.sample.batch_size
    return EditJob("invert", _folder("invert", kw, len(ts), seed), ["grid.png", "invert.json"] + _sample_names(len(x)),
                   lambda cb: _batched(one, len(x), bs, seed, y), save)


# ----------------------------------------------------------------------------- --interpolate
def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; DDIM Sec. 5.3 uses it between x_T's): stays at the norm of
    Gaussian noise, where linear interpolation would shrink it in the middle."""
    a, b = z0.flatten(), z1.flatten()
    theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    if theta < 1e-6:
        return (1 - alpha) * z0 + alpha * z1
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def _plan_interpolate(args, model, diffusion, cfg, class_names, seed) -> EditJob:
    _check_ddim_only(args, "interpolate")
    if len(args.interpolate) not in (0, 2) or (len(args.interpolate) == 2) == (args.seeds is not None):
        raise SampleError("--interpolate takes two images (--interpolate A B), or none with two seeds "
                          "(--interpolate --seeds S1 S2)")
    frames = FRAMES if args.frames is None else args.frames
    if frames < 2:
        raise SampleError(f"--frames {frames}: an interpolation needs at least 2 frames (its two ends)")
    kw = _settings(args, cfg, diffusion, "ddim")
    if args.interpolate:
        kw["guidance_scale"] = 1.0  # the inversion's model (see _check_ddim_only)
    ts = diffusion.sampling_timesteps("ddim", kw["steps"], kw["timestep_spacing"])
    # the frames are sampled as one batch (and kept twice more as GIF pictures: within the estimate's slack)
    _check_cost(args, cfg, diffusion, "interpolate", frames, len(ts), batch=frames, guided=_guided(args, kw),
                count_flag="--frames")
    ends = [_inputs(args, cfg, "--interpolate", p)[0] for p in args.interpolate]
    if any(len(e) != 1 for e in ends):
        raise SampleError("--interpolate takes two image files, not folders")
    y = _labels(args, cfg, class_names, 2)
    y = None if y is None else y[:1]
    dev, shape = diffusion.betas.device, (1, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)

    def run(_cb):
        if ends:
            zs = [invert(diffusion, model, e.to(dev), steps=kw["steps"], y=None if y is None else y.to(dev),
                         timestep_spacing=kw["timestep_spacing"]).float().cpu() for e in ends]
        else:
            zs = [SampleNoise(s, [0]).randn(shape) for s in args.seeds]
        x_T = torch.cat([slerp(zs[0], zs[1], a / (frames - 1)) for a in range(frames)])
        yy = None if y is None else y.expand(frames).to(dev)
        return diffusion.sample(model, x_T.shape, "ddim", kw["steps"], eta=0.0, x_T=x_T.to(dev), y=yy,
                                guidance_scale=kw["guidance_scale"], clip_x0=kw["clip_x0"],
                                timestep_spacing=kw["timestep_spacing"]).float().cpu()
    tag = "_seeds" + "-".join(map(str, args.seeds)) if args.seeds else ""
    return EditJob("interpolate", _folder("interpolate", kw, len(ts), seed, tag),
                   ["strip.png", "interpolation.gif"] + _sample_names(frames), run,
                   lambda r, out: _save_interpolation(r, out, torch.cat(ends) if ends else None))


def _save_interpolation(frames: torch.Tensor, out_dir: Path, ends: Optional[torch.Tensor]) -> list[Path]:
    """strip.png (the frames in a row, the two input images at its ends when given), interpolation.gif
    (there and back) and one PNG per frame."""
    strip = frames if ends is None else torch.cat([ends[:1], frames, ends[1:]])
    save_pil(image_grid(strip, nrow=len(strip)), out_dir / "strip.png")
    pictures = [image_grid(f[None], nrow=1, min_cell=128).convert("P") for f in frames]
    loop = pictures + pictures[-2:0:-1]
    save_pil(loop[0], out_dir / "interpolation.gif", save_all=True, append_images=loop[1:], duration=150, loop=0)
    return [out_dir / "strip.png", out_dir / "interpolation.gif"] + [
        save_png(f, out_dir / f"{j:06d}.png") for j, f in enumerate(frames)]
