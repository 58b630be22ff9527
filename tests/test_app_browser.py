"""End to end in headless Chromium (issue #24): app.py serves a tiny checkpoint this test trains; the page's
Sample grid must hold the same pixels as the PNGs of the `sample.py` command it shows, a brush stroke painted
with mouse events on the Inpaint canvas must change the painted pixels and keep the others, and a corrupt upload
must give one line in an error toast while the server keeps serving.

Select it with `pytest -m browser`; it skips (saying what is missing) without chromium, chromedriver, selenium or
gradio. DDPM_LAB_SCREENSHOTS=DIR also saves one full-page PNG per tab into DIR (docs/app holds the README's);
DDPM_LAB_APP_CHECKPOINT=PATH serves a copy of that checkpoint instead of the tiny one (a 16x16 grey model).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import browser
from browser import by_id, open_tab, text_of, upload, wait, wait_image
from safety import DIGITS
from safety import TINY as SAFETY_TINY

REPO = Path(__file__).resolve().parents[1]
# tests/safety.py's tiny run at 16x16 (the page's pictures) with 4 sampling steps: later overrides win.
TINY = [*SAFETY_TINY, "data.image_size=16", "sample.steps=4"]
SHOTS = os.environ.get("DDPM_LAB_SCREENSHOTS", "")
GIVEN = os.environ.get("DDPM_LAB_APP_CHECKPOINT", "")
RUN = Path(GIVEN).resolve().parent.name if GIVEN else "tiny"  # the run folder the app shows by name
URL = re.compile(r"http://127\.0\.0\.1:\d+")

pytestmark = [pytest.mark.browser, pytest.mark.skipif(bool(browser.missing()), reason=browser.missing() or "-")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working folder holding checkpoints/tiny/last.pt, trained here (in-process: no second torch import)."""
    import train
    root = tmp_path_factory.mktemp("project")
    if GIVEN:  # e.g. the digits quickstart run, for the README's screenshots
        (root / "checkpoints" / RUN).mkdir(parents=True)
        shutil.copyfile(GIVEN, root / "checkpoints" / RUN / "last.pt")
        return root
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        assert train.main(["--config", DIGITS, *TINY, "run_name=tiny", "train.max_steps=4"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(root: Path) -> tuple[subprocess.Popen, Path]:
    log = root / "app.log"  # a file, not a pipe: a full pipe would block the server
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", f"checkpoints/{RUN}/last.pt",
                                 "--port", str(free_port())], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, log


def wait_url(proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = URL.search(log.read_text())
        if found:
            return found.group(0)
        assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"app.py printed no URL in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def page(project):
    """(driver, url, server log): app.py on a free loopback port and a headless Chromium on its page."""
    started = time.monotonic()
    proc, log = start_app(project)
    driver = None
    try:
        driver = browser.start_chrome()  # starts while the server loads its model
        url = wait_url(proc, log)
        print(f"app.py printed its URL after {time.monotonic() - started:.1f} s")
        driver.get(url)
        wait(driver, lambda d: by_id(d, "sample-run").is_enabled(), 30, "the Sample button")
        yield driver, url, log
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def shoot(driver, name, *bottom_of):
    if SHOTS:
        browser.screenshot(driver, Path(SHOTS) / f"{name}.png", bottom_of)


def plain(pixels: np.ndarray) -> np.ndarray:
    """Grey or RGB pixels without an opaque alpha channel and without grey's three equal channels."""
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        assert (pixels[..., 3] == 255).all(), "the image has transparent pixels"
        pixels = pixels[..., :3]
    if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
        pixels = pixels[..., 0]
    return pixels


def cli_command(command: str, out: Path) -> list[str]:
    """The page's `python sample.py ...` as argv run from the project folder, writing into `out`."""
    argv = shlex.split(command.strip().splitlines()[-1])
    assert argv[0].startswith("python") and Path(argv[1]).name == "sample.py", f"not a sample.py command: {command}"
    return [sys.executable, str(REPO / "sample.py"), *argv[2:], "--out", str(out)]  # the last --out wins


def run_sample(driver, project: Path) -> tuple[np.ndarray, subprocess.Popen, Path]:
    """Presses Sample; returns the grid's pixels and the page's sample.py command, started in the background."""
    open_tab(driver, "tab-sample")
    by_id(driver, "sample-run").click()
    grid = plain(wait_image(driver, "sample-grid"))
    command = wait(driver, lambda d: "sample.py" in (t := text_of(d, "sample-command")) and t, 10, "the command")
    out = project / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = subprocess.Popen(cli_command(command, out), cwd=project, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    shoot(driver, "sample", "sample-files", "sample-grid", "sample-run")
    return grid, cli, out


def check_cli(grid: np.ndarray, cli: subprocess.Popen, out: Path):
    log, _ = cli.communicate(timeout=60)
    assert cli.returncode == 0, f"the page's sample.py command failed:\n{log[-3000:]}"
    expected = plain(np.array(Image.open(out / "grid.png")))
    assert grid.shape == expected.shape, f"page grid {grid.shape}, sample.py's grid.png {expected.shape}"
    assert np.array_equal(grid, expected), f"{(grid != expected).sum()} grid pixels differ from sample.py's"
    assert len(list(out.glob("0*.png"))) >= 1, "sample.py wrote no per-image PNGs"


def picture(path: Path, size: int = 16, seed: int = 0) -> Path:
    """A grey picture of the model's size: a gradient with a bright square, so any change shows."""
    ys, xs = np.mgrid[0:size, 0:size]
    pixels = (xs * 255 / (size - 1) * 0.6 + ys * 4 + seed * 20).clip(0, 255).astype(np.uint8)
    pixels[size // 4: size // 2, size // 4: size // 2] = 250
    pixels[(pixels > 110) & (pixels < 145)] += 40  # no mid grey: the inpaint grid shows the region in mid grey
    Image.fromarray(pixels, "L").save(path)
    return path


def grid_cells(grid: np.ndarray, size: int) -> list[np.ndarray]:
    """The pictures of a one-row grid.png (sample.py's layout: nearest-upscaled cells, 2-pixel white padding)."""
    scale = (grid.shape[0] - 4) // size
    cell = size * scale + 2
    assert grid.shape[0] == cell + 2 and (grid.shape[1] - 2) % cell == 0, f"not a one-row grid: {grid.shape}"
    return [grid[2:2 + size * scale:scale, 2 + i * cell:2 + i * cell + size * scale:scale]
            for i in range((grid.shape[1] - 2) // cell)]


def run_inpaint(driver, project: Path):
    """Uploads a picture into the editor, paints a stroke along its middle row, runs; the result's grid row
    (input, input with the region to generate in grey, result) must keep every pixel outside the painted
    region, change those inside, and that region must lie where the stroke went."""
    open_tab(driver, "tab-inpaint")
    source = picture(project / "inpaint-in.png")
    original = np.array(Image.open(source))
    upload(driver, "inpaint-editor", source)
    wait(driver, lambda d: editor_zoom(d) > 100, 20, "the editor to show the upload enlarged")
    for elem_id, value in (("inpaint-steps", 4), ("inpaint-resample", 2), ("inpaint-jump", 1)):
        browser.set_value(driver, elem_id, value)  # a cheap repaint schedule for the 4-step tiny model
    browser.brush_size(driver, "inpaint-editor", 2)  # a thin stroke: the default may cover a 16-pixel picture
    browser.paint_row(driver, "inpaint-editor", original.shape, row=0.5, start=0.25, stop=0.75)
    by_id(driver, "inpaint-run").click()
    seen, masked, result = grid_cells(plain(wait_image(driver, "inpaint-result", timeout=60)), original.shape[0])
    assert np.array_equal(seen, original), "the server's copy of the upload differs from the file"
    painted = masked != seen  # generated pixels show mid grey there; picture() has no mid grey
    size = original.shape[0]
    assert painted[size // 2, size * 3 // 8: size * 5 // 8].all(), f"the stroke is not in the region:\n{painted}"
    assert not painted[:size // 4].any() and not painted[-(size // 4):].any(), f"region beyond the stroke:\n{painted}"
    assert np.array_equal(result[~painted], original[~painted]), "inpainting changed pixels outside the region"
    changed = result[painted] != original[painted]
    assert changed.mean() >= 0.5, f"only {changed.sum()} of {changed.size} painted pixels changed"
    shoot(driver, "inpaint", "inpaint-result", "inpaint-files", "inpaint-run")


def editor_zoom(driver) -> float:
    from selenium.webdriver.common.by import By
    text = by_id(driver, "inpaint-editor").find_element(By.CSS_SELECTOR, ".zoom-number span").text
    return float(text.strip("% ") or 0)


def run_tab(driver, tab, uploads: dict, run_id, result_id, shot=None):
    """Opens `tab`, uploads {elem_id: file}, presses `run_id` and waits for `result_id`; its pixels."""
    open_tab(driver, tab)
    for elem_id, path in uploads.items():
        upload(driver, elem_id, path)
        wait(driver, lambda d, e=elem_id: browser.image_src(d, e) and browser.idle(d), 20, f"the upload in #{elem_id}")
    old = browser.image_src(driver, result_id)
    by_id(driver, run_id).click()
    pixels = wait_image(driver, result_id, old, timeout=60)
    if shot:
        shoot(driver, shot, result_id, run_id, result_id.replace("-result", "-files"))
    return pixels


def corrupt_upload(driver, project: Path) -> str:
    """Uploads bytes that are no image into img2img; the toast's text (pressing Run if the upload alone is quiet)."""
    browser.close_toasts(driver)
    open_tab(driver, "tab-img2img")
    bad = project / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image at all " * 8)
    upload(driver, "img2img-input", bad)
    try:
        wait(driver, browser.toasts, 3, "a toast after the upload")
    except AssertionError:
        by_id(driver, "img2img-run").click()
    texts = wait(driver, browser.toasts, 20, "an error toast after the corrupt upload")
    shoot(driver, "error", "img2img-run", "img2img-files")
    return texts[-1]


def test_app_in_headless_chromium(page, project):
    driver, _, log = page
    start = time.monotonic()
    grid, cli, out = run_sample(driver, project)
    print(f"sample grid after {time.monotonic() - start:.1f} s")
    run_inpaint(driver, project)
    print(f"inpaint result after {time.monotonic() - start:.1f} s")
    a, b = picture(project / "a.png"), picture(project / "b.png", seed=5)
    if SHOTS:  # the other tabs with results, for the README (the checks above are the test)
        run_tab(driver, "tab-img2img", {"img2img-input": a}, "img2img-run", "img2img-result", "img2img")
        run_tab(driver, "tab-interpolate", {"interp-a": a, "interp-b": b}, "interp-run", "interp-result",
                "interpolate")
        run_tab(driver, "tab-invert", {"invert-input": a}, "invert-run", "invert-result", "invert")
    message = corrupt_upload(driver, project)
    assert "\n" not in message.strip() and 0 < len(message) < 300, f"not one short line: {message!r}"
    assert "image" in message.lower(), f"the toast does not say the upload is not an image: {message!r}"
    browser.close_toasts(driver)
    # b, not a: the same result as the screenshot run's would keep its URL (Gradio names cached files by content)
    after = run_tab(driver, "tab-img2img", {"img2img-input": b}, "img2img-run", "img2img-result")
    assert np.array_equal(grid_cells(plain(after), 16)[0], np.array(Image.open(b))), "img2img after the error failed"
    print(f"error toast and one more request after {time.monotonic() - start:.1f} s")
    check_cli(grid, cli, out)
    assert "Traceback" not in log.read_text(), f"the server printed a traceback:\n{log.read_text()[-3000:]}"
