"""diffusers interop (interop.py, pretrained.py, export.py): our UNet vs diffusers' UNet2DModel in both
directions, schedules vs DDPMScheduler, and the refusals. Models are built locally with random weights: no
network."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import export  # noqa: E402
import interop.diffusers as interop  # noqa: E402
import interop.pretrained as pretrained  # noqa: E402
from config import ConfigError, load_config, to_dict  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from model import build_model  # noqa: E402
from storage.checkpoints import CheckpointError, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DDPM = dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, act_fn="silu",
            time_embedding_type="positional", center_input_sample=False, mid_block_scale_factor=1)
CIFAR10 = dict(DDPM, sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
               norm_num_groups=32, attention_head_dim=None)  # google/ddpm-cifar10-32
# The google/ddpm-cifar10-32 files as published (diffusers 0.0.4 / 0.1.1): keys missing here take
# diffusers' defaults, so the reader must fill them in as diffusers does.
HUB_UNET_CONFIG = {k: CIFAR10[k] for k in [
    "act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "down_block_types",
    "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
    "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels", "sample_size", "time_embedding_type",
    "up_block_types"]}
HUB_SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                        "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                        "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}
# Attention before a downsampler (16x16), 2 heads there and 4 in the middle.
SMALL = dict(DDPM, sample_size=16, in_channels=1, out_channels=1, block_out_channels=[32, 64],
             down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
             layers_per_block=1, norm_num_groups=8, attention_head_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**config).eval()


def assert_same_outputs(ours, theirs, x, t, y=None, labels=None):
    with torch.no_grad():
        out_ours = ours(x, t, y)
        out_theirs = theirs(x, t, class_labels=labels).sample
    assert out_theirs.abs().mean() > 1e-2  # a real signal, not two zero maps
    assert torch.allclose(out_ours, out_theirs, atol=1e-4), (out_ours - out_theirs).abs().max()


# ----------------------------------------------------------------------------- diffusers -> ours
def test_defaults_are_those_of_diffusers():
    """Keys missing from an old config.json take diffusers' defaults; ours must be the same."""
    for cls, ours in [(UNet2DModel, interop.UNET_DEFAULTS), (DDPMScheduler, interop.SCHEDULER_DEFAULTS)]:
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop("self")
        theirs = {k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in params.items()}
        assert ours == theirs, cls.__name__


def test_cifar10_pipeline_folder_runs_in_our_unet(tmp_path):
    unet = diffusers_unet(CIFAR10)
    scheduler = DDPMScheduler(**HUB_SCHEDULER_CONFIG)
    folder = tmp_path / "ddpm-cifar10-32"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **HUB_UNET_CONFIG}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(HUB_SCHEDULER_CONFIG))
    model, diffusion, cfg = pretrained.load_pretrained(str(folder))
    assert not model.training and cfg.run_name == "pretrained_ddpm-cifar10-32" and cfg.data.dataset == "cifar10"
    m = cfg.model
    assert (m.channel_mult, m.attention_resolutions, m.num_head_channels) == ([1, 2, 2, 2], [16], -1)
    assert (cfg.diffusion.var_type, cfg.diffusion.objective, cfg.sample.clip_x0) == ("fixed_large", "eps", True)
    assert torch.allclose(diffusion.betas, scheduler.betas, atol=1e-8)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 999])
    assert_same_outputs(model, unet, x, t)


def test_256px_ddpm_configs_convert():
    """google/ddpm-{celebahq,church,bedroom,cat}-256: attention at down index 4 / up index 1 = 16x16."""
    cfg = interop.diffusers_config_to_ours({
        **HUB_UNET_CONFIG, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}, HUB_SCHEDULER_CONFIG)
    assert (cfg.model.channel_mult, cfg.model.attention_resolutions) == ([1, 1, 2, 2, 4, 4], [16])


@pytest.mark.parametrize("weights", ["safetensors", "bin_with_pre_0.14_attention_names"])
def test_bare_unet_folder_runs_in_our_unet(tmp_path, capsys, weights):
    unet = diffusers_unet(SMALL, seed=1)
    if weights == "safetensors":
        unet.save_pretrained(tmp_path)
    else:  # what the hub's early .bin files hold: query/key/value/proj_attn, read with weights_only
        (tmp_path / "config.json").write_text(json.dumps(dict(unet.config)))
        old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
        sd = {}
        for key, value in unet.state_dict().items():
            for new, legacy in old.items():
                key = key.replace(new, legacy)
            sd[key] = value
        assert any(".query." in k for k in sd)
        torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    model, diffusion, cfg = pretrained.load_pretrained(str(tmp_path))
    assert "DDPMScheduler defaults" in capsys.readouterr().err  # no scheduler in a bare UNet folder
    assert (cfg.model.num_head_channels, cfg.model.attention_resolutions, cfg.model.norm_groups) == (16, [16], 8)
    assert cfg.diffusion.var_type == "fixed_small" and cfg.diffusion.num_timesteps == 1000
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    assert_same_outputs(model, unet, x, torch.tensor([0, 1, 500, 999]))


def test_non_default_norm_eps_is_carried_over(tmp_path):
    """PyTorch-default GroupNorm eps (1e-5) models load into model.norm_eps and match exactly."""
    unet = diffusers_unet({**SMALL, "norm_eps": 1e-5}, seed=4)
    unet.save_pretrained(tmp_path)
    model, _, cfg = pretrained.load_pretrained(str(tmp_path))
    assert cfg.model.norm_eps == 1e-5
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    assert_same_outputs(model, unet, x, torch.tensor([3, 700]))


def test_half_precision_weights_load_as_float32(tmp_path):
    unet = diffusers_unet(SMALL, seed=3)
    unet.half().save_pretrained(tmp_path)
    model, _, _ = pretrained.load_pretrained(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    assert_same_outputs(model, unet.float(), x, torch.tensor([10, 900]))


def test_class_conditional_unet_runs_in_our_unet(tmp_path):
    unet = diffusers_unet(dict(SMALL, num_class_embeds=4), seed=2)
    unet.save_pretrained(tmp_path)
    model, _, cfg = pretrained.load_pretrained(str(tmp_path))
    assert cfg.model.num_classes == 3  # the last embedding row is our null label
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    assert_same_outputs(model, unet, x, torch.tensor([0, 250, 999]), y=torch.tensor([0, 2, -1]),
                        labels=torch.tensor([0, 2, 3]))


def test_state_dict_mapping_is_invertible():
    sd = diffusers_unet(dict(SMALL, num_class_embeds=4)).state_dict()
    ours = interop.convert_diffusers_state_dict(sd)
    assert any(k.endswith("qkv.weight") for k in ours) and not any("to_q" in k for k in ours)
    back = interop.convert_state_dict_to_diffusers(ours)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("key,value", [
    ("downsample_padding", 1), ("flip_sin_to_cos", True), ("freq_shift", 0),
    ("resnet_time_scale_shift", "scale_shift"), ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"), ("out_channels", 2), ("block_out_channels", [32, 48]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"]),            # attention only in the down path
    ("down_block_types", ["AttnDownBlock2D", "SkipDownBlock2D"]), ("attention_head_dim", 24),
    ("sample_size", [16, 32]), ("_class_name", "UNet2DConditionModel"), ("act_fn", "mish")])
def test_inexpressible_unet_configs_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        interop.diffusers_config_to_ours({**SMALL, key: value}, {})


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "scaled_linear"), ("trained_betas", [0.1, 0.2]), ("variance_type", "learned_range"),
    ("thresholding", True), ("prediction_type", "flow"), ("steps_offset", 1), ("rescale_betas_zero_snr", True),
    ("clip_sample_range", 2.0), ("_class_name", "ScoreSdeVeScheduler")])
def test_inexpressible_schedulers_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        interop.diffusers_config_to_ours(SMALL, {key: value})


def test_refusal_happens_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "flip_sin_to_cos": True, "freq_shift": 0}))
    with pytest.raises(ConfigError) as err:
        pretrained.load_pretrained(str(tmp_path))
    assert "flip_sin_to_cos" in str(err.value) and "freq_shift" in str(err.value)  # all problems at once


@pytest.mark.parametrize("schedule,T", [("linear", 1000), ("squaredcos_cap_v2", 1000), ("squaredcos_cap_v2", 50)])
def test_diffusion_betas_equal_ddpmscheduler(schedule, T):
    sched = {"beta_schedule": schedule, "num_train_timesteps": T, "prediction_type": "v_prediction",
             "timestep_spacing": "trailing", "clip_sample": False}
    cfg = interop.diffusers_config_to_ours(SMALL, sched)
    d = cfg.diffusion
    assert (d.objective, d.timestep_spacing, d.num_timesteps, cfg.sample.clip_x0) == ("v", "trailing", T, False)
    ours, theirs = Diffusion.from_config(cfg.diffusion), DDPMScheduler(**sched)
    assert torch.allclose(ours.betas, theirs.betas, rtol=1e-5, atol=1e-8)
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- hub ids
def test_offline_hub_id_gives_one_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from interop.pretrained import load_pretrained\ntry:\n    load_pretrained('google/ddpm-cifar10-32')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.startswith("CheckpointError"), proc.stdout + proc.stderr
    assert "hf download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32" in proc.stdout
    assert "--pretrained ./ddpm-cifar10-32" in proc.stdout and "HF_HUB_OFFLINE" in proc.stdout


def test_hub_download_fetches_only_what_it_reads(tmp_path, monkeypatch):
    import huggingface_hub as hub
    DDPMPipeline(unet=diffusers_unet(SMALL), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    files = ["model_index.json", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
    info = type("Info", (), {"sha": "a" * 40, "siblings": [type("S", (), {"rfilename": f}) for f in files]})
    calls = []
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.HfApi, "model_info", lambda self, repo_id, timeout=None: info)
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(tmp_path))
    _, _, cfg = pretrained.load_pretrained("someone/small-ddpm")
    assert cfg.run_name == "pretrained_small-ddpm" and calls[0]["revision"] == "a" * 40
    skipped = {"README.md", "unet/diffusion_pytorch_model.bin"}  # one weights file: safetensors
    assert sorted(calls[0]["allow_patterns"]) == sorted(set(files) - skipped)

    def unreachable(self, repo_id, timeout=None):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **kw: (_ for _ in ()).throw(OSError("not cached")))
    with pytest.raises(CheckpointError, match="hf download someone/small-ddpm --local-dir small-ddpm"):
        pretrained.load_pretrained("someone/small-ddpm")
    # ... unless an earlier download is in the local cache
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path) if kw["local_files_only"]
                        else pytest.fail("no download while the hub is unreachable"))
    assert pretrained.load_pretrained("someone/small-ddpm")[2].model.num_head_channels == 16


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        pretrained.load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        pretrained.load_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- ours -> diffusers
def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter, so the zero-initialised output layers carry signal too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_checkpoint(tmp_path, preset: str, overrides=()):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", list(overrides))
    raw = randomized(build_model(cfg), 0)
    ema = randomized(build_model(cfg), 1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 7, "config": to_dict(cfg), "model": raw.state_dict(), "ema": ema.state_dict()}, path)
    return cfg, raw, ema, path


@pytest.mark.parametrize("preset,overrides", [("digits", ["model.num_classes=0"]), ("mnist", ["model.channels=32"]),
                                              ("digits", ["model.num_classes=10"])])
def test_export_loads_in_ddpmpipeline_with_same_outputs(tmp_path, capsys, preset, overrides):
    cfg, raw, ema, ckpt = write_checkpoint(tmp_path, preset, overrides)
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(ckpt), "--format", "diffusers", "--out", str(out)]) == 0
    assert "EMA weights of step 7" in capsys.readouterr().out
    pipe = DDPMPipeline.from_pretrained(out)
    size, classes = cfg.data.image_size, cfg.model.num_classes
    x = torch.randn(3, cfg.model.in_channels, size, size, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 500, 999])
    y, labels = (torch.tensor([0, 9, -1]), torch.tensor([0, 9, classes])) if classes else (None, None)
    assert_same_outputs(ema, pipe.unet, x, t, y, labels)  # EMA weights by default
    with torch.no_grad():
        assert not torch.allclose(raw(x, t, y), pipe.unet(x, t, class_labels=labels).sample, atol=1e-3)
    ours = Diffusion.from_config(cfg.diffusion)
    assert torch.allclose(ours.betas, pipe.scheduler.betas, rtol=1e-5, atol=1e-8)
    assert torch.allclose(ours.alphas_cumprod, pipe.scheduler.alphas_cumprod, rtol=1e-4, atol=1e-6)
    sched = pipe.scheduler.config
    expected_type = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[cfg.diffusion.objective]
    assert (sched.clip_sample, sched.prediction_type) == (cfg.sample.clip_x0, expected_type)
    assert sched.variance_type == cfg.diffusion.var_type
    if not classes:  # DDPMPipeline passes no class labels, so it only samples unconditional models
        images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
        assert images.shape == (1, size, size, cfg.model.in_channels) and (images >= 0).all()
    back, _, back_cfg = pretrained.load_pretrained(str(out))  # and the exported folder loads into our UNet
    assert back_cfg.model.channel_mult == cfg.model.channel_mult
    assert back_cfg.diffusion.schedule == cfg.diffusion.schedule
    with torch.no_grad():
        assert torch.allclose(back(x, t, y), ema(x, t, y), atol=1e-6)


def test_export_no_ema_and_cli_errors(tmp_path, capsys):
    cfg, raw, _, ckpt = write_checkpoint(tmp_path, "digits", ["model.num_classes=0"])
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out), "--no-ema"]) == 0
    pipe = DDPMPipeline.from_pretrained(out)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6)), torch.tensor([3, 700])
    assert_same_outputs(raw, pipe.unet, x, t)
    capsys.readouterr()
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 1  # not empty, no --force
    assert "--force" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_export_refuses_the_mlp_model(tmp_path, capsys):
    toy = load_config(REPO / "configs" / "toy2d.yaml")
    ckpt = tmp_path / "toy.pt"
    sd = build_model(toy).state_dict()
    save_checkpoint({"step": 1, "config": to_dict(toy), "model": sd, "ema": sd}, ckpt)
    assert export.main(["--checkpoint", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "model.kind = 'mlp'" in err and "no diffusers equivalent" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_export_refuses_heads_diffusers_cannot_express():
    cfg = load_config(REPO / "configs" / "digits.yaml", ["model.attention_resolutions=[16,4]"])  # widths 32, 64
    with pytest.raises(ConfigError, match="num_head_channels"):
        interop.ours_to_diffusers_config(cfg)  # 2 heads: head widths 16 and 32
    cfg = load_config(REPO / "configs" / "digits.yaml", ["model.attention_resolutions=[16,4]",
                                                          "model.num_head_channels=16"])
    assert interop.ours_to_diffusers_config(cfg)[0]["attention_head_dim"] == 16


def test_every_image_preset_exports():
    """Config level (no weights): each U-Net preset converts, and reads back as the same network."""
    for preset in ("cifar10", "mnist", "digits"):
        ours = load_config(REPO / "configs" / f"{preset}.yaml")
        back = interop.diffusers_config_to_ours(*interop.ours_to_diffusers_config(ours))
        for key in ("in_channels", "channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                    "norm_groups", "num_classes", "dropout"):
            assert getattr(back.model, key) == getattr(ours.model, key), (preset, key)
        training_only = {"loss_weighting": "none", "min_snr_gamma": 5.0}  # not part of a diffusers model
        assert to_dict(back.diffusion) == {**to_dict(ours.diffusion), **training_only}
        assert (back.data.image_size, back.sample.clip_x0) == (ours.data.image_size, ours.sample.clip_x0)
