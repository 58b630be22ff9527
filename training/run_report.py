"""What a training run tells its user: the start line, the end line (how to resume or sample), the summary
that train() returns, and the error of a diverged run (NonFiniteLossError, naming the last good checkpoint).
The stop codes the Trainer's ranks agree on sit next to the signal numbers (largest wins across ranks)."""
from __future__ import annotations

import math
import signal
import sys
from typing import Optional

from tqdm.auto import tqdm

from config import UserError
from model import count_parameters
from storage.run_folder import end_message, start_message
from training.parts import LossWatch

STOP_AT, NONFINITE = 1, 1000                 # stop codes next to signal numbers (largest wins across ranks)


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged: too many unhealthy steps (non-finite or exploding loss) in a row; the message names
    the last good checkpoint."""


def announce(trainer) -> None:
    """The run's start line (rank 0): what is trained, on what, from which step."""
    if trainer.dist.is_main:
        tqdm.write(start_message(trainer.cfg, step=trainer.step, params=count_parameters(trainer.net),
                                 items=len(trainer.base_dataset), world_size=trainer.dist.world_size,
                                 device=trainer.device, amp=trainer.amp, channels_last=trainer.channels_last))
        sys.stdout.flush()


def divergence_error(trainer) -> NonFiniteLossError:
    tcfg = trainer.tcfg
    return NonFiniteLossError(
        f"stopping at step {trainer.step}: {tcfg.max_nonfinite} steps in a row had a non-finite "
        f"loss or gradient, or an exploding loss (above max({LossWatch.FACTOR:g} x its running level, "
        f"{LossWatch.FLOOR:g})) (train.max_nonfinite={tcfg.max_nonfinite}); the non-finite ones "
        f"were skipped. {trainer.health.hint(trainer.last_saved)}")


def interruption(code: int) -> Optional[str]:
    """None (the run completed), 'stop_at', or the signal's name."""
    return None if not code else ("stop_at" if code == STOP_AT else signal.Signals(code).name)


def report_end(trainer, interrupted: Optional[str], wall: float) -> None:
    """The run's end line (rank 0), after the logger's last write."""
    if trainer.logger:
        trainer.logger.close()
        trainer.logger = None
    dist = trainer.dist
    launcher = f"torchrun --nproc_per_node {dist.world_size} train.py" if dist.enabled else None
    message = end_message(trainer.cfg.run_name, step=trainer.step, interrupted=interrupted,
                          saved=trainer.last_saved is not None, wall=wall, launcher=launcher)
    if message:
        print(message, flush=True)


def run_summary(trainer, code: int, interrupted: Optional[str], wall: float) -> dict:
    """train()'s return value."""
    return {"run_name": trainer.cfg.run_name, "step": trainer.step, "start_step": trainer.start_step,
            "interrupted": interrupted, "exit_code": 128 + code if code > STOP_AT else 0,
            "checkpoint": str(trainer.run_dir / "last.pt"), "wall_time_s": wall,
            "images_per_sec": trainer.images_per_sec, "skipped_steps": trainer.skipped_total,
            "final_loss": next((v for v in reversed(trainer.history) if math.isfinite(v)), math.nan),
            "model": trainer.net, "ema": trainer.ema.model}
