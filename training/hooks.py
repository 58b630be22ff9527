"""TrainerHook: the named points of a run where a variant of training acts on the Trainer without subclassing
it (progressive distillation's rounds: training/distillation.py). A hook uses the Trainer's public methods and
attributes (load_weights, reset_optimizer, reset_loss_watch, set_lr_schedule, save, sample, step, ema, ...) and
adds its own checkpoint entries; pass a list of them as Trainer(..., hooks=[...]) or train(..., hooks=[...])."""
from __future__ import annotations

from typing import Optional


class TrainerHook:
    """Every default does nothing; the Trainer calls its hooks in list order at each point."""

    def on_setup(self, trainer, ckpt: Optional[dict]) -> None:
        """After the networks, optimizer and LR schedule are built, before the training state is set (fresh,
        or restored from the resume checkpoint `ckpt`; None for a fresh run)."""

    def restore(self, trainer, ckpt: dict) -> None:
        """After the Trainer restored its own state from `ckpt`: read back what checkpoint_state added."""

    def on_step_start(self, trainer) -> None:
        """Before each optimizer step (trainer.step: the steps done so far): e.g. a round boundary."""

    def on_step_end(self, trainer) -> None:
        """After each optimizer step (trainer.step counts it), before the run's log / save / sample."""

    def checkpoint_state(self, trainer) -> dict:
        """Entries added to every checkpoint (after the Trainer's own)."""
        return {}
