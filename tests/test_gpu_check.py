"""bench/gpu_check.py (issue #17): its --dry-run runs every part on CPU, so the GPU script cannot rot between
GPU runs; a failing check is exit 1; the peak table and the RESULTS.md section."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

import bench.gpu_check as gpu_check
import bench.unet_bench as throughput


def test_dry_run_passes_every_part_on_cpu_and_writes_nothing(tmp_path):
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = re.findall(r"^\| (\w+) \| (.+?) \| (PASS|FAIL|SKIP) \|", proc.stdout, re.M)
    assert {part for part, _, _ in rows} == {"setup", *gpu_check.PARTS}
    assert [name for _, name, result in rows if result != "PASS"] == ["40 steps, fp16 + GradScaler"]  # CUDA only
    assert len(rows) >= 19
    for needed in ("bitwise equal", "resumed under torchrun", "NaN guard", "cudnn.benchmark", "channels_last vs NCHW",
                   "noise", "compile", "DDIM-2", "diffusers"):
        assert needed in proc.stdout, needed
    assert results.read_bytes() == before
    assert list(tmp_path.iterdir()) == []  # runs happened in temporary folders


def test_a_failing_part_is_a_fail_row_and_exit_1(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("sampling broke")
    monkeypatch.setattr(gpu_check, "part_sample", broken)
    assert gpu_check.main(["--dry-run", "--parts", "sample"]) == 1
    assert re.search(r"\| sample \| part ran to the end \| FAIL \| +\| RuntimeError: sampling broke", capsys.readouterr().out)


def test_without_a_gpu_only_the_dry_run_runs(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 1
    assert capsys.readouterr().err.strip().startswith("error: no CUDA GPU here")


def test_bf16_peaks_by_device_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None), ("Tesla T4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert gpu_check.bf16_peak(cuda) == peak, name
    assert gpu_check.bf16_peak(torch.device("cpu")) is None


def test_the_section_replaces_its_own_markers_only(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\n{throughput.START}\nthroughput\n{throughput.END}\n\n{gpu_check.START}\nold\n"
                    f"{gpu_check.END}\n\ntail\n")
    throughput.write_section(f"{gpu_check.START}\nnew\n{gpu_check.END}", path, gpu_check.START, gpu_check.END)
    text = path.read_text()
    assert "new" in text and "old" not in text and "throughput\n" in text and text.endswith("tail\n")
