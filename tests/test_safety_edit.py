"""Safety table of sample.py's editing modes (issue #14): every bad input is one line, exit 1, before sampling,
and the user's images and masks keep their bytes. On the code before the editing command line (commit e5797e2)
each case failed: argparse did not know the flags (exit 2, a usage block)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_sample import make_checkpoint, tiny_config

from safety import Case, run_case

SAMPLE = ["sample.py", "--checkpoint", "c.pt", "--steps", "2", "--device", "cpu"]
NOTHING_SAMPLED = r"\A(?!.*(: on cpu, seed|(sampling|inpainting|inversion):? *\d)).*error: .*"  # the error came before any model step
KEEP = ("*.png", "ins/*")
ABSENT = ("results/images/*/*",)


def setup(root: Path, preset: str = "digits") -> None:
    """c.pt (tiny, 8x8 grey), toy.pt (2-D toy), a.png and b.png (8x8), big.png (12x12), m.png (8x8 mask),
    m12.png (a 12x12 mask), bad.png (not an image)."""
    make_checkpoint(root / "c.pt", tiny_config())
    make_checkpoint(root / "toy.pt", tiny_config("toy", "toy2d"))
    rng = np.random.default_rng(0)
    for name, size in (("a.png", 8), ("b.png", 8), ("big.png", 12), ("m.png", 8), ("m12.png", 12)):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name)
    (root / "bad.png").write_bytes(b"not a png at all")


def case(id, args, pattern, argv=SAMPLE):
    return Case(id, [*argv, *args], 1, NOTHING_SAMPLED + pattern, setup, keep=KEEP, absent=ABSENT)


CASES = [
    case("inpaint-without-mask", ["--inpaint", "a.png"], r"--inpaint needs --mask.*white = generate"),
    case("mask-of-another-size", ["--inpaint", "a.png", "--mask", "m12.png"],
         r"--mask 'm12.png' is 12x12 but the image is 8x8: give a mask of the image's size"),
    case("mask-that-is-no-file", ["--inpaint", "a.png", "--mask", "middle"],
         r"neither a file nor a built-in mask.*center, left, right, top, bottom"),
    case("unreadable-image", ["--init-image", "bad.png"], r"--init-image 'bad.png' cannot be read as an image"),
    case("unreadable-mask", ["--inpaint", "a.png", "--mask", "bad.png"], r"--mask 'bad.png' cannot be read"),
    case("missing-image", ["--invert", "nothere.png"], r"--invert 'nothere.png' does not exist"),
    case("strength-zero", ["--init-image", "a.png", "--strength", "0"], r"--strength 0 is outside \(0, 1\]"),
    case("strength-above-one", ["--init-image", "a.png", "--strength", "1.5"], r"--strength 1.5 is outside"),
    case("strength-nan", ["--init-image", "a.png", "--strength", "nan"], r"--strength nan is outside"),
    case("inpaint-with-dpmpp2m", ["--inpaint", "a.png", "--mask", "top", "--sampler", "dpmpp2m"],
         r"--inpaint cannot use --sampler dpmpp2m.*use --sampler ddpm or ddim"),
    case("invert-with-ddpm", ["--invert", "a.png", "--sampler", "ddpm"], r"--invert runs DDIM.*--sampler ddpm"),
    case("interpolate-with-eta", ["--interpolate", "a.png", "b.png", "--sampler", "ddim", "--eta", "1"],
         r"--interpolate runs DDIM with eta 0"),
    case("two-modes", ["--inpaint", "a.png", "--mask", "top", "--invert", "a.png"],
         r"--inpaint and --invert are two editing modes at once: give one"),
    case("mode-flag-without-its-mode", ["--init-image", "a.png", "--mask", "top"],
         r"--mask belongs to --inpaint: drop --mask, or add --inpaint"),
    case("interpolate-one-image", ["--interpolate", "a.png"], r"--interpolate takes two images"),
    case("interpolate-one-frame", ["--interpolate", "--seeds", "1", "2", "--frames", "1"],
         r"at least 2 frames"),
    case("resample-zero", ["--inpaint", "a.png", "--mask", "top", "--resample", "0"], r"--resample 0 must be"),
    case("jump-too-long", ["--inpaint", "a.png", "--mask", "top", "--resample", "2", "--jump", "2"],
         r"--jump 2 leaves no block to resample on a grid of 2 steps"),
    case("num-samples-for-inversion", ["--invert", "a.png", "--num-samples", "3"], r"drop --num-samples"),
    case("animation-for-inpainting", ["--inpaint", "a.png", "--mask", "top", "--animation"],
         r"--animation is written for sampling and --init-image only"),
    case("editing-a-toy-model", ["--init-image", "a.png"], r"this checkpoint is a 2-D toy model",
         argv=["sample.py", "--checkpoint", "toy.pt", "--device", "cpu"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_safety_edit(case, tmp_path):
    run_case(case, tmp_path)
