"""Safety table of sample.py, evaluate.py and export.py (issue #12): what a user sees and keeps.

Checkpoints are built as in test_sample.py (random weights, no training). Each case failed on the code
before the fix (commit e5797e2): data loss, a traceback, a late or misleading error, or a wrong result.
"""
import json
from pathlib import Path

import pytest
import torch
from test_sample import make_checkpoint, random_state, tiny_config

import sample
from config import to_dict
from safety import Case, run_case
from storage.checkpoints import save_checkpoint

CPU = ["--device", "cpu"]
SAMPLE = ["sample.py", "--checkpoint", "c.pt", "--steps", "2", *CPU]
EVALUATE = ["evaluate.py", "--checkpoint", "c.pt", "--features", "classifier", "--classifier-dir", "clf",
            "--num-samples", "4", "--batch-size", "4", "--quiet"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
BEFORE_SAMPLING = r"\A(?!.*sampling \d+ with)"  # the error came before any sampling started


# ----------------------------------------------------------------------------- setups
def ckpt(path="c.pt", *extra, run_name="tiny"):
    def setup(root: Path):
        make_checkpoint(root / path, tiny_config(run_name, extra=extra))
    return setup


def both(*setups):
    def setup(root: Path):
        for s in setups:
            s(root)
    return setup


def files(spec: dict):
    """{relative path: bytes or text}: the user's files."""
    def setup(root: Path):
        for name, content in spec.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            (root / name).write_bytes(data)
    return setup


def user_pngs(folder, n=20):
    return files({f"{folder}/{i:06d}.png": f"user image {i}" for i in range(n)})


def earlier_run(folder, n=10):
    """A folder an earlier sample.py run wrote (its manifest lists its files) plus the user's own files."""
    names = ["grid.png"] + [f"{i:06d}.png" for i in range(n)]
    spec = {f"{folder}/{name}": "earlier run" for name in names}
    spec[f"{folder}/{sample.MANIFEST}"] = json.dumps({"files": names + ["../victim.txt"]})
    return files({**spec, f"{folder}/notes.txt": "mine", f"{folder}/mine.png": "mine", "victim.txt": "mine"})


def diffusers_folder(folder, config):
    return files({f"{folder}/config.json": json.dumps(config) if not isinstance(config, str) else config})


def mismatched_weights(root: Path):
    """The stored config says 8 channels, the weights are of a 16-channel network."""
    cfg, other = tiny_config(), tiny_config(extra=["model.channels=16"])
    save_checkpoint({"step": 1, "config": to_dict(cfg), "model": random_state(other, 1),
                     "ema": random_state(other, 2)}, root / "c.pt")


class Pickled:
    """An object torch.load(weights_only=True) refuses: stands for a file with pickled code in it."""


def checkpoint_folder(root: Path):
    make_checkpoint(root / "ck/good.pt", tiny_config())
    (root / "ck/broken.pt").write_bytes(b"\x00garbage" * 50)
    torch.save({"config": {}, "model": {}, "x": Pickled()}, root / "ck/hostile.pt")
    (root / "ck/bad.pt").write_bytes(b"not a checkpoint" * 10)


def stored_run_name(name):
    def setup(root: Path):
        cfg = tiny_config()
        cfg.run_name = name  # past config.validate, as a hand-edited checkpoint would be
        make_checkpoint(root / "c.pt", cfg)
    return setup


def stored_config_key(root: Path):
    cfg = to_dict(tiny_config())
    save_checkpoint({"step": 1, "config": {**cfg, "bogus": 1}, "model": {}, "ema": {}}, root / "c.pt")


UNSUPPORTED = {"block_out_channels": [8, 16], "flip_sin_to_cos": True, "freq_shift": 0}

CASES = [
    # 1. output folders: nothing the user had is deleted or overwritten
    Case("sample_out_with_user_pngs_refused", [*SAMPLE, "--out", "out"], 1, r"not empty.*--overwrite",
         both(ckpt(), user_pngs("out")), keep=("out/*",)),
    Case("sample_overwrite_refuses_user_file_with_our_name", [*SAMPLE, "--out", "out", "--overwrite"], 1,
         r"out/000000\.png.*not written by sample\.py", both(ckpt(), user_pngs("out")), keep=("out/*",)),
    Case("sample_overwrite_replaces_only_its_own_files", [*SAMPLE, "--out", "out", "--overwrite",
                                                          "--num-samples", "4"], 0, r"wrote 4 images",
         both(ckpt(), earlier_run("out")), keep=("out/notes.txt", "out/mine.png", "victim.txt"),
         absent=("out/000004.png", "out/000009.png")),
    Case("sample_default_folder_taken_goes_to_next_free", ["sample.py", "--steps", "2", *CPU], 0,
         r"already holds samples.*ddim_2_0-2.*wrote.*ddim_2_0-2",
         both(ckpt("checkpoints/tiny/last.pt"), user_pngs("results/images/tiny/ddim_2_0", 3)),
         keep=("results/images/tiny/ddim_2_0/*",)),
    # 2. output paths are checked before the work
    Case("sample_out_is_a_file", [*SAMPLE, "--out", "o"], 1, BEFORE_SAMPLING + r".*'o' is a file, not a folder",
         both(ckpt(), files({"o": "user file"})), keep=("o",)),
    Case("evaluate_results_dir_is_a_file", [*EVALUATE, "--results-dir", "res"], 1, r"--results-dir 'res' is a file",
         both(ckpt(), files({"res": "user file"})), keep=("res",)),
    Case("evaluate_ref_dir_under_a_file", [*EVALUATE, "--ref-dir", "f/refs"], 1, r"--ref-dir 'f' is a file",
         both(ckpt(), files({"f": "user file"})), keep=("f",)),
    # 3. --pretrained config.json of the wrong shape or types
    Case("pretrained_config_not_an_object", ["sample.py", "--pretrained", "./p", *CPU], 1, r"JSON list, not an object",
         diffusers_folder("p", "[1, 2]")),
    Case("pretrained_config_wrong_types", ["sample.py", "--pretrained", "./p", *CPU], 1,
         r"block_out_channels must be a non-empty list of positive integers, got 'abc'",
         diffusers_folder("p", {"block_out_channels": "abc", "in_channels": 1})),
    Case("pretrained_unsupported_settings_one_line", ["sample.py", "--pretrained", "./p", *CPU], 1,
         r"flip_sin_to_cos.*; .*freq_shift", diffusers_folder("p", UNSUPPORTED)),
    # 4. counts and device before loading anything big
    Case("evaluate_num_samples_zero", [*EVALUATE, "--num-samples", "0"], 1, r"--num-samples must be a positive",
         ckpt()),
    Case("evaluate_batch_size_zero", [*EVALUATE, "--batch-size", "0"], 1, r"--batch-size must be a positive", ckpt()),
    pytest.param(Case("evaluate_cuda_without_cuda", [*EVALUATE, "--device", "cuda"], 1, r"CUDA is not available",
                      ckpt()), marks=NO_CUDA),
    # 5. eta out of range, and flags the sampler would ignore
    Case("sample_eta_nan", [*SAMPLE, "--eta", "nan", "--out", "o"], 1, r"--eta nan is outside \[0, 1\]", ckpt(),
         absent=("o",)),
    Case("sample_eta_above_one", [*SAMPLE, "--eta", "2", "--out", "o"], 1, r"outside \[0, 1\]", ckpt(), absent=("o",)),
    Case("sample_eta_with_ddpm", ["sample.py", "--checkpoint", "c.pt", "--sampler", "ddpm", "--eta", "0.5", *CPU], 1,
         r"--eta is used only by the ddim sampler; ddpm ignores it", ckpt()),
    Case("sample_eta_with_dpmpp2m", [*SAMPLE, "--sampler", "dpmpp2m", "--eta", "1"], 1, r"only by the ddim", ckpt()),
    Case("sample_spacing_with_ddpm", ["sample.py", "--checkpoint", "c.pt", "--sampler", "ddpm",
                                      "--timestep-spacing", "trailing", *CPU], 1, r"ddpm visits all T steps", ckpt()),
    Case("evaluate_eta_with_dpmpp2m", [*EVALUATE, "--sampler", "dpmpp2m", "--eta", "0.5"], 1, r"only by the ddim",
         ckpt()),
    Case("evaluate_eta_nan", [*EVALUATE, "--eta", "nan"], 1, r"outside \[0, 1\]", ckpt()),
    # 6. guidance on an unconditional model, in evaluate.py too
    Case("evaluate_guidance_unconditional", [*EVALUATE, "--guidance-scale", "2"], 1, r"needs a class-conditional",
         ckpt()),
    # 7. exactly the number of samples asked, on a class-conditional model
    Case("sample_num_samples_conditional", [*SAMPLE, "--num-samples", "4", "--out", "o"], 0, r"wrote 4 images",
         ckpt("c.pt", "model.num_classes=10"), absent=("o/000004.png",)),
    # 8. a mistyped local folder is not sent to the Hub
    Case("pretrained_mistyped_local_path", ["sample.py", "--pretrained", "./ddpm-cifr10-32", *CPU], 1,
         r"\A(?!.*hf download).*does not exist \(did you mean 'ddpm-cifar10-32'\?\)",
         diffusers_folder("ddpm-cifar10-32", {})),
    # 9. export --out an existing file
    Case("export_out_is_an_empty_file", ["export.py", "--checkpoint", "c.pt", "--out", "o"], 1,
         r"'o' is a file, not a folder", both(ckpt(), files({"o": ""})), keep=("o",)),
    # 10. 0-byte checkpoints
    Case("sample_empty_checkpoint", [*SAMPLE], 1, r"empty \(0 bytes\)", files({"c.pt": ""})),
    Case("evaluate_empty_checkpoint", [*EVALUATE], 1, r"empty \(0 bytes\)", files({"c.pt": ""})),
    Case("export_empty_checkpoint", ["export.py", "--checkpoint", "c.pt", "--out", "o"], 1, r"empty \(0 bytes\)",
         files({"c.pt": ""})),
    # 11. only checkpoints that load are offered instead of a broken one
    Case("sample_offers_only_loadable_checkpoints", ["sample.py", "--checkpoint", "ck/bad.pt", *CPU], 1,
         r"Other checkpoints in ck: good\.pt - ", checkpoint_folder),
    # 12. weights that do not fit the stored config: one full line naming the mismatch
    Case("sample_weights_do_not_fit_config", [*SAMPLE], 1,
         r"does not match its stored config \(time_mlp\.0\.weight has shape \(64, 16\) in the checkpoint but "
         r"\(32, 8\) in the model\)",
         mismatched_weights),
    # 13. the config stored in a checkpoint is validated by every tool
    Case("export_names_the_stored_config", ["export.py", "--checkpoint", "c.pt", "--out", "o"], 1,
         r"config stored in 'c\.pt' is not valid.*bogus", stored_config_key),
    Case("sample_stored_run_name_escapes", [*SAMPLE], 1, r"run_name", stored_run_name("../x"),
         absent=("results/x",)),
    Case("evaluate_stored_run_name_escapes", [*EVALUATE], 1, r"run_name", stored_run_name("../x"),
         absent=("results/x.jsonl",)),
    Case("export_stored_run_name_escapes", ["export.py", "--checkpoint", "c.pt", "--out", "o"], 1,
         r"run_name", stored_run_name("../x"), absent=("o",)),
]


def _id(case):
    return case.id if isinstance(case, Case) else None


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_safety(case, tmp_path):
    run_case(case, tmp_path)


def test_an_eta_stored_in_the_config_is_a_default_not_a_flag(tmp_path, monkeypatch):
    """sample.eta = 0.5 in a checkpoint's config does not stop the ddpm sampler (only an explicit --eta does)."""
    monkeypatch.chdir(tmp_path)
    make_checkpoint("c.pt", tiny_config(extra=["sample.eta=0.5", "sample.sampler=ddpm", "sample.steps=null"]))
    assert sample.main(["--checkpoint", "c.pt", "--num-samples", "2", "--out", "o", *CPU]) == 0
    assert len(list(Path("o").glob("0*.png"))) == 2
