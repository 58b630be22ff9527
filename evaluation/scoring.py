"""Scores of generated images against cached reference statistics of a data set: the library behind
evaluate.py (and bench/quality.py): FID, k-NN precision/recall and classifier scores; see evaluate.py's
docstring for the protocol."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from config import DataConfig
from evaluation.features import extract, load_split_uint8, split_dataset
from evaluation.metrics import EvalError, classifier_scores, frechet_distance, gaussian_stats, precision_recall
from storage.files import write_output
from storage.paths import FID_REFS, plain_name

PR_MAX_REF = 10_000  # reference features kept for precision/recall (10k x 2048 float32 = 80 MB for Inception)


def reference_key(dataset: str, split: str, image_size: int, extractor_name: str, num_images: int) -> str:
    """Cache file stem: everything the reference statistics depend on. "noflip": of the un-augmented images
    (caches written before that, of randomly flipped images when data.random_flip was on, are not reused)."""
    plain_name("--dataset", dataset, "the reference statistics' cache file", "--dataset digits")
    return f"{dataset}-{split}-{image_size}px-{extractor_name}-n{num_images}-noflip"


def reference_source(data_cfg: DataConfig) -> str:
    """The data set part of the key: an image folder is named by a hash of its absolute path (two folders are
    two data sets), the other data sets by their name (their files are the official ones)."""
    if data_cfg.dataset != "folder":
        return data_cfg.dataset
    import hashlib
    return f"folder{hashlib.sha256(str(Path(data_cfg.root).resolve()).encode()).hexdigest()[:8]}"


def _save_npz_atomic(path: Path, folder: Path, **arrays) -> None:
    write_output(path, lambda f: np.savez(f, **arrays), replace=True, root=folder)  # a cache we own (in folder)


def reference_stats(data_cfg: DataConfig, split: str, extractor, num_ref: Optional[int] = None,
                    cache_dir: Path = FID_REFS, batch_size: int = 250, seed: int = 0) -> dict:
    """Mean and covariance of the features of a data split (all of it, or a seeded subset of num_ref images),
    classifier scores, and the features of at most PR_MAX_REF of its images for precision/recall; computed
    once and cached as <cache_dir>/<reference_key>.npz (plain arrays, loaded without pickle)."""
    dataset = split_dataset(data_cfg, split)
    n = len(dataset) if num_ref is None else min(num_ref, len(dataset))
    held = data_cfg.holdout if split == data_cfg.split else 0  # that split without its held-out images
    key = reference_key(reference_source(data_cfg), f"{split}-minus{held}" if held else split, data_cfg.image_size,
                        extractor.name, n)
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        images, _ = load_split_uint8(data_cfg, split, limit=n, seed=seed, dataset=dataset)
        feats, logits = extract(extractor, images, batch_size, desc="reference features")
        mu, sigma = gaussian_stats(feats)
        scores = classifier_scores(logits)
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:PR_MAX_REF].sort().values.numpy()
        _save_npz_atomic(path, Path(cache_dir), features=feats[keep], mu=mu, sigma=sigma, ref_is=scores["is"],
                         ref_label_entropy=scores["label_entropy"], root=str(data_cfg.root))
        print(f"cached reference statistics of {n} {data_cfg.dataset} {split} images in {path}")
    ref = read_reference(path, getattr(extractor, "feature_dim", None))
    ref.update(key=key, path=str(path), dataset=data_cfg.dataset, split=split, image_size=data_cfg.image_size,
               num_images=n, extractor=extractor.name)
    return ref


REFERENCE_ARRAYS = ("features", "mu", "sigma", "ref_is", "ref_label_entropy", "root")


def reference_problem(ref: dict, feature_dim: Optional[int]) -> Optional[str]:
    """What is wrong with the arrays of a reference cache (missing, misshapen, non-finite), or None."""
    missing = [name for name in REFERENCE_ARRAYS if name not in ref]
    if missing:
        return f"it has no {', '.join(missing)}"
    mu, sigma, feats = ref["mu"], ref["sigma"], ref["features"]
    dim = mu.shape[0] if mu.ndim == 1 else None
    if dim is None or sigma.shape != (dim, dim) or feats.ndim != 2 or feats.shape[1] != dim or len(feats) < 2:
        return f"its shapes do not fit (mu {mu.shape}, sigma {sigma.shape}, features {feats.shape})"
    if feature_dim is not None and dim != feature_dim:
        return f"its features are {dim}-d but the feature extractor's are {feature_dim}-d"
    numbers = [mu, sigma, feats, ref["ref_is"], ref["ref_label_entropy"]]
    if any(a.dtype.kind != "f" or not np.isfinite(a).all() for a in numbers):
        return "it holds non-numbers or NaN/inf"
    return None


def read_reference(path: Path, feature_dim: Optional[int]) -> dict:
    """The arrays of a reference cache (plain arrays: no pickle); a damaged one is an EvalError naming the
    file (it is the user's file: never deleted or rewritten here)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = {name: z[name] for name in z.files}
        problem = reference_problem(ref, feature_dim)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad headers, pickled (object) arrays
        problem = f"it does not load ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})"
    if problem:
        raise EvalError(f"the reference statistics cache '{path}' is damaged: {problem}. Delete it and run again "
                        f"to recompute it")
    return ref


def feature_metrics(feats: np.ndarray, logits: np.ndarray, ref: dict, k: int = 3, seed: int = 0) -> dict:
    """FID, precision/recall (N samples vs N seeded reference features) and classifier scores."""
    fid = frechet_distance(*gaussian_stats(feats), ref["mu"], ref["sigma"])
    n = min(len(feats), len(ref["features"]))  # equal set sizes for k-NN precision/recall
    pick = torch.randperm(len(ref["features"]), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    precision, recall = precision_recall(ref["features"][np.sort(pick)], feats[:n], k)
    return {"fid": fid, "precision": precision, "recall": recall, "pr_k": k, "pr_num": n,
            **classifier_scores(logits), "ref_is": float(ref["ref_is"]),
            "ref_label_entropy": float(ref["ref_label_entropy"])}


def count_problem(num_samples: int, num_refs: Optional[int], k: int, also_at=()) -> Optional[str]:
    """Whether the counts fit each other, checked before any sampling: k-NN precision/recall needs more than k
    samples and reference features, and each --also-at N is a first-N subset with more than k samples."""
    if k >= num_samples or (num_refs is not None and k >= num_refs):
        refs = "" if num_refs is None else f" and {num_refs} reference features"
        return (f"--k {k} needs more than {k} samples and reference images, there are {num_samples} samples{refs}: "
                f"lower --k or raise --num-samples / --num-ref")
    bad = [n for n in also_at if not k < n <= num_samples]
    if bad:
        return (f"--also-at {' '.join(map(str, bad))}: each N must be more than --k {k} and at most the "
                f"{num_samples} samples scored")
    return None


def score_images(images: torch.Tensor, ref: dict, extractor, k: int = 3, batch_size: int = 250,
                 seed: int = 0, also_at: tuple[int, ...] = ()) -> dict:
    """Metrics of uint8 images (N, C, H, W) against reference statistics; with also_at, the metrics of the
    first n images for each n as well (under "at_n"), to compare with runs of n samples."""
    problem = count_problem(len(images), len(ref["features"]), k, also_at)
    if problem:
        raise EvalError(problem)
    feats, logits = extract(extractor, images, batch_size, desc="sample features")
    metrics = feature_metrics(feats, logits, ref, k, seed)
    smaller = sorted({n for n in also_at if k < n < len(feats)})
    if smaller:
        metrics["at_n"] = {str(n): feature_metrics(feats[:n], logits[:n], ref, k, seed) for n in smaller}
    return metrics
