"""Safety table (issue #12): config files, config values and train.py's command line.

Each case runs a real command in a fresh working folder `<tmp>/home/work` (so that a run_name such as
`../../x` would land in `<tmp>/home/x`, where a decoy folder waits). Runs that need a trained checkpoint copy
one tiny digits run ("digits", 3 steps) trained once per session.
"""
from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from safety import DIGITS, REPO, TINY, Case, run_case

TOY2D = str(REPO / "configs" / "toy2d.yaml")
TOY_TINY = ["device=cpu", "train.max_steps=2", "train.sample_every=1000", "train.ckpt_every=1000",
            "train.num_sample_images=4", "train.sample_steps=2", "diffusion.num_timesteps=20", "train.batch_size=16"]
RUN = [*TINY, "run_name=digits", "train.max_steps=3"]


def write(name: str, data: str | bytes):
    def setup(workdir: Path) -> None:
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return setup


@functools.lru_cache(maxsize=None)
def trained_run() -> Path:
    """checkpoints/digits/{last.pt, step_0000003.pt} of a tiny run (trained with OMP_NUM_THREADS=1)."""
    root = Path(tempfile.mkdtemp(prefix="safety_config_"))
    atexit.register(shutil.rmtree, root, True)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", DIGITS, *RUN], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "checkpoints"


def with_run(*, drop_last: bool = False, run_name: str | None = None, lr: float | None = None):
    """Copies the trained run into the working folder; optionally without last.pt, or with a stored run_name
    changed (as a hand-edited or foreign checkpoint could hold)."""
    def setup(workdir: Path) -> None:
        shutil.copytree(trained_run(), workdir / "checkpoints")
        if drop_last:
            (workdir / "checkpoints" / "digits" / "last.pt").unlink()
        if run_name is not None or lr is not None:
            import torch
            path = workdir / "checkpoints" / "digits" / "last.pt"
            ckpt = torch.load(path, weights_only=True)
            ckpt["config"]["run_name"] = run_name or ckpt["config"]["run_name"]
            ckpt["config"]["train"]["lr"] = ckpt["config"]["train"]["lr"] if lr is None else lr
            torch.save(ckpt, path)
    return setup


def decoy(workdir: Path) -> None:
    """A folder outside checkpoints/ that looks like a run: --overwrite must not touch it."""
    (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)  # the user's other runs live here
    folder = workdir.parent / "x"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "step_0000001.pt", "notes.txt"):
        (folder / name).write_text(f"the user's {name}\n")


BAD_YAML = "run_name: mine\nmodel:\n  channel_mult: [1, 2\n  channels: 8\n"
CASES = [
    # 1. tracebacks where a one-line error belongs
    Case("bad_yaml_file", ["train.py", "--config", "bad.yaml"], 1, r"bad\.yaml.*line \d+.*fix the syntax",
         setup=write("bad.yaml", BAD_YAML), keep=("bad.yaml",)),
    Case("bad_yaml_override", ["train.py", "--config", DIGITS, "model.channel_mult=[1,2"], 1,
         r"override 'model\.channel_mult=\[1,2'.*not valid YAML.*fix"),
    Case("non_utf8_config", ["train.py", "--config", "latin1.yaml"], 1, r"latin1\.yaml.*not UTF-8",
         setup=write("latin1.yaml", "run_name: caf\xe9\n".encode("latin-1")), keep=("latin1.yaml",)),
    Case("sample_bad_yaml", ["sample.py", "--config", "bad.yaml"], 1, r"bad\.yaml.*line \d+.*fix the syntax",
         setup=write("bad.yaml", BAD_YAML), keep=("bad.yaml",)),
    # 2. a zero level width failed inside conv2d after training had started
    Case("channel_mult_zero", ["train.py", "--config", DIGITS, *TINY, "model.channel_mult=[0]"], 1,
         r"model\.channel_mult.*>= 1", absent=("checkpoints/*",)),
    # 3. values that were accepted but wrong
    Case("max_nonfinite_zero", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2", "train.max_nonfinite=0"],
         1, r"train\.max_nonfinite.*> 0", absent=("checkpoints/*",)),
    Case("mlp_hidden_zero", ["train.py", "--config", TOY2D, *TOY_TINY, "model.mlp_hidden=0"], 1,
         r"model\.mlp_hidden.*> 0", absent=("checkpoints/*",)),
    Case("mlp_layers_zero", ["train.py", "--config", TOY2D, *TOY_TINY, "model.mlp_layers=0"], 1,
         r"model\.mlp_layers.*> 0", absent=("checkpoints/*",)),
    Case("attention_resolution_of_no_level",
         ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2", "model.attention_resolutions=[16]"], 1,
         r"attention_resolutions.*16.*valid values are 8, 4", absent=("checkpoints/*",)),
    Case("min_lr_ratio_negative", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2",
                                   "train.min_lr_ratio=-0.5"], 1, r"train\.min_lr_ratio.*\[0, 1\]"),
    Case("min_lr_ratio_above_one", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2",
                                    "train.min_lr_ratio=1.5"], 1, r"train\.min_lr_ratio.*\[0, 1\]"),
    # 4. run_name is a name, not a path (with --overwrite the old code deleted the decoy's files)
    Case("run_name_path_with_overwrite", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2",
                                          "run_name=../../x", "--overwrite"], 1, r"run_name.*letters, digits",
         setup=decoy, keep=("../x/*",), absent=("../x/step_0000002.pt", "checkpoints/*")),
    Case("run_name_absolute", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2", "run_name=/tmp"], 1,
         r"run_name.*'/tmp'"),
    Case("resume_stored_run_name_path", ["train.py", "--resume", "checkpoints/digits/last.pt", "train.max_steps=4",
                                         "--overwrite"], 1, r"run_name.*'\.\./\.\./x'",
         setup=lambda w: (with_run(run_name="../../x")(w), decoy(w)), keep=("../x/*",)),
    # 5. no sample grids: the run completes and keeps its checkpoint
    Case("num_sample_images_zero", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2",
                                    "train.num_sample_images=0"], 0, r"finished", absent=("results/images/*/*.png",)),
    # 6. the thread count is a config field, recorded in the checkpoint; a resume warns when it differs
    Case("cpu_threads_field", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=1", "train.cpu_threads=2"],
         0, r"cpu \(2 threads\)"),
    Case("cpu_threads_differ_at_resume", ["train.py", "--resume", "checkpoints/digits/last.pt", "train.max_steps=4",
                                          "train.cpu_threads=2"], 0,
         r"(?=.*warning: the checkpoint was trained with 1 CPU thread.*uses 2)(?=.*resuming at step 3)",
         setup=with_run()),
    # 7. --resume without a config after the quickstart names the runs that exist and how to resume them
    Case("resume_names_existing_runs", ["train.py", "--resume"], 1,
         r"no checkpoint at checkpoints/cifar10/last\.pt; runs that exist: run 'digits': "
         r"python train\.py --resume checkpoints/digits/last\.pt", setup=with_run(), keep=("checkpoints/*/*",)),
    # 8. --resume FOLDER: its last.pt, else its newest step file
    Case("resume_folder", ["train.py", "--resume", "checkpoints/digits", "train.max_steps=4"], 0,
         r"resuming at step 3", setup=with_run(), keep=("checkpoints/digits/step_0000003.pt",)),
    Case("resume_folder_without_last", ["train.py", "--resume", "checkpoints/digits", "train.max_steps=4"], 0,
         r"resuming at step 3", setup=with_run(drop_last=True), keep=("checkpoints/digits/step_0000003.pt",)),
    # 9. flags and key=value overrides in any order
    Case("flags_between_overrides", ["train.py", *TINY[:3], "--config", DIGITS, "run_name=x", "--overwrite",
                                     *TINY[3:], "train.max_steps=2"], 0, r"finished x"),
    # 10. every value by its rule in config.RANGES: finite, in range, from any source (issue #23); these were
    # torch tracebacks, runs that trained to garbage with exit 0, or a NaN loss at step 2
    *[Case(f"value_{key}_{value}", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=3", f"{key}={value}"], 1,
           rf"config key '{key}' must be {re.escape(allowed)}", absent=("checkpoints/*",))
      for key, value, allowed in [
          ("train.lr", ".nan", "> 0 and finite"), ("train.lr", "inf", "> 0 and finite"),
          ("train.weight_decay", ".nan", ">= 0 and finite"), ("train.cond_drop_prob", "5", "in [0, 1] and finite"),
          ("diffusion.min_snr_gamma", ".nan", "> 0 and finite"), ("train.grad_clip", ".nan", "finite"),
          ("model.norm_eps", ".nan", "> 0 and finite"), ("train.adam_beta1", "1.5", "in [0, 1) and finite"),
          ("model.norm_groups", "0", "> 0"), ("seed", "99999999999999999999999", "in [0, 2**63-1]"),
          ("seed", "-1", "in [0, 2**63-1]")]],
    Case("value_min_snr_gamma_in_a_yaml_preset", ["train.py", "--config", "my.yaml", *TINY, "train.max_steps=3"], 1,
         r"config key 'diffusion\.min_snr_gamma' must be > 0 and finite, got nan",
         setup=write("my.yaml", "data:\n  dataset: digits\ndiffusion:\n  loss_weighting: min_snr\n"
                                "  min_snr_gamma: .nan\n"),
         keep=("my.yaml",)),
    Case("value_toy_num_points_zero", ["train.py", "--config", TOY2D, *TOY_TINY, "data.toy_num_points=0"], 1,
         r"'data\.toy_num_points' must be > 0", absent=("checkpoints/*",)),
    Case("value_stored_lr_nan_resume", ["train.py", "--resume", "checkpoints/digits/last.pt", "train.max_steps=4"], 1,
         r"'train\.lr' must be > 0 and finite, got nan", setup=with_run(lr=float("nan")),
         keep=("checkpoints/digits/*",)),
    Case("value_stored_lr_nan_distill", ["distill.py", "--teacher", "checkpoints/digits/last.pt", "--start-steps", "4",
                                         "--steps", "2", "--round-steps", "1"], 1,
         r"'train\.lr' must be > 0 and finite, got nan", setup=with_run(lr=float("nan")),
         absent=("checkpoints/digits_distill",)),
    Case("value_distill_guidance_nan", ["distill.py", "--teacher", "checkpoints/digits/last.pt", "--start-steps", "4",
                                        "--steps", "2", "--round-steps", "1", "--guidance-scale", "nan"], 1,
         r"--guidance-scale must be finite, got nan", setup=with_run(), absent=("checkpoints/digits_distill",)),
    Case("value_distill_lr_nan", ["distill.py", "--teacher", "checkpoints/digits/last.pt", "--start-steps", "4",
                                  "--steps", "2", "--round-steps", "1", "train.lr=nan"], 1,
         r"'train\.lr' must be > 0 and finite, got nan", setup=with_run(), absent=("checkpoints/digits_distill",)),
    Case("argparse_error_exits_1", ["train.py", "--bogus"], 1, r"error: unrecognized arguments: --bogus"),
    # sanity: a valid tiny run still works
    Case("valid_tiny_run", ["train.py", "--config", DIGITS, *TINY, "train.max_steps=2", "run_name=ok"], 0,
         r"finished ok"),
]
# Files a passing case must leave behind (the harness checks only what must not change or appear).
EXPECT = {"num_sample_images_zero": ["checkpoints/digits/last.pt"],
          "cpu_threads_differ_at_resume": ["checkpoints/digits/step_0000004.pt"],
          "resume_folder": ["checkpoints/digits/step_0000004.pt"],
          "resume_folder_without_last": ["checkpoints/digits/last.pt", "checkpoints/digits/step_0000004.pt"],
          "flags_between_overrides": ["checkpoints/x/last.pt"]}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_safety_config(case, tmp_path):
    workdir = tmp_path / "home" / "work"
    run_case(case, workdir)
    for name in EXPECT.get(case.id, ()):
        assert (workdir / name).is_file(), f"{case.id}: {name} is missing"
