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

import dataclasses
import functools
import math
import socket
import sys
import threading
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from config import (DATASETS, TOY_DISTRIBUTIONS, ArgumentParser, Config, ConfigError, DataConfig, UserError,
                    check_value)
from storage.data_files import (CIFAR10_ARCHIVE, CIFAR10_CLASSES, CIFAR10_FOLDER, DIGIT_CLASSES, IDX_DATASETS,
    IDX_FILES, BadDataError, DatasetMissingError, check_image_files, first_line, folder_channels, open_as, read_cifar10,
    read_idx_split, scan_image_folder)

NETWORK_TIMEOUT_S = 10.0   # per connection attempt / socket read: offline fails in seconds, not minutes
TOY_SEEDS = {True: 0, False: 1}  # toy2d train / test points: fixed draws, so the data set is deterministic
OFFLINE_HINT = ("To work offline, use the embedded digits, which need no files: python train.py --config "
                "configs/digits.yaml (or data.dataset=digits; python dataset.py --dataset digits to preview).")


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
                    warnings.warn(f"image '{self.files[i]}' cannot be decoded ({first_line(err)}); another image "
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
HOLDOUT_SEED = 1234  # fixed, not cfg.seed: every tool finds the same held-out images from the config alone


def holdout_indices(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held) sorted indices into a split of n items: `holdout` of them drawn by a fixed seed."""
    if not 0 < holdout < n:
        raise ConfigError(f"data.holdout={holdout} must be below the {n} images of the training split: "
                          f"set data.holdout to at most {n - 1} (or 0 to train on all of them)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return order[holdout:].sort().values, order[:holdout].sort().values


def build_dataset(data_cfg, train: bool = True, held_out: bool = False) -> Dataset:
    """The train (or test) split of data_cfg.dataset; see the module docstring for the item format. With
    data.holdout > 0 the training split loses its held-out images, and held_out=True returns just those
    (unflipped)."""
    holdout = getattr(data_cfg, "holdout", 0)
    if held_out and not holdout:
        raise ConfigError("no held-out images: this config has data.holdout=0")
    if holdout and train:
        whole = _build_split(dataclasses.replace(data_cfg, random_flip=data_cfg.random_flip and not held_out), True)
        kept, held = holdout_indices(len(whole), holdout)
        return Subset(whole, (held if held_out else kept).tolist())
    return _build_split(data_cfg, train)


def _build_split(data_cfg, train: bool) -> Dataset:
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
    if cfg.data.task == "colorize" and channels != 3:  # before the channel advice below, which would not fit
        raise ConfigError(f"data.task=colorize makes RGB images from grey ones, but {name} has grey images: use "
                          "a folder of RGB images, or data.task=superres / generate")
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


def _save_preview(train_set: Dataset, path: Path, toy: bool, replace: bool = False) -> None:
    """--preview through the output guard (storage.files.write_output): an existing file only with --overwrite."""
    from storage.files import write_output
    if toy:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(*train_set.tensors[0].T.numpy(), s=2, alpha=0.5)  # all (n, 2) points
        ax.set_aspect("equal")
        try:
            write_output(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), replace=replace)
        finally:
            plt.close(fig)
        return
    from torchvision.utils import save_image
    batch = torch.stack([train_set[i][0] for i in range(min(64, len(train_set)))])  # (n, C, S, S)
    write_output(path, lambda f: save_image((batch + 1) / 2, f, nrow=8, format="png"), replace=replace)  # [-1,1]->[0,1]


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    parser = ArgumentParser(description="Download/verify a data set, print a summary, save a preview.")
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    parser.add_argument("--root", default=defaults.root, help="data folder (for 'folder': the image folder)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--toy-distribution", choices=TOY_DISTRIBUTIONS, default=defaults.toy_distribution)
    parser.add_argument("--toy-num-points", type=int, default=defaults.toy_num_points)
    parser.add_argument("--no-download", action="store_true", help="never touch the network")
    parser.add_argument("--preview", type=Path, help="write a PNG of 64 training items (toy2d: a scatter)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --preview file")
    args = parser.parse_args(argv)
    data_cfg = DataConfig(dataset=args.dataset, root=args.root, image_size=args.image_size,
                          download=not args.no_download, toy_distribution=args.toy_distribution,
                          toy_num_points=args.toy_num_points)
    from storage.files import check_output_path
    try:
        for key in ("image_size", "toy_num_points"):  # the config keys' own rules, as train.py applies them
            check_value(f"data.{key}", getattr(args, key), "--" + key.replace("_", "-"))
        if args.preview:  # before the data is read
            check_output_path(args.preview, replace=args.overwrite)
        train_set, test_set = build_dataset(data_cfg, train=True), build_dataset(data_cfg, train=False)
        _print_summary(data_cfg, train_set, test_set)
        if args.preview:
            _save_preview(train_set, args.preview, toy=args.dataset == "toy2d", replace=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.preview:
        print(f"preview      {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
