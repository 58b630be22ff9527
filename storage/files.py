"""Files written so that a crash never leaves half a file, and the check of an output folder."""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Optional

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

def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files save_checkpoint left in `folder` when a process was killed mid-write (only
    that pattern, only that folder). The caller must own the folder (train.py holds its run lock)."""
    removed = []
    for tmp in Path(folder).glob(TEMP_GLOB):
        if tmp.is_file() and re.fullmatch(r"\..+\.pt\.[0-9a-z_]{6,12}\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed

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
