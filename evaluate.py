"""Sample quality: FID, precision/recall and classifier scores of a checkpoint's samples (or a PNG folder)
against cached statistics of the training set.

    python evaluate.py --checkpoint checkpoints/mnist/last.pt --num-samples 10000 --sampler dpmpp2m --steps 20
    python evaluate.py --samples results/images/mnist/samples --dataset mnist
    python evaluate.py train-classifier --dataset mnist          # the digit classifier behind --features classifier

Protocol (each result is one JSON line in results/eval/<run_name>.jsonl, with everything below in it):
  - samples are drawn with a seeded generator, quantized to uint8 (utils.to_uint8_images) like saved PNGs,
    and only then fed to the feature extractor; the reference images go through the same quantization;
  - features: Inception-v3 pool3 (2048-d, the TTUR pt_inception-2015-12-05 weights, run by torch-fidelity,
    which resizes to 299 exactly as the original TensorFlow FID code), or for grey digit-like data the
    128-d penultimate layer of a small CNN trained on that data set ("classifier FID");
  - FID: Frechet distance of Gaussians fitted to the sample and reference features (Heusel et al. 2017);
  - precision / recall: k-NN manifolds (Kynkaanniemi et al. 2019, k=3), on equally many sample and reference
    features (a seeded subset of the reference), since k-NN radii depend on the set size;
  - classifier scores (when the extractor has logits): the Inception Score formula exp(E_x KL(p(y|x) || p(y)))
    (Salimans et al. 2016; with the digit classifier it is the usual "MNIST IS", at most the number of classes),
    and label_entropy = H(p(y)) / log(K), 1.0 when the predicted classes are perfectly balanced. The same
    scores of the reference images are stored next to them (ref_is, ref_label_entropy) for scale.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from config import SAMPLERS, SPACINGS, ConfigError, DataConfig
from utils import CheckpointError, get_device, load_checkpoint, resolve_amp, save_checkpoint, to_uint8_images

REF_DIR = Path("data/fid_refs")            # caches, relative to the working directory like train.py's outputs
CLASSIFIER_DIR = Path("data/classifiers")
INCEPTION_DIR = Path("data/inception")
CLASSIFIER_DATASETS = ("mnist", "fashion_mnist", "digits")
PR_MAX_REF = 10_000  # reference features kept for precision/recall (10k x 2048 float32 = 80 MB for Inception)
# torch-fidelity's copy of the TTUR FID Inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth is the
# same file): torch.hub names files <name>-<first 8 hex digits of the sha256>.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ALT_FILES = (INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class EvalError(RuntimeError):
    """A user-fixable problem (missing weights/classifier/samples); the message says what to do."""


# ============================================================================= metrics
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.
    (S1 S2)^{1/2} has the same eigenvalues as the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so its trace is
    the sum of their square roots: real by construction, with none of sqrtm's tiny imaginary parts."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded), (N,)."""
    radii = []
    for start in range(0, len(features), chunk):
        dist = torch.cdist(features[start:start + chunk], features)            # (chunk, N)
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, -1])     # k+1: the point itself is 0
    return torch.cat(radii)


def _inside_any_ball(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 1024) -> torch.Tensor:
    """(Q,) bool: whether each query lies within radius of at least one center."""
    inside = []
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start:start + chunk], centers)              # (chunk, C)
        inside.append((dist <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = share of fake samples inside the
    real k-NN manifold, recall = share of real samples inside the fake one."""
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    if min(len(real_t), len(fake_t)) <= k:
        raise EvalError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _inside_any_ball(fake_t, real_t, knn_radii(real_t, k)).float().mean().item()
    recall = _inside_any_ball(real_t, fake_t, knn_radii(fake_t, k)).float().mean().item()
    return precision, recall


def classifier_scores(logits: np.ndarray) -> dict:
    """Inception-Score formula exp(E_x KL(p(y|x) || p(y))) and the normalized entropy of p(y)."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)   # (N, K)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(log_p))              # (K,)
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
    entropy = -(log_marginal.exp() * log_marginal).sum()
    return {"is": float(kl.exp()), "label_entropy": float(entropy / math.log(log_p.shape[1]))}


# ============================================================================= digit classifier
class DigitClassifier(nn.Module):
    """Small CNN for grey images (any size >= 8): two conv stages, 4x4 pooled map, a 128-d feature layer."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def stage(cin: int, cout: int) -> list:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*stage(channels, width), *stage(width, 2 * width), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, H, W) in [-1, 1] -> (B, feature_dim)
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # -> (B, num_classes) logits
        return self.head(self.features(x))


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the inverse of utils.to_uint8_images."""
    return images.float() / 127.5 - 1.0


def _split_dataset(data_cfg: DataConfig, split: str):
    """The named split (build_dataset's training set is the split that data.split names)."""
    from dataset import build_dataset
    return build_dataset(dataclasses.replace(data_cfg, split=split), train=True)


def load_split_uint8(data_cfg: DataConfig, split: str, limit: Optional[int] = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as quantized images (N, C, S, S) uint8 and labels (N,), optionally a seeded subset."""
    dataset = _split_dataset(data_cfg, split)
    index = torch.arange(len(dataset))
    if limit is not None and limit < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    items = [dataset[int(i)] for i in tqdm(index, desc=f"loading {data_cfg.dataset} {split}", leave=False)]
    images = torch.stack([x for x, _ in items])
    labels = torch.stack([torch.as_tensor(y) for _, y in items]).long()
    return to_uint8_images(images), labels


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_frac: float = 0.08) -> torch.Tensor:
    """Per-image random translation by up to max_frac of the size (mild augmentation for samples'
    imperfect centering)."""
    shift = (torch.rand(len(x), 2, generator=generator) * 2 - 1) * 2 * max_frac     # affine units: 2 = full size
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with background -1


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(uint8_to_unit(images[i:i + batch])).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return correct / len(images)


def _classifier_eval_set(data_cfg: DataConfig, split: str, images, labels, seed: int):
    """(train images, train labels, test images, test labels, description of the test set): the other split
    when the data set has a distinct one on disk, else a seeded 10% held out of this split."""
    if split == "train" and data_cfg.dataset in ("mnist", "fashion_mnist"):
        from dataset import DatasetMissingError
        try:
            test_images, test_labels = load_split_uint8(data_cfg, "test")
            return images, labels, test_images, test_labels, f"{data_cfg.dataset} test split"
        except (DatasetMissingError, FileNotFoundError):
            pass
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = order[: max(1, len(images) // 10)]
    kept = order[len(held):]
    return images[kept], labels[kept], images[held], labels[held], f"held-out 10% of the {split} split"


def train_classifier(data_cfg: DataConfig, split: str = "train", steps: int = 2000, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Train a DigitClassifier; returns the checkpoint dict (config = metadata, model = state_dict)."""
    from dataset import dataset_info
    info = dataset_info(data_cfg)
    images, labels = load_split_uint8(data_cfg, split)
    train_x, train_y, test_x, test_y, test_name = _classifier_eval_set(data_cfg, split, images, labels, seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weight init and dropout
    model = DigitClassifier(max(info.num_classes, 2), info.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="training classifier", disable=not progress):
        index = torch.randint(len(train_x), (batch_size,), generator=generator)
        x = _random_shift(uint8_to_unit(train_x[index]), generator).to(device)
        loss = F.cross_entropy(model(x), train_y[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.cpu()
    accuracy = classifier_accuracy(model, test_x, test_y)
    meta = {"kind": "digit_classifier", "dataset": data_cfg.dataset, "split": split,
            "image_size": data_cfg.image_size, "channels": info.channels, "num_classes": max(info.num_classes, 2),
            "steps": steps, "seed": seed, "accuracy": accuracy, "accuracy_on": test_name,
            "num_train": len(train_x), "num_test": len(test_x)}
    return {"config": meta, "model": model.state_dict()}


def classifier_path(dataset: str, image_size: int, folder: Path = CLASSIFIER_DIR) -> Path:
    return Path(folder) / f"{dataset}_{image_size}.pt"


def load_classifier(path: Path) -> tuple[DigitClassifier, dict]:
    """(model in eval mode, metadata) from a file written by train-classifier, loaded weights_only."""
    path = Path(path)
    if not path.is_file():
        dataset, size = path.stem.rsplit("_", 1) if "_" in path.stem else (path.stem, "?")
        raise EvalError(f"no classifier at '{path}': train it once with `python evaluate.py train-classifier "
                        f"--dataset {dataset} --image-size {size}` (about a minute on a CPU), or use "
                        f"--features inception")
    ckpt = load_checkpoint(path)
    meta = ckpt["config"]
    if meta.get("kind") != "digit_classifier":
        raise EvalError(f"'{path}' is not a classifier written by `python evaluate.py train-classifier`")
    model = DigitClassifier(meta["num_classes"], meta["channels"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), meta


# ============================================================================= feature extractors
def _state_fingerprint(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]


class ClassifierFeatures:
    """uint8 (B, C, H, W) -> 128-d penultimate features and logits of a DigitClassifier."""

    def __init__(self, path: Path, device: torch.device):
        self.model, self.meta = load_classifier(path)
        self.model.to(device)
        self.device, self.image_size = device, self.meta["image_size"]
        self.name = (f"classifier-{self.meta['dataset']}{self.image_size}-"
                     f"{_state_fingerprint(self.model.state_dict())}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] != self.meta["channels"] or images.shape[-1] != self.image_size:
            raise EvalError(f"images of shape {tuple(images.shape[1:])} do not fit the classifier "
                            f"({self.meta['channels']} x {self.image_size} x {self.image_size}): train one for "
                            f"this size with `python evaluate.py train-classifier --image-size {images.shape[-1]}`")
        feats = self.model.features(uint8_to_unit(images).to(self.device))
        return feats.cpu(), self.model.head(feats).cpu()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _online(url: str, timeout: float = 5.0) -> bool:
    """Whether url's host answers, bounded in time even when DNS hangs (dataset.py's probe)."""
    from dataset import host_reachable
    return host_reachable(url, timeout)


def find_inception_weights(path: Optional[str] = None, download: bool = True) -> Path:
    """The FID Inception weights: `path`, else data/inception/ or torch.hub's cache, else a download into
    data/inception/. Offline without the file: one EvalError saying which file to put where."""
    where = INCEPTION_DIR / INCEPTION_FILE
    fix = (f"download {INCEPTION_URL} on a machine with internet and put it at '{where}' (or pass "
           f"--inception-weights PATH); for grey digits, --features classifier needs no download")
    if path is not None:
        if not Path(path).is_file():
            raise EvalError(f"no Inception weights at '{path}': {fix}")
        return Path(path)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for candidate in [folder / name for folder in (INCEPTION_DIR, hub) for name in INCEPTION_ALT_FILES]:
        if candidate.is_file():
            return candidate
    if not download or not _online(INCEPTION_URL):
        raise EvalError(f"the Inception-v3 FID weights ({INCEPTION_FILE}) are not on this machine and cannot be "
                        f"downloaded (no network): {fix}")
    where.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(where), hash_prefix=INCEPTION_SHA256_PREFIX)
    except Exception as err:  # timeouts, HTTP errors, hash mismatch
        raise EvalError(f"downloading the Inception weights failed ({err}): {fix}") from None
    return where


class InceptionFeatures:
    """uint8 (B, C, H, W) -> Inception-v3 pool3 features (2048-d) and logits, through torch-fidelity."""

    def __init__(self, weights: Path, device: torch.device):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise EvalError("--features inception needs torch-fidelity: pip install torch-fidelity") from None
        try:  # untrusted file: prove it holds only tensors before torch-fidelity loads it (weights_only=False)
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EvalError(f"'{weights}' is not a valid Inception weights file ({type(err).__name__}); "
                            f"fetch {INCEPTION_URL} again") from None
        sha = _sha256(weights)
        self.official = sha.startswith(INCEPTION_SHA256_PREFIX)
        # Other weights give other numbers: their features get their own name (and reference cache).
        self.name = "inception-v3-2015-12-05" if self.official else f"inception-v3-custom-{sha[:8]}"
        if not self.official:
            print(f"warning: '{weights}' is not the standard FID Inception file (sha256 {sha[:8]}..., expected "
                  f"{INCEPTION_SHA256_PREFIX}...): FIDs will not be comparable to published ones", file=sys.stderr)
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(weights)).to(device)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys, wrong shapes
            raise EvalError(f"'{weights}' does not fit torch-fidelity's Inception-v3 ({str(err).splitlines()[0]}); "
                            f"fetch {INCEPTION_URL}") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grey -> RGB
        feats, logits = self.model(images.to(self.device))
        return feats.cpu(), logits.cpu()


def build_extractor(kind: str, dataset: str, image_size: int, device: torch.device,
                    classifier_dir: Path = CLASSIFIER_DIR, inception_weights: Optional[str] = None):
    """kind auto: the digit classifier for grey digit-like data sets, Inception for everything else."""
    if kind == "auto":
        kind = "classifier" if dataset in CLASSIFIER_DATASETS else "inception"
    if kind == "classifier":
        return ClassifierFeatures(classifier_path(dataset, image_size, classifier_dir), device)
    return InceptionFeatures(find_inception_weights(inception_weights), device)


def extract(extractor, images: torch.Tensor, batch_size: int = 250, desc: str = "features"):
    """uint8 (N, C, H, W) -> (features (N, D) float32 numpy, logits (N, K) float32 numpy)."""
    if images.dtype != torch.uint8:  # the protocol: score exactly what a saved PNG would hold
        raise TypeError(f"feature extraction takes uint8 images (utils.to_uint8_images), got {images.dtype}")
    feats, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        f, lg = extractor(images[start:start + batch_size])
        feats.append(f)
        logits.append(lg)
    return torch.cat(feats).numpy().astype(np.float32), torch.cat(logits).numpy().astype(np.float32)


# ============================================================================= reference statistics
def reference_key(dataset: str, split: str, image_size: int, extractor_name: str, num_images: int) -> str:
    """Cache file stem: everything the reference statistics depend on."""
    return f"{dataset}-{split}-{image_size}px-{extractor_name}-n{num_images}"


def _save_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def reference_stats(data_cfg: DataConfig, split: str, extractor, num_ref: Optional[int] = None,
                    cache_dir: Path = REF_DIR, batch_size: int = 250, seed: int = 0) -> dict:
    """Mean and covariance of the features of a data split (all of it, or a seeded subset of num_ref images),
    classifier scores, and the features of at most PR_MAX_REF of its images for precision/recall; computed
    once and cached as <cache_dir>/<reference_key>.npz (plain arrays, loaded without pickle)."""
    dataset = _split_dataset(data_cfg, split)
    n = len(dataset) if num_ref is None else min(num_ref, len(dataset))
    key = reference_key(data_cfg.dataset, split, data_cfg.image_size, extractor.name, n)
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        images, _ = load_split_uint8(data_cfg, split, limit=n, seed=seed)
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


# ============================================================================= samples
def draw_samples(model, diffusion, cfg, args) -> tuple[torch.Tensor, Optional[int], float, float]:
    """Samples as uint8 (N, C, S, S) through sample.generate: one seeded CPU generator, so a seed gives the
    same samples on any device for a given batch size. Returns (images, steps, guidance, seconds)."""
    from sample import generate
    steps = args.steps if args.steps is not None else (None if args.sampler == "ddpm" else cfg.sample.steps)
    guidance = cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    labels = None
    if cfg.model.num_classes > 0:  # class-conditional: uniform labels from their own seeded generator
        label_gen = torch.Generator().manual_seed(args.seed + 1)
        labels = torch.randint(cfg.model.num_classes, (args.num_samples,), generator=label_gen).tolist()
    start = time.perf_counter()
    x0 = generate(model, diffusion, cfg, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                  sampler=args.sampler, steps=steps, eta=args.eta, timestep_spacing=args.timestep_spacing,
                  labels=labels, guidance_scale=guidance, clip_x0=cfg.sample.clip_x0, amp=args.amp,
                  progress=not args.quiet)
    return to_uint8_images(x0), steps, guidance, time.perf_counter() - start


def load_png_folder(folder: str | Path, channels: int) -> torch.Tensor:
    """All PNGs in a folder (sorted, not recursive) as uint8 (N, C, H, W); they must share one size."""
    from PIL import Image
    files = sorted(Path(folder).glob("*.png"))
    numbered = [f for f in files if f.stem.isdigit()]
    files = numbered or files  # sample.py writes 000000.png ... beside grid.png and trajectory.png
    if not files:
        raise EvalError(f"no .png files in '{folder}': pass the folder that sample.py wrote the images to")
    arrays = []
    for f in files:
        with Image.open(f) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        if arrays and array.shape != arrays[0].shape:
            raise EvalError(f"'{f}' is {array.shape[:2]} but '{files[0]}' is {arrays[0].shape[:2]}: the folder "
                            "must hold single samples of one size (no grids)")
        arrays.append(array)
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked[:, None] if channels == 1 else stacked.permute(0, 3, 1, 2).contiguous()


# ============================================================================= results
def write_result(record: dict, run_name: str, results_dir: Path = Path("results/eval")) -> Path:
    """Append one JSON line to <results_dir>/<run_name>.jsonl."""
    path = Path(results_dir) / f"{run_name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
    return path


SAMPLING_KEYS = ("sampler", "steps", "eta", "seed", "guidance_scale", "timestep_spacing", "amp", "sampling_wall_s")


def protocol_record(args, run_name: str, ckpt: Optional[dict], sampling: Optional[dict], num_samples: int,
                    extractor, ref: dict, metrics: dict, eval_wall_s: float) -> dict:
    """Everything needed to reproduce and compare a number (sampling fields are None for --samples)."""
    sampling = sampling or dict.fromkeys(SAMPLING_KEYS)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_name": run_name, "command": " ".join(["python evaluate.py", *sys.argv[1:]]),
        "checkpoint": args.checkpoint, "checkpoint_step": None if ckpt is None else int(ckpt.get("step", -1)),
        "ema": None if ckpt is None else (not args.no_ema and ckpt.get("ema") is not None),
        "samples_dir": args.samples, **sampling, "num_samples": num_samples, "batch_size": args.batch_size,
        "feature_extractor": extractor.name,
        "reference": {"dataset": ref["dataset"], "split": ref["split"], "image_size": int(ref["image_size"]),
                      "num_images": int(ref["num_images"]), "root": str(ref["root"]), "cache": ref["path"]},
        "metrics": metrics, "eval_wall_s": eval_wall_s,
        "device": str(args.device), "torch": torch.__version__, "host": platform.node(),
    }


# ============================================================================= command line
DEFAULT_SIZES = {"mnist": 28, "fashion_mnist": 28, "digits": 16}


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FID, precision/recall and classifier scores of a checkpoint's "
                                "samples (or a PNG folder) against cached training-set statistics. "
                                "Train the digit classifier with: python evaluate.py train-classifier --help")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="train.py checkpoint to sample from (e.g. checkpoints/mnist/last.pt)")
    src.add_argument("--samples", help="folder of sample PNGs to score instead (needs --dataset)")
    p.add_argument("--num-samples", type=int, default=10000, help="samples to draw (with --samples: the most "
                   "PNGs to read); FIDs are only comparable at equal N")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config; ddpm uses all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--timestep-spacing", choices=SPACINGS, help="default: the checkpoint's diffusion config")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="sampling autocast; auto = bf16 on GPUs and on CPUs with native bf16, else off")
    p.add_argument("--guidance-scale", type=float, default=None, help="class-conditional models (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--features", choices=("auto", "classifier", "inception"), default="auto",
                   help="auto: the digit classifier for mnist/fashion_mnist/digits, Inception-v3 otherwise")
    p.add_argument("--inception-weights", help=f"local {INCEPTION_FILE} (default: {INCEPTION_DIR}/ or download)")
    p.add_argument("--dataset", help="reference data set (default: the checkpoint's)")
    p.add_argument("--root", help="reference data folder (default: the checkpoint's data.root)")
    p.add_argument("--split", choices=("train", "test"), help="reference split (default: the training split)")
    p.add_argument("--image-size", type=int, help="reference resolution (default: the checkpoint's / the PNGs')")
    p.add_argument("--num-ref", type=int, default=None, help="reference images (default: the whole split)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    p.add_argument("--also-at", type=int, nargs="*", default=[], metavar="N",
                   help="also score the first N samples (to compare with a run of N samples)")
    p.add_argument("--run-name", help="results/eval/<run-name>.jsonl (default: the checkpoint's run_name)")
    p.add_argument("--results-dir", default="results/eval")
    p.add_argument("--ref-dir", default=str(REF_DIR))
    p.add_argument("--classifier-dir", default=str(CLASSIFIER_DIR))
    p.add_argument("--quiet", action="store_true", help="no per-step progress bars")
    return p


def _reference_config(args, cfg=None) -> DataConfig:
    """The reference data: the checkpoint's data section (its training split) with flags on top."""
    base = vars(cfg.data) if cfg is not None else {"root": "data", "split": "train"}
    return DataConfig(**{**base, "dataset": args.dataset or base.get("dataset"), "root": args.root or base["root"],
                         "split": args.split or base["split"],
                         "image_size": args.image_size or base.get("image_size") or getattr(args, "png_size", None)})


def evaluate_main(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    device = get_device(args.device)
    args.device = str(device)
    cfg = ckpt = images = None
    if args.samples is not None:
        if not args.dataset:
            raise EvalError("--samples needs --dataset (and --root where the data lives) to pick the reference")
        images = load_png_folder(args.samples, 3 if args.dataset in ("cifar10", "folder") else 1)
        images = images[: args.num_samples]
        args.png_size = images.shape[-1]
        run_name = args.run_name or Path(args.samples).name
    else:
        from sample import load_for_sampling
        model, diffusion, cfg, ckpt = load_for_sampling(args.checkpoint, device, use_ema=not args.no_ema)
        if cfg.data.dataset == "toy2d":
            raise EvalError("FID and precision/recall here are for images; toy2d checkpoints are 2-D points")
        args.sampler = args.sampler or cfg.sample.sampler
        run_name = args.run_name or cfg.run_name
    data_cfg = _reference_config(args, cfg)
    # Extractor and reference first: a missing classifier or weights file fails before minutes of sampling.
    extractor = build_extractor(args.features, data_cfg.dataset, data_cfg.image_size, device,
                                Path(args.classifier_dir), args.inception_weights)
    ref = reference_stats(data_cfg, data_cfg.split, extractor, args.num_ref, Path(args.ref_dir), args.batch_size)
    sampling = None
    if images is None:
        images, steps, guidance, seconds = draw_samples(model, diffusion, cfg, args)
        sampling = {"sampler": args.sampler, "steps": steps, "eta": args.eta, "seed": args.seed,
                    "guidance_scale": guidance, "timestep_spacing": args.timestep_spacing or
                    cfg.diffusion.timestep_spacing, "amp": resolve_amp(args.amp, device), "sampling_wall_s": seconds}
    start = time.perf_counter()
    metrics = score_images(images, ref, extractor, args.k, args.batch_size, args.seed, tuple(args.also_at))
    record = protocol_record(args, run_name, ckpt, sampling, len(images), extractor, ref, metrics,
                             time.perf_counter() - start)
    path = write_result(record, run_name, Path(args.results_dir))
    what = f"{args.sampler} steps={sampling['steps']}" if sampling else f"PNGs in {args.samples}"
    print(f"{run_name} ({what}, N={len(images)}, features {extractor.name}, reference {ref['key']}):")
    for label, values in [(f"N={len(images)}", metrics), *[(f"N={n}", m) for n, m in metrics.get("at_n", {}).items()]]:
        print(f"  {label}: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in values.items() if k != "at_n"))
    took = f"sampling took {sampling['sampling_wall_s']:.1f} s; " if sampling else ""
    print(f"  {took}result appended to {path}")
    return 0


def train_classifier_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py train-classifier",
                                description="Train and cache the digit classifier whose features give "
                                            "--features classifier FIDs.")
    p.add_argument("--dataset", choices=CLASSIFIER_DATASETS, required=True)
    p.add_argument("--root", default="data")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--image-size", type=int, help="default: the preset's (mnist/fashion_mnist 28, digits 16)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-download", action="store_true", help="never touch the network")
    p.add_argument("--classifier-dir", default=str(CLASSIFIER_DIR))
    args = p.parse_args(argv)
    size = args.image_size or DEFAULT_SIZES[args.dataset]
    data_cfg = DataConfig(dataset=args.dataset, root=args.root, split=args.split, image_size=size,
                          random_flip=False, download=not args.no_download)
    ckpt = train_classifier(data_cfg, args.split, args.steps, args.batch_size, args.lr, args.seed,
                            get_device(args.device))
    path = classifier_path(args.dataset, size, Path(args.classifier_dir))
    save_checkpoint(ckpt, path)
    meta = ckpt["config"]
    print(f"classifier accuracy {meta['accuracy']:.4f} on {meta['accuracy_on']} ({meta['num_test']} images); "
          f"trained {meta['steps']} steps on {meta['num_train']} images; saved to {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from dataset import DatasetMissingError
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train-classifier"]:
            return train_classifier_main(argv[1:])
        return evaluate_main(argv)
    except (ConfigError, CheckpointError, DatasetMissingError, EvalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
