"""evaluate.py, metrics.py and features.py: Frechet distance and k-NN precision/recall against closed forms,
the digit classifier, the cached reference statistics, the Inception loading logic (with a locally made weights
file: no network, no real weights) and the JSON protocol line of a full CLI run on a tiny checkpoint."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
import evaluation.features as feat
import evaluation.metrics as mt
import evaluation.scoring as scoring
from config import DataConfig, load_config, to_dict
from model import build_model
from storage.checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def digits_cfg(size: int = 8) -> DataConfig:
    return DataConfig(dataset="digits", image_size=size, random_flip=False, download=False)


# ----------------------------------------------------------------------------- Frechet distance
def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 16))
    assert mt.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fid_grows_monotonically_with_noise():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2000, 8))
    noise = rng.normal(size=feats.shape)
    fids = [mt.fid_from_features(feats, feats + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert fids[0] == pytest.approx(0.0, abs=1e-8)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 4, size=6), rng.uniform(0.1, 4, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert mt.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    import scipy.linalg as scipy_linalg  # installed with scikit-learn
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    s1, s2 = A @ A.T / 20, B @ B.T / 20 + 1e-3 * np.eye(20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert mt.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_gaussian_distance():
    rng = np.random.default_rng(4)
    a, b = np.array([1.0, 0.25, 2.0]), np.array([0.5, 1.0, 2.0])
    x = rng.normal(size=(200_000, 3)) * np.sqrt(a)
    y = rng.normal(size=(200_000, 3)) * np.sqrt(b) + 0.5
    expected = 3 * 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert mt.fid_from_features(x, y) == pytest.approx(expected, abs=0.02)


def test_frechet_distance_is_finite_and_real_for_singular_covariances():
    feats = np.random.default_rng(5).normal(size=(10, 50))  # N < D: rank-deficient covariance
    value = mt.fid_from_features(feats, feats[::-1] + 1.0)
    assert np.isfinite(value) and value == pytest.approx(50.0, rel=1e-6)  # same covariance, shifted mean


# ----------------------------------------------------------------------------- precision / recall
def test_knn_radii_on_a_line():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(mt.knn_radii(points, k=1), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(mt.knn_radii(points, k=2, chunk=3), torch.tensor([3.0, 2.0, 3.0, 6.0]))


def test_precision_recall_identical_disjoint_and_half_covered():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(300, 4))
    assert mt.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert mt.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Two far-apart modes in the real data; the fakes cover only one: all fakes are good, half the reals missed.
    two_modes = np.concatenate([real[:150], real[150:] + 50.0])
    one_mode = rng.normal(size=(300, 4))
    precision, recall = mt.precision_recall(two_modes, one_mode)
    assert precision > 0.85 and 0.4 < recall <= 0.5
    both_modes = np.concatenate([one_mode[:150], one_mode[150:] + 50.0])
    precision, recall = mt.precision_recall(two_modes, both_modes)
    assert precision > 0.85 and recall > 0.85


def test_classifier_scores_extremes():
    K = 10
    confident_balanced = 50.0 * np.eye(K)[np.arange(200) % K]   # each class predicted with certainty, equally
    scores = mt.classifier_scores(confident_balanced)
    assert scores["is"] == pytest.approx(K, rel=1e-6) and scores["label_entropy"] == pytest.approx(1.0, rel=1e-6)
    collapsed = 50.0 * np.eye(K)[np.zeros(200, dtype=int)]      # mode collapse onto one class
    scores = mt.classifier_scores(collapsed)
    assert scores["is"] == pytest.approx(1.0, abs=1e-6) and scores["label_entropy"] == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- digit classifier
@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> Path:
    """A classifier trained briefly on scikit-learn's 8x8 digits, saved where evaluate.py looks."""
    ckpt = feat.train_classifier(digits_cfg(8), "train", steps=120, batch_size=64, lr=3e-3, progress=False)
    path = feat.classifier_path("digits", 8, tmp_path_factory.mktemp("classifiers"))
    save_checkpoint(ckpt, path)
    return path


def test_classifier_trains_to_a_sane_accuracy_and_reloads(classifier_file):
    model, meta = feat.load_classifier(classifier_file)
    assert meta["accuracy"] > 0.85, meta  # on a held-out 10% of the 1797 digits
    assert meta["accuracy_on"].startswith("held-out") and meta["num_test"] + meta["num_train"] == 1797
    images, labels = feat.load_split_uint8(digits_cfg(8), "train")
    assert images.dtype == torch.uint8 and images.shape == (1797, 1, 8, 8)
    assert feat.classifier_accuracy(model, images, labels) > 0.85


def test_missing_classifier_names_the_command(tmp_path):
    with pytest.raises(ev.EvalError, match="python evaluate.py train-classifier --dataset mnist --image-size 28"):
        feat.load_classifier(feat.classifier_path("mnist", 28, tmp_path))


def test_extractors_take_only_uint8_images(classifier_file):
    extractor = feat.ClassifierFeatures(classifier_file, torch.device("cpu"))
    with pytest.raises(TypeError, match="uint8"):
        feat.extract(extractor, torch.zeros(4, 1, 8, 8))
    feats, logits = feat.extract(extractor, torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    assert feats.shape == (4, 128) and logits.shape == (4, 10)


def test_classifier_fid_separates_real_digits_from_noise(classifier_file):
    extractor = feat.ClassifierFeatures(classifier_file, torch.device("cpu"))
    images, _ = feat.load_split_uint8(digits_cfg(8), "train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half_a, half_b = images[order[:800]], images[order[800:1600]]
    feats_a, _ = feat.extract(extractor, half_a)
    feats_b, _ = feat.extract(extractor, half_b)
    noise = torch.randint(0, 256, half_b.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    jitter = torch.randn(half_b.shape, generator=torch.Generator().manual_seed(2))
    fids = [mt.fid_from_features(feats_a, feats_b)]  # real vs real, then increasingly noisy digits
    for std in (10, 40):
        noisy = (half_b.float() + std * jitter).clamp(0, 255).round().to(torch.uint8)
        fids.append(mt.fid_from_features(feats_a, feat.extract(extractor, noisy)[0]))
    fids.append(mt.fid_from_features(feats_a, feat.extract(extractor, noise)[0]))
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    precision, recall = mt.precision_recall(feats_a, feats_b)
    assert precision > 0.6 and recall > 0.6
    noise_precision, noise_recall = mt.precision_recall(feats_a, feat.extract(extractor, noise)[0])
    assert noise_precision < precision - 0.3 and noise_recall < 0.1


def test_metrics_of_a_prefix_equal_the_metrics_of_a_smaller_run(classifier_file, tmp_path):
    extractor = feat.ClassifierFeatures(classifier_file, torch.device("cpu"))
    ref = scoring.reference_stats(digits_cfg(8), "train", extractor, cache_dir=tmp_path)
    images = torch.randint(0, 256, (60, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    both = scoring.score_images(images, ref, extractor, also_at=(30,))
    assert both["at_n"]["30"] == scoring.score_images(images[:30], ref, extractor)
    assert both["pr_num"] == 60 and both["fid"] != both["at_n"]["30"]["fid"]


# ----------------------------------------------------------------------------- reference cache
class CountingExtractor:
    """Flattened pixels as features; counts calls to prove the cache is used."""

    def __init__(self, name: str = "pixels"):
        self.name, self.calls = name, 0

    def __call__(self, images):
        self.calls += 1
        x = images.flatten(1).float()
        return x, x[:, :10]


def test_reference_key_changes_with_every_ingredient():
    base = scoring.reference_key("mnist", "train", 28, "classifier-mnist28-abcd1234", 60000)
    others = [scoring.reference_key("mnist", "train", 32, "classifier-mnist28-abcd1234", 60000),
              scoring.reference_key("mnist", "train", 28, "inception-v3-2015-12-05", 60000),
              scoring.reference_key("mnist", "train", 28, "classifier-mnist28-ffff0000", 60000),
              scoring.reference_key("mnist", "test", 28, "classifier-mnist28-abcd1234", 60000),
              scoring.reference_key("fashion_mnist", "train", 28, "classifier-mnist28-abcd1234", 60000),
              scoring.reference_key("mnist", "train", 28, "classifier-mnist28-abcd1234", 1000)]
    assert len({base, *others}) == 1 + len(others)


def digits_pixels_by_hand() -> np.ndarray:
    """scikit-learn's 8x8 digits (ink 0..16) as the uint8 pixels the pipeline should feed the extractor,
    computed without the repository's code: v -> round(v * 255 / 16), flattened to (1797, 64)."""
    from sklearn.datasets import load_digits
    return np.round(load_digits().images.reshape(-1, 64) * (255 / 16))


def mean_and_unbiased_cov_by_hand(x) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    mu = x.sum(axis=0) / len(x)
    centered = x - mu
    return mu, centered.T @ centered / (len(x) - 1)


def test_reference_stats_are_computed_once_and_cached(tmp_path):
    extractor = CountingExtractor()
    ref = scoring.reference_stats(digits_cfg(8), "train", extractor, num_ref=300, cache_dir=tmp_path, batch_size=100)
    assert extractor.calls == 3 and ref["features"].shape == (300, 64) and ref["num_images"] == 300
    assert Path(ref["path"]).name == "digits-train-8px-pixels-n300-noflip.npz"
    digits = {row.tobytes() for row in digits_pixels_by_hand()}
    assert all(row.astype(np.float64).tobytes() in digits for row in ref["features"])  # real digit images
    mu, sigma = mean_and_unbiased_cov_by_hand(ref["features"])
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-10)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-10, atol=1e-9)
    again = scoring.reference_stats(digits_cfg(8), "train", extractor, num_ref=300, cache_dir=tmp_path)
    assert extractor.calls == 3  # served from the cache
    np.testing.assert_array_equal(again["features"], ref["features"])
    scoring.reference_stats(digits_cfg(16), "train", extractor, num_ref=300, cache_dir=tmp_path, batch_size=100)
    assert extractor.calls == 6 and len(list(tmp_path.glob("*.npz"))) == 2  # another resolution, another file


def test_reference_keeps_a_capped_feature_subset_but_full_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "PR_MAX_REF", 100)
    ref = scoring.reference_stats(digits_cfg(8), "train", CountingExtractor(), cache_dir=tmp_path)  # all 1797
    pixels = digits_pixels_by_hand()
    assert ref["features"].shape == (100, 64) and ref["num_images"] == len(pixels) == 1797
    digits = {row.tobytes() for row in pixels}
    assert all(row.astype(np.float64).tobytes() in digits for row in ref["features"])
    mu, sigma = mean_and_unbiased_cov_by_hand(pixels)  # of the whole split, not of the kept subset
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-10)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-10, atol=1e-9)


def test_classifier_extractor_name_tracks_the_weights(classifier_file, tmp_path):
    name = feat.ClassifierFeatures(classifier_file, torch.device("cpu")).name
    ckpt = torch.load(classifier_file, weights_only=True)
    ckpt["model"]["head.1.bias"] += 1.0
    other = tmp_path / "digits_8.pt"
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format_version"}, other)
    assert name.startswith("classifier-digits8-")
    assert feat.ClassifierFeatures(other, torch.device("cpu")).name != name


# ----------------------------------------------------------------------------- Inception loading
@pytest.fixture
def no_inception_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(feat, "INCEPTION_DIR", tmp_path / "inception")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(feat, "_online", lambda url, timeout=5.0: False)
    return tmp_path


def test_offline_without_inception_weights_says_which_file_to_put_where(no_inception_anywhere):
    with pytest.raises(ev.EvalError) as info:
        feat.find_inception_weights()
    message = str(info.value)
    assert feat.INCEPTION_URL in message and feat.INCEPTION_FILE in message
    assert str(no_inception_anywhere / "inception" / feat.INCEPTION_FILE) in message
    assert "--inception-weights" in message
    with pytest.raises(ev.EvalError, match="no Inception weights at 'nowhere.pth'"):
        feat.find_inception_weights("nowhere.pth")


def test_inception_weights_are_found_in_the_data_folder_and_torch_hub(no_inception_anywhere):
    hub_file = no_inception_anywhere / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert feat.find_inception_weights() == hub_file  # pytorch-fid's copy of the same file
    local = no_inception_anywhere / "inception" / feat.INCEPTION_FILE
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x")
    assert feat.find_inception_weights() == local


@pytest.fixture(scope="module")
def fake_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised state dict with the real layout (the real file is not on this machine)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception  # requirements.txt: torch-fidelity
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = inception.FeatureExtractorInceptionV3("x", ["2048"])
    path = tmp_path_factory.mktemp("inception") / feat.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_from_a_local_weights_file(fake_inception_weights, monkeypatch, capsys):
    extractor = feat.build_extractor("inception", "cifar10", 32, torch.device("cpu"),
                                   inception_weights=str(fake_inception_weights))
    assert not extractor.official and extractor.name.startswith("inception-v3-custom-")
    assert "not the standard FID Inception file" in capsys.readouterr().err
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)  # grey is repeated to RGB
    feats, logits = feat.extract(extractor, grey)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and np.isfinite(feats).all()
    monkeypatch.setattr(feat, "INCEPTION_SHA256_PREFIX", feat._sha256(fake_inception_weights)[:8])
    assert feat.InceptionFeatures(fake_inception_weights, torch.device("cpu")).name == "inception-v3-2015-12-05"


class NotAWeight:
    pass


def test_inception_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / feat.INCEPTION_FILE
    torch.save({"fc.weight": NotAWeight()}, path)
    with pytest.raises(ev.EvalError, match="not a valid Inception weights file"):
        feat.InceptionFeatures(path, torch.device("cpu"))


# ----------------------------------------------------------------------------- the CLI and its JSON line
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained 8x8 digits U-Net in the train.py checkpoint format."""
    cfg = load_config("configs/digits.yaml", ["data.image_size=8", "model.channels=16", "model.channel_mult=[1]",
                                              "model.attention_resolutions=[]", "model.norm_groups=8",
                                              "diffusion.num_timesteps=50", "run_name=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint({"step": 7, "config": to_dict(cfg), "model": model.state_dict(),
                     "ema": model.state_dict()}, path)
    return path


def eval_args(tmp_path, classifier_file, *extra):
    return ["--features", "classifier", "--classifier-dir", str(classifier_file.parent),
            "--ref-dir", str(tmp_path / "refs"), "--results-dir", str(tmp_path / "eval"), "--num-ref", "200",
            "--batch-size", "16", "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("sampler, steps", [("dpmpp2m", "3"), ("ddim", "3"), ("ddpm", None)])
def test_cli_writes_one_json_line_with_the_protocol(tiny_checkpoint, classifier_file, tmp_path, sampler, steps):
    args = ["--checkpoint", str(tiny_checkpoint), "--num-samples", "20", "--sampler", sampler, "--seed", "3",
            "--also-at", "10"]  # an N above --num-samples is refused (test_safety_tools.py)
    args += ["--steps", steps] if steps else []
    assert ev.main(args + eval_args(tmp_path, classifier_file)) == 0
    lines = (tmp_path / "eval" / "tiny.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["checkpoint"] == str(tiny_checkpoint) and record["checkpoint_step"] == 7 and record["ema"] is True
    assert record["sampler"] == sampler and record["steps"] == (int(steps) if steps else None)
    assert record["eta"] == 0.0 and record["num_samples"] == 20 and record["seed"] == 3
    assert record["feature_extractor"].startswith("classifier-digits8-")
    assert record["reference"] | {"cache": None, "root": None} == {
        "dataset": "digits", "split": "train", "image_size": 8, "num_images": 200, "cache": None, "root": None}
    metrics = record["metrics"]
    assert {"fid", "precision", "recall", "is", "label_entropy", "ref_is"} <= set(metrics)
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and metrics["pr_num"] == 20
    assert list(metrics["at_n"]) == ["10"] and metrics["at_n"]["10"]["pr_num"] == 10
    assert record["sampling_wall_s"] > 0 and record["date"][:4].isdigit()


def test_cli_scores_a_png_folder_and_real_digits_beat_noise(classifier_file, tmp_path):
    images, _ = feat.load_split_uint8(digits_cfg(8), "train", limit=100, seed=5)
    rng = np.random.default_rng(0)
    for name, batch in [("real", images[:, 0].numpy()), ("noise", rng.integers(0, 256, (100, 8, 8), np.uint8))]:
        (tmp_path / name).mkdir()
        for i, image in enumerate(batch):
            Image.fromarray(image).save(tmp_path / name / f"{i:06d}.png")
        assert ev.main(["--samples", str(tmp_path / name), "--dataset", "digits"]
                       + eval_args(tmp_path, classifier_file)) == 0
    metrics = {n: json.loads((tmp_path / "eval" / f"{n}.jsonl").read_text())["metrics"] for n in ("real", "noise")}
    assert metrics["real"]["fid"] < metrics["noise"]["fid"] / 4, metrics  # N=100 < 128 dims: FID is biased up
    assert metrics["real"]["recall"] > 0.8 > 0.2 > metrics["noise"]["recall"], metrics


def test_cli_errors_are_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "no_classifiers" / "x.pt"
    args = ["--checkpoint", str(tiny_checkpoint), "--num-samples", "8"] + eval_args(tmp_path, missing)
    assert ev.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no classifier at") and "Traceback" not in err
    assert ev.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert ev.main(["--samples", str(tmp_path)]) == 1
    assert "--samples needs --dataset" in capsys.readouterr().err


def test_train_classifier_cli(tmp_path, capsys):
    assert ev.main(["train-classifier", "--dataset", "digits", "--image-size", "8", "--steps", "30",
                    "--batch-size", "32", "--device", "cpu", "--classifier-dir", str(tmp_path)]) == 0
    assert "classifier accuracy" in capsys.readouterr().out
    model, meta = feat.load_classifier(tmp_path / "digits_8.pt")
    assert meta["dataset"] == "digits" and meta["image_size"] == 8 and meta["steps"] == 30
    assert math.isfinite(meta["accuracy"])


# ----------------------------------------------------------------------------- bench/quality.py's report
def load_bench():
    import bench.quality
    return bench.quality


def test_bench_rewrites_only_its_own_section(tmp_path):
    bench = load_bench()
    path = tmp_path / "RESULTS.md"
    bench.write_section(f"{bench.START}\nfirst\n{bench.END}", path)
    assert path.read_text() == f"{bench.START}\nfirst\n{bench.END}\n"
    other = "<!-- throughput:start -->\nthroughput table\n<!-- throughput:end -->"
    path.write_text(f"# Results\n\n{other}\n\n{bench.START}\nfirst\n{bench.END}\n\ntrailer\n")
    bench.write_section(f"{bench.START}\nsecond\n{bench.END}", path)
    assert path.read_text() == f"# Results\n\n{other}\n\n{bench.START}\nsecond\n{bench.END}\n\ntrailer\n"
    path.write_text(f"# Results\n\n{other}\n")
    bench.write_section(f"{bench.START}\nthird\n{bench.END}", path)
    assert path.read_text() == f"# Results\n\n{other}\n\n{bench.START}\nthird\n{bench.END}\n"


def test_bench_targets_compare_the_right_rows():
    targets = load_bench().targets({("dpmpp2m", 20, "all"): 10.0, ("ddim", 50, "all"): 11.0,
                                    ("ddim", 50, "small"): 13.0, ("ddpm", 1000, "small"): 10.0})
    assert "holds (FID 10.00 vs 11.00)" in targets[0]
    assert "does NOT hold (FID 13.00 vs 10.00, +30.0%)" in targets[1]  # compared at the DDPM sample count


def test_bench_table_averages_fids_over_sampling_seeds():
    bench = load_bench()

    def record(sampler, steps, n, fid, fid_small=None, eta=0.0):
        metrics = {"fid": fid, "precision": 0.5, "recall": 0.7, "is": 9.0}
        if fid_small is not None:
            metrics["at_n"] = {"250": {"fid": fid_small}}
        return {"sampler": sampler, "steps": steps, "eta": eta, "num_samples": n, "metrics": metrics,
                "sampling_wall_s": 10.0}
    groups = [[record("ddpm", None, 250, f) for f in (14.0, 16.0)],
              [record("ddim", 50, 500, f, f + 10) for f in (10.0, 12.0)],
              [record("ddim", 50, 500, f, f - 5, eta=1.0) for f in (8.0, 8.0)]]
    floors = {n: {"fid": [4.0, 6.0], "precision": [0.9, 0.9], "recall": [0.9, 0.9], "is": [9.8, 9.8]}
              for n in (250, 500)}
    rows = bench.table_rows(groups, floors, 500, 250)
    assert rows[2].startswith("| DDPM | 1000 | – | 15.00 ± 1.41 |") and "(N=250)" in rows[2]
    assert rows[3].startswith("| DDIM (eta=0) | 50 | 11.00 ± 1.41 | 21.00 ± 1.41 | 0.500 | 0.700 | 9.00 |")
    assert rows[4].startswith("| DDIM (eta=1) | 50 | 8.00 ± 0.00 | 3.00 ± 0.00 |")
    assert rows[5].startswith("| real MNIST test images (the metric's floor) | – | 5.00 ± 1.41 | 5.00 ± 1.41 |")
    # The targets are about deterministic DDIM: the eta=1 row must not stand in for DDIM-50.
    args = bench.parse_args(["--num-samples", "500", "--ddpm-samples", "250"])
    info = {"date": "d", "machine": "m", "commit": "c", "load": (0.0, 0.0), "command": "python -m bench.quality",
            "params": 1e6, "train_s": 60.0, "classifier": {"accuracy": 0.99, "accuracy_on": "held-out"},
            "num_ref": 10000, "total_min": 1.0, "overrides": "seed=0"}
    section = bench.render(args, groups, floors, info)
    assert "(FID 21.00 vs 15.00, +40.0%)" in section
    assert bench.mean_sd([3.0]) == "3.00"


def test_bench_distillation_rows_and_targets_compare_students_with_the_right_rows():
    bench = load_bench()

    def record(steps, fid, wall, student=False, spacing="leading"):
        source = {"teacher": "t.pt", "student_steps": steps, "teacher_start_steps": 64, "guidance_scale": 1.0}
        return {"sampler": "ddim", "steps": steps, "eta": 0.0, "num_samples": 100, "timestep_spacing": spacing,
                "metrics": {"fid": fid, "precision": 0.5, "recall": 0.7, "is": 9.0}, "sampling_wall_s": wall,
                "distilled_from": source if student else None}
    groups = [[record(50, 10.0, 50.0)], [record(4, 40.0, 4.0, spacing="trailing")],
              [record(4, 12.0, 4.0, student=True, spacing="trailing")],
              [record(8, 30.0, 8.0, spacing="trailing")], [record(8, 11.5, 8.0, student=True, spacing="trailing")]]
    floors = {100: {"fid": [4.0], "precision": [0.9], "recall": [0.9], "is": [9.8]}}
    rows = bench.table_rows(groups, floors, 100, 100)
    assert rows[2].startswith("| DDIM (eta=0) | 50 | 10.00 |")
    assert rows[3].startswith("| DDIM (eta=0, trailing grid) | 4 | 40.00 |")
    assert rows[4].startswith("| **student** of DDIM-64 (progressive distillation) | 4 | 12.00 |")
    args = bench.parse_args(["--num-samples", "100", "--ddpm-samples", "100", "--section", "distill"])
    info = {"date": "d", "machine": "m", "commit": "c", "load": (0.0, 0.0), "command": "python -m bench.quality",
            "params": 1e6, "train_s": 60.0, "classifier": {"accuracy": 0.99, "accuracy_on": "held-out"},
            "num_ref": 9000, "total_min": 1.0, "overrides": "seed=0",
            "distill": {"command": "python distill.py", "wall_s": 120.0, "rounds": [[8, 60.0], [4, 60.0]]}}
    section = bench.render(args, groups, floors, info)
    assert section.startswith("<!-- distill:start -->") and section.endswith("<!-- distill:end -->")
    assert "\"4-step student's FID ≤ 1.25x the teacher's DDIM-50\": holds (FID 12.00 vs 10.00 = 1.20x; " \
           "the teacher's DDIM-4: FID 40.00)" in section
    assert "\"8-step student's FID ≤ 1.1x the teacher's DDIM-50\": does NOT hold (FID 11.50 vs 10.00" in section
    assert "draws 25 images/s, the teacher's DDIM-50 2 images/s (12.5x faster" in section
    assert "(8 steps 1.0 min, 4 steps 1.0 min)" in section


def test_bench_exits_cleanly_without_the_data(tmp_path, capsys):
    assert load_bench().main(["--data", str(tmp_path / "nothing")]) == 0
    assert "MNIST test split not found" in capsys.readouterr().out


def test_png_folder_written_by_sample_py_skips_grid_and_trajectory(tmp_path):
    """sample.py puts grid.png and trajectory.png beside the numbered samples; only the samples count."""
    from PIL import Image

    from evaluate import load_png_folder
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(np.zeros((30, 30), dtype=np.uint8)).save(tmp_path / "grid.png")
    Image.fromarray(np.zeros((10, 60), dtype=np.uint8)).save(tmp_path / "trajectory.png")
    images = load_png_folder(tmp_path, channels=1)
    assert images.shape == (3, 1, 8, 8) and images[2].max().item() == 80
