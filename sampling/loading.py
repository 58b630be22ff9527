"""Checkpoints for sampling, evaluation and export: find one, read it (untrusted: weights_only, stored config
validated), and rebuild (model, diffusion, config) from the config stored inside it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from diffusion import build_diffusion
from limits import check_model
from model import build_model
from storage.checkpoint_checks import nonfinite_problem
from storage.checkpoints import CheckpointError, read_checkpoint
from storage.paths import ema_snapshot_folder


def load_for_sampling(checkpoint: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                      ema_length: Optional[float] = None):
    """(model in eval mode, diffusion, cfg, ckpt), all rebuilt from the config stored in the checkpoint.
    ema_length: a post-hoc EMA of that sigma_rel, rebuilt from the run's snapshots (sampling/posthoc.py)."""
    ckpt, cfg = read_checkpoint(checkpoint)
    check_model(cfg, device)  # before any tensor of a network the stored config may make too big
    weights = ckpt.get("ema") if use_ema else ckpt["model"]
    if weights is None:
        print(f"note: '{checkpoint}' has no EMA weights; using the raw model weights")
        weights = ckpt["model"]
    model = build_model(cfg)
    if ema_length is not None:
        weights = posthoc_weights(ckpt, Path(checkpoint), ema_length, model.state_dict())
    mismatch = first_mismatch(model.state_dict(), weights)
    if mismatch:
        raise CheckpointError(f"the weights in '{checkpoint}' do not fit the model its config describes: the "
                              f"checkpoint does not match its stored config ({mismatch})")
    check_finite(weights, checkpoint, "raw" if weights is ckpt["model"] else "EMA")
    model.load_state_dict(weights)
    return model.to(device).eval(), build_diffusion(cfg).to(device), cfg, ckpt


def check_finite(weights: dict, checkpoint: str | Path, what: str) -> None:
    """NaN/inf weights would give black images without a word: refuse them, naming the first tensors."""
    problem = nonfinite_problem(weights, what)
    if problem:
        other = " (or the raw ones: --no-ema)" if what == "EMA" else ""
        raise CheckpointError(f"'{checkpoint}' is unusable: {problem}, so every image would come out blank (the "
                              f"run diverged before it was saved): use an earlier checkpoint of the run{other}")


def first_mismatch(expected: dict, weights) -> Optional[str]:
    """The first difference between a model's state_dict and a checkpoint's weights, in words, or None
    (load_state_dict's own message lists every key over many lines)."""
    if not isinstance(weights, dict):
        return f"the weights are a {type(weights).__name__}, not a state dict"
    for key, tensor in expected.items():
        if key not in weights:
            return f"{key} is missing from the checkpoint"
        shape = tuple(weights[key].shape) if torch.is_tensor(weights[key]) else None
        if shape != tuple(tensor.shape):
            return f"{key} has shape {shape} in the checkpoint but {tuple(tensor.shape)} in the model"
    extra = sorted(set(weights) - set(expected))
    return f"the checkpoint has {len(extra)} keys the model lacks, first {extra[0]}" if extra else None


def posthoc_weights(ckpt: dict, checkpoint: Path, sigma_rel: float, template: dict) -> dict:
    """The post-hoc EMA of length sigma_rel at the checkpoint's step, from the snapshots in the ema/ folder
    next to the checkpoint (sampling.posthoc.reconstruct_weights); a bad length is a CheckpointError too."""
    from sampling.posthoc import reconstruct_weights
    try:
        weights, summary = reconstruct_weights(ckpt, ema_snapshot_folder(checkpoint.parent), sigma_rel, template)
    except ValueError as err:  # the length is out of range
        raise CheckpointError(str(err)) from None
    print(f"post-hoc EMA sigma_rel={sigma_rel:g} at step {summary['step']}: from "
          f"{len(summary['snapshot_steps'])} snapshot(s) of profiles {ckpt['phema']['sigma_rels']}")
    return weights
