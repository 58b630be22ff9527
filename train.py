"""Train a diffusion model from a YAML preset.

    python train.py                                      # configs/cifar10.yaml: the DDPM paper recipe
    python train.py --config configs/digits.yaml         # quickstart: 2 CPU cores, a few minutes
    python train.py --config configs/mnist.yaml train.lr=1e-4 model.dropout=0.0
    python train.py --config configs/digits.yaml --resume           # continue checkpoints/digits/last.pt
    python train.py --resume checkpoints/digits/step_0002000.pt     # config comes from the checkpoint
    torchrun --nproc_per_node 4 train.py                 # DDP: train.batch_size is PER PROCESS (per GPU)

Outputs of run R: checkpoints/R/{last.pt, step_XXXXXXX.pt}, results/logs/R/ (tensorboard --logdir
results/logs), results/images/R/step_XXXXXXX.png (EMA samples, fixed seed), results/plots/R/loss.png.

Exit codes: 0 done; 1 user error (config, checkpoint, missing data, diverged training: the message says
what to do); 130 / 143 (128 + signal number, the shell convention) after Ctrl-C / SIGTERM stopped the run
and saved a checkpoint, so `python train.py && python sample.py` does not go on with an unfinished run.

How resume, the NaN guard and the run lock work: training/trainer.py (the library code behind this command line).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional

from config import UserError, load_config
from limits import add_limit_args, apply_limit_args
from storage.checkpoints import CheckpointError, load_resume_checkpoint, resume_path
from training.resume import config_for_resume
from training.trainer import train
from utils import ArgumentParser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description="Train a diffusion model.", epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset (default configs/cifar10.yaml; with --resume PATH the "
                                    "checkpoint's own config)")
    p.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue checkpoints/<run_name>/last.pt of the config, or the checkpoint PATH, or a "
                        "run folder PATH (its last.pt, else its newest step file)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if checkpoints/<run_name>/ holds a run (deletes its checkpoints and logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    add_limit_args(p)
    args = p.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    # `--resume train.lr=1e-4` means a bare --resume followed by an override, not a file named so.
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        apply_limit_args(args)
        checkpoint, resume = None, args.resume
        if resume is None or resume is True:
            cfg = load_config(args.config, args.overrides)
        if resume is True:  # the run of the given config
            resume = resume_path(True, cfg.run_name)
            checkpoint = load_resume_checkpoint(resume)
        elif resume is not None:  # a file or run folder: its own config unless --config is given
            resume = resume_path(resume, "")
            checkpoint = load_resume_checkpoint(resume)
            cfg = (load_config(args.config, args.overrides) if args.config
                   else config_for_resume(checkpoint, args.overrides))
        if checkpoint is not None and isinstance(checkpoint.get("distill"), dict):  # distill.py's, not ours
            teacher = checkpoint["distill"].get("teacher", "TEACHER")
            raise CheckpointError(f"{resume} is a distillation checkpoint: continue it with "
                                  f"python distill.py --teacher {teacher} --resume")
        summary = train(cfg, resume, checkpoint=checkpoint, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint for the unfinished step
        print("aborted without saving (the last checkpoint on disk is intact)", file=sys.stderr)
        return 128 + signal.SIGINT
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
