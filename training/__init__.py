"""Training on top of the core: the Trainer and its loop (trainer), its parts (distributed set-up, optimizer and
LR schedule, stop signals, the loss watch), EMA and EDM2's power-function EMA (ema), the run log (runlog), exact
resume and the data order (resume, data_order), and progressive distillation (distillation). train.py and
distill.py are its command lines."""
from training.trainer import Trainer, train

__all__ = ["Trainer", "train"]
