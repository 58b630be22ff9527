"""The on-disk data formats ddpm-lab reads, as untrusted input: CIFAR-10 python pickles (through a restricted
unpickler: numpy arrays and plain values only, so a tampered batch cannot run code), MNIST-style IDX files
(lengths checked against their headers) and image folders (every file's header checked before training, 16-bit
grey scaled, grey folders detected). A bad file raises BadDataError naming it and the fix. dataset.py builds
the data sets on top of these readers.
"""
from __future__ import annotations

import gzip
import math
import pickle
import warnings
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from config import ConfigError, UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_FOLDER = "cifar-10-batches-py"         # what torchvision's cifar-10-python.tar.gz unpacks to
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
# (images, labels) file names per split, without the optional ".gz", as torchvision names them.
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# dataset -> (torchvision class name = folder under root, class names); files live in <root>/<name>/raw/.
IDX_DATASETS = {"mnist": ("MNIST", DIGIT_CLASSES), "fashion_mnist": ("FashionMNIST", FASHION_CLASSES)}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # PIL modes of one-channel images
WIDE_GREY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}   # 16-bit grey PNGs open as I;16 (or I)
BAD_FILES_SHOWN = 5        # bad files named in the error (then "and N more")
_IMAGE_MODES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> mode of an image file that passed the check
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IDX_MIRRORS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",   # torchvision's first mirrors
               "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
CIFAR_FIX = (f"To fix it, delete the folder {CIFAR10_FOLDER}/ that holds it and run again: with data.download=true "
             f"the official files are downloaded; offline, place the official {CIFAR10_ARCHIVE} "
             f"(https://www.cs.toronto.edu/~kriz/{CIFAR10_ARCHIVE}) beside the folder first.")


class DatasetMissingError(UserError, RuntimeError):
    """The data is not on disk and cannot be downloaded; the message says exactly what to do."""


class BadDataError(DatasetMissingError):
    """A data file is on disk but unreadable (truncated, corrupt) or unsafe (a pickle that would run code); the
    message names the file and the fix. A DatasetMissingError, so every script's main() reports it in one line."""


# ----------------------------------------------------------------------------- CIFAR-10 pickles
# What the official batches (pickled by Python 2 with numpy arrays) and test-made copies reference: numpy's
# array reconstruction (numpy.core before numpy 2, numpy._core after; _frombuffer for pickle protocol 5), and
# _codecs.encode, which Python 3 uses to write bytes at protocols < 3. Nothing else is ever looked up, so a file
# that asks for anything else (os.system, eval, ...) is refused before it can call it.
CIFAR_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                        *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
                        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a function or class outside CIFAR_PICKLE_GLOBALS: loading stops before calling it."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, strings and numpy arrays: a hand-placed or tampered batch
    file cannot run code (pickle.load would call whatever function the file names)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise _RefusedGlobal(f"it asks to call {module}.{name}, which CIFAR-10 batches never do")
        # numpy 2 renamed numpy.core to numpy._core (the old name warns); numpy < 2 has only numpy.core.
        core = "numpy._core." if int(np.__version__.split(".")[0]) >= 2 else "numpy.core."
        module = module.replace("numpy._core.", core).replace("numpy.core.", core)
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR-10 pickle as a dict with str keys. The official files were pickled by Python 2 and load with
    bytes keys (b'data'); files pickled by Python 3 may use str keys: accept both. BadDataError naming the
    file when it is truncated, not a pickle of a dict, or asks to run anything."""
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise BadDataError(f"'{path}' is not a CIFAR-10 batch: {err}; refused before running anything. "
                           f"{CIFAR_FIX}") from None
    except Exception as err:  # UnpicklingError, EOFError (truncated), ValueError, ...: the file is bad, not us
        raise BadDataError(f"'{path}' is not a readable CIFAR-10 batch ({first_line(err)}). {CIFAR_FIX}") from None
    if not isinstance(raw, dict):
        raise BadDataError(f"'{path}' is not a CIFAR-10 batch (a {type(raw).__name__}, not a dict). {CIFAR_FIX}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of one batch file, checked; BadDataError otherwise."""
    batch = _unpickle(path)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise BadDataError(f"'{path}' is not a CIFAR-10 batch (no usable {err}). {CIFAR_FIX}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise BadDataError(f"'{path}' holds data {data.shape} and labels {labels.shape}, not (N, 3072) and (N,): "
                           f"it is not a CIFAR-10 batch. {CIFAR_FIX}")
    return data, labels


def read_cifar10(root: Path, train: bool):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,), class names); FileNotFoundError naming a missing
    file. Reads <root>/cifar-10-batches-py (torchvision's layout) or root itself when it holds the batches;
    a cifar-10-python.tar.gz lying in root is unpacked first (no network needed)."""
    folder = root if (root / "test_batch").is_file() else root / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names) and (root / CIFAR10_ARCHIVE).is_file():
        from torchvision.datasets.utils import extract_archive
        extract_archive(str(root / CIFAR10_ARCHIVE), str(root))
    for n in names:
        if not (folder / n).is_file():
            raise FileNotFoundError(str(folder / n))
    batches = [_batch_arrays(folder / n) for n in names]
    # Each row of 'data' is 1024 R, then 1024 G, then 1024 B values, each plane row-major 32x32.
    data = np.concatenate([d for d, _ in batches])         # (N, 3072)
    labels = np.concatenate([y for _, y in batches])       # (N,)
    class_names = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        meta_names = _unpickle(folder / "batches.meta").get("label_names")
        if isinstance(meta_names, list) and len(meta_names) == len(CIFAR10_CLASSES):
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta_names]
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels), class_names


# ----------------------------------------------------------------------------- MNIST IDX files
MAX_IDX_BYTES = 10 ** 9  # MNIST's largest file is 47 MB; more is a forged header, not a data set


def read_idx(path: Path, type_code: int | None = None) -> np.ndarray:
    """An IDX file, plain or gzipped: bytes 0, 0, dtype code, ndim; ndim big-endian uint32 sizes; data.
    (MNIST's magic numbers 2051 = images, 2049 = labels are dtype 0x08 with ndim 3 and 1.) ValueError naming
    the file when it is not IDX, or its length does not match its header (a truncated download)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"  # gzip magic, whatever the file is called
    try:  # a gzip file is inflated as a stream, never past what the header promises (a "gzip bomb")
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            raw = _read_idx_stream(f, path, None if gzipped else path.stat().st_size)
    except (EOFError, OSError, zlib.error) as err:  # EOFError: cut short; BadGzipFile / zlib: corrupt
        raise ValueError(f"'{path}' is a truncated or corrupt gzip file ({err})") from None
    if type_code is not None and raw[2] != type_code:  # e.g. floats (0x0D) would be read as black digits
        raise ValueError(f"'{path}' holds IDX type code 0x{raw[2]:02X} ({np.dtype(IDX_DTYPES[raw[2]]).name}), not "
                         f"0x{type_code:02X} ({np.dtype(IDX_DTYPES[type_code]).name}) as MNIST-style files do")
    ndim, dtype = raw[3], np.dtype(IDX_DTYPES[raw[2]])
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    return data.reshape(shape).astype(data.dtype.newbyteorder("="))  # native byte order, writable copy


def _read_idx_stream(f, path: Path, size: Optional[int]) -> bytes:
    """Header, then exactly the data bytes it promises (checked against MAX_IDX_BYTES first), then one byte
    more to refuse trailing data; ValueError naming the file otherwise."""
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
        raise ValueError(f"'{path}' is not an IDX file (magic bytes {head.hex()})")
    sizes = f.read(4 * head[3])
    if len(sizes) < 4 * head[3]:
        raise ValueError(f"'{path}' is truncated: shorter than its {4 + 4 * head[3]}-byte header")
    shape = tuple(int(s) for s in np.frombuffer(sizes, dtype=">u4"))
    expected = math.prod(shape) * np.dtype(IDX_DTYPES[head[2]]).itemsize
    if expected > MAX_IDX_BYTES:
        raise ValueError(f"'{path}' claims {shape} ({expected} bytes), more than any MNIST-style file "
                         f"({MAX_IDX_BYTES} bytes at most here)")
    data = f.read(expected)
    if len(data) != expected or f.read(1):
        held = f"{size} bytes" if size is not None else "fewer" if len(data) != expected else "more (trailing data)"
        raise ValueError(f"'{path}' is truncated or corrupt: its header says {shape} ({4 + len(sizes) + expected} "
                         f"bytes) but it holds {held}")
    return head + sizes + data


def _find_file(folders: list[Path], name: str) -> Path:
    """The first of folder/name, folder/name.gz over folders; FileNotFoundError naming the expected file."""
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(str(folders[0] / f"{name}.gz"))


def read_idx_split(root: Path, dataset: str, train: bool):
    """(images uint8 (N, 1, 28, 28), labels int64 (N,), class names); FileNotFoundError naming a missing
    file. Looks in <root>/<MNIST|FashionMNIST>/raw/ (torchvision's layout), then directly in root."""
    folder_name, class_names = IDX_DATASETS[dataset]
    folders = [root / folder_name / "raw", root]
    image_path, label_path = (_find_file(folders, name) for name in IDX_FILES[train])
    fix = (f"To fix it, delete it and run again: with data.download=true a fresh copy is downloaded; offline, "
           f"place the official file (from {IDX_MIRRORS[dataset]}) there first.")
    try:
        images, labels = read_idx(image_path, 0x08), read_idx(label_path, 0x08)  # unsigned bytes, as MNIST's
    except ValueError as err:
        raise BadDataError(f"{err}. {fix}") from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise BadDataError(f"'{image_path}' {images.shape} and '{label_path}' {labels.shape} do not match: one "
                           f"of them is not the official file. {fix}")
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64)), class_names


# ----------------------------------------------------------------------------- image folders
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names). Sub-folders holding images are the classes (sorted names -> labels,
    searched recursively; loose top-level files are then ignored); otherwise the top-level images, y = 0."""
    how = (f"put images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it, flat or one sub-folder per class, "
           f"or point data.root / --root at your image folder")
    if not root.is_dir():
        raise DatasetMissingError(f"image folder '{root}' does not exist: {how}")
    class_dirs = sorted(d for d in root.iterdir()
                        if d.is_dir() and not d.name.startswith(".") and any(map(_is_image, d.rglob("*"))))
    if class_dirs:
        files, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            found = sorted(p for p in class_dir.rglob("*") if _is_image(p))
            files += found
            labels += [label] * len(found)
        return files, labels, [d.name for d in class_dirs]
    files = sorted(p for p in root.iterdir() if _is_image(p))
    if not files:
        raise DatasetMissingError(f"image folder '{root}' holds no images: {how}")
    return files, [0] * len(files), []


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0][:100] if text else "") or type(err).__name__


def _image_mode(path: Path) -> str:
    """The mode of an image file whose header and chunks PIL accepts (Image.open + verify: no pixel decoding;
    for PNG this checks every chunk's CRC and that the file reaches its end). Raises otherwise. Remembered per
    (path, size, mtime), so dataset_info and build_dataset in one process scan a folder once."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _IMAGE_MODES:
        with Image.open(path) as image:
            mode = image.mode
            image.verify()
        _IMAGE_MODES[key] = mode
    return _IMAGE_MODES[key]


def check_image_files(root: Path, files: list[Path]) -> None:
    """BadDataError listing the first few unreadable files and their count. Bad files are refused, not
    skipped: a data set that silently shrinks differs from run to run and hides broken copies."""
    bad = []
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS (and raises above twice that): a safety limit, so a bad file here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path in files:
            try:
                _image_mode(path)
            except Exception as err:  # UnidentifiedImageError, SyntaxError (broken PNG), OSError, bombs
                bad.append(f"{path.relative_to(root)} ({first_line(err)})")
    if bad:
        more = f"; and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
        raise BadDataError(f"{len(bad)} of {len(files)} files in image folder '{root}' are not readable images: "
                           f"{'; '.join(bad[:BAD_FILES_SHOWN])}{more}. To fix it, move them out of the folder "
                           "(or replace them with good copies) and run again.")


def folder_channels(files: list[Path], requested: int) -> int:
    """data.channels for a folder: 1 or 3 as asked, or (0 = auto) 1 when every image is grey, else 3. Stops
    at the first colour image (an RGB folder costs one header); unreadable files are check_image_files's."""
    if requested not in (0, 1, 3):
        raise ConfigError(f"config key 'data.channels' = {requested} must be 0 (auto: 1 for a folder of grey "
                          "images, else 3), 1 or 3")
    if requested:
        return requested
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path in files:
            try:
                if _image_mode(path) not in GREY_MODES:
                    return 3
            except Exception:  # a bad file: build_dataset refuses it; it says nothing about the channels
                continue
    return 1


def open_as(path: Path, channels: int) -> Image.Image:
    """A decoded image as mode L (channels=1) or RGB. 16-bit grey (PNG: mode I;16 or I) is scaled from
    0..65535 to 0..255: PIL's convert would clip it at 255 and turn it almost white."""
    with Image.open(path) as image:
        if image.mode in WIDE_GREY_MODES:
            array = np.asarray(image, dtype=np.float64) / 257.0  # 65535 / 257 = 255 exactly
            image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))  # mode L
        return image.convert("L" if channels == 1 else "RGB")
