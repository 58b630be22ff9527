"""Image-conditioned models under classifier-free guidance with batches > 1 (conditioning.Conditioned and
with_condition, Diffusion.guided_model's doubled batch, generation.generate, sample.py --condition), and the range
of the condition images (conditioning.make_condition, condition_from_input, condition_images.load_conditions).

Guidance runs [x_t, x_t] in one call with the labels [y, null]; Conditioned then repeats the condition batch, so
row i and row n + i must both hold sample i's x_t and condition, with label y_i and -1. A mix-up (repeat_interleave
instead of repeat, the halves swapped, a batch's slice of conditions or labels shifted) keeps every shape right,
so these tests compare values: a fake model records what it is called with, and its output depends on each row's
own inputs only."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
from commands import sample_command
from config import Config, load_config, to_dict
from diffusion import Diffusion, build_diffusion
from model import build_model
from sampling.conditioning import condition_from_input, make_condition, upsample
from sampling.conditions import load_conditions
from sampling.generation import SampleNoise, generate
from storage.checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
TINY_SR = ["device=cpu", "data.image_size=16", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
           "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.num_classes=3",
           "diffusion.num_timesteps=20", "train.sample_steps=2", "sample.steps=2", "sample.num_samples=3",
           "sample.batch_size=2", "data.task=superres", "data.sr_factor=4", "run_name=sr"]
S = 8  # the fake model's image side


def fake_output(xt: torch.Tensor, t: torch.Tensor, y, cond: torch.Tensor) -> torch.Tensor:
    """A model output that depends on each row's own x_t, t, label (-1 or None: none) and condition."""
    label = torch.zeros(len(xt)) if y is None else (y + 1).float()
    return (0.5 * xt + 0.3 * cond.mean(1, keepdim=True)
            + 0.1 * label.view(-1, 1, 1, 1) * (1 + t.view(-1, 1, 1, 1).float() / 20))


class Recorder:
    """A conditioned model (in_channels image channels + cond_channels condition channels, as the U-Net of a
    superres / colorize task takes them) that records every call's (x_t, t, y, condition)."""

    def __init__(self, in_channels: int, cond_channels: int, num_classes: int = 5):
        self.in_channels, self.cond_channels, self.num_classes, self.calls = in_channels, cond_channels, num_classes, []

    def __call__(self, x, t, y=None):
        assert x.shape[1] == self.in_channels + self.cond_channels
        xt, cond = x[:, :self.in_channels], x[:, self.in_channels:]
        self.calls.append((xt.clone(), t.clone(), None if y is None else y.clone(), cond.clone()))
        return fake_output(xt, t, y, cond)


def fake_cfg(channels: int) -> Config:
    """A real config of the shapes the recording model sees: generate's cost check estimates from it."""
    cfg = Config()
    cfg.model.in_channels, cfg.data.image_size = channels, S
    return cfg


def distinct_conditions(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    """n condition images in [-1, 1], each different (its own offset plus noise)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-0.6, 0.6, n).view(n, 1, 1, 1)
    return (offsets + 0.3 * torch.rand(n, channels, S, S, generator=g) - 0.15).clamp(-1, 1)


def assert_guided_pairing(calls, conds: torch.Tensor, labels: list[int], batch_size: int, seed: int) -> None:
    """Every call of every batch: row i and row n + i carry sample i's x_t, t and condition; labels y_i and -1.
    The first call of a batch starts from each sample's own x_T (SampleNoise(seed, i))."""
    starts, k = list(range(0, len(conds), batch_size)), len(calls) // len(range(0, len(conds), batch_size))
    assert len(calls) == k * len(starts)
    for b, start in enumerate(starts):
        n = min(batch_size, len(conds) - start)
        own_cond, own_labels = conds[start:start + n], labels[start:start + n]
        for j, (xt, t, y, cond) in enumerate(calls[b * k:(b + 1) * k]):
            assert xt.shape[0] == 2 * n
            assert torch.equal(xt[:n], xt[n:]) and torch.equal(t[:n], t[n:]) and bool((t == t[0]).all())
            assert torch.equal(cond[:n], own_cond), f"batch {b} call {j}: the conditional half's conditions"
            assert torch.equal(cond[n:], own_cond), f"batch {b} call {j}: the unconditional half's conditions"
            assert y.tolist() == own_labels + [-1] * n, (b, j, y.tolist())
            if j == 0:
                x_T = SampleNoise(seed, range(start, start + n)).randn(xt[:n].shape)
                assert torch.equal(xt[:n], x_T)


# ----------------------------------------------------------------------------- the doubled batch of guidance
@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 3, 0.0), ("ddim", 3, 1.0), ("dpmpp2m", 3, None),
                                                 ("ddpm", None, None)])
@pytest.mark.parametrize("channels, cond_channels", [(1, 1), (3, 1), (3, 3)])  # superres grey, colorize, superres RGB
def test_each_image_keeps_its_own_condition_and_label_in_both_halves(sampler, steps, eta, channels, cond_channels):
    """5 samples in batches of 3 and 2, distinct labels and conditions, guidance 3: the pairing in every call."""
    n, bs, seed = 5, 3, 7
    model, conds, labels = Recorder(channels, cond_channels), distinct_conditions(n, cond_channels), [3, 0, 4, 1, 2]
    d = Diffusion(20, objective="v")
    x = generate(model, d, fake_cfg(channels), n, bs, seed, sampler, steps, eta=eta or 0.0, labels=labels,
                 guidance_scale=3.0, conditions=conds, amp="off", progress=False)
    assert x.shape == (n, channels, S, S) and torch.isfinite(x).all()
    assert len(model.calls) == 2 * len(d.sampling_timesteps(sampler, steps))
    assert_guided_pairing(model.calls, conds, labels, bs, seed)


@pytest.mark.parametrize("objective", ["v", "eps"])
def test_guidance_mixes_each_images_own_conditional_and_unconditional_outputs(objective):
    """One deterministic DDIM step from t = 19 to the data (trailing grid, steps 1) lands on the x0 of the guided
    output out_u + w (out_c - out_u), computed here from each sample's own x_T, label and condition."""
    n, w, seed = 4, 2.5, 3
    model, conds, labels = Recorder(1, 1), distinct_conditions(n, 1, seed=1), [2, 0, 3, 1]
    d = Diffusion(20, objective=objective)
    x = generate(model, d, fake_cfg(1), n, n, seed, "ddim", 1, timestep_spacing="trailing", labels=labels,
                 guidance_scale=w, conditions=conds, clip_x0=False, amp="off", progress=False)
    x_T, t = SampleNoise(seed, range(n)).randn((n, 1, S, S)), torch.full((n,), 19)
    out_c = fake_output(x_T, t, torch.tensor(labels), conds)
    out_u = fake_output(x_T, t, torch.full((n,), -1), conds)
    guided = out_u + w * (out_c - out_u)
    a, s = d.sqrt_abar[19], d.sqrt_one_minus_abar[19]
    expected = a * x_T - s * guided if objective == "v" else (x_T - s * guided) / a
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    assert (out_c - out_u).abs().min() > 0.05  # the labels matter, so a swap of the halves would show


def test_guided_conditioned_sampling_does_not_depend_on_the_batch_size():
    """A tiny superres U-Net with classes (cosine T = 20, v): sample i (its condition, label and noise) is the same
    whether it is drawn alone or in a guided batch of 3; swapping two samples' conditions, or labels, changes
    their images (measured: 0.07 and 0.26 at most; the batch sizes agree to 7e-7)."""
    cfg = load_config(DIGITS, TINY_SR)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.parameters():  # the zero-initialised output layers would make the model constant
        torch.nn.init.normal_(p, std=0.2)
    conds = make_condition(torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1, "superres", 4)
    kw = dict(sampler="ddim", steps=3, guidance_scale=3.0, amp="off", progress=False)

    def run(batch_size, conditions=conds, labels=(2, 0, 1)):
        return generate(model, build_diffusion(cfg), cfg, 3, batch_size, 5, conditions=conditions,
                        labels=list(labels), **kw)
    together = run(3)
    torch.testing.assert_close(together, run(1), rtol=0, atol=1e-5)
    for other in (run(3, conditions=conds[[1, 0, 2]]), run(3, labels=(0, 2, 1))):
        assert (other[0] - together[0]).abs().max() > 0.01 and (other[1] - together[1]).abs().max() > 0.01
        torch.testing.assert_close(other[2], together[2], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the condition images' range
def checkerboard(n: int, channels: int, side: int, block: int) -> torch.Tensor:
    """+-1 blocks of `block` pixels: bicubic upsampling of their low-res version overshoots [-1, 1]."""
    i = torch.arange(side) // block
    board = ((i[:, None] + i[None]) % 2).float() * 2 - 1
    signs = torch.tensor([(-1.0) ** k for k in range(n)]).view(n, 1, 1, 1)
    return (signs * board).expand(n, channels, side, side).clone()


def test_superres_conditions_stay_in_minus_one_one_and_reach_the_model_unchanged():
    targets = checkerboard(3, 1, S, 2)
    low = F.avg_pool2d(targets, 2)
    raw = F.interpolate(low, size=(S, S), mode="bicubic", align_corners=False)
    assert raw.max() > 1.05 and raw.min() < -1.05  # the bicubic overshoot the clamp must remove
    for cond in (make_condition(targets, "superres", 2), condition_from_input(low, "superres", S)):
        assert cond.shape == targets.shape and cond.min() == -1 and cond.max() == 1
        torch.testing.assert_close(cond, raw.clamp(-1, 1), rtol=0, atol=1e-6)
    cond = make_condition(targets, "superres", 2)
    model = Recorder(1, 1)
    generate(model, Diffusion(20, objective="v"), fake_cfg(1), 3, 3, 0, "ddim", 2, labels=[0, 1, 2],
             guidance_scale=2.0, conditions=cond, amp="off", progress=False)
    for _, _, _, seen in model.calls:
        assert seen.min() >= -1 and seen.max() <= 1 and seen.min() == -1  # [-1, 1], not rescaled to [0, 1]
        assert torch.equal(seen, torch.cat([cond, cond]))


def test_colorize_conditions_are_the_luma_in_minus_one_one():
    """Pure black / white / saturated RGB targets: the grey condition is the ITU-R 601 luma in [-1, 1] (black -1,
    white 1), and the model sees exactly that in both halves of the guided batch."""
    colours = torch.tensor([[-1.0, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    targets = colours.view(5, 3, 1, 1).expand(5, 3, S, S).clone()
    cond = make_condition(targets, "colorize")
    luma = torch.tensor([0.299, 0.587, 0.114])
    expected = ((colours + 1) / 2 @ luma) * 2 - 1  # the luma of [0, 1] colours, mapped back to [-1, 1]
    assert cond.shape == (5, 1, S, S) and cond.min() >= -1 - 1e-6 and cond.max() <= 1 + 1e-6
    torch.testing.assert_close(cond[:, 0, 0, 0], expected, rtol=0, atol=1e-6)
    assert cond[0].max() == pytest.approx(-1) and cond[1].min() == pytest.approx(1)
    model = Recorder(3, 1)
    generate(model, Diffusion(20, objective="v"), fake_cfg(3), 5, 5, 0, "ddim", 2, labels=[0, 1, 2, 3, 4],
             guidance_scale=2.0, conditions=cond, amp="off", progress=False)
    assert_guided_pairing(model.calls, cond, [0, 1, 2, 3, 4], 5, 0)


def test_condition_images_loaded_from_files_are_in_minus_one_one(tmp_path):
    """sample.py --condition's loader: a black/white 4x4 low-res PNG (superres, 16x16 model: bicubic overshoot,
    clamped) and an RGB picture (colorize) give conditions spanning exactly [-1, 1]."""
    board = (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "low.png")
    conds, _ = load_conditions(str(tmp_path / "low.png"), load_config(DIGITS, TINY_SR))
    assert conds.cond.shape == (1, 1, 16, 16) and conds.cond.min() == -1 and conds.cond.max() == 1
    torch.testing.assert_close(conds.cond, upsample(torch.from_numpy(board).float()[None, None] / 127.5 - 1, 16),
                               rtol=0, atol=1e-6)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = 255  # top half white, bottom half black
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    cfg = load_config(REPO / "configs" / "cifar10.yaml", ["data.task=colorize", "data.image_size=8",
                                                          "model.channel_mult=[1,2]", "model.attention_resolutions=[]"])
    conds, _ = load_conditions(str(tmp_path / "rgb.png"), cfg)
    assert conds.cond.shape == (1, 1, 8, 8)
    assert conds.cond.min() == pytest.approx(-1, abs=1e-5) and conds.cond.max() == pytest.approx(1, abs=1e-5)
    assert conds.cond.min() >= -1 - 1e-5 and conds.cond.max() <= 1 + 1e-5


# ----------------------------------------------------------------------------- sample.py --condition
def test_sample_condition_with_labels_and_guidance_pairs_each_file_with_its_label(workdir, monkeypatch):
    """End to end: three distinct low-res PNGs, --class-label 2,0,1, --guidance-scale 3, --batch-size 2 (batches
    of 2 and 1). Every U-Net call holds each file's upsampled condition in both halves, labels y and -1."""
    tmp_path = workdir  # tests/conftest.py: the working folder, one thread
    cfg = load_config(DIGITS, TINY_SR)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    save_checkpoint({"step": 0, "config": to_dict(cfg), "model": state, "ema": state}, tmp_path / "c.pt")
    (tmp_path / "lows").mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        low = rng.integers(0, 256, (4, 4), dtype=np.uint8)
        low[0, 0], low[3, 3] = 0, 255  # every file reaches both ends of the range
        Image.fromarray(low).save(tmp_path / "lows" / f"l{i}.png")
    expected = torch.stack([upsample(torch.from_numpy(np.asarray(Image.open(tmp_path / "lows" / f"l{i}.png"),
                                                                 np.float32))[None, None] / 127.5 - 1, 16)[0]
                            for i in range(3)])
    seen = []
    real = sample_command.load_for_sampling

    def load(*args, **kwargs):
        model, diffusion, cfg, ckpt = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append((inputs[0].clone(), inputs[1].clone(),
                                                                       inputs[2].clone())))
        return model, diffusion, cfg, ckpt
    monkeypatch.setattr(sample_command, "load_for_sampling", load)
    assert sample.main(["--checkpoint", "c.pt", "--condition", "lows", "--class-label", "2,0,1", "--guidance-scale",
                        "3", "--batch-size", "2", "--sampler", "ddim", "--steps", "2", "--amp", "off", "--out", "o",
                        "--device", "cpu"]) == 0
    calls = [(x[:, :1], t, y, x[:, 1:]) for x, t, y in seen]
    assert len(calls) == 4  # 2 batches x 2 steps
    assert_guided_pairing(calls, expected, [2, 0, 1], 2, cfg.seed)
    for _, _, _, cond in calls:
        assert cond.min() == -1 and cond.max() == 1
    assert sorted(p.name for p in (tmp_path / "o").glob("0*.png")) == ["000000.png", "000001.png", "000002.png"]
