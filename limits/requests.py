"""The cost checks of each kind of request, called by the library functions before they allocate: training
(Trainer), loading a model for sampling (sampling/loading.py, interop/pretrained.py), sampling and editing
(sample.py, evaluate.py, editing/modes.py). Each estimates with limits/cost.py and refuses with budget.py."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from limits.budget import check_disk, check_memory, check_model_calls
from limits.cost import FLOAT_BYTES, parameter_count, sample_bytes, sampling_memory, training_memory

PNG_OVERHEAD = 100  # bytes of a PNG's signature and chunks around its (here: assumed uncompressed) pixels


def _model_words(cfg) -> str:
    m = cfg.model
    if m.kind == "mlp":
        return f"the {m.mlp_layers}-layer MLP of width {m.mlp_hidden}"
    return (f"a U-Net of model.channels={m.channels}, channel_mult={m.channel_mult} at "
            f"data.image_size={cfg.data.image_size}")


def check_parameters(cfg, device=None) -> int:
    """The weights alone (counted on the meta device) must fit: a config whose network is too big is refused
    before the first tensor of it exists. Returns the parameter count."""
    params = parameter_count(cfg)
    sizes = ("model.mlp_hidden / model.mlp_layers" if cfg.model.kind == "mlp"
             else "model.channels / model.channel_mult / model.num_res_blocks") + " / model.num_classes"
    check_memory(FLOAT_BYTES * params, f"{_model_words(cfg)} ({params:.3g} parameters)", f"lower {sizes}", device)
    return params


def check_training(cfg, device=None) -> None:
    """Weights, gradients, Adam, EMA and the activations of a train.batch_size micro-batch."""
    params = check_parameters(cfg, device)
    check_memory(training_memory(cfg), f"training {_model_words(cfg)} ({params:.3g} parameters) at "
                 f"train.batch_size={cfg.train.batch_size}",
                 "lower train.batch_size (train.grad_accum keeps the effective batch) or the model's size", device)


def check_model(cfg, device=None, what: str = "sampling") -> None:
    """A network loaded to sample from: its weights and one sample's pass must fit."""
    params = check_parameters(cfg, device)
    check_memory(sampling_memory(cfg, 1), f"{what} with {_model_words(cfg)} ({params:.3g} parameters), even "
                 "one sample at a time", "lower data.image_size or the model's size", device)


def check_sampling(cfg, num_samples: int, batch_size: int, steps: int, device=None, *, guided: bool = False,
                   out_folder: Optional[Path] = None, what: str = "sampling", count_flag: str = "--num-samples",
                   steps_flags: str = "--steps", batch_flag: str = " or --batch-size") -> None:
    """`num_samples` results in batches of `batch_size`, `steps` network evaluations each (RePaint: with its
    resampling): memory of a batch and of the results kept, the work, and the PNGs' disk space."""
    batch = min(batch_size, num_samples)
    check_model_calls(num_samples * steps * (2 if guided else 1),
                      f"{what} of {num_samples} sample(s) x {steps} evaluation(s)" + (" x 2 (guidance)" * guided),
                      f"{count_flag} or {steps_flags}")
    check_memory(sampling_memory(cfg, batch, num_samples, guided), f"{what} of {num_samples} sample(s) in batches "
                 f"of {batch} with {_model_words(cfg)}", f"lower {count_flag}{batch_flag}", device)
    if out_folder is not None and cfg.model.kind != "mlp":
        png = sample_bytes(cfg) // FLOAT_BYTES + PNG_OVERHEAD
        check_disk(num_samples * png, out_folder, f"{what} of {num_samples} PNG(s)", count_flag)
