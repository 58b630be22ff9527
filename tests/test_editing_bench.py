"""bench/edit_quality.py (issue #14's editing benchmark) end to end on a tiny random model of the digits data set:
the tables have their rows, the kept pixels come back exactly, bad input is refused in one line."""
import re
from pathlib import Path

import pytest
import torch
from test_sample import make_checkpoint, tiny_config  # noqa: F401

import bench.edit_quality as bench

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]

ROWS = "ddim:5:1:1:1,ddim:5:1:2:2,ddim:4:0:1:1,ddim:4:0:3:1"


def argv(tmp_path: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--num", "4", "--batch-size", "3", "--inpaint-rows", ROWS,
            "--invert-steps", "2,5", "--strengths", "0.5", "--sdedit-steps", "5", "--classifier-steps", "2",
            "--classifier-dir", str(tmp_path / "classifier"), "--no-write", *extra]


def test_known_pixel_error_counts_only_the_kept_pixels():
    x = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True  # top half kept
    generated = x.clone()
    generated[..., 2:, :] = 0.7
    assert bench.known_pixel_error(generated, x, mask) == 0
    generated[1, 0, 1, 3] = -0.25
    assert bench.known_pixel_error(generated, x, mask) == 0.25
    assert torch.allclose(bench.psnr(x + 0.2, x), torch.full((2,), 20.0))  # 10 log10(4 / 0.04)


def test_benchmark_tables_have_every_row_and_keep_the_known_pixels(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_config(extra=["data.holdout=40"]))
    results = tmp_path / "RESULTS.md"
    results.write_text("mine\n")
    bench.RESULTS = results
    assert bench.main(argv(tmp_path, ckpt)) == 0
    assert results.read_text() == "mine\n"  # --no-write
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    inpaint = [line.split(" | ") for line in table if "plain replacement" in line or "RePaint" in line]
    assert len(inpaint) == 2 * 4  # bottom and center, one row per --inpaint-rows entry
    assert all(cells[6] == "0" for cells in inpaint)  # the max known-pixel error column
    assert {cells[2] for cells in inpaint} == {"plain replacement", "RePaint 2 / 2", "RePaint 3 / 1"}
    assert sum("originals (reference)" in line for line in table) == 2
    assert re.search(r"^\| 2 \+ 2 \| [\d.]+ dB", out, re.M) and re.search(r"^\| 5 \+ 5 \| [\d.]+ dB", out, re.M)
    assert re.search(r"^\| 0\.5 \| 3 \| ", out, re.M)  # strength 0.5: t <= 9 of the grid 16, 12, 8, 4, 0
    assert "beat plain replacement on label recovery" in out


@pytest.mark.parametrize("extra, holdout, match", [
    ((), 0, "data.holdout=0"),
    (("--masks", "middle"), 40, "--masks 'middle'"),
    (("--inpaint-rows", "ddim:4:0:3:4"), 40, "jump 4 leaves no block"),
    (("--num", "41"), 40, "--num 41 is more than the 40 held-out digits"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, extra, holdout, match):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_config(extra=[f"data.holdout={holdout}"]))
    assert bench.main(argv(tmp_path, ckpt, *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err
    assert not (tmp_path / "classifier").exists()  # refused before the classifier is trained
