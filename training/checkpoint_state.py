"""What a Trainer checkpoint holds and how a resume puts it back: the Trainer's own entries (weights, EMA,
optimizer, LR schedule, GradScaler, every rank's RNG state, the data position, the log state, post-hoc EMA).
Hooks add theirs on top (TrainerHook.checkpoint_state / restore). Reading the file and refusing a checkpoint
that does not fit the config: storage/checkpoints.py and training/resume.py."""
from __future__ import annotations

import torch

from config import to_dict
from training.resume import restore_optimization, restore_rng


def trainer_entries(trainer, rng_states: list) -> dict:
    """The Trainer's entries of a checkpoint; `rng_states`: every rank's (parts.gather_rng_states)."""
    return {"step": trainer.step, "config": to_dict(trainer.cfg), "model": trainer.net.state_dict(),
            "ema": trainer.ema.model.state_dict(), "ema_num_updates": float(trainer.ema.num_updates),
            "optimizer": trainer.optimizer.state_dict(), "lr_scheduler": trainer.scheduler.state_dict(),
            "grad_scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "rng": {"world_size": trainer.dist.world_size, "ranks": rng_states},
            "data_state": trainer.data.state_dict(),
            "cpu_threads": torch.get_num_threads() if trainer.device.type == "cpu" else None,
            "log_state": {"skipped_total": trainer.skipped_total,
                          "loss_history": torch.tensor(trainer.history, dtype=torch.float32),
                          "loss_level": float(trainer.loss_watch.level)},
            **({"phema": trainer.phema.state_dict()} if trainer.phema is not None else {})}  # post-hoc EMA: on only


def restore_trainer_entries(trainer, ckpt: dict) -> None:
    """The training state of `ckpt` into `trainer`; hyper-parameters (lr, betas, weight decay, fused) come from
    the current config."""
    restore_optimization(ckpt, net=trainer.net, ema=trainer.ema, optimizer=trainer.optimizer,
                         scheduler=trainer.scheduler, lr=trainer.tcfg.lr)
    if trainer.scaler is not None and ckpt.get("grad_scaler"):
        trainer.scaler.load_state_dict(ckpt["grad_scaler"])
    trainer.step = trainer.last_saved = int(ckpt["step"])
    if trainer.phema is not None:
        trainer.phema.load_state_dict(ckpt["phema"])
    trainer.data.load_state_dict(ckpt["data_state"])
    log_state = ckpt.get("log_state") or {}
    trainer.skipped_total = int(log_state.get("skipped_total", 0))
    trainer.history = [float(v) for v in log_state.get("loss_history", torch.zeros(0)).tolist()]
    restore_rng(ckpt["rng"], rank=trainer.dist.rank, seed=trainer.cfg.seed, step=trainer.step)
