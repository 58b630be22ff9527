"""Image-conditioned models from the command line (issue #15): sample.py --condition and held-out conditions,
evaluate.py's scores with the bicubic baseline, export.py / --pretrained round trip."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from config import load_config, to_dict
from diffusion import Diffusion
from model import build_model
from sampling.conditions import load_conditions
from sampling.generation import generate
from storage.checkpoints import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
TINY = ["device=cpu", "data.image_size=16", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.num_classes=0",
        "diffusion.num_timesteps=20", "train.sample_steps=2", "sample.steps=2", "sample.num_samples=3",
        "sample.batch_size=2", "data.task=superres", "data.sr_factor=4", "run_name=sr"]


def write_checkpoint(path: Path, cfg) -> Path:
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    save_checkpoint({"step": 0, "config": to_dict(cfg), "model": state, "ema": state}, path)
    return path


@pytest.fixture
def sr_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_checkpoint(tmp_path / "ckpt.pt", load_config(DIGITS, TINY))


def test_sample_condition_upscales_a_png_to_the_model_size(sr_checkpoint, tmp_path):
    import sample
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).save(tmp_path / "low.png")
    sample.main(["--checkpoint", str(sr_checkpoint), "--condition", "low.png", "--out", "out"])
    with Image.open(tmp_path / "out" / "000000.png") as image:
        assert image.size == (16, 16) and image.mode == "L"
    with Image.open(tmp_path / "out" / "grid.png") as grid:  # condition | bicubic | ddpm-lab: 3 cells of 64 px
        assert grid.width == 3 * 64 + 4 * 2
    assert not (tmp_path / "out" / "000001.png").exists()


def test_num_samples_gives_k_different_results_per_condition_whatever_the_batch_size(sr_checkpoint, tmp_path):
    """SR3's outputs are diverse: --condition with --num-samples K writes K results per condition image, output j
    being result j % K of image j // K (as --inpaint), each its own noise: result 0 of image 0 is K=1's output."""
    import sample
    (tmp_path / "lows").mkdir()
    for i in range(2):
        Image.fromarray((np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)[:, ::1 - 2 * i]).save(
            tmp_path / "lows" / f"{i}.png")
    base = ["--checkpoint", str(sr_checkpoint), "--condition", "lows"]
    sample.main([*base, "--num-samples", "3", "--batch-size", "2", "--out", "k3"])
    sample.main([*base, "--num-samples", "3", "--batch-size", "6", "--out", "k3b"])
    sample.main([*base, "--out", "k1"])
    k3 = [(tmp_path / "k3" / f"{j:06d}.png").read_bytes() for j in range(6)]
    assert not (tmp_path / "k3" / "000006.png").exists() and len(set(k3)) == 6  # all differ
    assert k3 == [(tmp_path / "k3b" / f"{j:06d}.png").read_bytes() for j in range(6)]  # any --batch-size
    assert k3[0] == (tmp_path / "k1" / "000000.png").read_bytes()
    with Image.open(tmp_path / "k3" / "grid.png") as grid:  # a row per image: condition | bicubic | 3 results
        assert grid.size == (5 * 64 + 6 * 2, 2 * 64 + 3 * 2)


def test_sample_without_condition_uses_held_out_images_and_shows_the_targets(sr_checkpoint, tmp_path):
    import sample
    sample.main(["--checkpoint", str(sr_checkpoint), "--out", "out"])
    assert sorted(p.name for p in (tmp_path / "out").glob("0*.png")) == ["000000.png", "000001.png", "000002.png"]
    with Image.open(tmp_path / "out" / "grid.png") as grid:  # 4 columns per item: ... | target
        assert grid.width == 4 * 64 + 5 * 2


def test_conditioned_samples_do_not_depend_on_the_batch_size():
    cfg = load_config(DIGITS, TINY)
    model, diffusion = build_model(cfg).eval(), Diffusion(20)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # zero at initialisation: it would hide the condition
    cond = torch.rand(3, 1, 16, 16) * 2 - 1
    a = generate(model, diffusion, cfg, 3, 3, 0, "ddim", 2, conditions=cond, progress=False)
    b = generate(model, diffusion, cfg, 3, 1, 0, "ddim", 2, conditions=cond, progress=False)
    assert torch.allclose(a, b, atol=1e-5)
    c = generate(model, diffusion, cfg, 3, 3, 0, "ddim", 2, conditions=cond.flip(0), progress=False)
    assert not torch.allclose(a, c)  # the condition reaches the network


def test_colorize_takes_any_image_as_grey_and_knows_the_target_of_a_colour_one(tmp_path):
    cfg = load_config(REPO / "configs" / "cifar10.yaml", ["data.task=colorize"])
    rgb = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    conds, files = load_conditions(str(tmp_path / "a.png"), cfg)
    assert conds.cond.shape == (1, 1, 32, 32) and conds.targets.shape == (1, 3, 32, 32)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "a.png")
    conds, _ = load_conditions(str(tmp_path / "a.png"), cfg)
    assert conds.targets is None and conds.cond.shape == (1, 1, 32, 32)


def test_pixel_metrics_psnr_ssim_and_consistency():
    from evaluation.conditioned import pixel_metrics
    from sampling.conditions import conditions_from_targets
    cfg = load_config(DIGITS, TINY)
    targets = torch.rand(4, 1, 16, 16) * 2 - 1
    conds = conditions_from_targets(targets, None, cfg)
    perfect = pixel_metrics(targets, conds, cfg)
    assert perfect["psnr"] == 100 and perfect["ssim"] == pytest.approx(1.0) and perfect["consistency_mse"] < 1e-5
    q = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round() / 255  # noqa: E731  (the PNG values)
    base = pixel_metrics(conds.cond, conds, cfg)
    mse = (q(conds.cond) - q(targets)).pow(2).flatten(1).mean(1)
    assert base["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)
    assert base["ssim"] < 0.9
    by_hand = (F.avg_pool2d(q(conds.cond), 4) - q(conds.inputs)).pow(2).mean()  # SR3: downsample the output
    assert base["consistency_mse"] == pytest.approx(float(by_hand), rel=1e-5)
    shifted = pixel_metrics(conds.cond.roll(1, -1), conds, cfg)
    assert shifted["consistency_mse"] > base["consistency_mse"]


def test_evaluate_scores_model_and_bicubic_baseline_in_one_record(sr_checkpoint, tmp_path):
    import json

    import evaluate
    import evaluation.features as features
    from config import DataConfig
    ckpt = features.train_classifier(DataConfig(dataset="digits", image_size=16, random_flip=False), "train",
                                     steps=30, batch_size=64, lr=3e-3, progress=False)
    save_checkpoint(ckpt, features.classifier_path("digits", 16, tmp_path / "cls"))
    rc = evaluate.main(["--checkpoint", str(sr_checkpoint), "--num-samples", "6", "--batch-size", "4", "--steps", "2",
                        "--classifier-dir", str(tmp_path / "cls"), "--ref-dir", str(tmp_path / "refs"),
                        "--results-dir", str(tmp_path / "eval"), "--num-ref", "50", "--quiet", "--device", "cpu"])
    assert rc == 0
    record = json.loads((tmp_path / "eval" / "sr.jsonl").read_text().splitlines()[-1])
    m = record["metrics"]
    assert m["task"] == "superres" and m["baseline"] == "bicubic" and m["num_images"] == 6
    for key in ("model", "bicubic"):
        assert {"psnr", "ssim", "consistency_mse", "fid", "classifier_accuracy"} <= set(m[key])
    assert m["model"]["psnr"] != m["bicubic"]["psnr"] and "classifier_accuracy" in m["targets"]


@pytest.mark.parametrize("preset,overrides,extra", [("digits", TINY, 1), ("cifar10", ["data.task=colorize"], 1),
                                                    ("cifar10", ["data.task=superres"], 3)])
def test_export_and_pretrained_round_trip_a_conditioned_unet(tmp_path, capsys, preset, overrides, extra):
    diffusers = pytest.importorskip("diffusers")
    import export
    import interop.pretrained as pretrained
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_checkpoint({"step": 3, "config": to_dict(cfg), "model": model.state_dict(), "ema": model.state_dict()},
                    tmp_path / "ckpt.pt")
    assert export.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out")]) == 0
    assert "torch.cat([x_t, cond], dim=1)" in capsys.readouterr().out
    c, size = cfg.model.in_channels, cfg.data.image_size
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    assert (unet.config.in_channels, unet.config.out_channels) == (c + extra, c)
    x, t = torch.randn(2, c + extra, size, size), torch.tensor([5, 900])
    back, _, back_cfg = pretrained.load_pretrained(str(tmp_path / "out"))
    assert (back_cfg.data.task, back_cfg.data.sr_factor) == (cfg.data.task, cfg.data.sr_factor)
    assert back_cfg.model.in_channels == c and back.conv_in.in_channels == c + extra
    with torch.no_grad():
        ours = model(x, t)
        assert torch.allclose(unet(x, t).sample, ours, atol=1e-4)
        assert torch.allclose(back(x, t), ours, atol=1e-6)


def test_the_animation_shows_the_condition_next_to_the_denoising(sr_checkpoint, tmp_path):
    import sample
    from sampling.pictures import image_grid
    sample.main(["--checkpoint", str(sr_checkpoint), "--out", "out", "--animation"])
    panel = image_grid(torch.zeros(2, 1, 16, 16), min_cell=64).width  # the first batch (sample.batch_size=2)
    with Image.open(tmp_path / "out" / "animation.gif") as gif:
        assert gif.width == 3 * panel + 2 * 10  # condition | x_t | predicted x0


@pytest.mark.parametrize("value", [{"task": "deblur", "sr_factor": 4}, {"task": "superres"}, "superres"])
def test_a_malformed_condition_record_in_config_json_is_one_clear_error(value):
    import interop.diffusers as interop
    from config import ConfigError
    unet, scheduler = interop.ours_to_diffusers_config(load_config(DIGITS, TINY))
    with pytest.raises(ConfigError, match="_ddpm_lab_condition"):
        interop.diffusers_config_to_ours({**unet, "_ddpm_lab_condition": value}, scheduler)
    unet.pop("_ddpm_lab_condition")  # without the record, extra input channels are not ours to guess
    with pytest.raises(ConfigError, match="out_channels"):
        interop.diffusers_config_to_ours(unet, scheduler)
