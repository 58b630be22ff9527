"""Editing with a trained diffusion model: inpainting, inversion, image-to-image.

Free functions over the public core: `inpaint(diffusion, model, x_known, mask, ...)`, `invert(diffusion, model,
x0, ...)`, `edit(diffusion, model, x0, strength, ...)`, for any Diffusion and any model `model(xt, t, y=None)`.
All three walk the sampling grids of `Diffusion.sampling_timesteps` with the one step function `Diffusion.step`,
and use only Diffusion's public names (`timestep_batch`, `guided_model`, `draw_noise`, ...); diffusion.py does
not import this module. `generator=` is None, a torch.Generator or a diffusion.NoiseSource (`noise_source`).

References (equation and algorithm numbers are the papers'):
  [RePaint] Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models"
  [DDIM]    Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"
  [SDEdit]  Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations"
  [DDPM]    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from config import ConfigError
from diffusion import DATA_T, Diffusion, NoiseSource, noise_source

INPAINT_SAMPLERS = ("ddpm", "ddim")  # see inpaint's docstring for why not dpmpp2m


# ----------------------------------------------------------------------------- argument checks
def _check_input(model: Callable, x: torch.Tensor, name: str, y: Optional[torch.Tensor]) -> None:
    """x must be a batch the model takes: (B, C, H, W) with the UNet's channels, (B, dim) for the MLP; y one
    label per sample, within the model's classes. Checked before any model evaluation."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ConfigError(f"{name} must be a float tensor batch (B, ...), got "
                          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    channels, dim = getattr(model, "in_channels", None), getattr(model, "dim", None)
    if channels is not None and (x.ndim != 4 or x.shape[1] != channels):
        raise ConfigError(f"{name} has shape {tuple(x.shape)} but the model takes images (B, {channels}, H, W); "
                          f"give {channels}-channel images")
    if dim is not None and tuple(x.shape[1:]) != (dim,):
        raise ConfigError(f"{name} has shape {tuple(x.shape)} but the model takes points (B, {dim})")
    if y is None:
        return
    if tuple(y.shape) != (x.shape[0],):
        raise ConfigError(f"labels y must be one per sample, shape ({x.shape[0]},), got {tuple(y.shape)}")
    classes = getattr(model, "num_classes", None)
    if classes is not None and bool((y >= max(classes, 0)).any()):
        raise ConfigError(f"labels must be below the model's {classes} classes (or -1 for none), got "
                          f"{sorted(set(y.tolist()))}")


def _check_mask(x_known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask as a bool tensor of x_known's shape (True = known). It may broadcast, e.g. (B, 1, H, W) or
    (1, 1, H, W) over the channels and the batch, but must hold only 0 and 1."""
    mask = torch.as_tensor(mask)
    try:
        fits = torch.broadcast_shapes(mask.shape, x_known.shape) == x_known.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ConfigError(f"mask of shape {tuple(mask.shape)} does not fit the image of shape {tuple(x_known.shape)}; "
                          "give one mask per image (B, 1, H, W), or (1, 1, H, W) for all, with 1 = keep")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError("mask must hold only 0 (generate) and 1 (keep); threshold a soft mask first")
    return mask.to(x_known.device).bool().expand(x_known.shape)


# ----------------------------------------------------------------------------- RePaint inpainting
def repaint_schedule(num_steps: int, resample: int, jump: int) -> list[int]:
    """[RePaint] Sec. 4.2 / Algorithm 1 with jumps, as the authors' get_schedule_jump: the positions visited
    on a grid of `num_steps` noise levels, num_steps - 1 (the top) down to -1 (the data). Going down one
    position is one reverse step (one model evaluation); a rise of `jump` is a jump back up with the
    forward process. Each block of `jump` steps whose bottom is a multiple of `jump` and whose top lies on
    the grid is walked `resample` times; the last step, onto the data, once."""
    left = {s: resample - 1 for s in range(0, num_steps - jump, jump)}  # the blocks' bottoms
    s, path = num_steps - 1, [num_steps - 1]
    while s >= 0:
        s -= 1
        path.append(s)
        if left.get(s, 0) > 0:
            left[s] -= 1
            s += jump
            path.append(s)
    return path


def repaint_evaluations(num_steps: int, resample: int, jump: int) -> int:
    """The model evaluations of repaint_schedule (its steps down), without building it: one per grid step, plus
    jump for each extra walk of each block."""
    return num_steps + (resample - 1) * jump * len(range(0, num_steps - jump, jump))


def _forward_jump(diffusion: Diffusion, x: torch.Tensor, t_from: int, t_to: int,
                  noise: torch.Tensor) -> torch.Tensor:
    """q(x_{t_to} | x_{t_from}) for t_to > t_from ([DDPM] Eq. 2 composed; [RePaint] Algorithm 1, line 10):
    x_to = sqrt(abar_to / abar_from) x_from + sqrt(1 - abar_to / abar_from) eps."""
    ratio = diffusion.alpha_bar_prev(t_to, x) / diffusion.alpha_bar_prev(t_from, x)
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


def _with_known(diffusion: Diffusion, x: torch.Tensor, t: int, x_known: torch.Tensor, mask: torch.Tensor,
                noise: NoiseSource) -> torch.Tensor:
    """[RePaint] Algorithm 1, lines 4-5 and 8: the known pixels noised to level t with fresh noise
    (x_known itself at the data, t < 0), the unknown ones from x."""
    if t >= 0:
        x_known = diffusion.q_sample(x_known, diffusion.timestep_batch(t, x), diffusion.draw_noise(x.shape, noise))
    return torch.where(mask, x_known, x)


def _inpaint_checks(diffusion, model, x_known, mask, sampler, steps, eta, resample, jump, y, spacing):
    """Every argument of inpaint, checked before any work. Returns x_known (float32, on the diffusion's device),
    the mask (bool, its shape), eta and the decreasing grid."""
    eta = diffusion.check_eta(sampler, eta)
    if sampler not in INPAINT_SAMPLERS:
        raise ConfigError(f"inpainting cannot use sampler {sampler}: its multistep history assumes one continuous "
                          f"trajectory, which the known pixels' re-noising and the jumps break; use "
                          f"{' or '.join(INPAINT_SAMPLERS)}")
    for name, value in (("resample", resample), ("jump", jump)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r} (1 = no {name})")
    _check_input(model, x_known, "the image to inpaint", y)
    x_known = x_known.to(diffusion.betas.device).float()
    mask = _check_mask(x_known, mask)
    timesteps = diffusion.sampling_timesteps(sampler, steps, spacing)
    if resample > 1 and jump >= len(timesteps):
        raise ConfigError(f"jump={jump} leaves no block to resample on a grid of {len(timesteps)} steps; "
                          f"use a jump below {len(timesteps)}")
    return x_known, mask, eta, timesteps


@torch.no_grad()
def inpaint(diffusion: Diffusion, model: Callable, x_known: torch.Tensor, mask: torch.Tensor,
            sampler: str = "ddpm", steps: Optional[int] = None, eta: Optional[float] = None,
            resample: int = 1, jump: int = 1, generator: Optional[torch.Generator | NoiseSource] = None,
            y: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, clip_x0: bool = True,
            progress: bool = True, timestep_spacing: Optional[str] = None) -> torch.Tensor:
    """RePaint ([RePaint] Algorithm 1 with the jump schedule of Sec. 4.2, `repaint_schedule`): fill in the
    pixels of x_known where mask == 0. MASK CONVENTION: here mask == 1 marks the KNOWN pixels, which are kept
    (the command line reads diffusers' PNG masks, white = generate, and converts). mask broadcasts to
    x_known, e.g. (B, 1, H, W); values 0/1 only. The result equals x_known (as float32) exactly where mask == 1.

    At every reverse step the known pixels are re-noised from x_known to the step's level and the unknown
    ones come from the sampler step; with resample > 1 each block of `jump` steps is repeated after jumping
    back up with the forward process, which lets the unknown pixels harmonise with the known ones (plain
    replacement, resample=1, ignores their correlation). It walks the grid of sample(sampler, steps): ddpm,
    or ddim with any eta. Not dpmpp2m: its second-order step extrapolates from the previous step's x0
    along one ODE trajectory, which the re-noised known pixels and the jumps break at every step. One
    progress bar counts the model evaluations: len(grid) + (resample - 1) * jump * blocks."""
    noise_src = noise_source(generator)
    x_known, mask, eta, timesteps = _inpaint_checks(diffusion, model, x_known, mask, sampler, steps, eta, resample,
                                                    jump, y, timestep_spacing)
    levels = [*reversed(timesteps), DATA_T]  # position s on the grid -> timestep (DATA_T, -1 -> the data)
    path = repaint_schedule(len(timesteps), resample, jump)
    model_fn = diffusion.guided_model(model, y, guidance_scale)
    # x_T, with the known pixels already at their level (the authors' code replaces them before every step)
    x = _with_known(diffusion, diffusion.draw_noise(x_known.shape, noise_src), levels[path[0]], x_known, mask,
                    noise_src)
    bar = tqdm(total=sum(b < a for a, b in zip(path, path[1:])), desc=f"{sampler} inpainting", leave=False,
               disable=not progress)
    with bar:
        for a, b in zip(path, path[1:]):
            t, t_next = levels[a], levels[b]
            if b > a:  # jump back up: every pixel, known ones included, through the forward process
                x = _forward_jump(diffusion, x, t, t_next, diffusion.draw_noise(x.shape, noise_src))
                continue
            out = model_fn(x, diffusion.timestep_batch(t, x))
            noise = diffusion.draw_noise(x.shape, noise_src) if diffusion.needs_noise(sampler, t_next, eta) else None
            x = diffusion.step(sampler, out, x, t, t_next, eta=eta, noise=noise, clip_x0=clip_x0).prev_sample
            x = _with_known(diffusion, x, t_next, x_known, mask, noise_src)
            bar.update(1)
    return x


# ----------------------------------------------------------------------------- DDIM inversion
def _ddim_up(diffusion: Diffusion, model_out: torch.Tensor, x: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
    """Inverts the deterministic sampling step t_next -> t ([DDIM] Eq. 12, eta = 0), which uses the (x0, eps) the
    model predicts at (x_{t_next}, t_next): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The unknown x_{t_next}
    is replaced by x_t in the model's input (model_out = model(x_t, t_next), as diffusers' DDIMInverseScheduler);
    then x0 follows from x_t exactly and x_{t_next} = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps. t may be
    the data (DATA_T, abar = 1: x0 is x itself)."""
    _, eps = diffusion.predict_x0_eps(model_out, x, diffusion.timestep_batch(t_next, x))
    abar, abar_next = diffusion.alpha_bar_prev(t, x), diffusion.alpha_bar_prev(t_next, x)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps


@torch.no_grad()
def invert(diffusion: Diffusion, model: Callable, x0: torch.Tensor, steps: Optional[int] = None,
           y: Optional[torch.Tensor] = None, progress: bool = True,
           timestep_spacing: Optional[str] = None) -> torch.Tensor:
    """DDIM inversion ([DDIM] Sec. 4.3 and 5.4: the ODE of Eq. 14 run from x0 to x_T): x_T such that
    sample(model, ..., sampler="ddim", steps=steps, x_T=x_T) gives back x0, on that same grid walked
    upwards, from the data to the grid's top, one model evaluation per step (`_ddim_up`). The model is
    evaluated at each step's target timestep, with x one step behind, so the reconstruction error falls
    like 1 / steps (first order; smaller than evaluating at the step's start: measured on a Gaussian, max
    error 0.26 instead of 0.51 at 10 steps, 0.017 instead of 0.025 at 250). Deterministic: DDIM with
    eta = 0 only; with y, the conditional model (guidance makes the inversion drift)."""
    _check_input(model, x0, "the image to invert", y)
    levels = [DATA_T, *reversed(diffusion.sampling_timesteps("ddim", steps, timestep_spacing))]
    model_fn = diffusion.guided_model(model, y, 1.0)
    x = x0.to(diffusion.betas.device).float()
    with tqdm(total=len(levels) - 1, desc="ddim inversion", leave=False, disable=not progress) as bar:
        for t, t_next in zip(levels, levels[1:]):
            x = _ddim_up(diffusion, model_fn(x, diffusion.timestep_batch(t_next, x)), x, t, t_next)
            bar.update(1)
    return x


# ----------------------------------------------------------------------------- SDEdit
def sdedit_timesteps(diffusion: Diffusion, strength: float, sampler: str, steps: Optional[int] = None,
                     spacing: Optional[str] = None) -> list[int]:
    """The grid SDEdit walks at `strength`: the sampler's grid restricted to t <= t_start, where
    t_start = round(strength * T) - 1 (the level of noise strength * T of T; strength 1 -> T - 1). x0 is
    noised to the first grid point at or below t_start (on the ddpm grid t_start itself), so the walk
    is the tail of sample()'s, as in diffusers' img2img (which keeps the last int(strength * steps) steps)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ConfigError(f"strength must be in (0, 1] (the fraction of the noise levels to redo; 1 = plain "
                          f"sampling), got {strength!r}")
    grid = diffusion.sampling_timesteps(sampler, steps, spacing)
    t_start = max(round(strength * diffusion.num_timesteps) - 1, 0)
    kept = [t for t in grid if t <= t_start]
    if not kept:
        raise ConfigError(f"strength {strength:g} (t <= {t_start}) is below the lowest timestep {grid[-1]} of the "
                          f"{sampler} grid with {len(grid)} steps; raise strength above "
                          f"{(grid[-1] + 1) / diffusion.num_timesteps:g}, or use more steps or another spacing")
    return kept


@torch.no_grad()
def edit(diffusion: Diffusion, model: Callable, x0: torch.Tensor, strength: float, sampler: str = "ddpm",
         steps: Optional[int] = None, eta: Optional[float] = None,
         generator: Optional[torch.Generator | NoiseSource] = None,
         y: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, clip_x0: bool = True,
         progress: bool = True, timestep_spacing: Optional[str] = None) -> torch.Tensor:
    """SDEdit ([SDEdit] Algorithm 1, here with the VP forward process [DDPM] Eq. 4 and any sampler): noise x0
    to t_start with the forward process and sample back from there. strength in (0, 1]: low keeps the
    input's detail, 1 is plain sampling (x0 noised to the top of the grid, almost pure noise). The grid
    and t_start are `sdedit_timesteps`'; the progress bar counts its model evaluations, one per step."""
    noise_src = noise_source(generator)
    eta = diffusion.check_eta(sampler, eta)
    timesteps = sdedit_timesteps(diffusion, strength, sampler, steps, timestep_spacing)
    _check_input(model, x0, "the image to edit", y)
    x0 = x0.to(diffusion.betas.device).float()
    x = diffusion.q_sample(x0, diffusion.timestep_batch(timesteps[0], x0), diffusion.draw_noise(x0.shape, noise_src))
    for record in diffusion.sample_steps(model, x, timesteps, sampler, eta=eta, generator=noise_src, y=y,
                                         guidance_scale=guidance_scale, clip_x0=clip_x0, progress=progress):
        x = record.xt
    return x
