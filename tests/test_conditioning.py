"""Image conditioning (issue #15, SR3): conditions made from targets, model channels, the training loss, the
sampling wrapper, config checks and a tiny super-resolution run."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, load_config
from diffusion import Diffusion
from model import UNet, build_model
from sampling.conditioning import Conditioned, grey, low_res, make_condition, upsample, with_condition
from sampling.conditions import comparison, conditions_from_targets, held_out_conditions
from training.loss import DiffusionLoss
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
# 16x16 digits (sr_factor 4: 4x4 low-res), an 8-channel U-Net, T=20
TINY = ["device=cpu", "data.image_size=16", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.num_classes=0",
        "diffusion.num_timesteps=20", "train.batch_size=16", "train.warmup_steps=2", "train.amp=off",
        "train.log_every=4", "train.sample_every=1000", "train.ckpt_every=1000", "train.num_sample_images=4",
        "train.sample_steps=2", "sample.steps=2", "sample.num_samples=4", "sample.batch_size=4",
        "data.task=superres", "data.sr_factor=4"]


def tiny(*extra):
    return load_config(DIGITS, TINY + list(extra))


def rgb_cfg(task="colorize", *extra):
    small = ["model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]", "model.attention_resolutions=[]"]
    return load_config(REPO / "configs" / "cifar10.yaml", [*small, f"data.task={task}", *extra])


def test_superres_condition_is_area_average_then_bicubic_at_the_target_size():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    cond = make_condition(x, "superres", 4)
    assert cond.shape == x.shape
    low = x.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))  # 4x4 block means, written out
    assert torch.allclose(low_res(x, 4), low, atol=1e-6)
    bicubic = F.interpolate(low, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.allclose(cond, bicubic, atol=1e-6)
    assert cond.min() >= -1 and cond.max() <= 1


def test_the_condition_is_a_deterministic_function_of_each_target():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    for task in ("superres", "colorize"):
        a = make_condition(x, task, 2)
        assert torch.equal(a, make_condition(x.clone(), task, 2))
        # one image's condition does not depend on the rest of its batch
        assert torch.allclose(make_condition(x[2:3], task, 2), a[2:3], atol=1e-6)


def test_colorize_condition_is_the_luma_of_pil():
    from PIL import Image
    rgb = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    pil = Image.fromarray(rgb[0].permute(1, 2, 0).numpy()).convert("L")
    expected = torch.tensor(np.asarray(pil), dtype=torch.float32).view(1, 1, 4, 4)
    ours = (grey(rgb.float() / 127.5 - 1) + 1) * 127.5
    assert ours.shape == (1, 1, 4, 4) and (ours - expected).abs().max() <= 0.51  # PIL rounds


@pytest.mark.parametrize("task", ["superres", "colorize"])
def test_a_flipped_target_has_the_flipped_condition(task):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(make_condition(x.flip(-1), task, 2), make_condition(x, task, 2).flip(-1), atol=1e-6)


class Spy(torch.nn.Module):
    """Records what the network is given; outputs zeros of the target's channels."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels, self.seen = out_channels, []

    def forward(self, x, t, y=None):
        self.seen.append(x)
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:])


def test_the_training_loss_gives_the_network_the_condition_of_the_augmented_batch():
    """The training loss builds the condition from the batch it trains on (flipped images included), so target and
    condition share every flip."""
    cfg = tiny()
    spy = Spy(1)
    fake = SimpleNamespace(cfg=cfg, model=spy, device=torch.device("cpu"), amp="off", diffusion=Diffusion(20))
    x0 = (torch.rand(4, 1, 16, 16) * 2 - 1).flip(-1)
    losses, t = DiffusionLoss()(fake, (x0, None))
    assert losses.shape == (4,) and spy.seen[0].shape == (4, 2, 16, 16)
    assert torch.equal(spy.seen[0][:, 1:], make_condition(x0, "superres", 4))


@pytest.mark.parametrize("task,inputs", [("superres", 6), ("colorize", 4), ("generate", 3)])
def test_model_channels_follow_the_task(task, inputs):
    model = build_model(rgb_cfg(task))
    assert model.conv_in.in_channels == inputs and model.conv_out.out_channels == 3
    out = with_condition(model, torch.zeros(2, inputs - 3, 32, 32) if inputs > 3 else None)(
        torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 32, 32)


def test_grey_superres_model_takes_two_channels():
    model = build_model(tiny())
    assert model.conv_in.in_channels == 2 and model.conv_out.out_channels == 1 and model.in_channels == 1


def test_unconditioned_models_keep_their_weights_layout():
    plain = UNet(3, 8, (1, 2), 2, (), 32, norm_groups=4)
    built = build_model(rgb_cfg("generate"))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


def test_the_wrapper_repeats_the_condition_for_guidance_and_samples_unchanged():
    cfg = tiny("model.num_classes=10")
    model, diffusion = build_model(cfg).eval(), Diffusion(20)
    cond = make_condition(torch.rand(2, 1, 16, 16) * 2 - 1, "superres", 4)
    y = torch.tensor([1, 2])
    for sampler, steps in (("ddim", 3), ("dpmpp2m", 3), ("ddpm", None)):
        x = diffusion.sample(with_condition(model, cond), (2, 1, 16, 16), sampler, steps=steps, y=y,
                             guidance_scale=2.0, progress=False, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="3 images for 2 condition"):
        Conditioned(model, cond)(torch.zeros(3, 1, 16, 16), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("overrides,pattern", [
    (["data.task=colorize"], "data.task=colorize makes RGB images from grey ones"),
    (["data.sr_factor=3"], "data.sr_factor=3 must be >= 2 and divide data.image_size=16"),
    (["data.sr_factor=1"], "data.sr_factor=1 must be >= 2"),
    (["data.sr_factor=0"], "data.sr_factor"),
    (["data.task=upscale"], "data.task"),
])
def test_config_refuses_tasks_that_make_no_sense(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(*overrides)


def test_config_refuses_a_task_on_2d_points():
    with pytest.raises(ConfigError, match="toy2d data are 2-D points"):
        load_config(REPO / "configs" / "toy2d.yaml", ["data.task=superres", "data.sr_factor=2"])


def test_comparison_columns():
    cfg = tiny()
    targets = torch.rand(3, 1, 16, 16) * 2 - 1
    conds = conditions_from_targets(targets, None, cfg)
    assert conds.inputs.shape == (3, 1, 4, 4) and conds.cond.shape == (3, 1, 16, 16)
    images, k, titles = comparison(conds, torch.zeros(3, 1, 16, 16), cfg)
    assert titles == ["condition", "bicubic", "ddpm-lab", "target"] and k == 4 and images.shape == (12, 1, 16, 16)
    assert torch.equal(images[4 + 3], targets[1]) and torch.equal(images[4 + 1], upsample(conds.inputs, 16)[1])
    assert torch.equal(images[0, :, :4, :4], conds.inputs[0, :, :1, :1].expand(1, 4, 4))  # nearest enlarged


def test_held_out_conditions_come_from_the_held_out_images():
    cfg = tiny("data.holdout=100")
    conds, where = held_out_conditions(cfg, 5)
    from dataset import build_dataset
    held = build_dataset(cfg.data, train=True, held_out=True)
    assert "held-out" in where and torch.equal(conds.targets, torch.stack([held[i][0] for i in range(5)]))


def test_a_tiny_superres_run_trains_and_saves_a_conditioned_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = train(tiny("run_name=sr", "train.max_steps=4", "train.sample_every=4", "train.ckpt_every=4"))
    assert out["step"] == 4 and torch.isfinite(torch.tensor(out["final_loss"]))
    assert out["ema"].conv_in.in_channels == 2
    from PIL import Image
    with Image.open(tmp_path / "results" / "images" / "sr" / "step_0000004.png") as grid:  # also TensorBoard's
        assert grid.size == (4 * 64 + 5 * 2, 4 * 64 + 5 * 2)  # condition | bicubic | output | target, 4 rows


@pytest.mark.parametrize("preset,task,low,inputs", [("mnist_sr", "superres", 7, 2), ("cifar10_sr", "superres", 8, 6),
                                                    ("cifar10_colorize", "colorize", None, 4)])
def test_presets(preset, task, low, inputs):
    import interop.diffusers as interop
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.data.task == task and build_model(cfg).conv_in.in_channels == inputs
    if low:
        assert cfg.data.image_size // cfg.data.sr_factor == low
    back = interop.diffusers_config_to_ours(*interop.ours_to_diffusers_config(cfg))
    assert (back.data.task, back.model.in_channels) == (task, cfg.model.in_channels)


def test_a_resumed_superres_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    """Resume stays exact for a conditioned run with flips and a sample grid (held-out conditions) in between."""
    monkeypatch.chdir(tmp_path)
    flips = "data.random_flip=true"
    straight = train(tiny("run_name=a", "train.max_steps=4", "train.sample_every=2", flips))
    train(tiny("run_name=b", "train.max_steps=2", "train.sample_every=2", flips))
    resumed = train(tiny("run_name=b", "train.max_steps=4", "train.sample_every=2", flips), resume=True)
    assert resumed["start_step"] == 2
    for key, value in straight["ema"].state_dict().items():
        assert torch.equal(value, resumed["ema"].state_dict()[key]), key


def test_a_colorize_run_trains_on_a_folder_of_rgb_images(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = train(tiny("run_name=col", "data.task=colorize", "data.dataset=folder", "data.root=imgs",
                     "model.in_channels=3", "data.random_flip=true", "train.batch_size=4", "train.max_steps=2",
                     "train.sample_every=2", "train.num_sample_images=2"))
    assert out["step"] == 2 and out["ema"].conv_in.in_channels == 4
    with Image.open(tmp_path / "results" / "images" / "col" / "step_0000002.png") as grid:
        assert grid.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)  # condition | output | target, 2 rows
