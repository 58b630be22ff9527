"""The page's handlers, plain functions (no Gradio needed to call them): a loaded run and the values of a form in,
a Result out: the picture to show, the exact sample.py command that writes the same PNGs byte for byte, and the
files written.

Each handler turns its values into sample.py arguments (webapp/requests.py), stores any image it was sent in the
run's results folder (webapp/uploads.py), and runs them through the very code sample.py runs (commands/): the same
parser, flag checks, cost check (limits/), output guard and no-overwrite rules (storage/outputs.py), into the same
default folder results/images/<run>/<settings>[-2, -3, ...]. One request at a time uses a model (its lock)."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from commands import check_request, run_request
from webapp.models import Loaded, parser
from webapp.requests import RequestError, count_flags, repaint_flags, region_flag, real, sampling_flags, whole
from webapp.requests import MAX_FRAMES
from webapp.uploads import UploadError, as_image, store_input

PICTURES = ("strip.png", "grid.png", "scatter.png")  # what the page shows of a run's folder, first found


@dataclass
class Result:
    image: Image.Image          # the picture shown (a copy of `picture`'s pixels)
    picture: Path               # its file in the output folder (the page serves these bytes)
    command: str
    files: list[Path]
    folder: Path
    note: str = ""


def command_line(argv: list[str]) -> str:
    return "python sample.py " + shlex.join(argv)


def run(loaded: Loaded, argv: list[str], callback: Optional[Callable] = None) -> Result:
    """sample.py with the run's flags + argv, on the loaded model; callback(i, t, x_t, x0_pred): the first batch's
    steps (sampling and image-to-image)."""
    full = loaded.argv + argv
    args = parser().parse_args(full)
    with loaded.lock:
        check_request(args)
        files = run_request(args, loaded.source, callback)
    folder = files[0].parent
    shown = next(folder / name for name in PICTURES if (folder / name).is_file())
    with Image.open(shown) as image:
        picture = image.copy()
    return Result(picture, shown, command_line(full), files, folder)


def sample(loaded: Loaded, sampler: str, steps, eta, guidance, label, seed, count,
           callback: Optional[Callable] = None) -> Result:
    """The Sample tab: `count` samples (for an image-conditioned model: of held-out images' conditions)."""
    flags = sampling_flags(loaded.source.cfg, sampler, steps, eta, guidance, label, seed)
    return run(loaded, flags + count_flags(count), callback)


def painted_mask(editor: Optional[dict]) -> tuple[Optional[Image.Image], Optional[Image.Image]]:
    """(background, mask) of an image editor's value {background, layers, composite}: the mask is white where
    any layer was painted (diffusers' convention, sample.py --mask: white = generate), None when none was."""
    if not editor or editor.get("background") is None:
        return None, None
    background, painted = editor["background"], None
    for layer in editor.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0 if isinstance(layer, Image.Image) else \
            np.asarray(layer)[..., -1] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return background, None
    return background, Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def inpaint(loaded: Loaded, image, region: str, mask, resample, jump, sampler: str, steps, seed,
            label=None, count=1) -> Result:
    """The Inpaint tab: `image` (a path or PIL image) with the painted `mask` (white = generate) when region is
    'painted', else a built-in region (center, left, ...); RePaint's resample and jump."""
    run_name = loaded.source.run
    picture = as_image(image, "the image to inpaint")
    if region == "painted":
        if mask is None:
            raise RequestError("nothing is painted: paint the region to generate on the image, or pick a "
                               "built-in region")
        mask_image = as_image(mask, "the painted mask")
        if mask_image.size != picture.size:
            raise UploadError(f"the painted mask is {mask_image.width}x{mask_image.height} but the image is "
                              f"{picture.width}x{picture.height}: paint on the image itself")
        mask_flags = ["--mask", str(store_input(mask_image.convert("L"), run_name))]
    else:
        mask_flags = region_flag(region)
    flags = ["--inpaint", str(store_input(picture, run_name))] + mask_flags + repaint_flags(resample, jump)
    flags += sampling_flags(loaded.source.cfg, sampler, steps, None, None, label, seed)
    return run(loaded, flags + _per_input(count))


def img2img(loaded: Loaded, image, strength, sampler: str, steps, seed, label=None, count=1) -> Result:
    """The Image-to-image tab (SDEdit): `strength` of the noise levels redone, in (0, 1]."""
    path = store_input(as_image(image, "the uploaded image"), loaded.source.run)
    flags = ["--init-image", str(path), "--strength", f"{real(strength, 'strength', 0.01, 1.0):g}"]
    flags += sampling_flags(loaded.source.cfg, sampler, steps, None, None, label, seed)
    return run(loaded, flags + _per_input(count))


def interpolate(loaded: Loaded, image_a, image_b, frames, steps, seed) -> Result:
    """The Interpolation tab: DDIM-inverts A and B and samples `frames` frames between their noises."""
    ends = [str(store_input(as_image(x, f"image {n}"), loaded.source.run)) for x, n in ((image_a, "A"),
                                                                                         (image_b, "B"))]
    flags = ["--interpolate", *ends, "--frames", str(whole(frames, "frames", 2, MAX_FRAMES))]
    return run(loaded, flags + sampling_flags(loaded.source.cfg, None, steps, None, None, None, seed))


def invert(loaded: Loaded, image, steps, seed) -> Result:
    """The Inversion tab: DDIM inversion and the reconstruction, with its PSNR."""
    path = store_input(as_image(image, "the image to invert"), loaded.source.run)
    result = run(loaded, ["--invert", str(path)] + sampling_flags(loaded.source.cfg, None, steps, None, None, None,
                                                                   seed))
    record = json.loads((result.folder / "invert.json").read_text())
    result.note = f"reconstruction PSNR {record['mean_psnr_db']:.2f} dB ({record['steps']} DDIM steps)"
    return result


def condition(loaded: Loaded, image, sampler: str, steps, seed, count) -> Result:
    """The Super-resolve / colourise tab of an image-conditioned model: the uploaded low-res (superres) or any
    (colorize) image, `count` results of it; without an upload, `count` held-out images of the data set."""
    flags = [] if image is None else ["--condition", str(store_input(as_image(image, "the condition image"),
                                                                     loaded.source.run))]
    flags += sampling_flags(loaded.source.cfg, sampler, steps, None, None, None, seed)
    return run(loaded, flags + count_flags(count))


def _per_input(count) -> list[str]:
    n = whole(count, "count", 1, 16)
    return [] if n == 1 else ["--num-samples", str(n)]


def held_out_image(loaded: Loaded, index, scale_to: int = 128) -> Image.Image:
    """Image `index` of the run's held-out images (sampling.conditions.held_out_split: never trained on), enlarged
    (nearest) so that a brush can paint on it; the library brings it back to the model's size."""
    from sampling.conditions import held_out_split
    from sampling.pictures import to_uint8_images
    dataset, _ = held_out_split(loaded.source.cfg.data)
    x = dataset[whole(index, "held-out image", 0, len(dataset) - 1)][0]
    pixels = to_uint8_images(x[None])[0].permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    factor = max(1, scale_to // image.width)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
