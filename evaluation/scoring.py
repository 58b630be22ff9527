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
from evaluation.metrics import classifier_scores, frechet_distance, gaussian_stats, precision_recall
from storage.paths import FID_REFS

PR_MAX_REF = 10_000  # reference features kept for precision/recall (10k x 2048 float32 = 80 MB for Inception)


def reference_key(dataset: str, split: str, image_size: int, extractor_name: str, num_images: int) -> str:
    """Cache file stem: everything the reference statistics depend on. "noflip": of the un-augmented images
    (caches written before that, of randomly flipped images when data.random_flip was on, are not reused)."""
    return f"{dataset}-{split}-{image_size}px-{extractor_name}-n{num_images}-noflip"


def reference_source(data_cfg: DataConfig) -> str:
    """The data set part of the key: an image folder is named by a hash of its absolute path (two folders are
    two data sets), the other data sets by their name (their files are the official ones)."""
    if data_cfg.dataset != "folder":
        return data_cfg.dataset
    import hashlib
    return f"folder{hashlib.sha256(str(Path(data_cfg.root).resolve()).encode()).hexdigest()[:8]}"


def _save_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


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
        _save_npz_atomic(path, features=feats[keep], mu=mu, sigma=sigma, ref_is=scores["is"],
                         ref_label_entropy=scores["label_entropy"], root=str(data_cfg.root))
        print(f"cached reference statistics of {n} {data_cfg.dataset} {split} images in {path}")
    with np.load(path, allow_pickle=False) as z:
        ref = {name: z[name] for name in z.files}
    ref.update(key=key, path=str(path), dataset=data_cfg.dataset, split=split, image_size=data_cfg.image_size,
               num_images=n, extractor=extractor.name)
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


def score_images(images: torch.Tensor, ref: dict, extractor, k: int = 3, batch_size: int = 250,
                 seed: int = 0, also_at: tuple[int, ...] = ()) -> dict:
    """Metrics of uint8 images (N, C, H, W) against reference statistics; with also_at, the metrics of the
    first n images for each n as well (under "at_n"), to compare with runs of n samples."""
    feats, logits = extract(extractor, images, batch_size, desc="sample features")
    metrics = feature_metrics(feats, logits, ref, k, seed)
    smaller = sorted({n for n in also_at if k < n < len(feats)})
    if smaller:
        metrics["at_n"] = {str(n): feature_metrics(feats[:n], logits[:n], ref, k, seed) for n in smaller}
    return metrics
