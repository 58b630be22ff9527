"""Resuming a run: loading the checkpoint, whether this config may continue it, and reading its training
state back into a Trainer's network, EMA, optimizer, schedule and RNGs (Trainer.checkpoint_state writes
it). Library code of trainer.py; which file --resume means: run_folder.resume_path.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from config import Config, ConfigError, config_with_overrides, from_dict, to_dict
from storage.checkpoints import CheckpointError
from training.data_order import NOISE
from utils import derive_seed, seed_everything, set_rng_state

# Resuming may change these; any other change under seed/data/model/diffusion means another experiment.
RESUME_FIXED = ("seed", "data.", "model.", "diffusion.", "train.ema_profiles")
RESUME_MUTABLE = ("data.num_workers", "data.root", "data.download")
# What --resume needs besides config/model (load_checkpoint checks those): weights-only files lack them.
RESUME_KEYS = ("step", "ema", "ema_num_updates", "optimizer", "lr_scheduler", "rng", "data_state")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_differences(old: dict, new: Config) -> list[str]:
    """'key: old -> new' for every changed key that defines the experiment (seed, data, model, diffusion) or
    the tracked post-hoc EMA profiles (train.ema_profiles)."""
    flat_old, flat_new = _flatten(to_dict(from_dict(old))), _flatten(to_dict(new))
    return [f"  {key}: {flat_old[key]!r} -> {flat_new[key]!r}" for key in sorted(flat_new)
            if key.startswith(RESUME_FIXED) and key not in RESUME_MUTABLE and flat_old[key] != flat_new[key]]


def check_resumable(ckpt: dict, cfg: Config, resume: Optional[Path]) -> None:
    """A ConfigError / CheckpointError unless `ckpt` holds a training state that `cfg` may continue."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume from {resume or 'the checkpoint'}: it has no {', '.join(missing)} "
                              f"entr{'y' if len(missing) == 1 else 'ies'} (a weights-only or edited file, not "
                              f"one train.py wrote): sample from it with sample.py, or resume from a "
                              f"checkpoints/<run>/last.pt or step_*.pt that train.py saved")
    diffs = resume_differences(ckpt["config"], cfg)
    if diffs:
        raise ConfigError(f"cannot resume from {resume or 'the checkpoint'}: these settings differ from the "
                          "checkpoint's (old -> new):\n" + "\n".join(diffs) + "\nUse the checkpoint's values, "
                          "or start a separate run with run_name=NEW_NAME (without --resume).")


def warn_thread_count(ckpt: dict, device: torch.device) -> None:
    """CPU results depend on the thread count (reduction order): a different one is worth a warning."""
    saved, now = ckpt.get("cpu_threads"), torch.get_num_threads()
    if device.type == "cpu" and saved is not None and saved != now:
        tqdm.write(f"warning: the checkpoint was trained with {saved} CPU thread(s), this run uses {now}: the "
                   f"resume is not bitwise exact (set train.cpu_threads={saved} to match)", file=sys.stderr)


def config_for_resume(ckpt: dict, overrides: list[str]) -> Config:
    """The checkpoint's own config with command-line overrides applied (for --resume PATH without --config)."""
    return config_with_overrides(ckpt["config"], overrides)


# ----------------------------------------------------------------------------- loading the training state
def state_mismatch(saved: dict, expected: dict, what: str) -> Optional[str]:
    """The first difference between two state dicts (missing / unexpected key, tensor shape), or None."""
    for key in expected:
        if key not in saved:
            return f"missing key {key!r} in {what}"
        have, want = saved[key], expected[key]
        if isinstance(want, torch.Tensor) and (not isinstance(have, torch.Tensor) or have.shape != want.shape):
            shape = tuple(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            return f"size mismatch for {key} in {what}: {shape} in the file, {tuple(want.shape)} in the model"
    extra = [key for key in saved if key not in expected]
    return f"unexpected key {extra[0]!r} in {what}" if extra else None


def optimizer_mismatch(saved: dict, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """The first optimizer state tensor (Adam's moments) whose shape is not its parameter's, or None."""
    for index, param in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in saved["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                return (f"size mismatch for optimizer {key} of parameter {index}: {tuple(value.shape)} in the "
                        f"file, {tuple(param.shape)} in the model")
    return None


def load_weights(ckpt: dict, net: torch.nn.Module, ema_net: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    """Model, EMA and optimizer state. Weights that do not fit the network the stored config describes (an
    edited or foreign file) are one CheckpointError naming the first difference, checked before loading."""
    try:
        detail = (state_mismatch(ckpt["model"], net.state_dict(), "model")
                  or state_mismatch(ckpt["ema"], ema_net.state_dict(), "ema")
                  or optimizer_mismatch(ckpt["optimizer"], optimizer))
        if detail is None:
            net.load_state_dict(ckpt["model"])
            ema_net.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:  # a malformed entry
        detail = f"{type(err).__name__}: {err}".splitlines()[0]
    if detail is not None:
        raise CheckpointError(f"cannot resume: the weights in the checkpoint do not fit the model its stored "
                              f"config describes ({detail[:300]}); the file was edited or not written by "
                              f"this train.py: resume from another checkpoint of the run, or start over "
                              f"without --resume") from None


def restore_optimization(ckpt: dict, net: torch.nn.Module, ema, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Weights, EMA, optimizer moments and the schedule position of `ckpt`. Hyper-parameters (lr, betas,
    weight decay, fused) stay those of the current config: a resume may change train.*."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_weights(ckpt, net, ema.model, optimizer)
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    match_state_layout(optimizer)
    ema.num_updates = int(ckpt["ema_num_updates"])
    # Each group's lr is the expression LambdaLR.step uses, so bitwise equal to an uninterrupted run's; the
    # scheduler's own record of the last lr is refreshed by the next step (before anything logs it).
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(scheduler.last_epoch)


def restore_rng(rng: dict, rank: int, seed: int, step: int) -> None:
    """This rank's saved RNG states; a rank the checkpoint's run did not have starts a fresh noise stream."""
    if rank < len(rng["ranks"]):
        set_rng_state(rng["ranks"][rank])
        return
    seed_everything(derive_seed(seed, NOISE, rank, step))
    tqdm.write(f"note: rank {rank} has no saved RNG state (the checkpoint was written by {len(rng['ranks'])} "
               f"process(es)): it starts a fresh noise stream")


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state tensors in their parameter's memory layout. load_state_dict keeps the strides they
    were saved with, so after a resume that toggles train.channels_last (or moves CPU -> GPU) the fused
    AdamW kernel would pair moments with the wrong elements (CPU) or refuse to run (CUDA)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
