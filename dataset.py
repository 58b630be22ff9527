"""Data sets for ddpm-lab: item i is (x, y), x a float32 tensor in [-1, 1] of shape (C, S, S)
(toy2d: a raw 2-D point of shape (2,)) and y an int64 scalar label (0 where the data has no labels).

    info = dataset_info(cfg.data)                  # channels, image_size, num_classes, class_names
    train_set = build_dataset(cfg.data, train=True)
    check_data(cfg, train_set)                     # ConfigError unless the items fit cfg.model
    python dataset.py --dataset digits --preview results/plots/preview_digits.png

Why our own readers for CIFAR-10 and (Fashion-)MNIST: torchvision 0.29.1's CIFAR10 refuses any batch file
whose md5 is not the official one, and its MNIST needs the uncompressed IDX files in <root>/MNIST/raw/, so
neither reads test-made files or hand-placed `.gz` files. Both formats are simple (python pickles, IDX):
torchvision only downloads (its URLs, mirrors and md5 checks; a short timeout makes offline fail in
seconds) and one reader parses downloads, hand-placed files and test fixtures alike. `digits` (sklearn's
bundled 8x8 digits) and `toy2d` need no files: they are the offline data sets.

Data files are untrusted: CIFAR-10 pickles go through a restricted unpickler (numpy arrays and plain values
only), IDX lengths are checked against their headers, and an image folder's files are header-checked when the
data set is built. A bad file raises BadDataError (a DatasetMissingError) naming it and the fix.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import math
import pickle
import socket
import sys
import threading
import urllib.parse
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from config import DATASETS, TOY_DISTRIBUTIONS, Config, ConfigError, DataConfig

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
NETWORK_TIMEOUT_S = 10.0   # per connection attempt / socket read: offline fails in seconds, not minutes
TOY_SEEDS = {True: 0, False: 1}  # toy2d train / test points: fixed draws, so the data set is deterministic
CIFAR_FIX = (f"To fix it, delete the folder {CIFAR10_FOLDER}/ that holds it and run again: with data.download=true "
             f"the official files are downloaded; offline, place the official {CIFAR10_ARCHIVE} "
             f"(https://www.cs.toronto.edu/~kriz/{CIFAR10_ARCHIVE}) beside the folder first.")
OFFLINE_HINT = ("To work offline, use the embedded digits, which need no files: python train.py --config "
                "configs/digits.yaml (or data.dataset=digits; python dataset.py --dataset digits to preview).")


class DatasetMissingError(RuntimeError):
    """The data is not on disk and cannot be downloaded; the message says exactly what to do."""


class BadDataError(DatasetMissingError):
    """A data file is on disk but unreadable (truncated, corrupt) or unsafe (a pickle that would run code); the
    message names the file and the fix. A DatasetMissingError, so every script's main() reports it in one line."""


@dataclass
class DatasetInfo:
    channels: int            # 1 or 3 for images, 2 for toy2d (the coordinate dimension)
    image_size: int          # resolution the items come out at (0 for toy2d)
    num_classes: int         # 0 when the data set has no labels
    class_names: list[str]


# ----------------------------------------------------------------------------- in-memory images
def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size), bilinear; antialiased when shrinking, where plain bilinear aliases."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    shrinking = size < max(x.shape[-2:])
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrinking)[0]


class ImageTensorDataset(Dataset):
    """Images kept as one integer tensor (N, C, H, W) in [0, max_value] (one byte per pixel, even for 60k
    MNIST images); each item is scaled to [-1, 1], resized to image_size and optionally flipped on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int,
                 max_value: float = 255.0, flip: bool = False, class_names: list[str] | None = None):
        self.images, self.labels = images, labels.long()          # (N, C, H, W) uint8, (N,) int64
        self.image_size, self.max_value, self.flip = image_size, float(max_value), flip
        self.class_names = list(class_names or [])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].float() / (self.max_value / 2) - 1.0  # (C, H, W); 0 -> -1, max -> +1 exactly
        x = resize_square(x, self.image_size)
        # One torch.rand(1) from the global RNG per item, as torchvision's RandomHorizontalFlip draws (without
        # importing torchvision, ~2 s): runs that restore torch's RNG state (num_workers=0) see the same flips.
        if self.flip and torch.rand(1) < 0.5:
            x = x.flip(-1)
        return x, self.labels[index]


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
        raise BadDataError(f"'{path}' is not a readable CIFAR-10 batch ({_first_line(err)}). {CIFAR_FIX}") from None
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
def read_idx(path: Path) -> np.ndarray:
    """An IDX file, plain or gzipped: bytes 0, 0, dtype code, ndim; ndim big-endian uint32 sizes; data.
    (MNIST's magic numbers 2051 = images, 2049 = labels are dtype 0x08 with ndim 3 and 1.) ValueError naming
    the file when it is not IDX, or its length does not match its header (a truncated download)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:  # EOFError: cut short; BadGzipFile / zlib: corrupt
            raise ValueError(f"'{path}' is a truncated or corrupt gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"'{path}' is not an IDX file (magic bytes {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(IDX_DTYPES[raw[2]])
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"'{path}' is truncated: {len(raw)} bytes, shorter than its {4 + 4 * ndim}-byte header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"'{path}' is truncated or corrupt: its header says {shape} ({expected} bytes) but it "
                         f"holds {len(raw)} bytes")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    return data.reshape(shape).astype(data.dtype.newbyteorder("="))  # native byte order, writable copy


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
        images, labels = read_idx(image_path), read_idx(label_path)
    except ValueError as err:
        raise BadDataError(f"{err}. {fix}") from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise BadDataError(f"'{image_path}' {images.shape} and '{label_path}' {labels.shape} do not match: one "
                           f"of them is not the official file. {fix}")
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64)), class_names


# ----------------------------------------------------------------------------- download or explain
def _missing_message(dataset: str, root: Path, reason: str) -> str:
    from torchvision import datasets as tv
    if dataset == "cifar10":
        fix = (f"place {CIFAR10_ARCHIVE} (from {tv.CIFAR10.url}) in '{root}/' (it is unpacked on the next "
               f"run), or its unpacked folder as '{root / CIFAR10_FOLDER}/'")
    else:
        folder_name = IDX_DATASETS[dataset][0]
        files = ", ".join(f"{name}.gz" for pair in IDX_FILES.values() for name in pair)
        mirror = getattr(tv, folder_name).mirrors[0]
        fix = f"place the four files {files} (from {mirror}) in '{root / folder_name / 'raw'}/'"
    return f"{dataset} data not found under '{root}' ({reason}). To fix it, {fix}. {OFFLINE_HINT}"


def host_reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to url's host (or the configured proxy) opens. Runs in a daemon thread joined
    with a timeout, because socket timeouts do not bound a hanging DNS lookup."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)  # behind a proxy, the proxy is what must answer
    if proxy:
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reached = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def _torchvision_download(dataset: str, root: Path, train: bool) -> None:
    """Let torchvision fetch, check (md5) and unpack the files into root; DatasetMissingError if it cannot."""
    from torchvision import datasets as tv
    tv_class = tv.CIFAR10 if dataset == "cifar10" else getattr(tv, IDX_DATASETS[dataset][0])
    urls = [tv_class.url] if dataset == "cifar10" else [m + tv_class.resources[0][0] for m in tv_class.mirrors]
    if not any(host_reachable(url, NETWORK_TIMEOUT_S) for url in urls):
        hosts = ", ".join(urllib.parse.urlsplit(url).hostname for url in urls)
        raise DatasetMissingError(_missing_message(dataset, root, f"no network connection to {hosts}"))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)  # torchvision's urlopen calls pass no timeout themselves
    try:
        tv_class(str(root), train=train, download=True)
    except Exception as err:  # URLError, timeouts, md5 mismatch, bad archive: all mean "not available"
        raise DatasetMissingError(_missing_message(dataset, root, f"download failed: {err}")) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _torchvision_format_dataset(data_cfg, train: bool) -> ImageTensorDataset:
    dataset, root = data_cfg.dataset, Path(data_cfg.root)
    read = read_cifar10 if dataset == "cifar10" else functools.partial(read_idx_split, dataset=dataset)
    # The training set is the split named by data.split (e.g. "test" to train on MNIST's t10k files);
    # the held-out set (train=False) is always the test split.
    train_files = train and getattr(data_cfg, "split", "train") == "train"
    try:
        arrays = read(root=root, train=train_files)
    except FileNotFoundError as missing:
        if not data_cfg.download:
            reason = f"no file {missing}; downloads are disabled"
            raise DatasetMissingError(_missing_message(dataset, root, reason)) from None
        _torchvision_download(dataset, root, train_files)
        arrays = read(root=root, train=train_files)
    images, labels, class_names = arrays
    # Flipped digits and letters are not digits: only CIFAR-10 gets flips.
    flip = train and data_cfg.random_flip and dataset == "cifar10"
    return ImageTensorDataset(images, labels, data_cfg.image_size, 255.0, flip, class_names)


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


def _first_line(err: BaseException) -> str:
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
                bad.append(f"{path.relative_to(root)} ({_first_line(err)})")
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


class ImageFolderDataset(Dataset):
    """Any images as grey (channels=1) or RGB: shorter side resized to image_size, center-cropped, scaled to
    [-1, 1]. Bad files are refused when it is built (check_image_files); a file that passed that check but
    fails to decode later (a cut-short JPEG, corrupt pixel data) is replaced by the next readable file, with a
    warning naming it, so training never stops mid-run on it."""

    def __init__(self, root: Path, image_size: int, flip: bool, channels: int = 0):
        from torchvision import transforms  # PIL resizing for arbitrary files; imported only when used (~2 s)

        self.files, self.labels, self.class_names = scan_image_folder(root)
        check_image_files(root, self.files)
        self.channels = folder_channels(self.files, channels)
        self.unreadable: set[int] = set()  # indices that failed to decode (warned once each)
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        if flip:
            steps.append(transforms.RandomHorizontalFlip(0.5))  # draws from torch's global RNG
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * self.channels, [0.5] * self.channels)]
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        for k in range(len(self.files)):  # index first; the next ones only if it cannot be decoded
            i = (index + k) % len(self.files)
            try:
                image = open_as(self.files[i], self.channels)
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
                if i not in self.unreadable:
                    self.unreadable.add(i)
                    warnings.warn(f"image '{self.files[i]}' cannot be decoded ({_first_line(err)}); another image "
                                  "of the folder is used in its place: move the file out of the folder")
                continue
            x = self.transform(image)  # (C, S, S) in [-1, 1]
            return x, torch.tensor(self.labels[i], dtype=torch.int64)
        raise BadDataError(f"no image in '{self.files[index].parent}' can be decoded")


# ----------------------------------------------------------------------------- offline data sets
def digits_dataset(image_size: int) -> ImageTensorDataset:
    """scikit-learn's 1797 bundled 8x8 handwritten digits (ink 16 on paper 0: white on black, as MNIST)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageTensorDataset(images, labels, image_size, max_value=16.0, flip=False,
                              class_names=DIGIT_CLASSES)


def _ring(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t.cos(), t.sin()], dim=1)  # (n,) angles -> (n, 2) unit vectors


def _toy_points(name: str, n: int, g: torch.Generator | None) -> torch.Tensor:
    if name == "gaussian":  # N([2, 2], 0.5^2 I), exactly as in the original tutorial
        return 2.0 + 0.5 * torch.randn(n, 2, generator=g)
    if name == "8gaussians":  # 8 modes evenly spaced on a circle of radius 2, std 0.1 each
        angles = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
        return 2.0 * _ring(angles) + 0.1 * torch.randn(n, 2, generator=g)
    if name == "moons":  # sklearn make_moons (noise 0.05), centered and scaled to about [-2, 2] x [-1, 1]
        upper = _ring(math.pi * torch.rand(n, generator=g))
        lower = torch.tensor([1.0, 0.5]) - upper
        is_lower = torch.randint(0, 2, (n, 1), generator=g).bool()
        points = torch.where(is_lower, lower, upper) + 0.05 * torch.randn(n, 2, generator=g)
        return (points - torch.tensor([0.5, 0.25])) * (4 / 3)
    if name == "swissroll":  # sklearn make_swiss_roll's (x, z) plane, t in [1.5 pi, 4.5 pi], radius <= 2
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        return t[:, None] * _ring(t) / (2.25 * math.pi) + 0.05 * torch.randn(n, 2, generator=g)
    if name == "heart":  # x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t, centered, / 8
        t = 2 * math.pi * torch.rand(n, generator=g)
        x = 16 * t.sin() ** 3
        y = 13 * t.cos() - 5 * (2 * t).cos() - 2 * (3 * t).cos() - (4 * t).cos() + 2.5
        return torch.stack([x, y], dim=1) / 8 + 0.05 * torch.randn(n, 2, generator=g)
    raise ValueError(f"unknown toy distribution {name!r} (choose from {', '.join(TOY_DISTRIBUTIONS)})")


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) float32 points of a 2-D toy distribution, drawn from generator (None: torch's global RNG)."""
    return _toy_points(name, n, generator).float()


def toy2d_dataset(name: str, num_points: int, seed: int) -> TensorDataset:
    """num_points fixed points (n, 2), drawn once from a seeded generator, each with label 0."""
    points = sample_toy2d(name, num_points, torch.Generator().manual_seed(seed))
    return TensorDataset(points, torch.zeros(num_points, dtype=torch.int64))


# ----------------------------------------------------------------------------- public entry points
def build_dataset(data_cfg, train: bool = True) -> Dataset:
    """The train (or test) split of data_cfg.dataset; see the module docstring for the item format."""
    name = data_cfg.dataset
    if name == "toy2d":
        return toy2d_dataset(data_cfg.toy_distribution, data_cfg.toy_num_points, TOY_SEEDS[train])
    if name == "digits":  # tiny: the same 1797 images serve as train and test split
        return digits_dataset(data_cfg.image_size)
    if name == "folder":  # no split either: the folder is the data set
        return ImageFolderDataset(Path(data_cfg.root), data_cfg.image_size, train and data_cfg.random_flip,
                                  data_cfg.channels)
    if name in ("cifar10", *IDX_DATASETS):
        return _torchvision_format_dataset(data_cfg, train)
    raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")


def dataset_info(data_cfg) -> DatasetInfo:
    """Shape and classes of the data set's items; reads no files except a folder's listing and headers."""
    name, size = data_cfg.dataset, data_cfg.image_size
    if name == "toy2d":
        return DatasetInfo(channels=2, image_size=0, num_classes=0, class_names=[])
    if name == "folder":  # the files' modes give the channels (headers only, remembered per file)
        files, _, class_names = scan_image_folder(Path(data_cfg.root))
        return DatasetInfo(folder_channels(files, data_cfg.channels), size, len(class_names), class_names)
    class_names = {"cifar10": CIFAR10_CLASSES, "digits": DIGIT_CLASSES}.get(name) or IDX_DATASETS[name][1]
    return DatasetInfo(3 if name == "cifar10" else 1, size, len(class_names), list(class_names))


def check_data(cfg: Config, dataset: Dataset) -> None:
    """The data must fit the model: channels vs model.in_channels, size vs data.image_size, classes."""
    info, (x, _) = dataset_info(cfg.data), dataset[0]
    name = f"data.dataset={cfg.data.dataset}"
    channels = x.shape[0] if x.ndim == 3 else x.shape[-1]
    if info.channels != cfg.model.in_channels or channels != cfg.model.in_channels:
        wanted = cfg.model.in_channels
        rgb = (f" (or data.channels={wanted} to read the images as {'RGB' if wanted == 3 else 'grey'})"
               if cfg.data.dataset == "folder" and wanted in (1, 3) else "")
        raise ConfigError(f"{name} has {channels} channels but model.in_channels={cfg.model.in_channels}: "
                          f"set model.in_channels={channels}{rgb}")
    if x.ndim == 3 and tuple(x.shape[1:]) != (cfg.data.image_size, cfg.data.image_size):
        raise ConfigError(f"{name} gives {x.shape[1]}x{x.shape[2]} images but data.image_size="
                          f"{cfg.data.image_size}: set data.image_size to match the data set")
    classes = cfg.model.num_classes
    if classes and not info.num_classes:
        raise ConfigError(f"model.num_classes={classes} but {name} has no class labels: set model.num_classes=0")
    if classes and classes != info.num_classes:
        raise ConfigError(f"model.num_classes={classes} but {name} has {info.num_classes} classes: set "
                          f"model.num_classes={info.num_classes} (or 0 for an unconditional model)")


# ----------------------------------------------------------------------------- command line
def _print_summary(data_cfg, train_set: Dataset, test_set: Dataset) -> None:
    info = dataset_info(data_cfg)
    probe = torch.stack([train_set[i][0] for i in range(min(256, len(train_set)))])  # (n, *item shape)
    toy = f" ({data_cfg.toy_distribution})" if data_cfg.dataset == "toy2d" else ""
    print(f"dataset      {data_cfg.dataset}{toy}")
    print(f"splits       train {len(train_set)}, test {len(test_set)}")
    print(f"item shape   {tuple(probe.shape[1:])} {probe.dtype}")
    print(f"value range  [{probe.min().item():.3f}, {probe.max().item():.3f}] (first {len(probe)} items)")
    names = f": {', '.join(info.class_names)}" if info.class_names else ""
    print(f"classes      {info.num_classes}{names}")


def _save_preview(train_set: Dataset, path: Path, toy: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if toy:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(*train_set.tensors[0].T.numpy(), s=2, alpha=0.5)  # all (n, 2) points
        ax.set_aspect("equal")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return
    from torchvision.utils import save_image
    batch = torch.stack([train_set[i][0] for i in range(min(64, len(train_set)))])  # (n, C, S, S)
    save_image((batch + 1) / 2, path, nrow=8)  # [-1, 1] -> [0, 1]


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description="Download/verify a data set, print a summary, save a preview.")
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    parser.add_argument("--root", default=defaults.root, help="data folder (for 'folder': the image folder)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--toy-distribution", choices=TOY_DISTRIBUTIONS, default=defaults.toy_distribution)
    parser.add_argument("--toy-num-points", type=int, default=defaults.toy_num_points)
    parser.add_argument("--no-download", action="store_true", help="never touch the network")
    parser.add_argument("--preview", type=Path, help="write a PNG of 64 training items (toy2d: a scatter)")
    args = parser.parse_args(argv)
    data_cfg = DataConfig(dataset=args.dataset, root=args.root, image_size=args.image_size,
                          download=not args.no_download, toy_distribution=args.toy_distribution,
                          toy_num_points=args.toy_num_points)
    try:
        train_set, test_set = build_dataset(data_cfg, train=True), build_dataset(data_cfg, train=False)
    except DatasetMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_summary(data_cfg, train_set, test_set)
    if args.preview:
        _save_preview(train_set, args.preview, toy=args.dataset == "toy2d")
        print(f"preview      {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
