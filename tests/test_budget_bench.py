"""bench/budget.py (issue #18): the report from rows (cheap), and the whole benchmark end to end at a toy size
on the real MNIST test split with the peers' own code (skipped where MNIST or a peer library is absent)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench.budget as budget

REPO = Path(__file__).resolve().parents[1]

ROWS = [{"recipe": r, "steps": s, "train_s": t, "train_cpu_s": t / 2, "sample_s": 30.0, "params": 6e6, "fid": f,
         "precision": 0.5, "recall": 0.4}
        for r, s, t, f in [("ddpm-lab", 500, 600, 40.0), ("ddpm-lab", 1000, 1200, 20.0),
                           ("diffusers", 500, 900, 60.0), ("diffusers", 1000, 1800, 35.0)]]
INFO = {"date": "2026-11-30", "commit": "abc", "machine": "2 cores", "load": (1.0, 2.0), "command": "python x",
        "batch": 64, "threads": 2, "n": 1000, "num_ref": 10000, "rows": "bench/budget_rows.jsonl"}


def test_report_has_a_row_per_run_between_its_markers_and_keeps_other_text(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nother sections stay\n\n<!-- budget:start -->\nold table\n<!-- budget:end -->\n"
                       "\nhand-written note below the section\n")
    section = budget.render(ROWS, INFO, "budget_fid_vs_time.png")
    budget.write_section(section, path=results, name="budget")
    text = results.read_text()
    assert "old table" not in text and "other sections stay" in text and "hand-written note below" in text
    assert "| ddpm-lab | 1000 | 6.00 M | 20.0 | 10.0 | 3.0 | 20.00 | 0.500 | 0.400 |" in text
    assert sum(line.startswith(("| ddpm-lab |", "| diffusers |")) for line in text.splitlines()) == 4
    assert "![FID vs training wall time](budget_fid_vs_time.png)" in text
    png = budget.plot(ROWS, tmp_path / "budget_fid_vs_time.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batches_reshuffle_each_epoch_and_are_seeded():
    import torch
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1)
    a, b = budget.Batches(images, 4, seed=1), budget.Batches(images, 4, seed=1)
    first = [a.next().flatten().tolist() for _ in range(4)]
    assert first == [b.next().flatten().tolist() for _ in range(4)]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # no repeats inside an epoch
    assert first[2] != first[0]  # the second epoch (2 full batches of 4 out of 10) is a new order


ALL = os.environ.get("BUDGET_BENCH_ALL") == "1"   # every recipe end to end: ~80 s instead of ~30 s


@pytest.mark.skipif(not budget.MNIST.is_dir(), reason="the MNIST test split is not on this machine")
def test_budget_trains_samples_scores_and_writes_rows_table_and_plot(tmp_path):
    """One step of lucidrains' recipe (all three with BUDGET_BENCH_ALL=1), 4 DDIM-50 samples, evaluate.py."""
    pytest.importorskip("denoising_diffusion_pytorch")
    pytest.importorskip("diffusers")
    recipes = list(budget.RECIPES) if ALL else ["lucidrains"]
    results = tmp_path / "RESULTS.md"
    rows_file = tmp_path / "rows.jsonl"
    argv = ["--budgets", "1", "--recipes", ",".join(recipes), "--num-samples", "4", "--sample-batch-size", "4",
            "--threads", "1", "--classifier-steps", "5", "--work", str(tmp_path / "work"), "--results", str(results),
            "--rows", str(rows_file)]
    bench(argv, tmp_path)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["recipe"], r["steps"]) for r in rows] == [(name, 1) for name in recipes]
    assert all(math.isfinite(r["fid"]) and r["train_s"] > 0 and r["train_cpu_s"] > 0 and r["params"] > 1e6
               for r in rows)
    samples = tmp_path / "work" / "results" / "images" / "bench_budget" / f"{recipes[0]}_1"
    assert len(list(samples.glob("0*.png"))) == 4  # 000000.png ... (sample.py adds grid.png)
    text = results.read_text()
    assert text.count("| 1 |") == len(recipes) and "<!-- budget:end -->" in text
    assert (tmp_path / "budget_fid_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun with the same settings skips the finished row and rebuilds the same table from the file.
    results.write_text("")
    again = bench(argv, tmp_path)
    assert "1 row(s) with these settings already in" in again.stdout and "0 to run" in again.stdout, again.stdout
    assert "python train.py" not in again.stdout and "evaluate.py" not in again.stdout
    assert len(rows_file.read_text().splitlines()) == 1 and results.read_text().count("| 1 |") == len(recipes)


def bench(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bench.budget", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_rows_are_reused_only_with_the_same_settings(tmp_path):
    import argparse
    args = argparse.Namespace(rows=str(tmp_path / "r.jsonl"), batch_size=64, threads=1, num_samples=1000, seed=0,
                              classifier_steps=2000)
    budget.append_row(tmp_path / "r.jsonl", {**ROWS[0], "settings": budget.settings(args)})
    budget.append_row(tmp_path / "r.jsonl", {**ROWS[1], "settings": {**budget.settings(args), "batch_size": 128}})
    assert [(r["recipe"], r["steps"]) for r in budget.read_rows(tmp_path / "r.jsonl", args)] == [("ddpm-lab", 500)]
