"""Scores of image-conditioned models (condition_eval.pixel_metrics) held against values computed independently
here: PSNR and SR3's consistency by hand in numpy, SSIM by torchmetrics called explicitly with data_range=1.0 on
the [0, 1] PNG values; colourisation consistency on ITU-R 601 luma (a right luma with another chroma scores 0);
and the superres condition's bicubic upsampling against a numpy implementation of Keys' kernel.

The existing test (test_condition_cli.test_pixel_metrics_psnr_ssim_and_consistency) checks superres PSNR and
consistency; these add SSIM's data range, colorize's luma consistency and the condition images themselves.
SSIM's window is smaller for images under 11 px (evaluation.conditioned.ssim_sigma), so a 4 px model scores."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.conditioned import pixel_metrics
from sampling.conditioning import grey, low_res, make_condition, upsample
from sampling.conditions import conditions_from_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LUMA_601 = np.array([0.299, 0.587, 0.114])


def cfg_for(task: str, sr_factor: int = 4):
    return SimpleNamespace(data=SimpleNamespace(task=task, sr_factor=sr_factor))


def png(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> the 8-bit values a PNG stores, as float64 in [0, 1] (by hand, not utils)."""
    return np.round((np.clip(x.double().numpy(), -1, 1) + 1) * 127.5) / 255.0


def psnr_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return float(np.minimum(10 * np.log10(1.0 / mse), 100).mean())


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """torchmetrics' SSIM, its Gaussian 11x11 window (sigma 1.5), on [0, 1] images with data_range=1.0, called
    explicitly (the images here are >= 11 px: the full window)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    assert a.shape[-1] >= 11
    return float(structural_similarity_index_measure(torch.from_numpy(a).float(), torch.from_numpy(b).float(),
                                                     data_range=1.0, kernel_size=11, sigma=1.5))


def area_down(x: np.ndarray, f: int) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).mean(axis=(3, 5))


def luma(x: np.ndarray) -> np.ndarray:
    return np.einsum("bchw,c->bhw", x, LUMA_601)[:, None]


def smooth_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Images in (-0.8, 0.8) with some structure (random low-res upsampled, plus a little noise), so SSIM's
    constants matter (flat random noise has SSIM ~0 whatever the data range)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, size // 4, size // 4, generator=g) * 1.2 - 0.6
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-0.8, 0.8)


# ----------------------------------------------------------------------------- superres
def test_superres_psnr_ssim_and_consistency_match_independent_values():
    cfg = cfg_for("superres", 4)
    targets = smooth_images(4, 3, 16, seed=1)
    conds = conditions_from_targets(targets, None, cfg)
    g = torch.Generator().manual_seed(2)
    outputs = (targets + 0.15 * torch.randn(targets.shape, generator=g)).clamp(-1, 1)  # a plausible, imperfect SR
    m = pixel_metrics(outputs, conds, cfg)
    out, tgt = png(outputs), png(targets)
    assert m["psnr"] == pytest.approx(psnr_by_hand(out, tgt), rel=1e-5)
    assert m["ssim"] == pytest.approx(ssim_reference(out, tgt), abs=1e-5)
    assert 0.2 < m["ssim"] < 0.95  # a range where SSIM's constants (hence its data range) move the value
    # SR3: the output area-downsampled by sr_factor against the low-res input (as a PNG of it)
    inputs = png(torch.from_numpy(area_down(targets.double().numpy(), 4)))
    consistency = ((area_down(out, 4) - inputs) ** 2).mean()
    assert m["consistency_mse"] == pytest.approx(float(consistency), rel=1e-5)


def test_superres_bicubic_baseline_scores_and_the_upsampling_itself():
    cfg = cfg_for("superres", 2)
    targets = smooth_images(3, 1, 12, seed=3)
    conds = conditions_from_targets(targets, None, cfg)
    low = area_down(targets.double().numpy(), 2)
    assert np.allclose(conds.inputs.double().numpy(), low, atol=1e-6)
    bicubic = np.clip(bicubic_by_hand(low, 12), -1, 1)
    assert np.allclose(conds.cond.double().numpy(), bicubic, atol=1e-5)  # make_condition = upsample(low_res)
    m = pixel_metrics(conds.cond, conds, cfg)  # the bicubic baseline, as evaluate.py scores it
    assert m["psnr"] == pytest.approx(psnr_by_hand(png(torch.from_numpy(bicubic)), png(targets)), rel=1e-5)
    assert m["ssim"] == pytest.approx(ssim_reference(png(torch.from_numpy(bicubic)), png(targets)), abs=1e-5)
    # upsample clamps to [-1, 1]: a saturated image overshoots under the bicubic kernel
    edge = torch.tensor([[-1.0, 1.0, 1.0, -1.0]]).repeat(4, 1).view(1, 1, 4, 4)
    up = upsample(edge, 8)
    assert up.min() >= -1 and up.max() <= 1
    assert np.allclose(up.double().numpy(), np.clip(bicubic_by_hand(edge.double().numpy(), 8), -1, 1), atol=1e-5)


def bicubic_by_hand(x: np.ndarray, size: int, a: float = -0.75) -> np.ndarray:
    """Separable bicubic resampling (Keys' kernel, a=-0.75 as PyTorch/OpenCV), half-pixel centres
    (align_corners=False), edge pixels replicated."""
    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    def matrix(n_in):
        m = np.zeros((size, n_in))
        scale = n_in / size
        for o in range(size):
            src = (o + 0.5) * scale - 0.5
            base = int(np.floor(src))
            for k in range(base - 1, base + 3):
                m[o, min(max(k, 0), n_in - 1)] += kernel(src - k)
        return m

    rows, cols = matrix(x.shape[-2]), matrix(x.shape[-1])
    return np.einsum("oh,bchw,pw->bcop", rows, x, cols)


# ----------------------------------------------------------------------------- colorize
def test_colorize_consistency_is_on_601_luma():
    cfg = cfg_for("colorize")
    targets = smooth_images(4, 3, 16, seed=4)
    conds = conditions_from_targets(targets, None, cfg)
    assert np.allclose(conds.inputs.double().numpy(), luma(targets.double().numpy()), atol=1e-6)
    perfect = pixel_metrics(targets, conds, cfg)
    assert perfect["consistency_mse"] < 1e-5 and perfect["psnr"] == 100 and perfect["ssim"] == pytest.approx(1.0)
    # the same luma, another chroma: a direction orthogonal to the 601 weights (and not grey)
    chroma = torch.tensor([0.587, -0.299, 0.0]).view(1, 3, 1, 1)
    assert float((chroma.flatten().double() * torch.from_numpy(LUMA_601)).sum()) == pytest.approx(0, abs=1e-7)
    signs = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5)).sign()
    recoloured = targets + 0.3 * chroma * signs
    assert recoloured.abs().max() <= 1
    m = pixel_metrics(recoloured, conds, cfg)
    assert m["consistency_mse"] < 1e-5  # right luma: consistent, whatever the colours
    assert m["psnr"] < 40  # but not the target
    # a wrong luma is not consistent: brighter output, and the grey baseline misses nothing in luma either
    brighter = pixel_metrics((targets + 0.2).clamp(-1, 1), conds, cfg)
    assert brighter["consistency_mse"] > 1e-3
    base = pixel_metrics(conds.cond.expand(-1, 3, -1, -1), conds, cfg)  # the grey image as RGB: luma = grey
    assert base["consistency_mse"] < 1e-5


def test_colorize_scores_match_independent_values():
    cfg = cfg_for("colorize")
    targets = smooth_images(4, 3, 16, seed=6)
    conds = conditions_from_targets(targets, None, cfg)
    g = torch.Generator().manual_seed(7)
    outputs = (targets + 0.2 * torch.randn(targets.shape, generator=g)).clamp(-1, 1)
    m = pixel_metrics(outputs, conds, cfg)
    out, tgt = png(outputs), png(targets)
    assert m["psnr"] == pytest.approx(psnr_by_hand(out, tgt), rel=1e-5)
    assert m["ssim"] == pytest.approx(ssim_reference(out, tgt), abs=1e-5)
    assert 0.2 < m["ssim"] < 0.95
    grey_input = png(torch.from_numpy(luma(targets.double().numpy())))  # the grey PNG a user would give
    consistency = ((luma(out) - grey_input) ** 2).mean()
    assert m["consistency_mse"] == pytest.approx(float(consistency), rel=1e-4)


def test_ssim_is_on_the_unit_data_range():
    """SSIM of the [0, 1] PNG values with data_range 1 (equivalently of twice those values with data range 2:
    SSIM is scale-invariant when the range scales too), not with data range 2 on [0, 1], nor on the [-1, 1]
    images (SSIM's luminance term is not shift-invariant)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    ssim = structural_similarity_index_measure
    cfg = cfg_for("colorize")
    targets = smooth_images(2, 3, 16, seed=8)
    g = torch.Generator().manual_seed(9)
    outputs = (targets + 0.3 * torch.randn(targets.shape, generator=g)).clamp(-1, 1)
    m = pixel_metrics(outputs, conditions_from_targets(targets, None, cfg), cfg)
    out, tgt = torch.from_numpy(png(outputs)).float(), torch.from_numpy(png(targets)).float()
    right = float(ssim(out, tgt, data_range=1.0, kernel_size=11))
    assert float(ssim(2 * out, 2 * tgt, data_range=2.0, kernel_size=11)) == pytest.approx(right, abs=1e-5)
    assert m["ssim"] == pytest.approx(right, abs=1e-5)
    for wrong in (ssim(out, tgt, data_range=2.0, kernel_size=11),
                  ssim(out * 2 - 1, tgt * 2 - 1, data_range=2.0, kernel_size=11),
                  ssim(out * 2 - 1, tgt * 2 - 1, data_range=1.0, kernel_size=11)):
        assert abs(m["ssim"] - float(wrong)) > 1e-2


def test_grey_and_make_condition_use_601_weights():
    x = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [0.5, 0.0, -0.5]]).view(4, 3, 1, 1)
    expected = np.einsum("bchw,c->bhw", x.double().numpy(), LUMA_601)[:, None]
    assert np.allclose(grey(x).double().numpy(), expected, atol=1e-7)
    assert np.allclose(make_condition(x, "colorize").double().numpy(), expected, atol=1e-7)
    # pure red, green, blue in [0, 1]: 0.299, 0.587, 0.114
    assert np.allclose((grey(x[:3]).flatten().numpy() + 1) / 2, LUMA_601, atol=1e-7)
    assert torch.equal(low_res(torch.arange(16.0).view(1, 1, 4, 4), 2).flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))


def test_ssim_of_images_under_11_px_uses_a_smaller_window():
    cfg = cfg_for("superres", 2)
    targets = smooth_images(2, 1, 4, seed=10)
    conds = conditions_from_targets(targets, None, cfg)
    perfect = pixel_metrics(targets, conds, cfg)
    assert perfect["ssim"] == pytest.approx(1.0)
    assert 0 < pixel_metrics(conds.cond, conds, cfg)["ssim"] < 1


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 8, 10, 11, 16])
def test_ssim_window_fits_every_image_size_and_is_the_standard_one_from_11_px(size):
    from torchmetrics.functional.image import structural_similarity_index_measure

    from evaluation.conditioned import ssim_sigma
    sigma = ssim_sigma(size)
    assert int(3.5 * sigma + 0.5) * 2 + 1 <= max(1, size)  # torchmetrics' window width fits the image
    cfg = cfg_for("colorize")
    targets = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(11)) * 1.6 - 0.8
    conds = conditions_from_targets(targets, None, cfg)
    score = pixel_metrics(targets.flip(-1), conds, cfg)["ssim"]
    if size >= 11:  # the standard window: the scores are unchanged
        out, target = (((x.clamp(-1, 1) + 1) * 127.5).round() / 255 for x in (targets.flip(-1), targets))
        assert score == float(structural_similarity_index_measure(out, target, data_range=1.0))
