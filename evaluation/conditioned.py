"""Scores of an image-conditioned model (data.task superres / colorize) on held-out images: the library behind
evaluate.py --checkpoint for such a model (and bench/superres.py).

For N held-out targets (sampling.conditions.held_out_split: data.holdout's images, else the test split), each
output is sampled from the target's condition with its own seeded noise, quantised to uint8 like a saved PNG,
and scored against its target, next to the classical baseline (bicubic upsampling; for colorize the grey
image itself) in the same record:
  - psnr, ssim: mean over images, on [0, 1] images (torchmetrics; SSIM with its Gaussian 11x11 window, smaller
    for images under 11 px: ssim_sigma);
  - consistency_mse: SR3's consistency, the MSE between the condition and the output brought back to it
    (superres: area-downsampled by sr_factor; colorize: its grey version), on [0, 1];
  - fid (and precision/recall, classifier scores) of the outputs against the usual reference statistics
    (evaluation/scoring.py: the digit classifier's features on grey digits, Inception-v3 on RGB);
  - classifier_accuracy (digit classifier only): its predicted class against the targets' labels, also of
    the targets themselves ("targets"), for scale.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from evaluation.features import extract
from evaluation.scoring import feature_metrics
from sampling.conditioning import baseline, grey, low_res
from sampling.conditions import Conditions, held_out_conditions
from sampling.generation import generate
from sampling.pictures import to_uint8_images


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the 8-bit values a PNG holds, as floats in [0, 1]."""
    return to_uint8_images(x).float() / 255.0


def ssim_sigma(size: int) -> float:
    """SSIM's Gaussian sigma for images of side `size`: torchmetrics ignores kernel_size with its Gaussian window,
    whose width 2 int(3.5 sigma + 0.5) + 1 follows sigma alone (1.5: 11 px, reflect-padded by 5, which needs
    images over 5 px). The standard 1.5 from 11 px up (the scores stay those of Wang et al.'s window); below, the
    same window shape shrunk to the largest odd width that fits, k: sigma 1.5 k / 11 (4 px: 3x3, 8 px: 7x7)."""
    if size >= 11:
        return 1.5
    width = size if size % 2 else size - 1
    return 1.5 * width / 11


def pixel_metrics(outputs: torch.Tensor, conds: Conditions, cfg) -> dict:
    """PSNR, SSIM against the targets and the consistency error against the condition (see the docstring)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    out, target = _unit(outputs), _unit(conds.targets)
    psnr = peak_signal_noise_ratio(out, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(out, target, data_range=1.0, sigma=ssim_sigma(out.shape[-1]))
    back = low_res(out, cfg.data.sr_factor) if cfg.data.task == "superres" else grey(out)
    consistency = (back - _unit(conds.inputs)).pow(2).mean()
    return {"psnr": float(psnr.clamp(max=100).mean()), "ssim": float(ssim), "consistency_mse": float(consistency)}


def feature_scores(images: torch.Tensor, labels: Optional[torch.Tensor], ref: dict, extractor, k: int,
                   batch_size: int, seed: int) -> dict:
    """FID, precision/recall, classifier scores of uint8 images; the digit classifier's accuracy on labels."""
    feats, logits = extract(extractor, images, batch_size, desc="features")
    metrics = feature_metrics(feats, logits, ref, min(k, len(feats) - 1), seed)
    if extractor.name.startswith("classifier") and labels is not None:
        metrics["classifier_accuracy"] = float(np.mean(logits.argmax(1) == labels.numpy()))
    return metrics


def evaluate_conditioned(model, diffusion, cfg, n: int, batch_size: int, seed: int, kw: dict, amp: str,
                         ref: dict, extractor, k: int = 3, progress: bool = True) -> tuple[dict, float]:
    """(metrics record, sampling seconds): model, baseline and targets scored on n held-out images."""
    conds, where = held_out_conditions(cfg, n)
    labels = conds.labels.tolist() if cfg.model.num_classes else None
    start = time.perf_counter()
    outputs = generate(model, diffusion, cfg, len(conds.cond), batch_size, seed, labels=labels, amp=amp,
                       progress=progress, conditions=conds.cond, **kw)
    seconds = time.perf_counter() - start
    name = "bicubic" if cfg.data.task == "superres" else "grey"
    base = baseline(conds.cond, cfg.data.task, cfg.model.in_channels)
    record = {"task": cfg.data.task, "sr_factor": cfg.data.sr_factor if cfg.data.task == "superres" else None,
              "conditions": where, "num_images": len(conds.cond), "baseline": name}
    for key, images in (("model", outputs), (name, base)):
        record[key] = {**pixel_metrics(images, conds, cfg),
                       **feature_scores(to_uint8_images(images), conds.labels, ref, extractor, k, batch_size, seed)}
    target_scores = feature_scores(to_uint8_images(conds.targets), conds.labels, ref, extractor, k, batch_size, seed)
    record["targets"] = {key: target_scores[key] for key in ("fid", "classifier_accuracy") if key in target_scores}
    return record, seconds


def summary_lines(record: dict) -> list[str]:
    """The printed table: one line per scored set."""
    keys = ("psnr", "ssim", "consistency_mse", "fid", "classifier_accuracy")
    lines = []
    for name in ("model", record["baseline"], "targets"):
        values = record[name]
        lines.append(f"  {name:>8}: " + "  ".join(f"{key}={values[key]:.4g}" for key in keys if key in values))
    return lines
