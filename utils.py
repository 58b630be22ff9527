"""Shared helpers: devices, seeds, checkpoint files (atomic, safe to load), image grids.

Checkpoint format (a dict saved with torch.save, loaded with weights_only=True):
    format_version  int, CHECKPOINT_VERSION
    step            int, optimizer steps done
    config          dict, config.to_dict(cfg): the full config, so sample.py needs no flags
    model           state_dict of the bare network (no DDP "module." / compile "_orig_mod." prefixes)
    ema             state_dict of the EMA network, same keys as `model`
    ... plus training state (optimizer, lr_scheduler, grad_scaler, rng, data_state) written by train.py
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message says what to do."""


def get_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was asked for but CUDA is not available: use device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):          # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):     # torch.compile
            model = model._orig_mod
        else:
            return model


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`.
    A crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint as untrusted input (weights_only=True) with one clear error per failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'. Train one first, e.g. "
                              f"`python train.py --config configs/digits.yaml`, or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, disallowed pickle globals
        others = sorted(p.name for p in path.parent.glob("*.pt") if p != path)
        hint = (f" Other checkpoints in {path.parent}: {', '.join(others)} - use one of them "
                f"(e.g. --resume {path.parent / others[-1]})." if others else "")
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).{hint}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"'{path}' is not a ddpm-lab checkpoint (no config/model inside)")
    version = ckpt.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {version}, this ddpm-lab reads "
                              f"version {CHECKPOINT_VERSION}: use the ddpm-lab release that wrote it")
    return ckpt


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Periodic step_XXXXXXX.pt files in a run folder, oldest first."""
    return sorted(Path(folder).glob("step_*.pt"))


def find_latest_checkpoint(root: str | Path = "checkpoints") -> Optional[Path]:
    """Newest last.pt (or step file) anywhere under `root`, by modification time."""
    candidates = list(Path(root).glob("*/last.pt")) or list(Path(root).glob("*/step_*.pt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255] (the quantization sample files and FID use)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: Optional[int] = None,
                    min_cell: int = 64) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one PNG grid; tiny images are upscaled (nearest)
    so that an 8x8 digit is still visible."""
    import torchvision.utils as vutils
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(round(len(x) ** 0.5)))
    scale = max(1, -(-min_cell // x.shape[-1]))  # ceil
    if scale > 1:
        x = torch.nn.functional.interpolate(x.float(), scale_factor=scale, mode="nearest")
    grid = vutils.make_grid(to_uint8_images(x.cpu()), nrow=nrow, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy().squeeze()).save(path)
    return path
