"""Feature extractors of evaluate.py: the digit classifier behind --features classifier (model, training,
loading) and torch-fidelity's Inception-v3 behind --features inception (finding, downloading and checking
its weights), plus the uint8 image loading both the classifier training and the reference statistics use."""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from config import DataConfig
from evaluation.metrics import EvalError
from limits import check_memory
from sampling.pictures import to_uint8_images
from storage.checkpoint_checks import nonfinite_problem
from storage.checkpoints import load_checkpoint
from storage.paths import CLASSIFIERS, INCEPTION, plain_name

CLASSIFIER_DIR = CLASSIFIERS  # caches under data/ (storage/paths.py)
INCEPTION_DIR = INCEPTION
CLASSIFIER_DATASETS = ("mnist", "fashion_mnist", "digits")
# torch-fidelity's copy of the TTUR FID Inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth is the
# same file): torch.hub names files <name>-<first 8 hex digits of the sha256>.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ALT_FILES = (INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


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


def split_dataset(data_cfg: DataConfig, split: str):
    """The named split as stored: never augmented (data.random_flip is a training setting; reference statistics
    and classifier data are of the images themselves, and deterministic). build_dataset's training set is the
    split that data.split names."""
    from dataset import build_dataset
    holdout = data_cfg.holdout if split == data_cfg.split else 0  # data.holdout is a part of data.split only
    return build_dataset(dataclasses.replace(data_cfg, split=split, random_flip=False, holdout=holdout), train=True)


def load_split_uint8(data_cfg: DataConfig, split: str, limit: Optional[int] = None, seed: int = 0,
                     dataset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as quantized images (N, C, S, S) uint8 and labels (N,), optionally a seeded subset.
    `dataset`: the split already built by split_dataset (saves reading it twice)."""
    dataset = dataset if dataset is not None else split_dataset(data_cfg, split)
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
    problem = classifier_settings_problem(data_cfg.image_size, steps, batch_size, lr)
    if problem:  # before the data set is read
        raise EvalError(f"train-classifier {problem}")
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


def classifier_settings_problem(image_size, steps: int, batch_size: int, lr: float) -> Optional[str]:
    for flag, value, low in [("--image-size", image_size, 8), ("--steps", steps, 1), ("--batch-size", batch_size, 1)]:
        if not isinstance(value, int) or value < low:
            return f"{flag} {value}: must be a whole number >= {low}"
    if not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        return f"--lr {lr}: must be a positive number"
    return None


def classifier_path(dataset: str, image_size: int, folder: Path = CLASSIFIER_DIR) -> Path:
    """<folder>/<dataset>_<size>.pt; the data set's name (a flag, or read from a checkpoint) must be plain."""
    plain_name("--dataset", dataset, f"the classifier file {Path(folder)}/<dataset>_<size>.pt", "--dataset digits")
    return Path(folder) / f"{dataset}_{image_size}.pt"


def cached_classifier(data_cfg: DataConfig, split: str, folder: Path, steps: int, seed: int = 0) -> Path:
    """classifier_path(...) in `folder`, trained once with train_classifier (on the CPU) when it is missing: the
    benches' classifiers, each in its own folder. With data.holdout on `split`, it never sees the held-out images
    (split_dataset drops them)."""
    from storage.checkpoints import save_checkpoint
    path = classifier_path(data_cfg.dataset, data_cfg.image_size, folder)
    if not path.is_file():
        print(f"training the digit classifier ({steps} steps) -> {path}", flush=True)
        save_checkpoint(train_classifier(data_cfg, split, steps=steps, seed=seed, device="cpu"), path)
    return path


def check_classifier_memory(meta: dict, path: Path) -> None:
    """The weights its (valid) metadata sizes must fit memory (the head alone has (feature_dim + 1) x num_classes
    parameters), checked before the network is built."""
    with torch.device("meta"):
        params = sum(p.numel() for p in DigitClassifier(meta["num_classes"], meta["channels"]).parameters())
    check_memory(4 * params, f"the digit classifier in '{path}' ({meta['num_classes']} classes, {params:.3g} "
                 "parameters)", "it is not a real classifier: train it again with `python evaluate.py "
                 "train-classifier`")


def load_classifier(path: Path) -> tuple[DigitClassifier, dict]:
    """(model in eval mode, metadata) from a file written by train-classifier, loaded weights_only."""
    path = Path(path)
    if not path.is_file():
        dataset, size = path.stem.rsplit("_", 1) if "_" in path.stem else (path.stem, "?")
        raise EvalError(f"no classifier at '{path}': train it once with `python evaluate.py train-classifier "
                        f"--dataset {dataset} --image-size {size}` (a few minutes on a CPU), or use "
                        f"--features inception")
    ckpt = load_checkpoint(path)
    meta = ckpt["config"]
    if not isinstance(meta, dict) or meta.get("kind") != "digit_classifier":
        raise EvalError(f"'{path}' is not a classifier written by `python evaluate.py train-classifier`")
    problem = classifier_meta_problem(meta) or nonfinite_problem(ckpt["model"], "classifier")
    if not problem:
        check_classifier_memory(meta, path)
    model = None if problem else DigitClassifier(meta["num_classes"], meta["channels"])
    try:
        if model is not None:
            model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as err:  # missing / unexpected keys, wrong shapes
        problem = f"its weights do not fit its config ({str(err).splitlines()[0][:160]})"
    if problem:
        dataset, size = path.stem.rsplit("_", 1) if "_" in path.stem else (path.stem, "?")
        raise EvalError(f"the classifier '{path}' is damaged: {problem}. Delete it to retrain it, or retrain it "
                        f"with `python evaluate.py train-classifier --dataset {dataset} --image-size {size}`")
    return model.eval(), meta


# What a classifier's config must hold (train_classifier writes it) and the accepted range of each number.
CLASSIFIER_META = {"dataset": str, "image_size": (8, 4096), "channels": (1, 3), "num_classes": (2, 100_000)}


def classifier_meta_problem(meta: dict) -> Optional[str]:
    for key, want in CLASSIFIER_META.items():
        value = meta.get(key)
        if want is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and want[0] <= value <= want[1]
        if not ok:
            need = "a name" if want is str else f"a whole number in {want[0]}..{want[1]}"
            return f"its config has {key}={value!r}, not {need}"
    return None


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
        self.feature_dim = self.model.fc[1].out_features
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
        self.device, self.feature_dim = device, 2048  # pool3

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
