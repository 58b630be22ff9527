"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, Section 3 and Appendix C): train once, choose the EMA length afterwards.

During training K power-function EMA profiles of the weights are tracked (train.ema_profiles, e.g. [0.05, 0.1]:
their relative lengths sigma_rel) and every train.ema_snapshot_every steps a snapshot of all K is written to
checkpoints/<run>/ema/ema_XXXXXXX.pt (paths.RunPaths.ema_snapshots). Any other EMA length, at the step of a
checkpoint, is then a weighted sum of the snapshots: `reconstruct_weights` (sample.py / evaluate.py
--ema-length SIGMA_REL).

The maths, in optimizer steps t = 1, 2, ... (EDM2 counts images; the ratio sigma_rel is the same):
  - a power-function EMA at step t averages the weights theta_tau with the profile p_t(tau) ~ tau^gamma on
    [0, t] (Eq. 2 of the paper); its relative standard deviation is
        sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))             (Eq. 3; Appendix C, Eq. 123)
    and gamma for a given sigma_rel is the largest real root of the cubic this gives (Eq. 126, Algorithm 2);
  - it is tracked by ema <- beta_t ema + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1) (Eq. 127).
    Unrolled, theta_tau gets the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): exactly the
    integral of the continuous profile over [tau-1, tau], and the weights sum to 1 (they telescope);
  - a target profile p_hat is fitted by the profiles of the snapshots, p_i, in the L2 sense: the
    coefficients x solve A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_hat> (closed form, Eq. 151), and are
    then normalised to sum to 1 (Algorithm 3). As the discrete weights are bin integrals of the continuous
    profiles, the fit carries over to the discrete EMA.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from config import SIGMA_REL_MAX
from storage.checkpoints import CheckpointError

DEFAULT_PROFILES = (0.05, 0.10)        # EDM2's two tracked profiles
SNAPSHOT_NAME = re.compile(r"ema_(\d{7})\.pt")


# ----------------------------------------------------------------------------- the power-function profile
def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. 3: the relative standard deviation of the profile tau^gamma on [0, 1]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma > 0 with gamma_to_sigma_rel(gamma) = sigma_rel. Eq. 3 squared and multiplied out is the
    cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2; sigma_rel falls as gamma
    grows (for gamma > 0), so the largest real root is the one."""
    check_sigma_rel(sigma_rel, "sigma_rel")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def check_sigma_rel(value: float, what: str) -> None:
    """A ValueError naming `what` unless 0 < value < sqrt(1/12) (the lengths a power-function EMA has)."""
    if not 0 < value < SIGMA_REL_MAX:
        raise ValueError(f"{what} = {value:g} is not an EMA length a power-function EMA has: sigma_rel must be "
                         f"in (0, {SIGMA_REL_MAX:.4f}) (EDM2 tracks 0.05 and 0.10; typical choices lie in "
                         f"0.02 ... 0.25)")


def ema_length_problem(ema_length: float, conflicting_flag: str | None, source: str) -> str | None:
    """What is wrong with a command's --ema-length, or None: an invalid sigma_rel, or a flag that takes the
    weights from elsewhere (`conflicting_flag`, e.g. --no-ema). `source` says where the snapshots come from."""
    try:
        check_sigma_rel(ema_length, "--ema-length")
    except ValueError as err:
        return str(err)
    if conflicting_flag:
        return (f"--ema-length rebuilds the EMA weights of {source} from the run's snapshots: drop "
                f"{conflicting_flag}, or drop --ema-length")
    return None


def power_ema_beta(gamma: float, step: int) -> float:
    """Eq. 127: the decay of the update after optimizer step `step` (1, 2, ...); 0 at step 1."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of p_a p_b for the normalised profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t]
    (Eq. 151), element-wise with broadcasting. Integrating up to min(t_a, t_b) gives
    (g_a+1)(g_b+1) / (g_a+g_b+1) * (t_short / t_long)^g_long / t_long, g_long the exponent of the longer."""
    a_longer = t_a >= t_b
    t_long, t_short = np.where(a_longer, t_a, t_b), np.where(a_longer, t_b, t_a)
    g_long = np.where(a_longer, g_a, g_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (t_short / t_long) ** g_long / t_long


def posthoc_coefficients(steps: Sequence[int], sigma_rels: Sequence[float], target_step: int,
                         target_sigma_rel: float) -> np.ndarray:
    """Weights x (summing to 1) of the snapshots (steps[i], sigma_rels[i]) whose sum best matches, in L2,
    the profile of length target_sigma_rel at target_step (Algorithm 3), in float64."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], dtype=np.float64)
    A = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_products(t, g, np.float64(target_step), np.float64(sigma_rel_to_gamma(target_sigma_rel)))
    # lstsq, not solve: many snapshots make A near-singular (neighbouring profiles are almost collinear);
    # the minimum-norm solution is the same fit with bounded weights.
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


# ----------------------------------------------------------------------------- tracking during training


def snapshot_name(step: int) -> str:
    return f"ema_{step:07d}.pt"


# ----------------------------------------------------------------------------- reconstruction after training
def _read_snapshot(path: Path, step: int, sigma_rels: list[float]) -> list[dict]:
    """The K averages of a snapshot file (untrusted: weights_only), checked to be the step and profiles the
    checkpoint expects."""
    if not path.is_file():
        raise CheckpointError(f"post-hoc EMA snapshot '{path}' is missing (the checkpoint lists it): restore the "
                              f"run's ema/ folder next to the checkpoint, or sample without --ema-length")
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
        ok = int(snap["step"]) == step and [float(s) for s in snap["sigma_rels"]] == sigma_rels
        averages = snap["averages"]
    except Exception as err:  # truncated file, garbage, disallowed globals, missing keys
        raise CheckpointError(f"post-hoc EMA snapshot '{path}' does not load ({type(err).__name__}): restore it "
                              f"from a backup, or sample without --ema-length") from None
    if not ok:
        raise CheckpointError(f"post-hoc EMA snapshot '{path}' is not step {step} of profiles {sigma_rels} (a "
                              f"file of another run): restore the run's own ema/ folder")
    return averages


def reconstruct_weights(ckpt: dict, snapshot_folder: Path, sigma_rel: float,
                        template: dict) -> tuple[dict, dict]:
    """The weights of a power-function EMA of length `sigma_rel` at the checkpoint's step, from the run's
    snapshots before that step plus the profiles stored in the checkpoint itself (the exact ones at its
    step). `template`: the model's state_dict (non-float entries are taken from it). Returns (state dict,
    summary: coefficients and snapshot steps). Only the snapshots the checkpoint lists are read, so files
    from a later, abandoned part of the run (resumed from an older checkpoint) are never mixed in."""
    state = ckpt.get("phema")
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint tracked no post-hoc EMA profiles, so --ema-length cannot "
                              "reconstruct one: train with e.g. train.ema_profiles=[0.05,0.1] "
                              "train.ema_snapshot_every=N, or sample without --ema-length")
    check_sigma_rel(sigma_rel, "--ema-length")
    step, profiles = int(ckpt["step"]), [float(s) for s in state["sigma_rels"]]
    earlier = [s for s in state["snapshot_steps"] if s < step]
    sources = [(s, None) for s in earlier] + [(step, state["averages"])]
    steps = [s for s, _ in sources for _ in profiles]
    coefficients = posthoc_coefficients(steps, profiles * len(sources), step, sigma_rel)
    floats = {name for name, value in template.items() if value.is_floating_point()}
    total = {name: torch.zeros_like(template[name], dtype=torch.float64) for name in floats}
    for index, (snap_step, averages) in enumerate(sources):  # one snapshot in memory at a time
        averages = averages or _read_snapshot(Path(snapshot_folder) / snapshot_name(snap_step), snap_step, profiles)
        for k, average in enumerate(averages):
            if (len(averages) != len(profiles) or set(average) != floats
                    or any(average[n].shape != total[n].shape for n in floats)):
                raise CheckpointError(f"the post-hoc EMA profiles of step {snap_step} do not fit the model its "
                                      f"config describes (an edited file or another run's): restore the run's own")
            for name in floats:
                total[name].add_(average[name].double(), alpha=float(coefficients[index * len(profiles) + k]))
    weights = {name: (total[name].to(value.dtype) if name in floats else value) for name, value in template.items()}
    return weights, {"sigma_rel": sigma_rel, "step": step, "snapshot_steps": earlier + [step],
                     "coefficients": coefficients.tolist()}
