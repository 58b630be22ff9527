"""The page's values as sample.py arguments: each value is checked here against the page's ceilings (steps, count,
RePaint's resample x jump) and turned into the flags sample.py takes; the library then checks them as it checks the
command line (commands.check_request, the limits/ cost check, the output guard).

Only flags that change the result are written, so the command the page shows is the shortest one that gives the
same PNGs. --eta is DDIM's alone and --guidance-scale a class-conditional model's (sample.py refuses them
elsewhere)."""
from __future__ import annotations

import math
from typing import Optional

from config import UserError
from sampling.images import BUILTIN_MASKS

MAX_STEPS = 1000        # sampling steps a request may ask for (also bounded by the model's T)
MAX_COUNT = 64          # images of one request
MAX_REPAINT = 200       # RePaint's resample x jump (each block walks resample x jump extra steps)
MAX_FRAMES = 32         # interpolation frames
ALL_CLASSES = "all"     # the class picker's "one row per class"


class RequestError(UserError, ValueError):
    """A value of the page out of range; the message names the field and the range."""


def whole(value, name: str, low: int, high: int) -> int:
    """A whole number low..high from a page field (numbers arrive as floats), else one RequestError line."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def real(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high:  # NaN too
        raise RequestError(f"{name} must be from {low:g} to {high:g}, got {value!r}")
    return number


def sampling_flags(cfg, sampler: str, steps, eta, guidance, label: Optional[str], seed) -> list[str]:
    """The flags of the sampling settings every mode shares (sampler=None: the mode picks its own)."""
    argv = ["--seed", str(whole(seed, "seed", 0, 2 ** 63 - 1))]
    if sampler is not None:
        argv = ["--sampler", str(sampler)] + argv
    if sampler != "ddpm":  # ddpm always walks all T steps
        argv += ["--steps", str(whole(steps, "steps", 1, MAX_STEPS))]
    if sampler == "ddim" and eta is not None and float(eta) != 0.0:
        argv += ["--eta", f"{real(eta, 'eta', 0.0, 1.0):g}"]
    if cfg.model.num_classes > 0:
        if guidance is not None and float(guidance) != 1.0:
            argv += ["--guidance-scale", f"{real(guidance, 'guidance scale', 0.0, 50.0):g}"]
        if label not in (None, "", ALL_CLASSES):
            argv += ["--class-label", str(whole(label, "class label", 0, cfg.model.num_classes - 1))]
    return argv


def count_flags(count, flag: str = "--num-samples", name: str = "count", high: int = MAX_COUNT) -> list[str]:
    return [flag, str(whole(count, name, 1, high))]


def repaint_flags(resample, jump) -> list[str]:
    r, j = whole(resample, "resample", 1, MAX_REPAINT), whole(jump, "jump", 1, MAX_REPAINT)
    if r * j > MAX_REPAINT:
        raise RequestError(f"resample x jump is {r} x {j} = {r * j}, over the page's ceiling of {MAX_REPAINT}: "
                           "lower resample or jump")
    return ["--resample", str(r), "--jump", str(j)]


def region_flag(region: str) -> list[str]:
    """A built-in region to generate (sample.py --mask NAME); 'painted' is handled by the caller."""
    if region not in BUILTIN_MASKS:
        raise RequestError(f"region {region!r} is not one of painted, {', '.join(BUILTIN_MASKS)}")
    return ["--mask", region]
