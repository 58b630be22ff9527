"""The one checkpoint module: save (atomic), load (untrusted input: weights_only), list and resolve checkpoints.

Checkpoint format (a dict saved with torch.save, loaded with weights_only=True):
    format_version  int, CHECKPOINT_VERSION
    step            int, optimizer steps done
    config          dict, config.to_dict(cfg): the full config, so sample.py needs no flags
    model           state_dict of the bare network (no DDP "module." / compile "_orig_mod." prefixes)
    ema             state_dict of the EMA network, same keys as `model`
    ... plus training state (optimizer, lr_scheduler, grad_scaler, rng, data_state) written by train.py
"""
from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from config import Config, ConfigError, UserError, from_dict, load_config, validate
from storage.checkpoint_checks import nonfinite_problem, state_problem
from storage.files import write_output
from storage.paths import CHECKPOINTS, RunPaths

CHECKPOINT_VERSION = 1
# torch.save's old (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

class CheckpointError(UserError, RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message says what to do. `cause`: the message
    without its advice, for callers that give their own (train.py's resume lists the files that load)."""

    def __init__(self, message: str, cause: Optional[str] = None):
        super().__init__(message)
        self.cause = cause or message

def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save of the state (plus the format version), through the output guard (write_output: atomic,
    never through a link out of its folder, a full disk as one line). It replaces the file: the run folder
    was checked as a whole before (run_folder.prepare_run_dir)."""
    write_output(path, lambda f: torch.save({"format_version": CHECKPOINT_VERSION, **state}, f), replace=True)

def copy_checkpoint(source: str | Path, path: str | Path) -> None:
    """Make `path` a copy of the checkpoint file `source` without serialising the state again (a byte copy,
    written atomically). Not a hard link: the two files stay independent, so damage to one (a truncating
    write, a bad sector) leaves the other loadable."""
    def copy(f: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    write_output(path, copy, replace=True)

def _load_failure(path: Path, err: Exception) -> str:
    """Why torch.load refused `path`, in words that never suggest turning the weights-only safety off."""
    size = path.stat().st_size
    if size == 0:
        return f"checkpoint '{path}' is empty (0 bytes): its write was cut off (a full disk or a killed process)"
    with open(path, "rb") as f:
        head = f.read(16)
    zipped, legacy = zipfile.is_zipfile(path), head.startswith(LEGACY_MAGIC)
    if not zipped and head[:1] == b"\x80" and not legacy:  # a pickle protocol byte: pickle.dump, not torch.save
        return (f"'{path}' is a raw pickle file, not a torch.save checkpoint: ddpm-lab does not load raw pickles "
                f"(they could run code when loaded); load checkpoints that train.py or distill.py wrote")
    if not zipped and not (legacy and "weights only" in str(err).lower()):
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
    problem = state_problem(ckpt)
    if problem:
        reason = f"checkpoint '{path}' holds an invalid {problem}"
        raise CheckpointError(f"{reason}: the file was edited or damaged; use another checkpoint of the run",
                              cause=f"{reason}.")
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
        if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model"), dict) \
                and state_problem(ckpt) is None:
            names.append(p.name)
    return names

def find_latest_checkpoint(root: str | Path = CHECKPOINTS) -> Optional[Path]:
    """Newest last.pt (or step file) anywhere under `root`, by modification time."""
    candidates = list(Path(root).glob("*/last.pt")) or list(Path(root).glob("*/step_*.pt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


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


def loadable_step_files(folder: Path, exclude: Optional[Path] = None) -> list[tuple[Path, int]]:
    """(path, step) of the step files in folder that load (utils.loadable_checkpoints), newest first."""
    loadable = set(loadable_checkpoints(folder, exclude=exclude))
    return [(p, int(p.stem.split("_")[1])) for p in reversed(list_checkpoints(folder)) if p.name in loadable]


def load_resume_checkpoint(path: str | Path) -> dict:
    """The checkpoint to resume from; on failure a CheckpointError naming the older files that load."""
    path = Path(path)
    try:
        ckpt = load_checkpoint(path)
        problem = nonfinite_problem(ckpt["model"], "model") or nonfinite_problem(ckpt.get("ema"), "EMA")
        if problem:  # training cannot recover from NaN weights: every step after would be NaN too
            reason = f"'{path}' is unusable: {problem}, and training cannot recover from them."
            raise CheckpointError(reason, cause=reason)
        return ckpt
    except CheckpointError as err:
        good = loadable_step_files(path.parent, exclude=path)
        if good:
            names = ", ".join(f"{p} (step {s})" for p, s in good)
            hint = (f" These older checkpoints load: {names}. Resume from the newest with: "
                    f"python train.py --resume {good[0][0]}")
        else:
            hint = " No other checkpoint in that folder loads: start the run again without --resume."
        raise CheckpointError(f"cannot resume: {err.cause}{hint}") from None


def resume_path(resume: bool | str | Path, run_name: str) -> Path:
    """The checkpoint --resume means: True = the config's run folder; a folder = its last.pt, or its newest
    step file when last.pt is missing; a file as given. Nothing there: a CheckpointError naming the runs
    that exist under checkpoints/ and the command that resumes each."""
    path = RunPaths(run_name).checkpoints if resume is True else Path(resume)
    if resume is True or path.is_dir():
        steps = list_checkpoints(path)
        path = path / "last.pt" if (path / "last.pt").is_file() or not steps else steps[-1]
    if path.is_file():
        return path
    raise CheckpointError(f"cannot resume: no checkpoint at {path}; {existing_runs_hint()}")


def existing_runs_hint() -> str:
    """'; '-joined resume commands for the runs under checkpoints/ that hold a checkpoint (a zip: torch.save's
    format; checked without loading, so this stays fast for big files)."""
    runs = []
    for folder in sorted(p for p in CHECKPOINTS.glob("*") if p.is_dir()):
        files = [f for f in [folder / "last.pt", *reversed(list_checkpoints(folder))] if zipfile.is_zipfile(f)]
        if files and any(folder.glob("steps_*.pt")):  # round students: distill.py's run, resumed by it
            runs.append(f"distillation '{folder.name}': python distill.py --teacher TEACHER --resume")
        elif files:
            runs.append(f"run '{folder.name}': python train.py --resume {files[0]}")
    if not runs:
        return (f"{CHECKPOINTS}/ holds no run: start one without --resume, "
                f"e.g. python train.py --config configs/digits.yaml")
    return "runs that exist: " + "; ".join(runs)
