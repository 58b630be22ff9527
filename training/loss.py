"""The Trainer's loss objects (as EDM's training/loss.py): a callable loss(trainer, batch) -> (per-example
losses (B,), their timesteps t (B,)), called on each micro-batch inside the Trainer's step, which averages,
scales, backpropagates and logs it. train.py trains with DiffusionLoss; progressive distillation passes its
DistillationLoss (training/distillation.py). A loss reads the Trainer's public attributes only (model, diffusion,
cfg, device, amp) and draws its randomness from the global RNG streams, which checkpoints save (exact resume)."""
from __future__ import annotations

from typing import Optional

import torch

from sampling.conditioning import condition_for, with_condition
from utils import autocast


class DiffusionLoss:
    """train.py's loss: the diffusion's per-example training loss (Diffusion.training_losses: t and noise from
    the global RNG) of the model on one micro-batch. An image-conditioned model (data.task) sees its condition
    made from the augmented target itself, so target and condition share every flip."""

    def __call__(self, trainer, batch: tuple[torch.Tensor, Optional[torch.Tensor]]):
        x0, y = batch
        model = with_condition(trainer.model, condition_for(trainer.cfg, x0))
        with autocast(trainer.device, trainer.amp):
            return trainer.diffusion.training_losses(model, x0, y)
