"""Safety table of image-conditioned models (issue #15, data.task superres / colorize): each bad input is one
`error:` line, before any training or sampling, and the user's files stay as they were."""
from pathlib import Path

import pytest

from safety import DIGITS, REPO, TINY, Case, run_case

SR = ["data.task=superres", "data.sr_factor=4"]  # TINY's 8x8 digits: 2x2 low-res inputs


def checkpoint(*overrides):
    """setup: ckpt.pt, a tiny digits U-Net (random initial weights, no training) with these overrides."""
    def setup(workdir: Path) -> None:
        from config import load_config, to_dict
        from model import build_model
        from storage.checkpoints import save_checkpoint
        cfg = load_config(DIGITS, TINY + list(overrides))
        state = build_model(cfg).state_dict()
        save_checkpoint({"step": 0, "config": to_dict(cfg), "model": state, "ema": state}, workdir / "ckpt.pt")
    return setup


def with_image(name: str, size: int, mode: str = "L", *overrides):
    """setup: the checkpoint plus one condition image of size x size pixels in `mode`."""
    def setup(workdir: Path) -> None:
        from PIL import Image
        checkpoint(*overrides)(workdir)
        Image.new(mode, (size, size), "white" if mode == "L" else (200, 10, 10)).save(workdir / name)
    return setup


def with_text_file(workdir: Path) -> None:
    checkpoint(*SR)(workdir)
    (workdir / "low.png").write_text("not an image")


def grey_folder(workdir: Path) -> None:
    from PIL import Image
    (workdir / "imgs").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(workdir / "imgs" / f"{i}.png")


TRAIN = ["train.py", "--config", DIGITS, *TINY, "train.max_steps=1"]
SAMPLE = ["sample.py", "--checkpoint", "ckpt.pt", "--device", "cpu", "--out", "out"]
KEEP = ("ckpt.pt", "*.png")
CASES = [
    Case("colorize-grey-data", [*TRAIN, "data.task=colorize"], 1, r"error: .*data.task=colorize.*grey",
         absent=("checkpoints/*",)),
    Case("colorize-mnist-as-rgb", [*TRAIN, "data.dataset=mnist", "model.in_channels=3", "data.task=colorize"], 1,
         r"error: .*data.task=colorize.*data.dataset=mnist", absent=("checkpoints/*",)),
    Case("colorize-grey-folder", [*TRAIN, "data.dataset=folder", "data.root=imgs", "model.in_channels=3",
                                  "data.task=colorize"], 1,
         r"error: data.task=colorize makes RGB images from grey ones, but data.dataset=folder has grey images",
         grey_folder, keep=("imgs/*",), absent=("checkpoints/*",)),
    Case("distill-a-conditioned-teacher", ["distill.py", "--teacher", "ckpt.pt"], 1,
         r"error: .*image-conditioned.*distils unconditioned", checkpoint(*SR), keep=("ckpt.pt",)),
    Case("sr-factor-does-not-divide", [*TRAIN, "data.task=superres", "data.sr_factor=3"], 1,
         r"error: .*data.sr_factor=3 must be >= 2 and divide data.image_size=8", absent=("checkpoints/*",)),
    Case("sr-factor-one", [*TRAIN, "data.task=superres", "data.sr_factor=1"], 1, r"error: .*data.sr_factor=1",
         absent=("checkpoints/*",)),
    Case("task-on-toy2d", ["train.py", "--config", str(REPO / "configs" / "toy2d.yaml"), "data.task=superres",
                           "data.sr_factor=2", "train.max_steps=1"], 1, r"error: .*toy2d data are 2-D points",
         absent=("checkpoints/*",)),
    Case("condition-unconditioned-model", [*SAMPLE, "--condition", "low.png"], 1,
         r"error: --condition needs an image-conditioned model.*data.task=generate", with_image("low.png", 2),
         keep=KEEP, absent=("out",)),
    Case("condition-wrong-size", [*SAMPLE, "--condition", "low.png"], 1,
         r"error: --condition 'low.png' is 8x8, but this superres model takes 2x2 low-res images",
         with_image("low.png", 8, "L", *SR), keep=KEEP, absent=("out",)),
    Case("condition-wrong-channels", [*SAMPLE, "--condition", "low.png"], 1,
         r"error: --condition 'low.png' is colour, but this model upscales grey images",
         with_image("low.png", 2, "RGB", *SR), keep=KEEP, absent=("out",)),
    Case("condition-unreadable", [*SAMPLE, "--condition", "low.png"], 1,
         r"error: --condition 'low.png' cannot be read as an image", with_text_file, keep=("ckpt.pt", "low.png"),
         absent=("out",)),
    Case("condition-and-num-samples", [*SAMPLE, "--condition", "low.png", "--num-samples", "3"], 0,
         r"wrote 3 images", with_image("low.png", 2, "L", *SR), keep=KEEP),  # K results per condition (#23)
    Case("edit-a-conditioned-model", [*SAMPLE, "--invert", "low.png"], 1,
         r"error: the editing modes run models without an image condition", with_image("low.png", 8, "L", *SR),
         keep=KEEP, absent=("out",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conditioned_models_refuse_bad_inputs(case, tmp_path):
    run_case(case, tmp_path)
