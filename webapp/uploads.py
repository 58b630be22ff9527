"""Images sent to the page: checked before anything decodes them in full, then stored as PNGs in the run's results
folder (RunPaths.app_inputs), so that the sample.py command the page shows can name them.

Each check is one UploadError line: too many bytes, a header that PIL cannot read (not an image), more pixels than
MAX_UPLOAD_PIXELS (a decompression bomb: a small file of a huge image, refused from its header, before decoding;
PIL's own Image.MAX_IMAGE_PIXELS guard is ~179 M pixels, far above what a page of small models needs), or a file
that breaks while decoding (truncated)."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

from PIL import Image

from config import UserError
from limits import human_bytes
from storage.files import write_bytes_output
from storage.paths import RunPaths

MAX_UPLOAD_BYTES = 8 * 2 ** 20
MAX_UPLOAD_PIXELS = 4096 * 4096
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # PIL's own guard, far above ours
KEPT_MODES = ("L", "RGB")  # the modes the library reads as they are (grey: 1 channel, else RGB)


class UploadError(UserError, ValueError):
    """An upload the page refuses; the message says why and what to upload instead."""


def check_pixels(image: Image.Image, what: str) -> None:
    w, h = image.size
    if w * h > MAX_UPLOAD_PIXELS:
        raise UploadError(f"{what} is {w}x{h} pixels, over the page's limit of {MAX_UPLOAD_PIXELS:,} (a "
                          "decompression bomb, or just too big): upload a smaller image")
    if w < 1 or h < 1:
        raise UploadError(f"{what} is {w}x{h} pixels, an empty image: upload another image")


def check_upload(path: str | Path | bytes, what: str = "the upload") -> Image.Image:
    """The decoded image of an uploaded file (or its bytes), mode L or RGB, or one UploadError line."""
    size = len(path) if isinstance(path, bytes) else os.stat(path).st_size
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"{what} is {human_bytes(size)}, over the page's upload limit of "
                          f"{human_bytes(MAX_UPLOAD_BYTES)}: upload a smaller image (PNG or JPEG)")
    if size == 0:
        raise UploadError(f"{what} is an empty file (0 bytes): upload a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:  # the header only
                check_pixels(image, what)
                image.load()  # the whole file: a truncated or corrupt body fails here
                return normal_mode(image)
    except BOMBS:
        raise UploadError(f"{what} claims more pixels than PIL's own limit of {Image.MAX_IMAGE_PIXELS:,} (a "
                          "decompression bomb): upload a smaller image") from None
    except READ_ERRORS as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UploadError(f"{what} is not an image the page can read ({first}): upload a PNG or JPEG "
                          "file") from None


def normal_mode(image: Image.Image) -> Image.Image:
    """L stays grey, anything else becomes RGB (transparency dropped on white, as the image editor shows it)."""
    if image.mode in KEPT_MODES:
        return image.copy()
    if image.mode in ("LA", "I", "I;16", "F", "1"):
        return image.convert("L") if image.mode != "LA" else _on_white(image.convert("RGBA")).convert("L")
    return _on_white(image.convert("RGBA"))


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def as_image(value, what: str) -> Image.Image:
    """An upload as the page's components hand it over: a file path (checked in full) or a PIL image."""
    if value is None:
        raise UploadError(f"no image for {what}: upload one first")
    if isinstance(value, (str, Path)):
        return check_upload(value, what)
    if isinstance(value, Image.Image):
        check_pixels(value, what)
        return normal_mode(value)
    raise UploadError(f"{what} is a {type(value).__name__}, not an image: upload a PNG or JPEG file")


def store_input(image: Image.Image, run: str) -> Path:
    """The image as a PNG named by its content in the run's app-inputs folder (an existing one is the same
    image, so it is reused, never rewritten); returns its path for the sample.py command."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    path = RunPaths(run).app_inputs / f"{hashlib.sha256(data).hexdigest()[:20]}.png"
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_output(path, data)  # refuses a link or a different file of that name
