"""User images and masks for editing (sample.py --inpaint / --init-image / --interpolate / --invert).

An input is one image file or a folder of them (read in name order). Each image is decoded as grey or RGB
(the model's channels, dataset.open_as), center-cropped to a square and resized to the model's size, with a
printed note when that changes it, and scaled to [-1, 1] like the training data.

Masks follow diffusers' inpainting convention: a PNG, WHITE = the region to generate, BLACK = the pixels to
keep (grey is thresholded at 128). The library's mask is the opposite (Diffusion.inpaint: 1 = KNOWN), so
`load_mask` converts. A mask file must have its image's size, and is cropped and resized with it (nearest,
so it stays 0/1). Built-in masks name the region to generate: center (the middle half of each side), left,
right, top, bottom (half of the image).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import open_as, resize_square
from sampling.generation import SampleError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_MASKS = ("center", "left", "right", "top", "bottom")
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
               Image.DecompressionBombWarning)


def list_images(path: str | Path, flag: str) -> list[Path]:
    """The image files of an input: the file itself, or a folder's image files in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SampleError(f"{flag} '{path}' is a folder without images ({', '.join(IMAGE_SUFFIXES)}): "
                              "give an image file or a folder of images")
        return files
    if not path.is_file():
        raise SampleError(f"{flag} '{path}' does not exist: give an image file or a folder of images")
    return [path]


def read_image(path: Path, channels: int, flag: str) -> Image.Image:
    """The decoded image (mode L or RGB), or one clear error naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = open_as(path, channels)
            image.load()
            return image
    except READ_ERRORS as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SampleError(f"{flag} '{path}' cannot be read as an image ({first}): give a PNG or JPEG file") from None


def to_square(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> (C, size, size): center-crop to a square, then resize (bilinear for images, nearest for
    masks so that they stay 0/1)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s == size or mode == "bilinear":
        return resize_square(x, size)
    return F.interpolate(x[None], size=(size, size), mode="nearest")[0]


def conversion_note(path: Path, image: Image.Image, size: int) -> None:
    if image.size != (size, size):
        crop = ", center-cropped to a square" if image.width != image.height else ""
        print(f"note: '{path}' is {image.width}x{image.height}{crop}; resized to the model's {size}x{size}")


def load_image(path: Path, channels: int, size: int, flag: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(image (C, size, size) in [-1, 1], its (width, height) as read)."""
    image = read_image(path, channels, flag)
    conversion_note(path, image, size)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1.0
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return to_square(x, size), image.size


def load_images(path: str | Path, channels: int, size: int, flag: str):
    """(images (N, C, size, size) in [-1, 1], their files, their sizes as read) of one input."""
    files = list_images(path, flag)
    loaded = [load_image(f, channels, size, flag) for f in files]
    return torch.stack([x for x, _ in loaded]), files, [s for _, s in loaded]


def builtin_mask(name: str, size: int) -> torch.Tensor:
    """(1, 1, size, size), 1 = keep: the named region (see the module docstring) is 0, generated."""
    mask, half, q = torch.ones(1, 1, size, size), size // 2, size // 4
    region = {"center": (slice(q, size - q), slice(q, size - q)), "left": (slice(None), slice(0, half)),
              "right": (slice(None), slice(half, None)), "top": (slice(0, half), slice(None)),
              "bottom": (slice(half, None), slice(None))}[name]
    mask[..., region[0], region[1]] = 0
    return mask


def load_mask(spec: str, size: int, image_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """--mask as the library's mask (1, 1, size, size), 1 = keep: a built-in name, or a PNG (white =
    generate) of the same size as every input image, converted like them."""
    if spec in BUILTIN_MASKS:
        return builtin_mask(spec, size)
    path = Path(spec)
    if not path.is_file():
        raise SampleError(f"--mask '{spec}' is neither a file nor a built-in mask: give a PNG (white = generate, "
                          f"black = keep) or one of {', '.join(BUILTIN_MASKS)}")
    image = read_image(path, 1, "--mask")
    other = sorted({s for s in image_sizes if s != image.size})
    if other:
        raise SampleError(f"--mask '{path}' is {image.width}x{image.height} but the image is "
                          f"{other[0][0]}x{other[0][1]}: give a mask of the image's size (white = generate), "
                          f"or a built-in mask ({', '.join(BUILTIN_MASKS)})")
    keep = torch.from_numpy((np.asarray(image) < 128).astype(np.float32))[None]  # black -> 1 = keep
    return to_square(keep, size, mode="nearest")[None]


def mask_picture(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input as the model sees it for inpainting: kept pixels, the region to generate in mid grey."""
    return torch.where(mask.bool().expand_as(x), x, torch.zeros_like(x))


def save_png(x: torch.Tensor, path: Path) -> Path:
    """One (C, H, W) image in [-1, 1] as an exact-size PNG ('L' or RGB), quantised like sample.py's files."""
    image = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    from sampling.pictures import save_pil  # the output guard
    return save_pil(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), path)


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR in dB per image of two (N, C, H, W) batches in [-1, 1], on the 8-bit images the PNGs hold."""
    qa, qb = [((x.float().clamp(-1, 1) + 1) * 127.5).round() for x in (a, b)]
    mse = ((qa - qb) ** 2).flatten(1).mean(1)
    return [float("inf") if m == 0 else float(10 * torch.log10(255.0 ** 2 / m)) for m in mse]
