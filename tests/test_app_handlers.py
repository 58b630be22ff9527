"""app.py's page without a browser (issue #24): each handler against the library call it stands for (same seed,
same tensors, same PNG bytes), the command it shows against sample.py itself (run in subprocesses, bytes
compared), and every safety rule: uploads (too big, not an image, decompression bomb, wrong size), ceilings, run
names from the server's list only, --host, no checkpoint, nothing written outside the run's results folder, no
overwrite. The browser test (tests/test_app_browser.py) drives the real page.

The checkpoints are random but non-zero weights (tests/test_sample.py's make_checkpoint): no training needed, and
every pixel depends on the seed and the settings, so a wrong flag in a command cannot give the same bytes."""
from __future__ import annotations

import hashlib
import io
import os
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config, to_dict
from editing.algorithms import edit, inpaint, invert
from model import build_model
from sampling.generation import SampleNoise, generate
from sampling.images import builtin_mask, load_image
from sampling.pictures import to_uint8_images
from storage.checkpoints import save_checkpoint
from webapp import Models, RequestError, RunError, UploadError, handlers
from webapp import uploads

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits.yaml"
TINY = ["device=cpu", "model.channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4",
        "model.attention_resolutions=[]", "model.num_res_blocks=1", "diffusion.num_timesteps=20", "sample.steps=4",
        "sample.num_samples=4", "sample.batch_size=4", "train.sample_steps=2"]
CLASSES = ["run_name=tiny", "data.image_size=8", "model.num_classes=10", *TINY]
SUPERRES = ["run_name=sr", "data.image_size=16", "data.task=superres", "data.sr_factor=4", "model.num_classes=0",
            *TINY]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def make_checkpoint(path: Path, overrides: list[str]) -> Path:
    cfg = load_config(DIGITS, overrides)
    g = torch.Generator().manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"step": 3, "config": to_dict(cfg), "model": model.state_dict(), "ema": model.state_dict()},
                    path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working folder with checkpoints/tiny (class-conditional) and checkpoints/sr (superres); one thread."""
    root, old, threads = tmp_path_factory.mktemp("app"), Path.cwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    make_checkpoint(root / "checkpoints" / "tiny" / "last.pt", CLASSES)
    make_checkpoint(root / "checkpoints" / "sr" / "last.pt", SUPERRES)
    digit = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(digit).save(root / "digit.png")
    Image.fromarray(digit.T.copy()).save(root / "other.png")
    yield root
    torch.set_num_threads(threads)
    os.chdir(old)


@pytest.fixture(scope="module")
def models(work):
    return Models(device="cpu")


@pytest.fixture(scope="module")
def tiny(models):
    return models.get("tiny")


def png(x: torch.Tensor) -> np.ndarray:
    """A (C, H, W) sample as the 8-bit pixels its PNG holds."""
    return to_uint8_images(x[None])[0].permute(1, 2, 0).numpy()[..., 0]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def outputs(result: handlers.Result) -> list[Path]:
    return sorted(p for p in result.files if p.name[:6].isdigit() and p.suffix == ".png")


# ----------------------------------------------------------------------------- each mode = its library call
def test_sample_is_generate_with_the_same_seed_and_settings(tiny):
    steps = []
    result = handlers.sample(tiny, "ddim", 3, 0.5, 2.0, "3", 7, 3, callback=lambda i, t, x_t, x0: steps.append(i))
    src = tiny.source
    x = generate(src.model, src.diffusion, src.cfg, 3, 4, 7, "ddim", 3, eta=0.5, labels=[3, 3, 3],
                 guidance_scale=2.0, amp="auto", progress=False)
    for j, path in enumerate(outputs(result)):
        assert np.array_equal(pixels(path), png(x[j])), path
    assert steps == [0, 1, 2]  # the live previews see every step of the first batch
    assert result.command.startswith("python sample.py --checkpoint checkpoints/tiny/last.pt --device cpu")
    assert result.picture == result.folder / "grid.png" and result.folder.parent == Path("results/images/tiny")


def test_img2img_is_edit_with_the_same_noise(tiny, work):
    result = handlers.img2img(tiny, str(work / "digit.png"), 0.5, "ddim", 4, 3)
    src = tiny.source
    x0 = load_image(work / "digit.png", 1, 8, "x")[0][None]
    x = edit(src.diffusion, src.model, x0, 0.5, sampler="ddim", steps=4, generator=SampleNoise(3, [0]),
             clip_x0=src.cfg.sample.clip_x0, guidance_scale=src.cfg.sample.guidance_scale)
    assert np.array_equal(pixels(outputs(result)[0]), png(x[0]))


def test_inpaint_with_a_built_in_region_is_inpaint_with_the_same_noise(tiny, work):
    result = handlers.inpaint(tiny, str(work / "digit.png"), "center", None, 2, 1, "ddim", 4, 5)
    src = tiny.source
    x0 = load_image(work / "digit.png", 1, 8, "x")[0][None]
    keep = builtin_mask("center", 8)
    x = inpaint(src.diffusion, src.model, x0, keep, sampler="ddim", steps=4, eta=0.0, resample=2, jump=1,
                generator=SampleNoise(5, [0]), clip_x0=src.cfg.sample.clip_x0,
                guidance_scale=src.cfg.sample.guidance_scale, timestep_spacing=None)
    out = pixels(outputs(result)[0])
    assert np.array_equal(out, png(x[0]))
    kept = keep[0, 0].bool().numpy()
    assert np.array_equal(out[kept], np.asarray(Image.open(work / "digit.png"))[kept])  # kept pixels stay


def test_invert_is_ddim_inversion_then_its_reconstruction_with_psnr(tiny, work):
    result = handlers.invert(tiny, str(work / "digit.png"), 4, 0)
    src = tiny.source
    x0 = load_image(work / "digit.png", 1, 8, "x")[0][None]
    x_T = invert(src.diffusion, src.model, x0, steps=4)
    x = src.diffusion.sample(src.model, x_T.shape, "ddim", 4, eta=0.0, x_T=x_T, clip_x0=src.cfg.sample.clip_x0)
    assert np.array_equal(pixels(outputs(result)[0]), png(x[0]))
    assert "PSNR" in result.note and "dB" in result.note


def test_a_painted_mask_is_white_where_the_brush_went(work):
    background = Image.open(work / "digit.png").convert("RGB")
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 3:6] = (255, 0, 0, 255)
    image, mask = handlers.painted_mask({"background": background, "layers": [Image.fromarray(layer, "RGBA")]})
    assert image is background and np.array_equal(np.asarray(mask) == 255, layer[..., 3] > 0)
    assert handlers.painted_mask({"background": background, "layers": []})[1] is None


# ----------------------------------------------------------------------------- the shown command, byte for byte
def page_results(tiny, models, work) -> dict[str, handlers.Result]:
    layer = np.zeros((8, 8), np.uint8)
    layer[4:, :5] = 255
    return {"sample": handlers.sample(tiny, "ddim", 3, 0.0, 2.0, "all", 11, 5),
            "painted": handlers.inpaint(tiny, str(work / "digit.png"), "painted", Image.fromarray(layer), 2, 1,
                                        "ddpm", None, 2),
            "interpolate": handlers.interpolate(tiny, str(work / "digit.png"), str(work / "other.png"), 3, 3, 0),
            "condition": handlers.condition(models.get("sr"), None, "ddim", 3, 4, 2)}


def test_each_shown_command_writes_the_same_files_byte_for_byte(tiny, models, work):
    results = page_results(tiny, models, work)
    procs = {k: subprocess.Popen([sys.executable, str(REPO / "sample.py"), *shlex.split(r.command)[2:]], cwd=work,
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, r in results.items()}  # in parallel: each is mostly torch's import
    for key, proc in procs.items():
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-2000:]
        page = results[key]
        cli = next(p for p in Path(page.folder.parent).glob(page.folder.name.split("-")[0] + "*")
                   if p != page.folder and (p / "ddpm-lab-samples.json").is_file() and str(p) in out)
        names = sorted(p.name for p in page.files)
        assert names == sorted(p.name for p in cli.iterdir() if p.name != "ddpm-lab-samples.json"), key
        for name in names:
            assert (cli / name).read_bytes() == (page.folder / name).read_bytes(), (key, name)


# ----------------------------------------------------------------------------- uploads
def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape, without the bomb)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize("name, content, message", ids=["bomb", "bigger-bomb", "text", "truncated", "empty", "huge"],
                         argvalues=[
    ("bomb.png", bomb_png(3000, 9000), r"3000x9000 pixels, over the page's limit .* decompression bomb"),
    ("bigger.png", bomb_png(30000, 30000), r"more pixels than PIL's own limit .* decompression bomb"),
    ("notes.png", b"these are my notes, not a picture\n", r"not an image the page can read"),
    ("cut.png", bomb_png(8, 8)[:40], r"not an image the page can read"),
    ("empty.png", b"", r"empty file"),
    ("huge.png", b"\x89PNG" + bytes(uploads.MAX_UPLOAD_BYTES), r"over the page's upload limit of 8\.39 MB")])
def test_a_bad_upload_is_one_line_naming_cause_and_fix(tiny, work, name, content, message):
    (work / name).write_bytes(content)
    before = sorted(Path("results").rglob("*"))
    with pytest.raises(UploadError, match=message) as err:
        handlers.img2img(tiny, str(work / name), 0.5, "ddim", 2, 0)
    assert "\n" not in str(err.value) and "upload" in str(err.value)
    assert sorted(Path("results").rglob("*")) == before  # refused before anything was written


def test_the_page_refuses_a_bomb_before_gradio_decodes_it(work):
    import gradio as gr
    from gradio.data_classes import FileData
    from webapp.ui_parts import upload_image
    (work / "bomb2.png").write_bytes(bomb_png(5000, 5000))
    with pytest.raises(gr.Error, match="decompression bomb"):
        upload_image().preprocess(FileData(path=str(work / "bomb2.png")))
    # a grey PNG reaches the handler as the uploaded file, not re-encoded (Gradio's default: a lossy WebP)
    assert upload_image().preprocess(FileData(path=str(work / "digit.png"))) == str(work / "digit.png")
    assert upload_image(label="A", elem_id="x").get_config()["elem_id"] == "x"  # settings reach the page


def test_wrong_sizes_are_refused(tiny, models, work):
    with pytest.raises(UploadError, match=r"mask is 4x4 but the image is 8x8"):
        handlers.inpaint(tiny, str(work / "digit.png"), "painted", Image.new("L", (4, 4), 255), 2, 1, "ddim", 2, 0)
    with pytest.raises(RequestError, match="nothing is painted"):
        handlers.inpaint(tiny, str(work / "digit.png"), "painted", None, 2, 1, "ddim", 2, 0)
    with pytest.raises(UserErrorType(), match=r"is 8x8, but this superres model takes 4x4 low-res images"):
        handlers.condition(models.get("sr"), str(work / "digit.png"), "ddim", 2, 0, 1)


def UserErrorType():
    from config import UserError
    return UserError


# ----------------------------------------------------------------------------- ceilings, run names
@pytest.mark.parametrize("call, message", [
    (lambda t, w: handlers.sample(t, "ddim", 5000, 0, 1, "all", 0, 4), "steps must be a whole number from 1 to 1000"),
    (lambda t, w: handlers.sample(t, "ddim", 4, 0, 1, "all", 0, 65), "count must be a whole number from 1 to 64"),
    (lambda t, w: handlers.sample(t, "ddim", 2.5, 0, 1, "all", 0, 4), "steps must be a whole number"),
    (lambda t, w: handlers.sample(t, "ddim", 25, 0, 1, "all", 0, 4), r"--steps 25 is more than this model's T = 20"),
    (lambda t, w: handlers.sample(t, "ddim", 4, 0, 1, "10", 0, 4), "class label must be a whole number from 0 to 9"),
    (lambda t, w: handlers.inpaint(t, str(w / "digit.png"), "center", None, 20, 20, "ddim", 4, 0),
     r"resample x jump is 20 x 20 = 400, over the page's ceiling of 200"),
    (lambda t, w: handlers.inpaint(t, str(w / "digit.png"), "../../etc", None, 2, 1, "ddim", 4, 0),
     "region '../../etc' is not one of painted"),
    (lambda t, w: handlers.interpolate(t, str(w / "digit.png"), str(w / "other.png"), 500, 4, 0),
     "frames must be a whole number from 2 to 32")], ids=["steps", "count", "steps-fraction", "steps-over-T",
                                                          "label", "resample-x-jump", "region", "frames"])
def test_values_over_the_ceilings_are_refused_in_one_line(tiny, work, call, message):
    with pytest.raises(UserErrorType(), match=message) as err:
        call(tiny, work)
    assert "\n" not in str(err.value)


def test_the_cost_check_of_the_cli_refuses_what_this_machine_cannot_do(tiny, monkeypatch):
    import limits.budget
    monkeypatch.setattr(limits.budget, "MAX_MODEL_CALLS", 100)  # the machine's ceiling, lowered: same check as the CLI
    before = sorted(Path("results").rglob("*"))
    with pytest.raises(UserErrorType(), match=r"sampling of 64 sample\(s\) x 20 evaluation.*--max-model-calls"):
        handlers.sample(tiny, "ddim", 20, 0, 1, "all", 0, 64)
    assert sorted(Path("results").rglob("*")) == before


@pytest.mark.parametrize("name", ["../tiny", "checkpoints/tiny/last.pt", "/etc/passwd", "", None, "tinyx"])
def test_only_runs_on_the_servers_list_are_opened(models, name):
    with pytest.raises(RunError, match="is not on this server's list"):
        models.get(name)
    assert models.names() == ["sr", "tiny"] or models.names() == ["tiny", "sr"]


def test_a_model_is_loaded_once(models):
    assert models.get("tiny") is models.get("tiny")


# ----------------------------------------------------------------------------- where the page writes
def test_nothing_is_written_outside_the_runs_results_folder_and_nothing_is_overwritten(tiny, work):
    user = Path("results/images/tiny/ddim_2_9")
    user.mkdir(parents=True)
    (user / "000000.png").write_bytes(b"my own file")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in work.rglob("*") if p.is_file()}
    first = handlers.sample(tiny, "ddim", 2, 0, 1, "all", 9, 2)
    second = handlers.img2img(tiny, str(work / "digit.png"), 0.3, "ddim", 2, 9)
    third = handlers.img2img(tiny, str(work / "digit.png"), 0.3, "ddim", 2, 9)
    assert first.folder == Path("results/images/tiny/ddim_2_9_g2_y0-1-2-3-4-5-6-7-8-9") or first.folder != user
    assert third.folder != second.folder and third.folder.name == second.folder.name + "-2"
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in work.rglob("*") if p.is_file()}
    assert all(after[p] == h for p, h in before.items())  # every earlier file keeps its bytes
    new = [p.relative_to(work) for p in after if p not in before]
    assert new and all(p.parts[:3] == ("results", "images", "tiny") for p in new), new
    assert (user / "000000.png").read_bytes() == b"my own file"


def test_an_uploaded_image_is_stored_once_by_its_content(tiny, work):
    image = Image.open(work / "other.png")
    path = uploads.store_input(image, "tiny")
    assert path.parent == Path("results/images/tiny/app-inputs") and uploads.store_input(image, "tiny") == path
    path.unlink()
    path.symlink_to(work / "digit.png")  # a link planted where the next upload goes is refused, not followed
    with pytest.raises(UserErrorType(), match="symbolic link"):
        uploads.store_input(image, "tiny")
    path.unlink()


# ----------------------------------------------------------------------------- app.py itself
def test_app_py_warns_for_another_host_and_exits_1_without_a_checkpoint(tmp_path):
    runs = {host: subprocess.Popen([sys.executable, str(REPO / "app.py"), "--host", host], cwd=tmp_path, env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for host in ("0.0.0.0", "127.0.0.1")}
    for host, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("error: no checkpoint found under checkpoints/")
        assert "`python train.py --config configs/digits.yaml`" in lines[-1]
        assert ("warning: --host 0.0.0.0 lets other machines reach the page" in err) == (host == "0.0.0.0")
