"""Training on top of the core: the Trainer and its loop (trainer), the loss object it calls each step (loss)
and the hooks a variant of training plugs in (hooks), its parts (distributed set-up, optimizer and LR schedule,
stop signals, the loss watch), the checkpoint's entries (checkpoint_state), the start/end report (run_report),
EMA and EDM2's power-function EMA (ema), the run log (runlog), exact resume and the data order (resume,
data_order), and progressive distillation as a loss and a hook (distillation). train.py and distill.py are its
command lines."""
from training.trainer import Trainer, train

__all__ = ["Trainer", "train"]
