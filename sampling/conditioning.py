"""Image conditioning, the SR3 way (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement"):
the condition image, brought to the output size, is concatenated to x_t as extra input channels of the same
U-Net. Training and every sampler stay as they are: the model they get is `with_condition(model, cond)`.

data.task (config.py):
  generate  no condition (plain DDPM)
  superres  the condition is the target averaged down by data.sr_factor (area), then upsampled bicubically
            back to the target size; the model takes in_channels extra channels
  colorize  the condition is the target's grey version (ITU-R 601 luma, as PIL's convert("L")); 1 extra channel

The condition is always a deterministic function of the (augmented) target batch, `make_condition`, so a
flipped target has a flipped condition by construction and no data set needs to know about tasks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights of PIL's convert("L")


def low_res(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, S/f, S/f): the area average of each f x f block (what a camera pixel sees)."""
    return F.avg_pool2d(x, factor)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Low-res images back to (size, size), bicubic (align_corners=False, as PIL and SR3), clamped to [-1, 1]:
    the superres condition, and the bicubic baseline."""
    return F.interpolate(low.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [-1, 1] -> (B, 1, H, W) luma (an affine map, so [-1, 1] stays [-1, 1])."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def make_condition(x0: torch.Tensor, task: str, sr_factor: int = 4) -> torch.Tensor:
    """The condition of a target batch (B, C, S, S), at the target's size."""
    if task == "superres":
        return upsample(low_res(x0, sr_factor), x0.shape[-1]).to(x0.dtype)
    if task == "colorize":
        return grey(x0)
    raise ValueError(f"data.task={task!r} has no condition image")


def condition_from_input(x: torch.Tensor, task: str, size: int) -> torch.Tensor:
    """The condition from what a user gives: superres a low-res image (upsampled as in training), colorize a
    grey image (already at the model's size)."""
    return upsample(x, size) if task == "superres" else x


def baseline(cond: torch.Tensor, task: str, channels: int) -> torch.Tensor:
    """The classical answer to compare with: bicubic upsampling (superres: the condition itself), or the grey
    image as RGB (colorize)."""
    return cond if task == "superres" else cond.expand(-1, channels, -1, -1)


class Conditioned:
    """`model` with `cond` (B, Cc, S, S) concatenated to x_t as extra channels: called like a model,
    fn(xt, t, y=None). A batch that is a multiple of cond's (classifier-free guidance runs [xt, xt] in one
    call) gets cond repeated. Exposes in_channels / num_classes, which the editing checks read."""

    def __init__(self, model: Callable, cond: torch.Tensor):
        self.model, self.cond = model, cond
        self.in_channels = getattr(model, "in_channels", None)
        self.num_classes = getattr(model, "num_classes", None)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        cond, n = self.cond, self.cond.shape[0]
        if xt.shape[0] != n:
            if xt.shape[0] % n:
                raise ValueError(f"a batch of {xt.shape[0]} images for {n} condition images")
            cond = cond.repeat(xt.shape[0] // n, 1, 1, 1)
        return self.model(torch.cat([xt, cond.to(device=xt.device, dtype=xt.dtype)], dim=1), t, y)


def with_condition(model: Callable, cond: Optional[torch.Tensor]) -> Callable:
    """The model to hand to the diffusion (loss, samplers, editing); `model` itself when cond is None."""
    return model if cond is None else Conditioned(model, cond)


def conditioned(cfg) -> bool:
    return cfg.data.task != "generate"


def condition_for(cfg, x0: torch.Tensor) -> Optional[torch.Tensor]:
    """make_condition with the config's task and factor; None for unconditioned models."""
    return make_condition(x0, cfg.data.task, cfg.data.sr_factor) if conditioned(cfg) else None
