"""The models the page can use: the server's own list of runs (the browser sends a run NAME, checked against this
list, never a path), each loaded once, on first use, and kept (commands.load_source, as sample.py loads).

A run is a folder under checkpoints/ with a checkpoint (its last.pt, else its newest step file), named by the
folder; app.py --checkpoint PATH adds that file (named by its folder too, or its own name), --pretrained DIR a
converted diffusers model ("pretrained:<name>")."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from commands import Source, build_parser, load_source, parse_device
from config import UserError
from storage.checkpoints import list_checkpoints
from storage.paths import CHECKPOINTS

DESCRIPTION = "sample.py's flags, as the page builds them"


class RunError(UserError, ValueError):
    """A run name that is not on the server's list."""


@dataclass
class Loaded:
    """A loaded run: the model, the sample.py flags that load it (the start of every command the page shows),
    and the lock that lets one request at a time use it."""
    name: str
    source: Source
    argv: list[str]                   # the flags of the run (what the list says) and --device when given
    listed: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)


def parser():
    """sample.py's parser, raising a UserError instead of exiting (the server keeps serving)."""
    p = build_parser(DESCRIPTION, "")

    def error(message: str):
        raise RunError(f"{' '.join(message.split())}")
    p.error = error  # argparse calls self.error for every bad flag
    return p


def run_checkpoint(folder: Path) -> Optional[Path]:
    last = folder / "last.pt"
    steps = list_checkpoints(folder)
    return last if last.is_file() else (steps[-1] if steps else None)


def found_runs(root: Path = CHECKPOINTS) -> dict[str, list[str]]:
    """{run name: the sample.py flags that load it} for the runs under root, newest first."""
    runs = []
    for folder in (p for p in Path(root).glob("*") if p.is_dir() and not p.is_symlink()):
        ckpt = run_checkpoint(folder)
        if ckpt is not None:
            runs.append((ckpt.stat().st_mtime, folder.name, ckpt))
    return {name: ["--checkpoint", str(ckpt)] for _, name, ckpt in sorted(runs, reverse=True)}


class Models:
    """The server's list of runs and the models loaded from it (each once)."""

    def __init__(self, checkpoint: Optional[str] = None, pretrained: Optional[str] = None, device: str = "auto",
                 root: Path = CHECKPOINTS):
        self.root, self.device = Path(root), device
        self.extra: dict[str, list[str]] = {}
        if pretrained:
            self.extra[f"pretrained:{Path(pretrained).name or pretrained}"] = ["--pretrained", str(pretrained)]
        elif checkpoint:
            self.extra[Path(checkpoint).parent.name or Path(checkpoint).stem] = ["--checkpoint", str(checkpoint)]
        self.loaded: dict[str, Loaded] = {}
        self.loading = threading.Lock()

    def runs(self) -> dict[str, list[str]]:
        """{name: flags}: the given model first, then the runs under checkpoints/ (newest first)."""
        found = found_runs(self.root)
        return {**self.extra, **{k: v for k, v in found.items() if k not in self.extra}}

    def names(self) -> list[str]:
        return list(self.runs())

    def default(self) -> Optional[str]:
        names = self.names()
        return names[0] if names else None

    def get(self, name: str) -> Loaded:
        """The loaded run of that name; a name not on the list is refused before anything is opened."""
        runs = self.runs()
        if not isinstance(name, str) or name not in runs:
            shown = ", ".join(runs) or "none"
            raise RunError(f"run {str(name)[:80]!r} is not on this server's list ({shown}): pick one from the list")
        with self.loading:
            if name not in self.loaded or self.loaded[name].listed != runs[name]:  # new, or another file now
                flags = runs[name] + ([] if self.device == "auto" else ["--device", self.device])
                args = parser().parse_args(flags)
                self.loaded[name] = Loaded(name, load_source(args, parse_device(args.device)), flags, runs[name])
            return self.loaded[name]
