"""Where every output of ddpm-lab goes: one place names the folders, every script asks it.

All paths are relative to the working directory (as they always were), so running from another folder
keeps that folder's runs apart. A run R owns:

    checkpoints/R/            last.pt, step_XXXXXXX.pt            RunPaths(R).checkpoints
    checkpoints/R/ema/        post-hoc EMA snapshots ema_XXXXXXX.pt RunPaths(R).ema_snapshots
    results/images/R/         sample grids and sample.py folders  RunPaths(R).images
    results/images/R/app-inputs/  images sent to app.py's page    RunPaths(R).app_inputs
    results/plots/R/          loss curve, forward-process figure  RunPaths(R).plots
    results/logs/R/           TensorBoard                         RunPaths(R).logs
    results/eval/R.jsonl      one JSON line per evaluate.py run   RunPaths(R).eval_records

Caches shared by all runs live under data/: FID reference statistics, digit classifiers, Inception weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config import plain_name  # every name that becomes a path goes through it

__all__ = ["CHECKPOINTS", "CLASSIFIERS", "DATA", "EVAL_RECORDS", "FID_REFS", "INCEPTION", "RESULTS", "RunPaths",
           "ema_snapshot_folder", "eval_records_file", "plain_name"]

CHECKPOINTS = Path("checkpoints")
RESULTS = Path("results")
DATA = Path("data")
EVAL_RECORDS = RESULTS / "eval"       # <run_name>.jsonl files (evaluate.py --results-dir)
FID_REFS = DATA / "fid_refs"          # cached reference statistics (evaluate.py --ref-dir)
CLASSIFIERS = DATA / "classifiers"    # digit classifiers behind --features classifier
INCEPTION = DATA / "inception"        # Inception-v3 FID weights


@dataclass(frozen=True)
class RunPaths:
    """The folders of one run, named by its run_name (config.validate checks that it is a plain name)."""
    run_name: str

    @property
    def checkpoints(self) -> Path:
        return CHECKPOINTS / self.run_name

    @property
    def ema_snapshots(self) -> Path:
        return ema_snapshot_folder(self.checkpoints)

    @property
    def images(self) -> Path:
        return RESULTS / "images" / self.run_name

    @property
    def app_inputs(self) -> Path:
        """The page's uploads and painted masks, stored so that its sample.py commands can name them."""
        return self.images / "app-inputs"

    @property
    def plots(self) -> Path:
        return RESULTS / "plots" / self.run_name

    @property
    def logs(self) -> Path:
        return RESULTS / "logs" / self.run_name

    @property
    def eval_records(self) -> Path:
        return eval_records_file(self.run_name)


def eval_records_file(run_name: str, folder: Path = EVAL_RECORDS) -> Path:
    """<folder>/<run_name>.jsonl: evaluate.py's results file of a run (folder: --results-dir); run_name
    (--run-name, else the checkpoint's run_name or the --samples folder's name) must be a plain name."""
    plain_name("--run-name", run_name, f"the results file {Path(folder)}/<run-name>.jsonl", "--run-name digits_2")
    return Path(folder) / f"{run_name}.jsonl"


def ema_snapshot_folder(checkpoint_folder: Path) -> Path:
    """<folder>/ema/: the post-hoc EMA snapshots (sampling/posthoc.py) of the run whose checkpoints lie in folder."""
    return Path(checkpoint_folder) / "ema"
