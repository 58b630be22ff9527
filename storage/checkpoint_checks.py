"""The training state and weights inside a checkpoint, checked like a config (untrusted input): the step, the
RNG states and the data position a resume puts back, and whether weights are finite. Each check returns the
problem in words (or None); storage/checkpoints.py turns it into one CheckpointError naming the file."""
from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np
import torch


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# data_state's entries (DataStream.state_dict) and the least each may be.
DATA_STATE_MINIMUM = {"epoch": 0, "position": 0, "batch_size": 1, "world_size": 1, "num_items": 1}


def data_state_problem(state) -> Optional[str]:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict of {', '.join(DATA_STATE_MINIMUM)}"
    for key, low in DATA_STATE_MINIMUM.items():
        if not _whole(state.get(key), low):
            return f"{key} is {state.get(key)!r}, not a whole number >= {low}"
    return None


def rng_state_problem(rng) -> Optional[str]:
    """Every rank's saved states, tried on throw-away generators (the global ones are left alone): exactly
    what utils.set_rng_state would refuse, caught before the run starts."""
    if not isinstance(rng, dict) or not _whole(rng.get("world_size"), 1) or not isinstance(rng.get("ranks"), list) \
            or not rng["ranks"]:
        return "not a dict of world_size (>= 1) and a non-empty list of ranks"
    for rank, state in enumerate(rng["ranks"]):
        try:
            version, internal, gauss_next = state["python"]
            random.Random().setstate((version, tuple(internal), gauss_next))
            npy = state["numpy"]
            np.random.RandomState().set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                                               npy["has_gauss"], npy["cached_gaussian"]))
            torch.Generator().set_state(state["torch"])
            if not all(torch.is_tensor(s) and s.dtype == torch.uint8 for s in state.get("cuda") or []):
                raise TypeError("the CUDA states are not byte tensors")
        except Exception as err:  # noqa: BLE001 - any malformed entry: wrong type, size, missing key
            return f"the state of rank {rank} is malformed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


def log_state_problem(state) -> Optional[str]:
    if state is None:
        return None
    if not isinstance(state, dict) or not _whole(state.get("skipped_total", 0), 0) \
            or not torch.is_tensor(state.get("loss_history", torch.zeros(0))):
        return "not a dict of skipped_total (a whole number >= 0) and a loss_history tensor"
    return None


# The entries a resume reads besides the weights, and the check of each (only entries present are checked:
# weights-only files lack them, and training/resume.py says so).
STATE_CHECKS = {
    "step": lambda v: None if _whole(v, 0) and v < 2 ** 63 else f"{v!r}, not a whole number in 0..2**63-1",
    "ema_num_updates": lambda v: None if _number(v) else f"{v!r}, not a finite number >= 0",
    "lr_scheduler": lambda v: None if isinstance(v, dict) and _whole(v.get("last_epoch"), 0)
    else "not a schedule state with a last_epoch >= 0",
    "rng": rng_state_problem,
    "data_state": data_state_problem,
    "log_state": log_state_problem,
}


def state_problem(ckpt: dict) -> Optional[str]:
    """'FIELD: what is wrong' for the first malformed training-state entry of `ckpt`, or None."""
    for field, check in STATE_CHECKS.items():
        if field in ckpt:
            problem = check(ckpt[field])
            if problem:
                return f"{field}: {problem}"
    return None


def nonfinite_tensors(weights) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or inf (one isfinite pass each)."""
    if not isinstance(weights, dict):
        return []
    return [name for name, value in weights.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def nonfinite_problem(weights, what: str) -> Optional[str]:
    """'the WHAT weights hold NaN or inf in N tensor(s) (first: a, b, c)', or None when all are finite."""
    bad = nonfinite_tensors(weights)
    if not bad:
        return None
    first = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"the {what} weights hold NaN or inf in {len(bad)} tensor{'s' if len(bad) > 1 else ''} ({first})"
