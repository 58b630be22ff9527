"""dataset.py: the CIFAR-10 / IDX readers on files written here, image folders, digits, toy2d, missing data.

No test touches the network: every config has download=False (the CLI gets --no-download).
"""
import gzip
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import Config, ConfigError, DataConfig
from dataset import (CIFAR10_CLASSES, BadDataError, DatasetMissingError, build_dataset, check_data, dataset_info,
    sample_toy2d)
from storage.data_files import read_idx

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


class RunsCommand:
    """A pickle that runs a shell command when loaded (what a hostile 'CIFAR-10 batch' would hold)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_hostile_batch(path: Path, marker: Path) -> None:
    """A data batch whose b'data' entry, when unpickled with plain pickle, touches `marker`."""
    entry = {b"batch_label": b"x", b"labels": [0], b"data": RunsCommand(f"touch '{marker}'")}
    path.write_bytes(pickle.dumps(entry, protocol=2))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bad_image(path: Path, kind: str) -> None:
    """Files that end in an image extension but are not readable images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path.write_text("not an image, despite its name")
        return
    if kind in ("bomb", "big"):  # a tiny PNG claiming 20000^2 (PIL: error) or 10000^2 pixels (PIL: a warning)
        side = 20000 if kind == "bomb" else 10000
        header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b""))
                         + png_chunk(b"IEND", b""))
        return
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(path, format="PNG" if kind != "cut_jpeg" else "JPEG", quality=95)
    raw = bytearray(path.read_bytes())
    if kind == "corrupt":
        raw[len(raw) // 2] ^= 0xFF   # a flipped byte in the pixel data: the chunk's CRC no longer matches
    path.write_bytes(bytes(raw[: len(raw) // 2]) if kind in ("truncated", "cut_jpeg") else bytes(raw))


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


def test_cifar10_reads_numpy_1_and_protocol_5_pickles_without_running_anything(tmp_path):
    batches = write_cifar10(tmp_path, per_batch=4)
    folder = tmp_path / "cifar-10-batches-py"
    data, labels = batches["test_batch"]
    entry = {b"labels": labels, b"data": data}
    # The official files name numpy.core.multiarray._reconstruct (numpy < 2); protocol 5 uses _frombuffer.
    old_numpy = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old_numpy
    for raw in (old_numpy, pickle.dumps(entry, protocol=5)):
        (folder / "test_batch").write_bytes(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DeprecationWarning for numpy.core either
            test_set = build_dataset(data_cfg("cifar10", tmp_path), train=False)
        torch.testing.assert_close(test_set[2][0], torch.from_numpy(data[2].reshape(3, 32, 32)).float() / 127.5 - 1)


@pytest.mark.parametrize("name", ["test_batch", "batches.meta"])
def test_cifar10_hostile_pickle_is_refused_and_runs_nothing(tmp_path, name):
    write_cifar10(tmp_path, per_batch=2)
    marker = tmp_path / "ran"
    write_hostile_batch(tmp_path / "cifar-10-batches-py" / name, marker)
    with pytest.raises(BadDataError, match=rf"{name}'.*posix.system.*refused.*delete the folder"):
        build_dataset(data_cfg("cifar10", tmp_path), train=False)
    assert not marker.exists()


def test_cifar10_truncated_or_wrong_batches_name_the_file(tmp_path):
    batches = write_cifar10(tmp_path, per_batch=3)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    raw = batch.read_bytes()
    batch.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadDataError, match="data_batch_3' is not a readable CIFAR-10 batch"):
        build_dataset(data_cfg("cifar10", tmp_path), train=True)
    batch.write_bytes(pickle.dumps({b"data": batches["data_batch_3"][0][:, :100], b"labels": [1, 2, 3]}, protocol=2))
    with pytest.raises(BadDataError, match=r"data_batch_3' holds data \(3, 100\)"):
        build_dataset(data_cfg("cifar10", tmp_path), train=True)
    batch.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(BadDataError, match="not a CIFAR-10 batch"):
        build_dataset(data_cfg("cifar10", tmp_path), train=True)


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


def test_idx_with_wrong_length_is_refused(tmp_path):
    write_mnist(tmp_path, n=3)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    for cut, expected in [(raw[:-1], "truncated or corrupt: its header says"), (raw + b"\0", "holds 2369 bytes"),
                          (raw[:10], "shorter than its 16-byte header")]:
        path.write_bytes(cut)
        with pytest.raises(ValueError, match=expected):
            read_idx(path)
    compressed = gzip.compress(raw)
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_mnist_file_names_it_and_the_fix(tmp_path, compress):
    write_mnist(tmp_path / "MNIST" / "raw", n=5, compress=compress, split="t10k")
    path = tmp_path / "MNIST" / "raw" / f"t10k-labels-idx1-ubyte{'.gz' if compress else ''}"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(BadDataError, match=rf"'{path}' is (a )?truncated.*delete it and run again"):
        build_dataset(data_cfg("mnist", tmp_path, image_size=28), train=False)


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


@pytest.mark.parametrize("kind", ["corrupt", "text", "truncated", "bomb", "big"])
def test_folder_refuses_bad_files_at_build_time(tmp_path, kind):
    for i in range(3):
        write_image(tmp_path / "good" / f"{i}.png")
    write_bad_image(tmp_path / "bad" / ("x.jpg" if kind == "text" else "x.png"), kind)
    with pytest.raises(BadDataError, match=r"1 of 4 files in image folder .*: bad/x\.(jpg|png) \(.*move them out"):
        build_dataset(data_cfg("folder", tmp_path, image_size=8), train=True)
    assert dataset_info(data_cfg("folder", tmp_path)).channels == 3  # the good files are RGB; building refuses


def test_folder_error_lists_a_few_bad_files_and_their_count(tmp_path):
    write_image(tmp_path / "ok.png")
    for i in range(7):
        write_bad_image(tmp_path / f"bad{i}.jpg", "text")
    with pytest.raises(BadDataError) as caught:
        build_dataset(data_cfg("folder", tmp_path))
    message = str(caught.value)
    assert "7 of 8 files" in message and "bad4.jpg" in message and "bad5.jpg" not in message
    assert "and 2 more" in message and "\n" not in message


def test_folder_file_that_fails_to_decode_later_is_replaced_with_a_warning(tmp_path):
    write_image(tmp_path / "a.png", color=(0, 0, 255))
    write_bad_image(tmp_path / "b.jpg", "cut_jpeg")   # passes the header check (verify does not decode JPEG)
    write_image(tmp_path / "c.png", color=(0, 255, 0))
    dataset = build_dataset(data_cfg("folder", tmp_path, image_size=8), train=True)
    assert len(dataset) == 3
    with pytest.warns(UserWarning, match="b.jpg' cannot be decoded"):
        x, _ = dataset[1]
    torch.testing.assert_close(x[:, 4, 4], torch.tensor([-1.0, 1.0, -1.0]))  # c.png, the next image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        dataset[1]


def test_folder_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 32896]] * 4, dtype=np.uint16)  # 8-bit: 0, 100, 255, 128
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
    for channels in (1, 3):
        dataset = build_dataset(data_cfg("folder", tmp_path, image_size=4, channels=channels), train=False)
        x, _ = dataset[0]
        assert x.shape == (channels, 4, 4)
        expected = torch.tensor([0, 100, 255, 128]) / 127.5 - 1
        torch.testing.assert_close(x[:, 2], expected.expand(channels, 4))


def test_grey_folder_gives_one_channel_and_mixed_gives_three(tmp_path):
    write_image(tmp_path / "grey" / "a.png", color=200, mode="L")
    write_image(tmp_path / "grey" / "b.png", color=(10, 255), mode="LA")
    write_image(tmp_path / "grey" / "c.png", color=1, mode="1")
    grey = build_dataset(data_cfg("folder", tmp_path / "grey", image_size=8), train=True)
    assert dataset_info(data_cfg("folder", tmp_path / "grey")).channels == 1
    assert grey[0][0].shape == (1, 8, 8)
    torch.testing.assert_close(grey[0][0][0, 4, 4], torch.tensor(200 / 127.5 - 1))
    assert grey[1][0][0, 4, 4].item() == pytest.approx(10 / 127.5 - 1)  # the alpha channel is dropped
    forced = build_dataset(data_cfg("folder", tmp_path / "grey", image_size=8, channels=3), train=True)
    assert forced[0][0].shape == (3, 8, 8) and dataset_info(data_cfg("folder", tmp_path / "grey", channels=3)).channels == 3
    write_image(tmp_path / "grey" / "d.png", color=(1, 2, 3))
    assert dataset_info(data_cfg("folder", tmp_path / "grey")).channels == 3   # one RGB file: RGB
    assert build_dataset(data_cfg("folder", tmp_path / "grey", image_size=8))[0][0].shape == (3, 8, 8)
    assert build_dataset(data_cfg("folder", tmp_path / "grey", image_size=8, channels=1))[3][0].shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="data.channels"):
        dataset_info(data_cfg("folder", tmp_path / "grey", channels=2))


def test_rgb_folder_info_reads_one_header(tmp_path, monkeypatch):
    import storage.data_files as data_files
    for i in range(5):
        write_image(tmp_path / f"{i}.png", color=(i, 0, 0))
    seen = []
    monkeypatch.setattr(data_files, "_image_mode", lambda path: seen.append(path) or "RGB")
    assert dataset_info(data_cfg("folder", tmp_path)).channels == 3 and len(seen) == 1


def test_grey_folder_against_an_rgb_model_says_both_fixes(tmp_path):
    write_image(tmp_path / "a.png", color=20, mode="L")
    cfg = Config(data=data_cfg("folder", tmp_path, image_size=8))
    cfg.model.in_channels = 3
    with pytest.raises(ConfigError, match="has 1 channels.*model.in_channels=1 .or data.channels=3"):
        check_data(cfg, build_dataset(cfg.data))
    cfg.model.in_channels = 1
    check_data(cfg, build_dataset(cfg.data))


# ----------------------------------------------------------------------------- reference statistics
def test_reference_stats_are_of_unflipped_images_and_deterministic(tmp_path):
    import evaluation.scoring as ev

    class Pixels:
        name = "pixels"

        def __call__(self, images):
            x = images.flatten(1).float()
            return x, x[:, :10]

    batches = write_cifar10(tmp_path / "data", per_batch=6)
    cfg = data_cfg("cifar10", tmp_path / "data", random_flip=True, split="test")
    refs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        refs.append(ev.reference_stats(cfg, "test", Pixels(), cache_dir=tmp_path / f"cache{seed}"))
    unflipped = batches["test_batch"][0].astype(np.float64)  # (6, 3072), exactly the stored pixels
    np.testing.assert_allclose(refs[0]["mu"], unflipped.mean(0), rtol=1e-6)
    for name in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(refs[0][name], refs[1][name])
    assert refs[0]["key"].endswith("-noflip")  # caches of flipped images (older keys) are not reused


def test_reference_key_names_the_image_folder(tmp_path):
    import evaluation.scoring as ev
    one, two = (ev.reference_source(data_cfg("folder", tmp_path / name)) for name in ("one", "two"))
    assert one != two and one.startswith("folder") and ev.reference_source(data_cfg("mnist", tmp_path)) == "mnist"


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
