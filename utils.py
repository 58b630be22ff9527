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

import contextlib
import os
import pickle
import random
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np
import torch

from config import ConfigError
from paths import CHECKPOINTS

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message says what to do. `cause`: the message
    without its advice, for callers that give their own (train.py's resume lists the files that load)."""

    def __init__(self, message: str, cause: Optional[str] = None):
        super().__init__(message)
        self.cause = cause or message


class DeviceError(ConfigError, RuntimeError):
    """A device this machine does not have (a ConfigError for the scripts, a RuntimeError for older callers)."""


def get_device(name: str = "auto") -> torch.device:
    """The torch device for a name; an explicit cuda:N also becomes the current CUDA device, so kernels,
    autocast and cuDNN handles of this process go to GPU N rather than GPU 0."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' was asked for but CUDA is not available: use device=cpu")
    if device.type == "cuda" and device.index is not None:
        check_cuda_index(device.index, f"device '{name}'")
        torch.cuda.set_device(device)
    return device


def check_cuda_index(index: int, what: str) -> None:
    """One clear error instead of CUDA's "invalid device ordinal" traceback."""
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"{what} names GPU {index}, but this machine has {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1}): pick one of them, or launch fewer processes per node")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); there bf16 autocast is ~2x faster than
    fp32. Without it oneDNN emulates bf16 and autocast is a slowdown. (torch.cpu exposes these probes privately.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_amp(mode: str, device: torch.device) -> str:
    """'auto' -> the fastest autocast mode that keeps training stable on `device`: bf16 on CUDA GPUs that
    support it (no loss scaler needed), fp16 on older GPUs, bf16 on CPUs with native bf16, else off."""
    if mode != "auto":
        return mode
    if device.type == "cuda":  # is_bf16_supported() alone counts emulation; cuDNN has no bf16 conv below sm_80
        native = (torch.cuda.get_device_capability(device) >= (8, 0)
                  and torch.cuda.is_bf16_supported(including_emulation=False))
        return "bf16" if native else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "off"


def autocast(device: torch.device, amp: str):
    """The autocast context of a resolved amp mode ('off', 'bf16', 'fp16'; see resolve_amp)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def resolve_channels_last(flag: Optional[bool], device: torch.device) -> bool:
    """None (auto) -> channels_last on CUDA only (it feeds the tensor cores). On CPU NCHW trains as fast or
    faster (GroupNorm's channels_last backward is slow on CPU): measured by bench/throughput.py, numbers in
    bench/RESULTS.md ("Defaults chosen from these measurements")."""
    return device.type == "cuda" if flag is None else flag


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


TEMP_GLOB = ".*.pt.*.tmp"  # save_checkpoint's temp files: .<name>.<random hex>.tmp next to the target


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new file `.<name>.<random>.tmp` in folder, created with mode 0o666 so that the umask applies as for
    any other file the user writes (tempfile.mkstemp would force 0o600)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: `write(f)` into a temp file in the same folder, fsync, then rename over `path`.
    A crash mid-write leaves the previous file intact (and a temp file, see remove_temp_files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save of the state (plus the format version), written atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save({"format_version": CHECKPOINT_VERSION, **state}, f))


def copy_checkpoint(source: str | Path, path: str | Path) -> None:
    """Make `path` a copy of the checkpoint file `source` without serialising the state again (a byte copy,
    written atomically). Not a hard link: the two files stay independent, so damage to one (a truncating
    write, a bad sector) leaves the other loadable."""
    def copy(f: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    atomic_write(path, copy)


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files save_checkpoint left in `folder` when a process was killed mid-write (only
    that pattern, only that folder). The caller must own the folder (train.py holds its run lock)."""
    removed = []
    for tmp in Path(folder).glob(TEMP_GLOB):
        if tmp.is_file() and re.fullmatch(r"\..+\.pt\.[0-9a-z_]{6,12}\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _load_failure(path: Path, err: Exception) -> str:
    """Why torch.load refused `path`, in words that never suggest turning the weights-only safety off."""
    size = path.stat().st_size
    if size == 0:
        return f"checkpoint '{path}' is empty (0 bytes): its write was cut off (a full disk or a killed process)"
    if not zipfile.is_zipfile(path):
        return (f"checkpoint '{path}' is corrupt or truncated ({size} bytes that are not a complete "
                f"torch.save archive)")
    if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" (it holds a {found.group(1)} object)" if found else ""
        return (f"'{path}' is not a ddpm-lab checkpoint and may be unsafe to load{what}: ddpm-lab checkpoints "
                f"hold only tensors and plain values, and files with other objects are refused, as they could "
                f"run code when loaded")
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"checkpoint '{path}' is corrupt or truncated ({type(err).__name__}: {first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint as untrusted input (weights_only=True) with one clear error per failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'. Train one first, e.g. "
                              f"`python train.py --config configs/digits.yaml`, or pass --checkpoint PATH",
                              cause=f"no checkpoint at '{path}'.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # empty or truncated file, garbage bytes, disallowed pickle globals
        reason = f"{_load_failure(path, e)}."
        others = loadable_checkpoints(path.parent, exclude=path)  # never offer a broken or hostile file
        hint = (f" Other checkpoints in {path.parent}: {', '.join(others)} - pass one of them instead "
                f"(train.py --resume {path.parent / others[-1]}, or --checkpoint for sample.py)."
                if others else "")
        raise CheckpointError(reason + hint, cause=reason) from None
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


def loadable_checkpoints(folder: str | Path, exclude: Optional[Path] = None) -> list[str]:
    """Names of the *.pt files in `folder` that load as untrusted input (weights_only) and hold a config and
    weights: the only files worth offering in place of a broken one. mmap keeps big files cheap to probe."""
    names = []
    for p in sorted(Path(folder).glob("*.pt")):
        if p == exclude or not p.is_file():
            continue
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # corrupt, truncated, empty, or pickled code that weights_only refuses
            continue
        if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model"), dict):
            names.append(p.name)
    return names


def output_folder_problem(path: str | Path) -> Optional[str]:
    """Why `path` cannot be (or become) a folder to write into, or None; checked before any long work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"'{path}' is a file, not a folder"
    existing = path
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is a file, so no folder '{path}' can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"'{existing}' is not writable, so '{path}' cannot be written"
    return None


def find_latest_checkpoint(root: str | Path = CHECKPOINTS) -> Optional[Path]:
    """Newest last.pt (or step file) anywhere under `root`, by modification time."""
    candidates = list(Path(root).glob("*/last.pt")) or list(Path(root).glob("*/step_*.pt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255] (the quantization sample files and FID use)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(x: torch.Tensor, nrow: Optional[int] = None, min_cell: int = 64):
    """(B, C, H, W) images in [-1, 1] -> one RGB PIL image grid (nrow per row, default square-ish); tiny
    images are upscaled (nearest) so that an 8x8 digit is still visible. train.py's and sample.py's grids."""
    import torchvision.utils as vutils
    from PIL import Image

    nrow = nrow or max(1, int(round(len(x) ** 0.5)))
    scale = max(1, -(-min_cell // x.shape[-1]))  # ceil
    if scale > 1:
        x = torch.nn.functional.interpolate(x.float(), scale_factor=scale, mode="nearest")
    grid = vutils.make_grid(to_uint8_images(x.cpu()), nrow=nrow, padding=2, pad_value=255)  # always 3 channels
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: Optional[int] = None,
                    min_cell: int = 64) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one PNG grid (see image_grid)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(x, nrow, min_cell).save(path)
    return path


# ----------------------------------------------------------------------------- training helpers
def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hash): (seed, purpose, epoch, index) tuples
    give unrelated streams, unlike seed + offset arithmetic where neighbouring runs overlap."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def get_rng_state() -> dict:
    """Python, numpy, torch (CPU) and CUDA RNG states as tensors and plain types, so a checkpoint that
    holds them still loads with torch.load(weights_only=True) (no numpy objects inside)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": [version, list(internal), gauss_next],
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_state(state: dict) -> None:
    """Inverse of get_rng_state (CUDA states are restored for the devices this machine has)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Debiased exponential moving average that steps over NaNs (skipped steps)."""
    alpha, acc, weight, out = 2.0 / (span + 1), 0.0, 0.0, np.full_like(values, np.nan)
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, weight = (1 - alpha) * acc + alpha * v, (1 - alpha) * weight + alpha
        out[i] = acc / weight if weight > 0 else np.nan
    return out


def save_loss_plot(losses, path: str | Path, first_step: int = 1, title: str = "training loss",
                   max_points: int = 5000) -> Path:
    """Per-step losses (NaN = skipped step) as a faint raw curve plus a smoothed one, log-scaled.
    Long runs are binned to max_points means so the plot stays fast."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend needed

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.asarray(losses, dtype=np.float64)
    x = first_step + np.arange(len(y))
    if len(y) > max_points:
        bins = -(-len(y) // max_points)
        cut = len(y) // bins * bins
        with np.errstate(all="ignore"):  # all-NaN bins stay NaN
            y = np.nanmean(y[:cut].reshape(-1, bins), axis=1)
        x = x[:cut].reshape(-1, bins).mean(axis=1)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="raw")
    ax.plot(x, _smooth(y, max(5, len(y) // 50)), color="tab:blue", linewidth=1.8, label="smoothed")
    finite = y[np.isfinite(y)]
    if len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min():  # diffusion losses fall fast
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_scatter_plot(data: torch.Tensor, samples: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Two panels on the same axes: (N, 2) data points and (M, 2) generated points."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data, samples = data.detach().float().cpu().numpy(), samples.detach().float().cpu().numpy()
    both = np.concatenate([data, samples[np.isfinite(samples).all(axis=1)]])
    low, high = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    pad = 0.1 * (high - low).max()
    fig = Figure(figsize=(9, 4.5), dpi=110)
    for ax, points, name in zip(fig.subplots(1, 2), (data, samples), ("data", "samples")):
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color="tab:blue" if name == "data" else "tab:orange")
        ax.set(xlim=(low[0] - pad, high[0] + pad), ylim=(low[1] - pad, high[1] + pad), aspect="equal",
               title=f"{name} ({len(points)} points)")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path
