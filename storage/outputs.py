"""Output folders that never lose a user's file: sample.py lists what it writes in each folder
(ddpm-lab-samples.json), refuses a non-empty folder without --overwrite, and with it replaces only the files
an earlier run listed; a taken default folder becomes <folder>-2, -3, ...
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from config import UserError
from storage.files import check_output_path, output_folder_problem, write_bytes_output


class OutputFolderError(UserError, ValueError):
    """An output folder that cannot be written as asked; the message says which folder and what to do."""


MANIFEST = "ddpm-lab-samples.json"  # in every output folder: the files sample.py wrote there
# The names sample.py writes (sampling/pictures.py, editing/modes.py): a manifest entry of any other name is
# not ours, whatever the manifest says, so --overwrite never removes it.
OUR_NAMES = re.compile(r"\d{6}\.png|grid\.png|animation\.gif|trajectory\.png|scatter\.png|samples\.npy|"
                       r"forward\.gif|strip\.png|interpolation\.gif|invert\.json")


def read_manifest(out_dir: Path) -> set[str]:
    """Files an earlier sample.py run wrote into out_dir: only names of sample.py's own pattern (OUR_NAMES), so
    a doctored manifest can neither point outside the folder nor name a file of the user's."""
    path = out_dir / MANIFEST
    if not path.exists():
        return set()
    try:
        names = json.loads(path.read_text())["files"]
        if not isinstance(names, list):
            raise TypeError("files is not a list")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise OutputFolderError(f"'{path}' is not a manifest sample.py can read ({type(e).__name__}), so nothing in "
                          f"'{out_dir}' is known to be ours: choose another --out") from None
    return {n for n in names if isinstance(n, str) and OUR_NAMES.fullmatch(n)}


def check_out_dir(out_dir: Path, names: list[str], overwrite: bool) -> list[Path]:
    """Refuse, before sampling, an output folder where writing `names` would replace a file sample.py did not
    write there; returns the files of an earlier run (its manifest) to remove before writing."""
    problem = output_folder_problem(out_dir)
    if problem:
        raise OutputFolderError(f"--out {problem}: choose another output folder")
    for name in [MANIFEST, *names]:  # none is a link (results/images/<run>/...: nor leads out through one)
        check_output_path(out_dir / name, replace=True)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return []
    if not overwrite:
        raise OutputFolderError(f"output folder '{out_dir}' is not empty: choose a new or empty folder, or pass "
                          f"--overwrite to replace the files an earlier sample.py run wrote there ({MANIFEST})")
    ours = read_manifest(out_dir)
    for name in names:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and (name not in ours or not path.is_file()):
            raise OutputFolderError(f"'{path}' was not written by sample.py (not in '{out_dir / MANIFEST}'), and "
                              "--overwrite replaces only such files: move it away, or choose another --out")
    return [out_dir / n for n in sorted(ours) if (out_dir / n).is_file() or (out_dir / n).is_symlink()]


def free_default_folder(base: Path) -> Path:
    """The default folder, or when it already holds files (an earlier run, same settings), the first free
    <base>-2, <base>-3, ...: re-running a command keeps working and keeps the earlier samples."""
    folder, k = base, 1
    while folder.is_dir() and any(folder.iterdir()):
        k += 1
        folder = base.with_name(f"{base.name}-{k}")
    if folder != base:
        print(f"note: '{base}' already holds samples; writing to '{folder}' (--overwrite replaces the earlier ones)")
    return folder


def start_out_dir(out_dir: Path, names: list[str], stale: list[Path]) -> None:
    """Remove the earlier run's files, then list this run's files before writing them (so that a crash
    midway still leaves every written file listed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.unlink(missing_ok=True)
    manifest = json.dumps({"written_by": "ddpm-lab sample.py", "files": names}, indent=1).encode()
    write_bytes_output(out_dir / MANIFEST, manifest, replace=True)
