"""sample.py's editing modes (issue #14: --inpaint, --init-image, --interpolate, --invert) and images.py, on tiny
random-weight checkpoints built as in test_sample.py (no training). The bad inputs are in test_safety_edit.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import expect_error, make_checkpoint, run_main, tiny_config, work  # noqa: F401

import sampling.images as images
from editing.modes import slerp

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = ["--steps", "5"]


@pytest.fixture
def edit(work):
    """A tiny unconditional 8x8 checkpoint, three 8x8 grey inputs in ins/, and a mask (white bottom half)."""
    make_checkpoint(work / "c.pt", tiny_config())
    rng = np.random.default_rng(0)
    (work / "ins").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(work / "ins" / f"in{i}.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:, 2:] = 255  # white = generate
    Image.fromarray(mask).save(work / "mask.png")
    return work


def pngs(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("0*.png"))]


def only_folder(work) -> Path:
    (folder,) = [p for p in (work / "results" / "images" / "tiny").iterdir()]
    return folder


# ----------------------------------------------------------------------------- images.py
def test_builtin_masks_mark_the_region_to_generate_with_zero():
    m = images.builtin_mask("bottom", 8)[0, 0]
    assert m[:4].eq(1).all() and m[4:].eq(0).all()
    m = images.builtin_mask("left", 8)[0, 0]
    assert m[:, :4].eq(0).all() and m[:, 4:].eq(1).all()
    m = images.builtin_mask("center", 8)[0, 0]
    assert m[2:6, 2:6].eq(0).all() and m.sum() == 64 - 16


def test_a_png_mask_is_white_generate_black_keep(tmp_path):
    Image.fromarray(np.array([[255, 0], [0, 200]], np.uint8)).save(tmp_path / "m.png")
    mask = images.load_mask(str(tmp_path / "m.png"), 2, [(2, 2)])
    assert mask.tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]


def test_images_are_converted_to_the_models_channels_and_size_with_a_note(tmp_path, capsys):
    wide = np.full((12, 20, 3), 255, np.uint8)
    wide[:, :4] = 0  # outside the center square: cropped away
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x, size = images.load_image(tmp_path / "wide.png", 1, 8, "--init-image")
    assert x.shape == (1, 8, 8) and size == (20, 12) and torch.allclose(x, torch.ones_like(x))
    assert "20x12, center-cropped to a square; resized to the model's 8x8" in capsys.readouterr().out


def test_slerp_keeps_the_ends_and_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 16, 16, generator=g), torch.randn(1, 1, 16, 16, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert mid.norm() > 0.9 * a.norm() and mid.norm() > (a + b).norm() / 2 * 1.2  # linear would shrink it


# ----------------------------------------------------------------------------- --inpaint
def test_inpainting_keeps_the_black_pixels_of_the_mask_exactly(edit):
    run_main(["--checkpoint", "c.pt", "--inpaint", "ins", "--mask", "mask.png", "--sampler", "ddpm"])
    folder = only_folder(edit)
    assert folder.name.startswith("inpaint_ddpm_20_0_r10j10")
    keep = np.asarray(Image.open(edit / "mask.png")) < 128
    outputs = pngs(folder)
    assert len(outputs) == 3
    for out, src in zip(outputs, sorted((edit / "ins").glob("*.png"))):
        src = np.asarray(Image.open(src))
        assert (out[keep] == src[keep]).all()     # known pixels unchanged after the uint8 round trip
        assert (out[~keep] != src[~keep]).mean() > 0.5  # and the white region was generated
    manifest = json.loads((folder / "ddpm-lab-samples.json").read_text())["files"]
    assert set(manifest) == {p.name for p in folder.iterdir()} - {"ddpm-lab-samples.json"}


def test_inpainting_with_a_builtin_mask_and_several_results_per_input(edit):
    run_main(["--checkpoint", "c.pt", "--inpaint", "ins/in0.png", "--mask", "top", *STEPS, "--num-samples", "2",
              "--resample", "2", "--jump", "2"])
    folder = only_folder(edit)
    assert folder.name == "inpaint_ddim_5_0_r2j2"
    a, b = pngs(folder)
    src = np.asarray(Image.open(edit / "ins" / "in0.png"))
    assert (a[4:] == src[4:]).all() and (b[4:] == src[4:]).all() and (a[:4] != b[:4]).any()
    grid = Image.open(folder / "grid.png")
    assert grid.width > 3 * grid.height  # one row: input | mask | 2 results


# ----------------------------------------------------------------------------- --init-image
def test_image_to_image_does_not_depend_on_the_batch_size(edit):
    for bs, out in (("1", "a"), ("3", "b")):
        run_main(["--checkpoint", "c.pt", "--init-image", "ins", "--strength", "0.5", *STEPS, "--batch-size", bs,
                  "--num-samples", "2", "--out", out])
    a, b = pngs(edit / "a"), pngs(edit / "b")
    assert len(a) == 6 and all((x == y).all() for x, y in zip(a, b))
    assert any((a[0] != x).any() for x in a[1:])  # every output has its own noise


def test_image_to_image_animation_gives_the_same_images(edit):
    run_main(["--checkpoint", "c.pt", "--init-image", "ins", "--strength", "0.7", *STEPS, "--out", "a"])
    run_main(["--checkpoint", "c.pt", "--init-image", "ins", "--strength", "0.7", *STEPS, "--out", "b",
              "--animation"])
    assert all((x == y).all() for x, y in zip(pngs(edit / "a"), pngs(edit / "b")))
    assert (edit / "b" / "animation.gif").is_file() and (edit / "b" / "trajectory.png").is_file()


def test_image_to_image_low_strength_stays_near_the_input(edit):
    run_main(["--checkpoint", "c.pt", "--init-image", "ins", "--strength", "0.05", "--sampler", "ddpm", "--out", "lo"])
    run_main(["--checkpoint", "c.pt", "--init-image", "ins", "--strength", "1", "--sampler", "ddpm", "--out", "hi"])
    src = [np.asarray(Image.open(p)).astype(float) for p in sorted((edit / "ins").glob("*.png"))]
    err = {k: np.mean([np.abs(o - s).mean() for o, s in zip(pngs(edit / k), src)]) for k in ("lo", "hi")}
    assert err["lo"] < err["hi"] / 2, err


def test_a_conditional_model_takes_class_labels(work):
    make_checkpoint(work / "c.pt", tiny_config(extra=["model.num_classes=3", "sample.guidance_scale=2.0"]))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(work / "x.png")
    run_main(["--checkpoint", "c.pt", "--init-image", "x.png", "--class-label", "1,2", "--num-samples", "2",
              "--guidance-scale", "3", *STEPS, "--out", "o"])
    assert len(pngs(work / "o")) == 2


# ----------------------------------------------------------------------------- --invert, --interpolate
def test_invert_writes_the_reconstruction_and_its_psnr(edit, capsys):
    run_main(["--checkpoint", "c.pt", "--invert", "ins", "--steps", "20", "--out", "inv"])
    record = json.loads((edit / "inv" / "invert.json").read_text())
    src = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32))[None] / 127.5 - 1
                       for p in sorted((edit / "ins").glob("*.png"))])
    out = torch.stack([torch.from_numpy(a.astype(np.float32))[None] / 127.5 - 1 for a in pngs(edit / "inv")])
    expected = images.psnr(src, out)
    assert [record["psnr_db"][f"{j:06d}.png"]["psnr_db"] for j in range(3)] == pytest.approx(expected, abs=1e-4)
    assert min(expected) > 20  # 20 DDIM steps on T = 20: the inversion is close to exact
    assert "mean PSNR" in capsys.readouterr().out


def test_interpolating_between_seeds_starts_at_the_samples_of_those_seeds(edit):
    run_main(["--checkpoint", "c.pt", "--interpolate", "--seeds", "3", "4", "--frames", "3", *STEPS, "--out", "i"])
    for seed, frame in (("3", 0), ("4", 2)):
        run_main(["--checkpoint", "c.pt", "--seed", seed, "--num-samples", "1", "--sampler", "ddim", "--eta", "0",
                  "--amp", "off", *STEPS, "--out", f"s{seed}"])  # interpolation runs in float32
        assert (pngs(edit / f"s{seed}")[0] == pngs(edit / "i")[frame]).all()
    assert (edit / "i" / "strip.png").is_file() and Image.open(edit / "i" / "interpolation.gif").n_frames == 4


def test_interpolating_between_images_inverts_them(edit):
    run_main(["--checkpoint", "c.pt", "--interpolate", "ins/in0.png", "ins/in1.png", "--frames", "4",
              "--steps", "20", "--out", "i"])
    frames = pngs(edit / "i")
    assert len(frames) == 4
    first = np.asarray(Image.open(edit / "ins" / "in0.png")).astype(float)
    assert np.abs(frames[0] - first).mean() < 8  # frame 0 reconstructs image A (up to the inversion error)


def test_a_conditional_model_inpaints_with_labels_and_guidance_keeping_the_pixels(work):
    make_checkpoint(work / "c.pt", tiny_config(extra=["model.num_classes=3", "sample.guidance_scale=2.0"]))
    src = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(src).save(work / "x.png")
    run_main(["--checkpoint", "c.pt", "--inpaint", "x.png", "--mask", "center", "--class-label", "2",
              "--num-samples", "2", *STEPS, "--out", "o"])
    keep = images.builtin_mask("center", 8)[0, 0].bool().numpy()
    for out in pngs(work / "o"):
        assert (out[keep] == src[keep]).all() and (out[~keep] != src[~keep]).any()
