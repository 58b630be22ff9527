"""The metric math of evaluate.py on feature arrays: the Frechet distance of fitted Gaussians ("FID", Heusel et
al. 2017), improved k-NN precision/recall (Kynkaanniemi et al. 2019) and the Inception-Score formula (Salimans
et al. 2016). Pure functions of numpy/torch arrays: no models, files or data sets."""
from __future__ import annotations

import math

import numpy as np
import torch

from config import UserError


class EvalError(UserError, RuntimeError):
    """A user-fixable problem (missing weights/classifier/samples); the message says what to do."""


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
