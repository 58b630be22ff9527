"""The output guard every writer goes through (write_output): files written atomically (a crash or a full disk
never leaves half a file, nor loses the previous one), never through a symbolic link that leads out of the
output folder, never over a file without the caller's flag, and an OS write error as one line; plus the check
of an output folder."""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from config import UserError


class OutputError(UserError, ValueError):
    """An output that cannot be written as asked (a link out, a file in the way, a full disk); one line."""


FULL = "free some space or choose another --out"
NOT_WRITABLE = "choose a writable folder (another --out)"
WRITE_ERRORS = {errno.ENOSPC: ("no space left on device", FULL), errno.EDQUOT: ("disk quota exceeded", FULL),
                errno.EROFS: ("read-only file system", NOT_WRITABLE), errno.EACCES: ("permission denied", NOT_WRITABLE),
                errno.EPERM: ("permission denied", NOT_WRITABLE), errno.EIO: ("input/output error", NOT_WRITABLE)}

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


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: str | Path) -> str:
    """The free space of the disk that holds (or will hold) path, as '12 MB' ('unknown' if it cannot be read)."""
    try:
        free = shutil.disk_usage(_nearest_existing(Path(path))).free
    except OSError:
        return "unknown space"
    for unit, size in (("GB", 2**30), ("MB", 2**20)):
        if free >= size:
            return f"{free / size:.1f} GB" if unit == "GB" else f"{free // size} MB"
    return f"{free // 1024} KB"


def write_error(path: str | Path, err: OSError) -> OutputError:
    """An OS error of a write as one line naming the file, the free space and what to do."""
    reason, fix = WRITE_ERRORS.get(err.errno, (err.strerror or type(err).__name__, NOT_WRITABLE))
    if str(output_root(Path(path))) in OUTPUT_TOPS:  # a run folder or cache: no --out to choose
        fix = fix.replace("choose another --out", "run from a folder on another disk").replace(
            "(another --out)", "(run from another folder)")
    return OutputError(f"{reason} writing '{path}' ({free_space(path)} free): {fix}")


OUTPUT_TOPS = ("checkpoints", "results", "data")  # storage/paths.py's folders, relative to the working folder


def output_root(path: Path) -> Path:
    """The folder a write must stay inside: checkpoints/, results/ or data/ for the run folders and caches
    (links below them must not lead out), else the file's own folder (a path the user typed: only the file
    itself must not be a link)."""
    parts = Path(os.path.normpath(path)).parts
    return Path(parts[0]) if len(parts) > 1 and parts[0] in OUTPUT_TOPS else path.parent


def check_output_path(path: str | Path, *, replace: bool = False, flag: str = "--overwrite",
                      root: Optional[str | Path] = None) -> Path:
    """Refuse (OutputError) a path that is a symbolic link, that leads out of `root` (output_root by default;
    root itself may be a link, e.g. to another disk) through a link, that is a folder, or, unless `replace`,
    that already exists. Checked before the work that produces the file, and again by write_output."""
    path = Path(path)
    root = Path(root) if root is not None else output_root(path)
    if path.is_symlink():
        raise OutputError(f"'{path}' is a symbolic link (to '{os.readlink(path)}'): ddpm-lab never writes "
                          f"through a link; remove it or choose another folder")
    inside, real_root = path.parent.resolve(), root.resolve()
    if inside != real_root and real_root not in inside.parents:
        link = next((p for p in [path.parent, *path.parent.parents] if p.is_symlink()), path.parent)
        raise OutputError(f"'{path}' would be written to '{inside / path.name}', outside '{root}' (through the "
                          f"link '{link}'): remove the link or choose another folder")
    if path.is_dir():
        raise OutputError(f"'{path}' is a folder, not a file: move it away or choose another folder")
    if path.exists() and not replace:
        raise OutputError(f"'{path}' already exists: move it away, or pass {flag} to replace it")
    return path


def check_output_folder(folder: str | Path, root: Optional[str | Path] = None) -> Path:
    """A folder that writers fill themselves (TensorBoard): it must not be, or lie under, a link out of root."""
    folder = Path(folder)
    check_output_path(folder / "_", replace=True, root=root)
    return folder


def write_output(path: str | Path, write: Callable[[BinaryIO], None], *, replace: bool = False,
                 flag: str = "--overwrite", root: Optional[str | Path] = None) -> Path:
    """THE way ddpm-lab writes a file: check_output_path, then atomic_write; an OSError (a full disk, a
    read-only folder) becomes one OutputError line, and the previous file stays as it was."""
    path = check_output_path(path, replace=replace, flag=flag, root=root)
    recorder = _ErrorRecorder()
    try:
        atomic_write(path, lambda f: write(recorder.wrap(f)))
    except OSError as err:
        raise write_error(path, err) from None
    except Exception:  # torch.save and others re-raise a failed write as their own error: name the OS's
        if recorder.error is None:
            raise
        raise write_error(path, recorder.error) from None
    return path


class _ErrorRecorder:
    """Wraps the temp file so that an OSError of a write is known even when the library that writes turns it
    into its own exception (torch.save raises RuntimeError 'unexpected pos')."""

    def __init__(self):
        self.error: Optional[OSError] = None

    def wrap(self, f: BinaryIO) -> BinaryIO:
        recorder = self

        class Recording:
            def write(self, data):
                try:
                    return f.write(data)
                except OSError as err:
                    recorder.error = err
                    raise

            def __getattr__(self, name):
                return getattr(f, name)
        return Recording()


def write_bytes_output(path: str | Path, data: bytes, **guard) -> Path:
    """write_output of bytes already in memory (JSON, records, safetensors)."""
    return write_output(path, lambda f: f.write(data), **guard)
