"""Progressive distillation (Salimans & Ho 2022): halve a trained model's DDIM step count, round by round.

    python distill.py --teacher checkpoints/digits/last.pt                      # 64 -> 32 -> 16 -> 8 -> 4 steps
    python distill.py --teacher checkpoints/digits/last.pt --start-steps 32 --steps 8 --round-steps 500 \\
        train.lr=1e-4 train.batch_size=64 train.ema_decay=0.999 train.amp=off
    python distill.py --teacher checkpoints/digits/last.pt --resume            # continue an interrupted one
    python sample.py --checkpoint checkpoints/digits_distill/last.pt            # the 4-step student, no flags

Outputs: checkpoints/<teacher_run>_distill/steps_NNNN.pt (the N-step student of each round) and last.pt (the
final one; step files as train.py writes them), each with a config saying its grid (deterministic DDIM, N steps,
"trailing" spacing); TensorBoard, loss curve and sample grids under results/ as for train.py. A class-conditional
teacher is distilled with its classifier-free guidance folded in (--guidance-scale, default the teacher's
sample.guidance_scale; 1 = unguided): the student then samples guided in one model call per step.

Exit codes as train.py: 0 done, 1 user error (one line), 130 / 143 after Ctrl-C / SIGTERM saved a checkpoint.
How it works: training/distillation.py (the math, the loss and the rounds' hook on the Trainer).
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional

from config import POSITIVE, ConfigError, UserError, check_number
from limits import add_limit_args, apply_limit_args
from sampling.loading import load_for_sampling
from storage.checkpoints import load_resume_checkpoint, resume_path
from training.distillation import DistillPlan, check_resume_plan, distill_config, run_distillation
from utils import ArgumentParser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description="Progressive distillation of a trained model.",
                                epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="PATH", help="the checkpoint to distil (its EMA weights)")
    p.add_argument("--start-steps", type=int, default=64, metavar="N0", help="the teacher's DDIM steps (64)")
    p.add_argument("--steps", type=int, default=4, metavar="N", help="the final student's steps (4)")
    p.add_argument("--round-steps", type=int, default=1000, metavar="M", help="optimizer steps per round (1000)")
    p.add_argument("--guidance-scale", type=float, metavar="W",
                   help="classifier-free guidance folded into the student (default: the teacher's "
                        "sample.guidance_scale; 1 = none)")
    p.add_argument("--resume", action="store_true", help="continue checkpoints/<teacher_run>_distill/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over, deleting an existing distillation run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train.* overrides, e.g. train.lr=1e-4")
    add_limit_args(p)
    return p.parse_intermixed_args(argv)


def plan_and_config(args):
    """(plan, config) from the flags and the teacher checkpoint; every refusal happens here, before training."""
    for flag in ("--start-steps", "--steps", "--round-steps"):
        check_number(flag, getattr(args, flag[2:].replace("-", "_")), POSITIVE)
    teacher, _, teacher_cfg, _ = load_for_sampling(args.teacher, "cpu")
    if teacher_cfg.data.task != "generate":  # the student's loss does not pass a condition image
        raise ConfigError(f"the teacher is image-conditioned (data.task={teacher_cfg.data.task}); distill.py "
                          "distils unconditioned and class-conditional models only")
    scale = teacher_cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    if teacher_cfg.model.num_classes == 0 and args.guidance_scale is None:
        scale = 1.0
    plan = DistillPlan(teacher=str(args.teacher), teacher_weights=teacher.state_dict(), start_steps=args.start_steps,
                       steps=args.steps, round_steps=args.round_steps, guidance_scale=float(scale))
    return plan, distill_config(teacher_cfg, plan, args.overrides)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        apply_limit_args(args)
        plan, cfg = plan_and_config(args)
        checkpoint = resume = None
        if args.resume:
            resume = resume_path(True, cfg.run_name)
            checkpoint = load_resume_checkpoint(resume)
            check_resume_plan(checkpoint, plan, resume)
        summary = run_distillation(cfg, plan, resume, checkpoint=checkpoint, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted without saving (the last checkpoint on disk is intact)", file=sys.stderr)
        return 128 + signal.SIGINT
    if not summary["interrupted"]:
        print(f"student ({plan.steps} steps): {summary['checkpoint']}; sample with: python sample.py "
              f"--checkpoint {summary['checkpoint']}")
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
