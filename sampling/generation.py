"""Batched generation with per-sample seeds, and the sampling settings sample.py and evaluate.py share.

Sample i of seed s is the same whatever batch it is drawn in: each sample draws its noise (x_T and every
stochastic step) from its own CPU generator seeded from (s, i), as in the EDM code base's
StackedRandomGenerator (NVlabs/edm generate.py). Drawing on the CPU also makes a seed give the same noise on
any device.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from config import UserError, check_value
from diffusion import Diffusion, NoiseSource
from limits import check_sampling
from sampling.conditioning import with_condition
from utils import autocast, derive_seed, resolve_amp


class SampleError(UserError, ValueError):
    """A bad sampling argument (sample.py, evaluate.py); the message says what to change."""


# ----------------------------------------------------------------------------- per-sample noise
class SampleNoise(NoiseSource):
    """Noise for a batch of samples, one torch.Generator per sample seeded from (seed, index): a NoiseSource, so
    pass it as the `generator` of Diffusion.sample or the editing functions. randn draws each sample's share from
    its own stream and stacks them."""

    def __init__(self, seed: int, indices: Iterable[int]):
        self.generators = [torch.Generator().manual_seed(derive_seed(seed, int(i))) for i in indices]

    def randn(self, shape, device=None, dtype=None) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples asked of {len(self.generators)} generators")
        x = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators])
        return x.to(device=device, dtype=dtype)


def sample_shape(cfg) -> tuple[int, ...]:
    """The shape of one sample: (2,) for the 2-D toy MLP, else (C, S, S)."""
    size = cfg.data.image_size
    return (2,) if cfg.model.kind == "mlp" else (cfg.model.in_channels, size, size)


def sampling_autocast(device: torch.device, amp: str):
    """utils.autocast for --amp, refusing fp16 off CUDA (on CPU bf16 is the fast half precision)."""
    if resolve_amp(amp, device) == "fp16" and device.type != "cuda":
        raise SampleError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 (or off)")
    return autocast(device, amp)


# sample.py's and evaluate.py's sampling flags and the config keys whose rules (config.RANGES) they follow.
FLAG_KEYS = {"--seed": "seed", "--steps": "sample.steps", "--eta": "sample.eta", "--guidance-scale":
             "sample.guidance_scale", "--num-samples": "sample.num_samples", "--batch-size": "sample.batch_size"}


def check_flag_values(**values) -> None:
    """Flags as keyword arguments (guidance_scale=2.0; None = not given), each by its config key's rule."""
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        check_value(FLAG_KEYS[flag], value, flag)


def generate(model: Callable, diffusion: Diffusion, cfg, num_samples: int, batch_size: int, seed: int,
             sampler: str, steps: Optional[int], eta: float = 0.0, timestep_spacing: Optional[str] = None,
             labels: Optional[list[int]] = None, guidance_scale: float = 1.0, clip_x0: bool = True,
             amp: str = "auto", callback: Optional[Callable] = None, progress: bool = True,
             conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """num_samples samples (N, *sample_shape) on the CPU. Sample i draws its noise from its own generator
    seeded from (seed, i) (SampleNoise), so it does not depend on batch_size or the device. `callback(i, t,
    x_t, x0_pred)` sees the first batch only (enough for an animation). An image-conditioned model gets sample
    i's condition image conditions[i] (N, Cc, S, S; sampling/conditioning.py)."""
    check_value("seed", seed, "the seed")  # torch's generators take 64 bits
    device, shape = diffusion.betas.device, sample_shape(cfg)
    check_sampling(cfg, num_samples, batch_size, len(diffusion.sampling_timesteps(sampler, steps, timestep_spacing)),
                   device, guided=labels is not None and guidance_scale != 1.0)  # sample.py checked it too
    y_all = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    out = []
    starts = range(0, num_samples, batch_size)
    for b, start in enumerate(tqdm(starts, desc="batches", disable=not progress or len(starts) == 1)):
        n = min(batch_size, num_samples - start)
        y = y_all[start:start + n].to(device) if y_all is not None else None
        cond = conditions[start:start + n].to(device) if conditions is not None else None
        with sampling_autocast(device, amp):
            x = diffusion.sample(with_condition(model, cond), (n, *shape), sampler=sampler, steps=steps, eta=eta,
                                 generator=SampleNoise(seed, range(start, start + n)), y=y,
                                 guidance_scale=guidance_scale, clip_x0=clip_x0, progress=progress,
                                 callback=callback if b == 0 else None, timestep_spacing=timestep_spacing)
        out.append(x.float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- settings and checks
def sampling_settings(cfg, num_timesteps: int, sampler: Optional[str] = None, steps: Optional[int] = None,
                      eta: Optional[float] = None, timestep_spacing: Optional[str] = None,
                      guidance_scale: Optional[float] = None) -> dict:
    """generate()'s sampling keywords: the flags given (None = not given) over the checkpoint's `sample`
    section, after check_sampling_flags. timestep_spacing None means the diffusion config's."""
    check_flag_values(steps=steps, eta=eta, guidance_scale=guidance_scale)
    s = cfg.sample
    sampler = sampler or s.sampler
    steps = steps if steps is not None else (None if sampler == "ddpm" else s.steps)
    if steps is not None and steps > num_timesteps:
        raise SampleError(f"--steps {steps} is more than this model's T = {num_timesteps} diffusion steps: use "
                          f"--steps <= {num_timesteps}")
    check_sampling_flags(sampler, eta, timestep_spacing, guidance_scale, cfg.model.num_classes)
    eta = (s.eta if eta is None else eta) if sampler == "ddim" else 0.0  # a stored eta is ddim's default only
    return dict(sampler=sampler, steps=steps, eta=eta, timestep_spacing=timestep_spacing, clip_x0=s.clip_x0,
                guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale)


def check_sampling_flags(sampler: str, eta: Optional[float], spacing: Optional[str],
                         guidance_scale: Optional[float], num_classes: int) -> None:
    """Refuse explicit flags (None = not given) that are out of range or that this sampler or model would
    silently ignore."""
    Diffusion.check_eta(None, eta, "--eta")
    if eta is not None and sampler != "ddim":
        raise SampleError(f"--eta is used only by the ddim sampler; {sampler} ignores it: drop --eta, or pass "
                          "--sampler ddim")
    if spacing is not None and sampler == "ddpm":
        raise SampleError("--timestep-spacing is used only by ddim and dpmpp2m; ddpm visits all T steps: drop "
                          "--timestep-spacing, or pass --sampler ddim or dpmpp2m")
    if num_classes == 0 and guidance_scale not in (None, 1.0):
        raise SampleError("--guidance-scale needs a class-conditional model; this one has model.num_classes = 0")


# ----------------------------------------------------------------------------- class labels
def parse_class_labels(text: Optional[str], num_classes: int, class_names=()) -> Optional[list[int]]:
    """'3', '1,4,7', '1 4 7' or class names ('cat,dog') -> list of ints; None when no labels given."""
    if text is None:
        return None
    if num_classes == 0:
        raise SampleError("--class-label was given, but this model is unconditional (model.num_classes = 0): "
                          "drop --class-label, or train with model.num_classes > 0")
    labels = []
    for item in re.split(r"[,\s]+", text.strip()):
        if item in class_names:
            labels.append(list(class_names).index(item))
        elif re.fullmatch(r"-?\d+", item) and 0 <= int(item) < num_classes:
            labels.append(int(item))
        else:
            names = f" or a name ({', '.join(class_names)})" if class_names else ""
            raise SampleError(f"class label {item!r} is out of range: this model has {num_classes} classes, "
                              f"use 0..{num_classes - 1}{names}")
    return labels


def plan_labels(num_classes: int, labels: Optional[list[int]], num_samples: int):
    """(per-sample labels or None, images per grid row): exactly num_samples labels cycling over the classes
    (or over the listed labels), so the grid has one class per column, like train.py's sample grids."""
    if num_classes == 0:
        return None, None
    labels = labels if labels is not None else list(range(num_classes))
    nrow = len(labels) if 1 < len(labels) <= num_samples else None
    return [labels[i % len(labels)] for i in range(num_samples)], nrow


def random_labels(num_classes: int, num_samples: int, seed: int) -> Optional[list[int]]:
    """Uniform class labels for evaluation (None for unconditional models), from their own generator
    seeded with seed + 1, so that they do not depend on the batch size either."""
    if num_classes == 0:
        return None
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
