"""dataset.py: the CIFAR-10 / IDX readers on files written here, image folders, digits, toy2d, missing data.

No test touches the network: every config has download=False (the CLI gets --no-download).
"""
import gzip
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import DataConfig
from dataset import (CIFAR10_CLASSES, DatasetMissingError, build_dataset, dataset_info, read_idx,
                     sample_toy2d)

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def data_cfg(dataset, root, **overrides) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), download=False, **overrides)


# ----------------------------------------------------------------------------- file writers
def write_cifar10(root: Path, per_batch: int = 10, str_keys: bool = False) -> dict:
    """Tiny batches pickled as the real ones: dict with b'data' uint8 (N, 3072) (R, G, B planes, each
    row-major 32x32), b'labels' list[int], b'batch_label', b'filenames'; batches.meta with label names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batches[name] = (data, labels)
        entry = {key("batch_label"): name.encode(), key("labels"): labels, key("data"): data,
                 key("filenames"): [f"img_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    names = CIFAR10_CLASSES if str_keys else [n.encode() for n in CIFAR10_CLASSES]
    meta = {key("num_cases_per_batch"): per_batch, key("label_names"): names, key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """IDX: magic 0x0000 08 ndim (2051 for 3-D images, 2049 for 1-D labels), big-endian sizes, uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(folder: Path, n: int = 12, compress: bool = False, split: str = "train"):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)  # asymmetric: a flip would show
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


def write_image(path: Path, size=(40, 24), color=(255, 0, 0), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_reads_pickled_batches(tmp_path, str_keys):
    batches = write_cifar10(tmp_path, per_batch=10, str_keys=str_keys)
    train_set = build_dataset(data_cfg("cifar10", tmp_path, random_flip=False), train=True)
    test_set = build_dataset(data_cfg("cifar10", tmp_path, random_flip=False), train=False)
    assert len(train_set) == 50 and len(test_set) == 10
    assert train_set.class_names == CIFAR10_CLASSES
    data, labels = batches["data_batch_2"]
    x, y = train_set[10 + 3]                       # item 3 of the second batch
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0 and y.item() == labels[3]
    assert x.min() >= -1 and x.max() <= 1
    # Green plane, row 5, column 7 sits at 1024 + 5 * 32 + 7 in the flat row.
    assert x[1, 5, 7].item() == pytest.approx(data[3, 1024 + 5 * 32 + 7] / 127.5 - 1, abs=1e-6)
    expected = torch.from_numpy(data[3].reshape(3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    assert [test_set[i][1].item() for i in range(10)] == batches["test_batch"][1]


def test_cifar10_extremes_map_to_minus_one_and_one(tmp_path):
    batches = write_cifar10(tmp_path, per_batch=2)
    data = batches["test_batch"][0]
    data[0, :] = 0
    data[1, :] = 255
    entry = {b"labels": [0, 1], b"data": data}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    test_set = build_dataset(data_cfg("cifar10", tmp_path), train=False)
    assert torch.all(test_set[0][0] == -1) and torch.all(test_set[1][0] == 1)


def test_cifar10_resizes_and_reads_batches_folder_or_archive(tmp_path):
    write_cifar10(tmp_path / "a")
    small = build_dataset(data_cfg("cifar10", tmp_path / "a" / "cifar-10-batches-py", image_size=16), False)
    x, _ = small[0]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # The archive torchvision downloads, placed by hand, is unpacked without any network.
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert len(build_dataset(data_cfg("cifar10", tmp_path), train=True)) == 50


def test_cifar10_flip_draws_from_torch_global_rng(tmp_path):
    write_cifar10(tmp_path)
    plain = build_dataset(data_cfg("cifar10", tmp_path, random_flip=False), train=True)[0][0]
    flipping = build_dataset(data_cfg("cifar10", tmp_path, random_flip=True), train=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        will_flip = bool(torch.rand(1) < 0.5)    # the draw RandomHorizontalFlip makes
        torch.manual_seed(seed)
        x = flipping[0][0]
        torch.testing.assert_close(x, plain.flip(-1) if will_flip else plain)
        seen.add(will_flip)
    assert seen == {True, False}
    test_set = build_dataset(data_cfg("cifar10", tmp_path, random_flip=True), train=False)
    state = torch.get_rng_state()
    test_set[0]
    assert torch.equal(state, torch.get_rng_state())  # the test split never flips, so it draws nothing


# ----------------------------------------------------------------------------- MNIST / Fashion-MNIST
def test_mnist_reads_idx_files_and_never_flips(tmp_path):
    images, labels = write_mnist(tmp_path / "MNIST" / "raw")
    train_set = build_dataset(data_cfg("mnist", tmp_path, image_size=28, random_flip=True), train=True)
    assert len(train_set) == 12
    for seed in range(6):
        torch.manual_seed(seed)
        x, y = train_set[4]
        assert x.shape == (1, 28, 28) and y.item() == labels[4]
        torch.testing.assert_close(x[0], torch.from_numpy(images[4]).float() / 127.5 - 1)
    assert x[0, 2, 9].item() == pytest.approx(images[4, 2, 9] / 127.5 - 1, abs=1e-6)  # row 2, column 9


def test_fashion_mnist_reads_gzipped_idx_and_resizes(tmp_path):
    images, labels = write_mnist(tmp_path / "FashionMNIST" / "raw", compress=True, split="t10k")
    test_set = build_dataset(data_cfg("fashion_mnist", tmp_path, image_size=32), train=False)
    x, y = test_set[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.item() == labels[0]
    assert x.min() >= -1 and x.max() <= 1
    assert test_set.class_names[0] == "T-shirt/top"
    assert dataset_info(data_cfg("fashion_mnist", tmp_path)).channels == 1


def test_idx_magic_numbers_and_bad_files(tmp_path):
    images, _ = write_mnist(tmp_path, n=3)
    header = (tmp_path / "train-images-idx3-ubyte").read_bytes()[:16]
    assert struct.unpack(">IIII", header) == (2051, 3, 28, 28)
    assert struct.unpack(">I", (tmp_path / "train-labels-idx1-ubyte").read_bytes()[:4]) == (2049,)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte"), images)
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_real_mnist_test_split_loads_when_present():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST test split not found in {SHARED_MNIST}")
    test_set = build_dataset(data_cfg("mnist", SHARED_MNIST, image_size=28), train=False)
    assert len(test_set) == 10_000
    labels = test_set.labels
    assert labels[0].item() == 7 and torch.bincount(labels, minlength=10).min() > 800  # the first is a 7
    x, _ = test_set[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() == 1
    assert x[0, :3].eq(-1).all()  # white digit on black paper: the top rows are background


# ----------------------------------------------------------------------------- image folders
def test_folder_with_class_subfolders(tmp_path):
    write_image(tmp_path / "dogs" / "a.png", color=(0, 0, 255))
    write_image(tmp_path / "dogs" / "nested" / "b.jpg", size=(20, 50), color=(0, 255, 0))
    write_image(tmp_path / "cats" / "c.png", size=(64, 64), color=128, mode="L")
    write_image(tmp_path / "cats" / "d.png", color=(255, 0, 0, 255), mode="RGBA")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    dataset = build_dataset(data_cfg("folder", tmp_path, image_size=16), train=True)
    assert len(dataset) == 4 and dataset.class_names == ["cats", "dogs"]
    assert [dataset[i][1].item() for i in range(4)] == [0, 0, 1, 1]
    for i in range(4):
        x, y = dataset[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(dataset[2][0][:, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))  # blue PNG
    info = dataset_info(data_cfg("folder", tmp_path, image_size=16))
    assert (info.channels, info.image_size, info.num_classes) == (3, 16, 2)


def test_flat_folder_has_no_labels(tmp_path):
    write_image(tmp_path / "one.png", color=(255, 0, 0))
    write_image(tmp_path / "two.jpeg", size=(30, 30))
    dataset = build_dataset(data_cfg("folder", tmp_path, image_size=8), train=False)
    assert len(dataset) == 2 and dataset.class_names == []
    x, y = dataset[0]
    assert y.item() == 0 and x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert dataset_info(data_cfg("folder", tmp_path)).num_classes == 0


def test_missing_or_empty_folder_names_it(tmp_path):
    with pytest.raises(DatasetMissingError, match="nowhere"):
        build_dataset(data_cfg("folder", tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError, match="holds no images"):
        build_dataset(data_cfg("folder", tmp_path))


# ----------------------------------------------------------------------------- digits
def test_digits_offline_dataset(tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    dataset = build_dataset(data_cfg("digits", tmp_path, image_size=32, random_flip=True), train=True)
    assert len(dataset) == 1797
    x, y = dataset[5]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.item() == digits.target[5]
    everything = torch.stack([dataset[i][0] for i in range(0, 1797, 7)])
    assert everything.min() == -1 and everything.max() <= 1
    info = dataset_info(data_cfg("digits", tmp_path))
    assert (info.channels, info.num_classes, info.class_names[3]) == (1, 10, "3")
    # At the native 8x8 the item is exactly the sklearn image scaled 0..16 -> -1..1: upright, never flipped.
    native = build_dataset(data_cfg("digits", tmp_path, image_size=8, random_flip=True), train=True)
    expected = torch.from_numpy(digits.images[5]).float() / 8 - 1
    for seed in range(6):
        torch.manual_seed(seed)
        torch.testing.assert_close(native[5][0][0], expected)


# ----------------------------------------------------------------------------- toy2d
@pytest.mark.parametrize("name", ["gaussian", "heart", "moons", "swissroll", "8gaussians"])
def test_toy2d_points_are_finite_and_deterministic(name):
    points = sample_toy2d(name, 500, torch.Generator().manual_seed(3))
    assert points.shape == (500, 2) and points.dtype == torch.float32 and torch.isfinite(points).all()
    assert torch.equal(points, sample_toy2d(name, 500, torch.Generator().manual_seed(3)))
    assert not torch.equal(points, sample_toy2d(name, 500, torch.Generator().manual_seed(4)))
    if name != "gaussian":
        assert points.abs().max() < 3  # all centered at the origin, within about [-2, 2]


def test_toy2d_gaussian_matches_tutorial_distribution():
    points = sample_toy2d("gaussian", 40_000, torch.Generator().manual_seed(0))
    # Standard errors: 0.5 / sqrt(n) = 0.0025 for the mean, about 0.0018 for the std; allow ~8 of them.
    torch.testing.assert_close(points.mean(0), torch.tensor([2.0, 2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(points.std(0), torch.tensor([0.5, 0.5]), atol=0.015, rtol=0)


def test_toy2d_dataset_is_fixed(tmp_path):
    cfg = data_cfg("toy2d", tmp_path, toy_distribution="moons", toy_num_points=300)
    dataset = build_dataset(cfg, train=True)
    assert len(dataset) == 300
    x, y = dataset[7]
    assert x.shape == (2,) and y.dtype == torch.int64 and y.item() == 0
    assert torch.equal(x, build_dataset(cfg, train=True)[7][0])
    info = dataset_info(cfg)
    assert (info.channels, info.image_size, info.num_classes, info.class_names) == (2, 0, 0, [])


# ----------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("dataset, expected", [
    ("cifar10", "cifar-10-python.tar.gz"),
    ("mnist", "train-labels-idx1-ubyte.gz"),
    ("fashion_mnist", "FashionMNIST"),
])
def test_missing_data_without_download_says_what_to_place(tmp_path, dataset, expected):
    with pytest.raises(DatasetMissingError) as caught:
        build_dataset(data_cfg(dataset, tmp_path), train=True)
    message = str(caught.value)
    assert expected in message and str(tmp_path) in message and "--config configs/digits.yaml" in message


def test_cli_missing_data_exits_1_with_message(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "dataset.py"), "--dataset", "mnist",
                             "--root", str(tmp_path), "--no-download"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert "t10k-images-idx3-ubyte.gz" in result.stderr and "Traceback" not in result.stderr


def test_cli_digits_summary_and_preview(tmp_path):
    preview = tmp_path / "plots" / "digits.png"
    result = subprocess.run([sys.executable, str(REPO / "dataset.py"), "--dataset", "digits",
                             "--preview", str(preview), "--no-download"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "train 1797" in result.stdout and "(1, 32, 32)" in result.stdout
    with Image.open(preview) as image:
        assert image.size == (8 * 34 + 2, 8 * 34 + 2)  # 8x8 grid of 32-pixel tiles, 2-pixel padding
