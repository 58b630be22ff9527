"""The images around an image-conditioned model (data.task superres / colorize, sampling/conditioning.py): held-out
targets whose conditions show progress in training grids and are scored by evaluate.py, the user's
condition images of sample.py --condition, and the comparison grid

    condition (nearest-neighbour enlarged) | bicubic (superres) | ddpm-lab | target (when known)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from sampling.conditioning import baseline, condition_from_input, conditioned, low_res
from sampling.generation import SampleError

GREY_MODES = ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F")


class Conditions(NamedTuple):
    """What a conditioned model is run on: `inputs` as the user sees them (superres: low-res, colorize: grey),
    `cond` the model's condition (output size), `targets` the true outputs or None, `labels` or None. With
    `per_input` K > 1 each is repeated K times (item j is result j % K of input j // K, as --inpaint's)."""
    inputs: torch.Tensor
    cond: torch.Tensor
    targets: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    per_input: int = 1


def repeat_conditions(conds: Conditions, k: int) -> Conditions:
    """K results per condition (SR3's outputs are diverse): every tensor repeated K times in a row; K = 1 is
    `conds` itself. Output j then draws its own noise SampleNoise(seed, j), as every sample does."""
    if k == 1:
        return conds
    tensors = (None if x is None else x.repeat_interleave(k, 0) for x in conds[:4])
    return Conditions(*tensors, per_input=k * conds.per_input)


def held_out_split(data_cfg):
    """The images a conditioned model is shown and scored on, never trained on: the data.holdout images of
    the training split, else the test split (digits and folders have none: then the training images)."""
    from dataset import build_dataset
    if data_cfg.holdout:
        return build_dataset(data_cfg, train=True, held_out=True), f"held-out {data_cfg.split} images"
    return build_dataset(data_cfg, train=False), "test split"


def conditions_from_targets(targets: torch.Tensor, labels: Optional[torch.Tensor], cfg) -> Conditions:
    """Conditions made from true targets exactly as in training (conditioning.make_condition)."""
    from sampling.conditioning import make_condition
    task, f = cfg.data.task, cfg.data.sr_factor
    inputs = low_res(targets, f) if task == "superres" else make_condition(targets, task)
    return Conditions(inputs, make_condition(targets, task, f), targets, labels)


def held_out_conditions(cfg, n: int) -> tuple[Conditions, str]:
    """The first n held-out targets (unflipped), their labels and conditions; (conditions, where they come from)."""
    dataset, where = held_out_split(cfg.data)
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    targets = torch.stack([x for x, _ in items])
    labels = torch.stack([torch.as_tensor(y) for _, y in items]).long()
    return conditions_from_targets(targets, labels, cfg), where


def input_size(cfg) -> int:
    """The side of the images a user gives: low-res for superres, the model's for colorize."""
    return cfg.data.image_size // cfg.data.sr_factor if cfg.data.task == "superres" else cfg.data.image_size


def _is_grey(path: Path) -> bool:
    """Whether a (readable) image file stores grey pixels: its mode, from the header."""
    from PIL import Image
    with Image.open(path) as image:
        return image.mode in GREY_MODES


def load_conditions(path: str, cfg) -> tuple[Conditions, list[Path]]:
    """sample.py --condition: superres takes low-res images of exactly the size the model was trained on, with
    the model's channels; colorize takes any image, converted to grey (a colour image is also the target)."""
    from sampling.images import list_images, load_image, read_image
    files, size, task = list_images(path, "--condition"), cfg.data.image_size, cfg.data.task
    if task == "colorize":
        loaded = [load_image(f, 3, size, "--condition")[0] for f in files]
        colour = [not _is_grey(f) for f in files]
        conds = conditions_from_targets(torch.stack(loaded), None, cfg)
        return conds._replace(targets=conds.targets if all(colour) else None), files
    side, channels, low = input_size(cfg), cfg.model.in_channels, []
    for f in files:
        image, grey = read_image(f, channels, "--condition"), _is_grey(f)
        if image.size != (side, side):
            raise SampleError(f"--condition '{f}' is {image.width}x{image.height}, but this superres model takes "
                              f"{side}x{side} low-res images (data.image_size {size} / data.sr_factor "
                              f"{cfg.data.sr_factor}): resize it to {side}x{side}")
        if grey != (channels == 1):
            raise SampleError(f"--condition '{f}' is {'grey' if grey else 'colour'}, but this model upscales "
                              f"{'grey' if channels == 1 else 'RGB'} images: convert it to "
                              f"{'grey' if channels == 1 else 'RGB'}")
        low.append(load_image(f, channels, side, "--condition")[0])
    inputs = torch.stack(low)
    return Conditions(inputs, condition_from_input(inputs, task, size), None, None), files


def display_inputs(conds: Conditions, cfg) -> torch.Tensor:
    """The inputs at the output size and channels: low-res enlarged nearest-neighbour (each pixel a block)."""
    x, size = conds.inputs, cfg.data.image_size
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="nearest")
    return x.expand(-1, cfg.model.in_channels, -1, -1)


def comparison(conds: Conditions, outputs: torch.Tensor, cfg) -> tuple[torch.Tensor, int, list[str]]:
    """(images, columns per item, column titles): condition | bicubic (superres) | ddpm-lab (K of them, see
    Conditions.per_input) | target (known), one item per condition."""
    every = slice(None, None, conds.per_input)  # each condition once
    columns, titles = [display_inputs(conds, cfg)[every]], ["condition"]
    if cfg.data.task == "superres":
        columns.append(baseline(conds.cond[every], "superres", cfg.model.in_channels))
        titles.append("bicubic")
    results = outputs.float().cpu().unflatten(0, (-1, conds.per_input))  # (items, K, C, H, W)
    titles += ["ddpm-lab"] * conds.per_input
    after = [] if conds.targets is None else [conds.targets[every]]
    titles += ["target"] * len(after)
    stack = [torch.stack([c.float().cpu() for c in cs], dim=1) for cs in (columns, after) if cs]
    images = torch.cat([stack[0], results, *stack[1:]], dim=1)  # item-major: one item's k
    return images.flatten(0, 1), images.shape[1], titles


def save_comparison(conds: Conditions, outputs: torch.Tensor, cfg, path: Path) -> Path:
    """The comparison grid as one PNG: items side by side in a square-ish layout, k images each."""
    from sampling.pictures import save_image_grid
    images, k, _ = comparison(conds, outputs, cfg)
    per_row = max(1, int(math.sqrt(len(outputs) // conds.per_input / k)))
    return save_image_grid(images, path, nrow=k * per_row)


def plan_conditions(args, cfg) -> Optional[Conditions]:
    """sample.py's conditions: --condition's images (--num-samples K results for each), else (an image-conditioned
    model) the first --num-samples held-out targets'; None for other models. Refuses --condition for a model
    without an image condition, before any sampling."""
    if not conditioned(cfg):
        if getattr(args, "condition", None):
            raise SampleError(f"--condition needs an image-conditioned model (data.task superres or colorize); "
                              f"this one has data.task={cfg.data.task}: drop --condition")
        return None
    if args.condition is None and getattr(args, "pretrained", None):
        raise SampleError("an exported image-conditioned model comes without its data set, so there are no held-out "
                          "images to condition on: pass --condition IMG")
    if args.condition is None:
        return held_out_conditions(cfg, args.num_samples or cfg.sample.num_samples)[0]
    return repeat_conditions(load_conditions(args.condition, cfg)[0], args.num_samples or 1)  # K per condition
