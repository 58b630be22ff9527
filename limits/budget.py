"""What this machine allows, and the checks that refuse a request beyond it with one line: the estimate, the
limit, and how to lower the request or raise the limit (--memory-limit, --max-model-calls; a library caller
sets the same through set_limits). Memory: 80% of the RAM available now (and of what `ulimit -v` leaves) on
the CPU, 90% of the free memory of a CUDA device. Work: at most 1e9 network evaluations of one sample (steps
x samples, x resample for RePaint); disk: the PNGs planned must fit the free space of their folder."""
from __future__ import annotations

import os
import re
import resource
import shutil
from pathlib import Path
from typing import Optional

import torch

from config import UserError

RAM_FRACTION, DEVICE_FRACTION = 0.8, 0.9
MAX_MODEL_CALLS = 10 ** 9  # ~ a day of a 35M-parameter U-Net at 32x32 on a fast GPU; far more on a CPU
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "pb": 10 ** 15,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_UNSET = "machine"
SETTINGS = {"memory": _UNSET, "model_calls": MAX_MODEL_CALLS}  # set_limits() changes them (the flags do)


class CostError(UserError):
    """A request that cannot fit this machine's memory, disk or a sane amount of work (estimated first)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def parse_size(text: str) -> Optional[int]:
    """'64GB', '512MiB', '2e9' -> bytes; 'none' -> None (no limit). ValueError otherwise."""
    if text.strip().lower() in ("none", "off", "unlimited"):
        return None
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size: use e.g. 64GB, 512MiB or none")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def set_limits(memory=_UNSET, model_calls=MAX_MODEL_CALLS) -> None:
    """memory: bytes, None (no limit) or 'machine' (the default: measured); model_calls: int or None."""
    SETTINGS.update(memory=memory, model_calls=model_calls)


def available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), capped by what the address-space limit (ulimit -v) leaves."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            used = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            used = 0
        free = min(free, max(soft - used, 0))
    return free


def memory_limit(device=None) -> tuple[Optional[int], str]:
    """(bytes allowed, in words) for work on `device`; (None, ...) when the limit is off."""
    chosen = SETTINGS["memory"]
    if chosen is None:
        return None, "no limit"
    if chosen != _UNSET:
        return int(chosen), f"--memory-limit {human_bytes(chosen)}"
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEVICE_FRACTION * free), f"{device} allows {human_bytes(DEVICE_FRACTION * free)} " \
                                            f"({DEVICE_FRACTION:.0%} of its free memory)"
    ram = RAM_FRACTION * available_ram()
    capped = resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    return int(ram), f"this machine allows {human_bytes(ram)} ({RAM_FRACTION:.0%} of the available RAM" + \
        (" within ulimit -v)" if capped else ")")


def check_memory(estimate: int, what: str, fix: str, device=None) -> None:
    """Refuses `what` when its estimated bytes exceed the limit; `fix` says what shrinks it ('lower ...')."""
    limit, words = memory_limit(device)
    if limit is not None and estimate > limit:
        raise CostError(f"{what} needs ~{human_bytes(estimate)} (an estimate); {words}: {fix}, or raise "
                        f"the limit with --memory-limit {human_bytes(estimate * 1.25).replace(' ', '')} (or none)")


def check_model_calls(calls: int, what: str, lower: str) -> None:
    """Refuses work of more than the ceiling of network evaluations (one sample through the network once)."""
    limit = SETTINGS["model_calls"]
    if limit is not None and calls > limit:
        raise CostError(f"{what} plans {calls:.3g} network evaluations of one sample (limit {limit:.3g}; at "
                        f"10,000 a second: {calls / 1e4 / 86400:.3g} days): lower {lower}, or raise "
                        f"the limit with --max-model-calls {calls} (or none)")


def check_disk(num_bytes: int, folder: Path, what: str, lower: str) -> None:
    """Refuses writing ~num_bytes under `folder` (or its nearest existing parent) when the disk has less free."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if num_bytes > free:
        raise CostError(f"{what} would write ~{human_bytes(num_bytes)} (an estimate) but '{folder}' has "
                        f"{human_bytes(free)} free: lower {lower}, or free space there")


def add_limit_args(parser) -> None:
    """--memory-limit and --max-model-calls, the same on every script; apply_limit_args reads them."""
    g = parser.add_argument_group("cost limits (every request is estimated before anything is allocated)")
    g.add_argument("--memory-limit", metavar="SIZE", help="most memory a command may plan, e.g. 64GB, 512MiB or "
                   "none (default: 80%% of the available RAM; on CUDA 90%% of the device's free memory)")
    g.add_argument("--max-model-calls", metavar="N", help=f"most network evaluations of one sample a command may "
                   f"plan (default {MAX_MODEL_CALLS:.0e}; none = no limit)")


def apply_limit_args(args) -> None:
    """set_limits from the flags of add_limit_args; a bad value is a CostError."""
    memory, calls = _UNSET, MAX_MODEL_CALLS
    try:
        if getattr(args, "memory_limit", None) is not None:
            memory = parse_size(args.memory_limit)
    except ValueError as err:
        raise CostError(f"--memory-limit {err}") from None
    text = getattr(args, "max_model_calls", None)
    if text is not None:
        if text.lower() == "none":
            calls = None
        elif re.fullmatch(r"[0-9]+(e\+?[0-9]+)?", text.lower()) and float(text) >= 1:
            calls = int(float(text))
        else:
            raise CostError(f"--max-model-calls {text!r} is not a count: use e.g. 1e10, or none")
    set_limits(memory, calls)
