"""Safety table of the data files (issue #12): bad image-folder files, truncated MNIST files, hostile CIFAR-10
pickles, 16-bit grey PNGs and grey folders, each seen through the command line (dataset.py, train.py)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_dataset import write_bad_image, write_cifar10, write_hostile_batch, write_image, write_mnist

from safety import DIGITS, TINY, Case, run_case

PREVIEW = ["dataset.py", "--dataset", "folder", "--root", "imgs", "--image-size", "8", "--no-download"]
TRAIN_FOLDER = ["train.py", "--config", DIGITS, *TINY, "train.max_steps=3", "data.dataset=folder",
                "data.root=imgs", "data.num_workers=0", "run_name=folder"]


def folder_with(kind: str, name: str):
    """Setup: a few good grey images in imgs/ and one bad file imgs/<name> of the given kind."""
    def setup(workdir: Path) -> None:
        for i in range(4):
            write_image(workdir / "imgs" / f"{i}.png", size=(8, 8), color=40 * i, mode="L")
        write_bad_image(workdir / "imgs" / name, kind)
    return setup


def grey_folder(workdir: Path) -> None:
    for i in range(16):  # one batch of train.batch_size=16
        write_image(workdir / "imgs" / f"{i}.png", size=(10, 8), color=15 * i, mode="L")


def deep_grey_folder(workdir: Path) -> None:
    """16-bit grey PNGs of value 257 * 64: 64 in 8 bits, so every item value is 64 / 127.5 - 1 = -0.498."""
    (workdir / "imgs").mkdir()
    Image.fromarray(np.full((8, 8), 257 * 64, dtype=np.uint16)).save(workdir / "imgs" / "deep.png")


def mnist_cut(name: str, compress: bool):
    """Setup: MNIST's four files in data/MNIST/raw, the file `name` cut short."""
    def setup(workdir: Path) -> None:
        raw = workdir / "data" / "MNIST" / "raw"
        for split in ("train", "t10k"):
            write_mnist(raw, n=6, compress=compress, split=split)
        path = raw / f"{name}{'.gz' if compress else ''}"
        path.write_bytes(path.read_bytes()[:-5])
    return setup


def mnist_float_images(workdir: Path) -> None:
    """MNIST's files, the training images stored as IDX floats (type code 0x0D) in [0, 1], not unsigned bytes."""
    import struct
    raw = workdir / "data" / "MNIST" / "raw"
    for split in ("train", "t10k"):
        write_mnist(raw, n=6, split=split)
    images = np.random.default_rng(0).random((6, 28, 28)).astype(">f4")
    (raw / "train-images-idx3-ubyte").write_bytes(struct.pack(">I", 0x0D03) + struct.pack(">3I", 6, 28, 28)
                                                  + images.tobytes())


def hostile_cifar(workdir: Path) -> None:
    write_cifar10(workdir / "data", per_batch=2)
    write_hostile_batch(workdir / "data" / "cifar-10-batches-py" / "test_batch", workdir / "ran")


MNIST_CLI = ["dataset.py", "--dataset", "mnist", "--root", "data", "--image-size", "28", "--no-download"]

def grey_folder_and_file(name: str, link: bool = False):
    """Setup: grey_folder plus the user's file `name` (with `link`: `name` is a symlink to the user's mine.png)."""
    def setup(workdir: Path) -> None:
        grey_folder(workdir)
        (workdir / "mine.png").write_text("the user's file")
        if link:
            (workdir / name).symlink_to(workdir / "mine.png")
        elif name != "mine.png":
            (workdir / name).write_text("the user's file")
    return setup


CASES = [
    # --preview goes through the output guard: an existing file only with --overwrite, never through a link.
    Case("preview-keeps-an-existing-file", PREVIEW + ["--preview", "mine.png"], 1,
         r"'mine\.png' already exists: move it away, or pass --overwrite", grey_folder_and_file("mine.png"),
         keep=("mine.png",)),
    Case("preview-is-a-link", PREVIEW + ["--preview", "p.png", "--overwrite"], 1, r"'p\.png' is a symbolic link",
         grey_folder_and_file("p.png", link=True), keep=("mine.png",)),
    # Image folders: each kind of bad file is refused before any work, naming it (today: a traceback).
    Case("folder-corrupt-png", PREVIEW, 1, r"error: 1 of 5 files .*bad\.png \(broken PNG.*move them out",
         folder_with("corrupt", "bad.png"), keep=("imgs/*",)),
    Case("folder-text-as-jpg", PREVIEW, 1, r"error: 1 of 5 files .*notes\.jpg \(cannot identify",
         folder_with("text", "notes.jpg"), keep=("imgs/*",)),
    Case("folder-truncated-png", PREVIEW, 1, r"error: 1 of 5 files .*cut\.png \(.*truncated",
         folder_with("truncated", "cut.png"), keep=("imgs/*",)),
    Case("folder-decompression-bomb", PREVIEW, 1, r"error: 1 of 5 files .*huge\.png \(.*decompression bomb",
         folder_with("bomb", "huge.png"), keep=("imgs/*",)),
    # ... and train.py stops at start, not mid-run, with nothing of the run written.
    Case("train-folder-bad-file", TRAIN_FOLDER, 1, r"error: 1 of 5 files .*bad\.png .*move them out",
         folder_with("corrupt", "bad.png"), keep=("imgs/*",), absent=("checkpoints/folder/*.pt",)),
    # MNIST files cut short (a broken download): one line naming the file and the fix.
    Case("mnist-truncated-gz", MNIST_CLI, 1, r"error: .*t10k-images-idx3-ubyte\.gz' is a truncated .*delete it",
         mnist_cut("t10k-images-idx3-ubyte", compress=True), keep=("data/MNIST/raw/*",)),
    Case("mnist-short-idx", MNIST_CLI, 1, r"error: .*train-labels-idx1-ubyte' is truncated or corrupt: its header "
         r"says \(6,\).*delete it", mnist_cut("train-labels-idx1-ubyte", compress=False), keep=("data/MNIST/raw/*",)),
    # IDX images of another type than unsigned bytes (floats would be read as black digits) are refused.
    Case("mnist-float-idx-images", MNIST_CLI, 1, r"error: .*train-images-idx3-ubyte' holds IDX type code 0x0D "
         r"\(float32\), not 0x08 \(uint8\).*delete it", mnist_float_images, keep=("data/MNIST/raw/*",)),
    # A CIFAR-10 batch that would run a command when unpickled is refused, and the command never runs.
    Case("cifar10-hostile-pickle", ["dataset.py", "--dataset", "cifar10", "--root", "data", "--no-download"], 1,
         r"error: .*test_batch' .*posix\.system.*refused", hostile_cifar,
         keep=("data/cifar-10-batches-py/*",), absent=("ran",)),
    # dataset.py's flags: one line and exit 1 like every script (argparse's exit 2 before), the config keys' rules.
    Case("dataset-unknown-name", ["dataset.py", "--dataset", "nope"], 1, r"error: argument --dataset: invalid "
         r"choice: 'nope'"),
    Case("dataset-negative-toy-points", ["dataset.py", "--dataset", "toy2d", "--toy-num-points", "-5"], 1,
         r"error: --toy-num-points must be > 0, got -5"),
    # 16-bit grey PNGs keep their brightness (today: clipped to white, value range [1.000, 1.000]).
    Case("folder-16-bit-grey", PREVIEW, 0, r"item shape\s+\(1, 8, 8\).*value range\s+\[-0\.498, -0\.498\]",
         deep_grey_folder),
    # A folder of grey images gives 1-channel items, and trains the 1-channel digits model as it is.
    Case("folder-grey-preview", [*PREVIEW, "--preview", "p.png"], 0, r"item shape\s+\(1, 8, 8\)", grey_folder),
    Case("train-folder-grey", TRAIN_FOLDER, 0, r"finished folder: step 3", grey_folder, keep=("imgs/*",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_data_safety(case, tmp_path):
    run_case(case, tmp_path)
