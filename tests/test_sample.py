"""sample.py: checkpoint loading, seeded generation, guidance, output files, animations, 2-D plots, errors.

Every checkpoint is built here from a tiny config (no train.py); weights are random but non-zero (the U-Net
zero-initialises its output layer, which would make every model predict eps = 0 and hide bugs).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import interop.pretrained as pretrained
import sample
import sampling.generation as generation
import sampling.loading as loading
import storage.checkpoints as checkpoints
from config import load_config, save_config, to_dict
from diffusion import build_diffusion
from model import build_model
from sampling.pictures import Recorder, to_uint8_images
from storage.checkpoints import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = ["model.channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4",
             "model.attention_resolutions=[4]", "data.image_size=8", "diffusion.num_timesteps=20",
             "train.sample_steps=5", "sample.steps=5", "sample.num_samples=6", "sample.batch_size=4",
             "model.num_classes=0", "sample.guidance_scale=1.0"]  # unconditional unless a test says so
TINY_TOY = ["diffusion.num_timesteps=20", "train.sample_steps=10", "sample.num_samples=300",
            "sample.batch_size=300", "model.mlp_hidden=32", "model.mlp_emb_size=16"]


def tiny_config(run_name="tiny", preset="digits", extra=()):
    base = TINY_TOY if preset == "toy2d" else TINY_UNET
    return load_config(REPO / "configs" / f"{preset}.yaml", [f"run_name={run_name}", *base, *extra])


def random_state(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.state_dict()


def make_checkpoint(path, cfg, step=5):
    """A checkpoint by the contract: raw and EMA weights differ, so tests can tell them apart."""
    save_checkpoint({"step": step, "config": to_dict(cfg), "model": random_state(cfg, 1),
                     "ema": random_state(cfg, 2)}, path)
    return Path(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def work(tmp_path, monkeypatch):
    """Run in an empty folder: checkpoints/ and results/ are relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(argv):
    assert sample.main(argv + ["--device", "cpu"]) == 0


def expect_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        sample.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


# ----------------------------------------------------------------------------- loading
def test_load_for_sampling_uses_ema_by_default(work):
    ckpt_path = make_checkpoint("run.pt", tiny_config())
    ckpt = load_checkpoint(ckpt_path)
    model, diffusion, cfg, _ = loading.load_for_sampling(ckpt_path)
    assert cfg.run_name == "tiny" and diffusion.num_timesteps == 20 and not model.training
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    raw = loading.load_for_sampling(ckpt_path, use_ema=False)[0]
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in raw.state_dict().items())


def test_default_checkpoint_is_run_last_or_newest(work):
    make_checkpoint("checkpoints/tiny/last.pt", tiny_config())
    newest = make_checkpoint("checkpoints/other/last.pt", tiny_config("other"))
    save_config(tiny_config(), "tiny.yaml")
    assert checkpoints.resolve_checkpoint(None, "tiny.yaml") == Path("checkpoints/tiny/last.pt")
    assert checkpoints.resolve_checkpoint(None, None) == newest
    assert checkpoints.resolve_checkpoint("x.pt", "tiny.yaml") == Path("x.pt")


# ----------------------------------------------------------------------------- generation
def test_same_seed_gives_byte_identical_files(work):
    make_checkpoint("checkpoints/tiny/last.pt", tiny_config())
    run_main(["--out", "b", "--seed", "5", "--steps", "3", "--num-samples", "8"])  # an earlier, larger run
    Path("b/notes.txt").write_text("the user's own file")
    for out, seed, more in (("a", "3", []), ("b", "3", ["--overwrite"]), ("c", "4", [])):
        run_main(["--out", out, "--seed", seed, "--steps", "3", *more])
    files = sorted(p.name for p in Path("a").iterdir())
    assert files == [f"{i:06d}.png" for i in range(6)] + [sample.MANIFEST, "grid.png"]
    # the earlier run's 000006.png and 000007.png are gone, the user's file is not
    assert sorted(p.name for p in Path("b").iterdir()) == sorted(files + ["notes.txt"])
    for name in files:
        assert Path("a", name).read_bytes() == Path("b", name).read_bytes()
    assert Path("a/grid.png").read_bytes() != Path("c/grid.png").read_bytes()


def test_default_output_folder_and_pngs_are_exact_samples(work, capsys):
    ckpt_path = make_checkpoint("checkpoints/tiny/last.pt", tiny_config())
    run_main(["--sampler", "ddim", "--steps", "5", "--seed", "7"])
    out = Path("results/images/tiny/ddim_5_7")
    assert str(out / "grid.png") in capsys.readouterr().out
    model, diffusion, cfg, _ = loading.load_for_sampling(ckpt_path)
    x = generation.generate(model, diffusion, cfg, 6, 4, seed=7, sampler="ddim", steps=5, progress=False)
    expected = to_uint8_images(x)[:, 0].numpy()  # (6, 8, 8) uint8
    for i in range(6):
        with Image.open(out / f"{i:06d}.png") as image:
            assert image.mode == "L" and image.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(image), expected[i])
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 64 and grid.size[1] > 64  # 8x8 images are upscaled in the grid


def test_rgb_samples_saved_as_rgb(work):
    cfg = tiny_config("rgb", "cifar10", ["model.in_channels=3", "model.dropout=0.0", "sample.num_samples=2"])
    make_checkpoint("c.pt", cfg)
    run_main(["--checkpoint", "c.pt", "--out", "o", "--steps", "3"])
    with Image.open("o/000001.png") as image:
        assert image.mode == "RGB" and image.size == (8, 8)


def test_ddpm_uses_all_steps_and_ddim_proportionally_fewer_calls(work):
    model, diffusion, cfg, _ = loading.load_for_sampling(make_checkpoint("c.pt", tiny_config()))
    calls = []

    def counted(xt, t, y=None):
        calls.append(len(xt))
        return model(xt, t, y)

    def count(**kw):
        calls.clear()
        generation.generate(counted, diffusion, cfg, 6, 4, seed=0, progress=False, **kw)
        return len(calls)

    assert count(sampler="ddim", steps=8) == 2 * 8  # two batches (4 + 2)
    assert count(sampler="ddim", steps=4) == 2 * 4
    assert count(sampler="dpmpp2m", steps=3) == 2 * 3
    assert count(sampler="ddpm", steps=None) == 2 * 20


def test_guidance_scale_one_equals_plain_conditional_sampling(work):
    cfg = tiny_config("cond", extra=["model.num_classes=10"])
    model, diffusion, cfg, _ = loading.load_for_sampling(make_checkpoint("c.pt", cfg))
    labels = [3, 3, 7, 7]
    x = generation.generate(model, diffusion, cfg, 4, 4, seed=5, sampler="ddim", steps=6, labels=labels,
                            guidance_scale=1.0, amp="off", progress=False)  # exact comparison: fp32
    plain = diffusion.sample(model, (4, 1, 8, 8), sampler="ddim", steps=6, y=torch.tensor(labels),
                             generator=generation.SampleNoise(5, range(4)), progress=False)
    torch.testing.assert_close(x, plain, rtol=0, atol=0)
    seen = []

    def spy(xt, t, y=None):
        seen.append(y.clone())
        return model(xt, t, y)
    guided = generation.generate(spy, diffusion, cfg, 4, 4, seed=5, sampler="ddim", steps=6, labels=labels,
                                 guidance_scale=3.0, progress=False)
    assert not torch.allclose(guided, x)
    assert seen[0].tolist() == labels + [-1] * 4  # conditional and null-label halves in one pass


def test_conditional_default_grid_has_one_column_per_class(work):
    cfg = tiny_config("cond", extra=["model.num_classes=10", "sample.num_samples=15", "sample.batch_size=32"])
    make_checkpoint("checkpoints/cond/last.pt", cfg)
    run_main(["--steps", "2"])
    out = Path("results/images/cond/ddim_2_0")
    assert len(list(out.glob("0*.png"))) == 15  # exactly the number asked, labels cycling over the classes
    with Image.open(out / "grid.png") as grid:  # cells of 64 px + 2 px padding: 10 columns, 2 rows
        assert grid.size == (10 * 66 + 2, 2 * 66 + 2)
    assert generation.plan_labels(3, None, 5) == ([0, 1, 2, 0, 1], 3)
    assert generation.plan_labels(10, None, 4) == ([0, 1, 2, 3], None)
    assert generation.plan_labels(10, [4], 3) == ([4, 4, 4], None)
    assert generation.plan_labels(0, None, 5) == (None, None)


def test_parse_class_labels():
    assert generation.parse_class_labels("3", 10) == [3]
    assert generation.parse_class_labels("1,4 7", 10) == [1, 4, 7]
    assert generation.parse_class_labels("cat, dog", 3, ["bird", "cat", "dog"]) == [1, 2]
    assert generation.parse_class_labels(None, 10) is None


def test_bf16_autocast_on_cpu(work):
    model, diffusion, cfg, _ = loading.load_for_sampling(make_checkpoint("c.pt", tiny_config()))
    kw = dict(sampler="ddim", steps=2, progress=False)
    x32 = generation.generate(model, diffusion, cfg, 1, 1, 0, amp="off", **kw)
    x16 = generation.generate(model, diffusion, cfg, 1, 1, 0, amp="bf16", **kw)
    assert x16.dtype == torch.float32 and torch.isfinite(x16).all()
    # autocast was active, and the result is still close: measured 4.3e-4 here (at most 8.7e-4 over 30 seeds,
    # also with oneDNN held to AVX2 / SSE4.1, i.e. without native bf16); 5e-3 leaves a 6x margin
    assert 0 < (x16 - x32).abs().max() < 5e-3


# ----------------------------------------------------------------------------- animations
def test_animation_gif_and_trajectory(work):
    make_checkpoint("c.pt", tiny_config())
    run_main(["--checkpoint", "c.pt", "--out", "o", "--steps", "10", "--num-samples", "4", "--animation"])
    with Image.open("o/animation.gif") as gif:
        assert gif.n_frames == 10  # one frame per step when there are few steps
        assert gif.size == (2 * 134 + 10, 134 + 22)  # x_t | predicted x0 (2x2 grids of 64 px), title row
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
        assert durations[-1] > durations[0]  # the final image is held
    with Image.open("o/trajectory.png") as strip:
        assert strip.size[0] > strip.size[1] > 100


def test_recorder_keeps_at_most_60_frames_denser_near_the_end():
    timesteps = list(range(999, -1, -1))
    rec = Recorder(timesteps, batch_size=64)
    for i, t in enumerate(timesteps):
        rec(i, t, torch.zeros(64, 1, 4, 4), torch.zeros(64, 1, 4, 4))
    kept = sorted(rec.keep)
    assert 30 <= len(rec.frames) <= 60 and kept[0] == 0 and kept[-1] == 999
    assert kept[-1] - kept[-2] < kept[1] - kept[0]
    assert rec.frames[-1][0] == "output" and rec.frames[0][0] == "t = 998"
    assert rec.frames[0][1].shape == (16, 1, 4, 4)  # 16 samples spread over the batch


# ----------------------------------------------------------------------------- 2-D toy and forward figure
def test_toy2d_checkpoint_writes_scatter_and_gifs(work):
    make_checkpoint("checkpoints/toy/last.pt", tiny_config("toy", "toy2d"))
    run_main(["--animation"])
    out = Path("results/images/toy/ddpm_20_0")  # toy preset: ddpm over all T
    assert np.load(out / "samples.npy").shape == (300, 2)
    with Image.open(out / "scatter.png") as image:
        assert image.size[0] > image.size[1] > 200
    for name, frames in (("animation.gif", 20), ("forward.gif", 20)):
        with Image.open(out / name) as gif:
            assert gif.n_frames == frames and gif.size == (320, 320)


def test_forward_figure_from_config(work):
    save_config(tiny_config(), "tiny.yaml")
    run_main(["--forward", "--config", "tiny.yaml"])
    with Image.open("results/plots/tiny/forward_noise.png") as image:
        width, height = image.size
    assert width > height > 200  # 6 labeled columns, 4 rows
    make_checkpoint("t.pt", tiny_config("toy", "toy2d"))
    run_main(["--forward", "--checkpoint", "t.pt"])
    assert Path("results/plots/toy/forward_noise.png").is_file()


# ----------------------------------------------------------------------------- --pretrained wiring
def test_pretrained_goes_through_pretrained_load_pretrained(work, monkeypatch):
    cfg = tiny_config("whatever")
    model = build_model(cfg)
    model.load_state_dict(random_state(cfg, 3))
    asked = []

    def load_pretrained(name_or_path, device):
        asked.append(name_or_path)
        return model, build_diffusion(cfg), cfg
    monkeypatch.setattr(pretrained, "load_pretrained", load_pretrained)
    run_main(["--pretrained", "google/ddpm-tiny", "--steps", "3", "--num-samples", "2"])
    assert asked == ["google/ddpm-tiny"]
    assert len(list(Path("results/images/pretrained_google_ddpm-tiny/ddim_3_0").glob("0*.png"))) == 2


# ----------------------------------------------------------------------------- user errors
def test_no_checkpoint_anywhere(work, capsys):
    expect_error(capsys, [], "no checkpoint found", "checkpoints", "python train.py --config configs/digits.yaml")
    save_config(tiny_config(), "tiny.yaml")
    expect_error(capsys, ["--config", "tiny.yaml"], str(Path("checkpoints/tiny/last.pt")), "python train.py")
    expect_error(capsys, ["--checkpoint", "missing.pt"], "missing.pt", "python train.py")


@pytest.mark.parametrize("argv, fragments", [
    (["--class-label", "3"], ["unconditional", "num_classes = 0"]),
    (["--guidance-scale", "2"], ["class-conditional"]),
    (["--steps", "21"], ["--steps 21", "T = 20"]),
    (["--sampler", "ddpm", "--steps", "10"], ["ddpm sampler uses all T=20"]),
    (["--amp", "fp16", "--device", "cpu"], ["fp16 needs a CUDA device"]),
    pytest.param(["--device", "cuda"], ["CUDA is not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_sampling_arguments(work, capsys, argv, fragments):
    make_checkpoint("c.pt", tiny_config())
    expect_error(capsys, ["--checkpoint", "c.pt", "--out", "o"] + argv, *fragments)
    assert not Path("o").exists()


def test_class_label_out_of_range(work, capsys):
    make_checkpoint("c.pt", tiny_config("cond", extra=["model.num_classes=10"]))
    expect_error(capsys, ["--checkpoint", "c.pt", "--class-label", "2,10"], "'10' is out of range", "0..9")
    expect_error(capsys, ["--checkpoint", "c.pt", "--class-label", "-1"], "out of range")


def test_incompatible_and_corrupt_checkpoints(work, capsys):
    ckpt = load_checkpoint(make_checkpoint("good.pt", tiny_config()))
    torch.save({**ckpt, "format_version": 99}, "old.pt")
    expect_error(capsys, ["--checkpoint", "old.pt"], "format version 99")
    Path("junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    expect_error(capsys, ["--checkpoint", "junk.pt"], "corrupt")
    Path("cut.pt").write_bytes(Path("good.pt").read_bytes()[:2000])
    expect_error(capsys, ["--checkpoint", "cut.pt"], "corrupt or truncated")
    torch.save({**ckpt, "ema": {k: v[..., :1] for k, v in ckpt["ema"].items()}}, "shape.pt")
    expect_error(capsys, ["--checkpoint", "shape.pt"], "do not fit the model")
    torch.save({**ckpt, "config": {**ckpt["config"], "bogus": 1}}, "cfg.pt")
    expect_error(capsys, ["--checkpoint", "cfg.pt"], "not valid", "bogus")


def test_pretrained_local_diffusers_folder_end_to_end(work):
    """With export.py and diffusers present: a tiny DDPM-layout UNet2DModel saved by diffusers samples here."""
    pytest.importorskip("export")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained("tiny_pipe")
    run_main(["--pretrained", "./tiny_pipe/", "--steps", "2", "--num-samples", "2"])
    with Image.open("results/images/pretrained_tiny_pipe/ddim_2_0/000001.png") as image:
        assert image.mode == "RGB" and image.size == (8, 8)
