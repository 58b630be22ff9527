"""Checkpoints for sampling, evaluation and export: find one, read it (untrusted: weights_only, stored config
validated), and rebuild (model, diffusion, config) from the config stored inside it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from config import Config, ConfigError, from_dict, load_config, validate
from diffusion import build_diffusion
from model import build_model
from paths import CHECKPOINTS, RunPaths, ema_snapshot_folder
from utils import CheckpointError, find_latest_checkpoint, list_checkpoints, load_checkpoint

TRAIN_HINT = "Train one first: `python train.py --config configs/digits.yaml`, or pass --checkpoint PATH."


def resolve_checkpoint(checkpoint: Optional[str], config_path: Optional[str]) -> Path:
    """--checkpoint, else checkpoints/<run_name>/last.pt (or its newest step file), else the newest run."""
    if checkpoint:
        return Path(checkpoint)
    if config_path:
        run_dir = RunPaths(load_config(config_path).run_name).checkpoints
        found = run_dir / "last.pt" if (run_dir / "last.pt").is_file() else (list_checkpoints(run_dir) or [None])[-1]
        if found is None:
            raise CheckpointError(f"no checkpoint found: looked for {run_dir / 'last.pt'} (and step_*.pt there). "
                                  f"{TRAIN_HINT.replace('configs/digits.yaml', config_path)}")
        return found
    found = find_latest_checkpoint(CHECKPOINTS)
    if found is None:
        raise CheckpointError(f"no checkpoint found: looked for {CHECKPOINTS}/*/last.pt and "
                              f"{CHECKPOINTS}/*/step_*.pt under {Path.cwd()}. {TRAIN_HINT}")
    return found


def read_checkpoint(path: str | Path) -> tuple[dict, Config]:
    """(checkpoint dict, its stored config run through config.validate): the config is untrusted input,
    like the weights, and is checked before anything is built from it."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:  # utils may not say so itself yet
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes), e.g. an interrupted copy or a full disk: "
                              "pass another checkpoint")
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        return ckpt, validate(from_dict(ckpt["config"]))
    except ConfigError as e:
        raise CheckpointError(f"the config stored in '{path}' is not valid for this ddpm-lab: {e}") from None


def load_for_sampling(checkpoint: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                      ema_length: Optional[float] = None):
    """(model in eval mode, diffusion, cfg, ckpt), all rebuilt from the config stored in the checkpoint.
    ema_length: a post-hoc EMA of that sigma_rel, rebuilt from the run's snapshots (posthoc_ema.py)."""
    ckpt, cfg = read_checkpoint(checkpoint)
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
    model.load_state_dict(weights)
    return model.to(device).eval(), build_diffusion(cfg).to(device), cfg, ckpt


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
    next to the checkpoint (posthoc_ema.reconstruct_weights); a bad length is a CheckpointError too."""
    from posthoc_ema import reconstruct_weights
    try:
        weights, summary = reconstruct_weights(ckpt, ema_snapshot_folder(checkpoint.parent), sigma_rel, template)
    except ValueError as err:  # the length is out of range
        raise CheckpointError(str(err)) from None
    print(f"post-hoc EMA sigma_rel={sigma_rel:g} at step {summary['step']}: from "
          f"{len(summary['snapshot_steps'])} snapshot(s) of profiles {ckpt['phema']['sigma_rels']}")
    return weights
