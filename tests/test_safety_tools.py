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


def stored_value(dotted, value):
    """c.pt whose stored config holds one value out of range (past config.validate, as a hand-edited file)."""
    def setup(root: Path):
        cfg = tiny_config()
        section, _, key = dotted.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, key, value)
        make_checkpoint(root / "c.pt", cfg)
    return setup


def exported(**changes):
    """p/: export.py's diffusers folder of a tiny model, its config.json then edited."""
    def setup(root: Path):
        from interop.diffusers import export_diffusers
        cfg = tiny_config()
        export_diffusers(cfg, random_state(cfg, 1), root / "p")
        path = next(root.glob("p/**/config.json"))
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return setup


def stored_config_key(root: Path):
    cfg = to_dict(tiny_config())
    save_checkpoint({"step": 1, "config": {**cfg, "bogus": 1}, "model": {}, "ema": {}}, root / "c.pt")


def classifier(meta_change: dict = (), width: int = 32):
    """clf/digits_8.pt, a digit classifier as train-classifier writes it (random weights), its config changed."""
    def setup(root: Path):
        from evaluation.features import DigitClassifier
        torch.manual_seed(0)
        meta = {"kind": "digit_classifier", "dataset": "digits", "split": "train", "image_size": 8, "channels": 1,
                "num_classes": 10, "steps": 1, "seed": 0, "accuracy": 0.5, "accuracy_on": "x", "num_train": 1,
                "num_test": 1}
        meta = {k: v for k, v in {**meta, **dict(meta_change)}.items() if v is not None}  # None: the key removed
        save_checkpoint({"config": meta, "model": DigitClassifier(10, 1, width=width).state_dict()},
                        root / "clf" / "digits_8.pt")
    return setup


def damaged_reference(how: str):
    """refs/<key>.npz as evaluate.py caches it for c.pt and clf/, then damaged: cut short, or an array dropped."""
    def setup(root: Path):
        import numpy as np

        from evaluation.features import ClassifierFeatures
        from evaluation.scoring import reference_stats
        cfg = tiny_config()
        ref = reference_stats(cfg.data, cfg.data.split, ClassifierFeatures(root / "clf" / "digits_8.pt", "cpu"),
                              None, root / "refs")
        path = Path(ref["path"])
        if how == "cut":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files if k != how}
            np.savez(path.with_suffix(""), **arrays)  # np.savez adds the .npz
    return setup


def nonfinite(*names, key="ema"):
    """c.pt with NaN in the given tensors of its `key` weights (a run that diverged before the save)."""
    def setup(root: Path):
        cfg = tiny_config()
        state = {"step": 5, "config": to_dict(cfg), "model": random_state(cfg, 1), "ema": random_state(cfg, 2)}
        for name in names:
            state[key][name] = state[key][name] * float("nan")
        save_checkpoint(state, root / "c.pt")
    return setup


def raw_pickle(root: Path):
    import pickle
    (root / "c.pt").write_bytes(pickle.dumps({"config": {}, "model": {}}))


def doctored_manifest(folder):
    """An earlier run's folder whose manifest also lists the user's own files under plain names."""
    names = ["grid.png", "000000.png"]
    spec = {f"{folder}/{name}": "earlier run" for name in names}
    spec[f"{folder}/{sample.MANIFEST}"] = json.dumps({"files": names + ["notes.txt", "mine.png", "000001.png.bak"]})
    return files({**spec, f"{folder}/notes.txt": "mine", f"{folder}/mine.png": "mine", f"{folder}/000001.png.bak": "m"})


def link(name, target, folder=False):
    """`name` is a symlink to `target` (a folder when `folder`), both relative to the working folder."""
    def setup(root: Path):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        if folder:
            (root / target).mkdir(exist_ok=True)
        elif not (root / target).exists():
            (root / target).write_text("the user's file")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(root / target, target_is_directory=folder)
    return setup


FULL_DISK = {"PYTHONPATH": str(Path(__file__).parent / "full_disk")}  # with DDPM_TEST_FULL_DISK: fsync fails
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
    Case("sample_eta_nan", [*SAMPLE, "--eta", "nan", "--out", "o"], 1, r"--eta must be in \[0, 1\] and finite, got nan",
         ckpt(),
         absent=("o",)),
    Case("sample_eta_above_one", [*SAMPLE, "--eta", "2", "--out", "o"], 1, r"--eta must be in \[0, 1\]", ckpt(),
         absent=("o",)),
    Case("sample_eta_with_ddpm", ["sample.py", "--checkpoint", "c.pt", "--sampler", "ddpm", "--eta", "0.5", *CPU], 1,
         r"--eta is used only by the ddim sampler; ddpm ignores it", ckpt()),
    Case("sample_eta_with_dpmpp2m", [*SAMPLE, "--sampler", "dpmpp2m", "--eta", "1"], 1, r"only by the ddim", ckpt()),
    Case("sample_spacing_with_ddpm", ["sample.py", "--checkpoint", "c.pt", "--sampler", "ddpm",
                                      "--timestep-spacing", "trailing", *CPU], 1, r"ddpm visits all T steps", ckpt()),
    Case("evaluate_eta_with_dpmpp2m", [*EVALUATE, "--sampler", "dpmpp2m", "--eta", "0.5"], 1, r"only by the ddim",
         ckpt()),
    Case("evaluate_eta_nan", [*EVALUATE, "--eta", "nan"], 1, r"--eta must be in \[0, 1\]", ckpt()),
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
    # 14. every value by the rules of config.RANGES, wherever it comes from (issue #23)
    Case("sample_stored_norm_eps_nan", [*SAMPLE, "--out", "o"], 1, r"'model\.norm_eps' must be > 0 and finite",
         stored_value("model.norm_eps", float("nan")), absent=("o",)),
    Case("sample_stored_seed_beyond_64_bits", [*SAMPLE, "--out", "o"], 1, r"'seed' must be in \[0, 2\*\*63-1\]",
         stored_value("seed", 2 ** 70), absent=("o",)),
    Case("pretrained_norm_eps_nan", ["sample.py", "--pretrained", "p", "--steps", "2", "--out", "o", *CPU], 1,
         r"config\.json.*'model\.norm_eps' must be > 0 and finite, got nan", exported(norm_eps=float("nan")),
         absent=("o",)),
    Case("sample_seed_beyond_64_bits", [*SAMPLE, "--seed", str(2 ** 70), "--out", "o"], 1,
         r"--seed must be in \[0, 2\*\*63-1\]", ckpt(), absent=("o",)),
    Case("sample_steps_not_a_number_exits_1", [*SAMPLE, "--steps", "abc"], 1, r"error: argument --steps", ckpt()),
    Case("sample_num_samples_negative_exits_1", [*SAMPLE, "--num-samples", "-1"], 1, r"argument --num-samples",
         ckpt()),
    Case("evaluate_seed_beyond_64_bits", [*EVALUATE, "--seed", str(2 ** 70)], 1, r"--seed must be in \[0, 2\*\*63-1\]",
         ckpt()),
    Case("evaluate_guidance_scale_nan", [*EVALUATE, "--guidance-scale", "nan"], 1, r"--guidance-scale must be finite",
         ckpt()),
    Case("evaluate_steps_zero", [*EVALUATE, "--steps", "0"], 1, r"--steps must be > 0", ckpt()),
    Case("train_classifier_lr_nan", ["evaluate.py", "train-classifier", "--dataset", "digits", "--lr", "nan",
                                     "--classifier-dir", "clf", *CPU], 1, r"--lr must be > 0 and finite",
         absent=("clf",)),
    Case("export_bad_format_exits_1", ["export.py", "--checkpoint", "c.pt", "--out", "o", "--format", "onnx"], 1,
         r"argument --format", ckpt(), absent=("o",)),
    # 15. classifier files and reference caches of evaluate.py are untrusted input: one line naming the file
    Case("evaluate_classifier_config_missing_key", [*EVALUATE], 1,
         r"classifier 'clf/digits_8\.pt' is damaged: its config has num_classes=None.*Delete it to retrain",
         both(ckpt(), classifier({"num_classes": None})), keep=("clf/*",)),
    Case("evaluate_classifier_config_wrong_type", [*EVALUATE], 1,
         r"channels='one', not a whole number.*train-classifier",
         both(ckpt(), classifier({"channels": "one"})), keep=("clf/*",)),
    Case("evaluate_classifier_config_absurd", [*EVALUATE], 1, r"num_classes=0, not a whole number in 2\.\.",
         both(ckpt(), classifier({"num_classes": 0})), keep=("clf/*",)),
    Case("evaluate_classifier_weights_do_not_fit", [*EVALUATE], 1, r"damaged: its weights do not fit its config",
         both(ckpt(), classifier(width=16)), keep=("clf/*",)),
    Case("evaluate_reference_cache_truncated", [*EVALUATE, "--ref-dir", "refs"], 1,
         r"reference statistics cache 'refs/digits-.*\.npz' is damaged: it does not load.*Delete it",
         both(ckpt(), classifier(), damaged_reference("cut")), keep=("refs/*",)),
    Case("evaluate_reference_cache_without_sigma", [*EVALUATE, "--ref-dir", "refs"], 1,
         BEFORE_SAMPLING + r".*cache '.*' is damaged: it has no sigma", both(ckpt(), classifier(),
                                                                                damaged_reference("sigma")),
         keep=("refs/*",)),
    # 16. every count checked before sampling
    Case("evaluate_k_above_the_samples", [*EVALUATE, "--k", "100000"], 1,
         BEFORE_SAMPLING + r".*--k 100000 needs more than 100000 samples", both(ckpt(), classifier())),
    Case("evaluate_also_at_negative", [*EVALUATE, "--also-at", "-3"], 1, r"--also-at must be a positive integer, got -3",
         both(ckpt(), classifier())),
    Case("evaluate_also_at_above_the_samples", [*EVALUATE, "--also-at", "40"], 1, r"--also-at 40: .*at most the 4",
         both(ckpt(), classifier())),
    Case("evaluate_k_above_the_references", [*EVALUATE, "--num-samples", "8", "--batch-size", "8", "--num-ref", "3"],
         1, r"--k 3 needs more than 3 samples and reference images.*3 reference", both(ckpt(), classifier())),
    Case("train_classifier_negative_steps", ["evaluate.py", "train-classifier", "--dataset", "digits", "--steps", "-5",
                                             *CPU], 1, r"\A(?!.*loading).*--steps must be > 0, got -5"),
    Case("evaluate_samples_folder_missing", ["evaluate.py", "--samples", "nope", "--dataset", "digits"], 1,
         r"--samples 'nope' does not exist"),
    # 17. weights that are NaN/inf are refused, naming the tensors (they would sample blank images)
    Case("sample_nan_ema_weights", [*SAMPLE, "--out", "o"], 1,
         r"EMA weights hold NaN or inf in 2 tensors \(time_mlp\.0\.bias, conv_in\.weight\).*--no-ema",
         nonfinite("conv_in.weight", "time_mlp.0.bias"), keep=("c.pt",), absent=("o",)),
    Case("sample_no_ema_nan_raw_weights", [*SAMPLE, "--no-ema", "--out", "o"], 1, r"raw weights hold NaN",
         nonfinite("conv_in.weight", key="model"), absent=("o",)),
    Case("export_nan_ema_weights", ["export.py", "--checkpoint", "c.pt", "--out", "o"], 1, r"EMA weights hold NaN",
         nonfinite("conv_in.weight"), absent=("o",)),
    Case("evaluate_nan_ema_weights", [*EVALUATE], 1, BEFORE_SAMPLING + r".*EMA weights hold NaN",
         both(nonfinite("conv_in.weight"), classifier())),
    # 18. a raw pickle is named as such, not called truncated
    Case("sample_raw_pickle", [*SAMPLE], 1, r"\A(?!.*truncated).*'c\.pt' is a raw pickle file, not a torch\.save",
         raw_pickle, keep=("c.pt",)),
    # 19. names that become paths are plain names (config.plain_name)
    Case("evaluate_run_name_is_a_path", [*EVALUATE, "--run-name", "../../x"], 1,
         r"--run-name = '\.\./\.\./x' is not a plain name", ckpt(), absent=("x.jsonl", "results")),
    Case("evaluate_run_name_absolute", [*EVALUATE, "--run-name", "/tmp/x"], 1, r"--run-name = '/tmp/x' is not a plain",
         ckpt()),
    Case("evaluate_dataset_is_a_path", [*EVALUATE, "--dataset", "../../x"], 1,
         r"--dataset = '\.\./\.\./x' is not a plain", ckpt()),
    # 20. the output guard: no link out, no replacing without the flag, a full disk as one line
    Case("sample_forward_keeps_an_existing_figure", ["sample.py", "--checkpoint", "c.pt", "--forward", *CPU], 1,
         r"'results/plots/tiny/forward_noise\.png' already exists: .*--overwrite",
         both(ckpt(), files({"results/plots/tiny/forward_noise.png": "mine"})),
         keep=("results/plots/tiny/forward_noise.png",)),
    Case("sample_forward_figure_is_a_link_out", ["sample.py", "--checkpoint", "c.pt", "--forward", "--overwrite", *CPU],
         1, r"is a symbolic link", both(ckpt(), link("results/plots/tiny/forward_noise.png", "victim.png")),
         keep=("victim.png",)),
    Case("sample_overwrite_ignores_doctored_manifest_names", [*SAMPLE, "--out", "out", "--overwrite",
                                                               "--num-samples", "2"], 0, r"wrote 2 images",
         both(ckpt(), doctored_manifest("out")), keep=("out/notes.txt", "out/mine.png", "out/000001.png.bak")),
    Case("sample_default_folder_is_a_link_out", ["sample.py", "--steps", "2", *CPU], 1,
         r"outside 'results' \(through the link 'results/images/tiny'\)",
         both(ckpt("checkpoints/tiny/last.pt"), link("results/images/tiny", "elsewhere", folder=True)),
         absent=("elsewhere/*",)),
    Case("export_subfolder_is_a_link_out", ["export.py", "--checkpoint", "c.pt", "--out", "o", "--force"], 1,
         r"outside 'o' \(through the link 'o/unet'\)", both(ckpt(), link("o/unet", "elsewhere", folder=True)),
         absent=("elsewhere/*", "o/model_index.json")),
    Case("sample_disk_full", [*SAMPLE, "--out", "out"], 1,
         r"error: no space left on device writing 'out/000001\.png' \([\d.]+ [KMG]B free\): free some space or "
         r"choose another --out", ckpt(), env={**FULL_DISK, "DDPM_TEST_FULL_DISK": "000001.png"},
         absent=("out/000001.png",)),
    Case("export_disk_full", ["export.py", "--checkpoint", "c.pt", "--out", "o"], 1,
         r"no space left on device writing 'o/unet/diffusion_pytorch_model\.safetensors'", ckpt(),
         env={**FULL_DISK, "DDPM_TEST_FULL_DISK": ".safetensors"}, absent=("o/unet/*.safetensors",)),
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
