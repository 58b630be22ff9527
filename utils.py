"""Shared helpers of the core: devices, mixed precision, seeds and RNG states."""
from __future__ import annotations

import contextlib
import numbers
import random
from typing import Optional

import numpy as np
import torch

from config import ArgumentParser as ArgumentParser  # the scripts' parser, defined beside UserError
from config import ConfigError


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
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast beats fp32. Without
    it oneDNN emulates bf16 and autocast is a slowdown. (torch.cpu exposes these probes privately.)"""
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
    """The autocast context of an amp mode ('off', 'bf16', 'fp16'; 'auto' is resolved per device by resolve_amp).
    The scripts refuse fp16 off CUDA before they get here (sampling_autocast, the Trainer)."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def resolve_channels_last(flag: Optional[bool], device: torch.device) -> bool:
    """None (auto) -> channels_last on CUDA only (it feeds the tensor cores). On CPU NCHW trains as fast or
    faster (GroupNorm's channels_last backward is slow on CPU; bench/RESULTS.md, "Defaults chosen from these
    measurements")."""
    return device.type == "cuda" if flag is None else flag


def is_int(value) -> bool:
    """An integer, not a bool (True is an int to Python, never a step count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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



