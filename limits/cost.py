"""Estimates of what a configuration costs, computed before anything is allocated: the network is built on
torch's `meta` device (shapes only, no memory), its parameters counted, and one forward pass of a single
sample run on it while a dispatch mode follows the bytes of the tensors alive at each moment. Activations
grow linearly with the batch, so the peak of that pass times the batch is the estimate. These are estimates
(fp32, no allocator overhead or fragmentation): good to a small factor, enough to refuse what cannot fit."""
from __future__ import annotations

import weakref
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from config import cond_channels, to_dict
from model import build_model

FLOAT_BYTES = 4
UNCOUNTABLE = 10 ** 21  # bytes standing for "more than int64 can count"
# The forward's saved tensors make the peak: backward frees them as it makes the gradients (measured: a
# 32-channel U-Net at 32x32, batch 64, peak RSS growth 0.9x the forward's live peak; tests/test_safety_cost.py).
BACKWARD_FACTOR = 1.0


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create (views and in-place results not counted twice);
    a tensor's bytes are released when it is freed (weakref.finalize)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: dict[int, weakref.ref] = {}  # id -> the tensor, for those counted and still alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and self.tracked.get(id(t), lambda: None)() is not t:
                    self.tracked[id(t)] = weakref.ref(t)
                    size = t.numel() * t.element_size()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self.release, id(t), size)
        return out

    def release(self, key: int, size: int) -> None:
        self.live -= size
        self.tracked.pop(key, None)


def meta_model(cfg) -> torch.nn.Module:
    """The network of `cfg` with meta tensors: its shapes, no memory."""
    with torch.device("meta"):
        return build_model(cfg)


def sample_inputs(cfg, batch: int) -> tuple:
    """(x, t, y) meta inputs of one forward pass."""
    m = cfg.model
    if m.kind == "mlp":
        x = torch.empty(batch, 2, device="meta")
    else:
        extra = cond_channels(cfg.data.task, m.in_channels)
        x = torch.empty(batch, m.in_channels + extra, cfg.data.image_size, cfg.data.image_size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta") if m.num_classes > 0 else None
    return x, t, y


_CACHE: dict[tuple, int] = {}  # (model config, what) -> count: a second check of the same model is free


def _cached(cfg, what: str, measure) -> int:
    key = (repr((to_dict(cfg.model), cfg.data.image_size, cfg.data.task)), what)
    if key not in _CACHE:
        _CACHE[key] = measure(meta_model(cfg))
    return _CACHE[key]


def activation_peak(net: torch.nn.Module, cfg, training: bool) -> int:
    """The live-bytes peak of one forward pass of a single sample (with autograd's saved tensors in training)."""
    net.train(training)  # dropout's masks exist in training only
    x, t, y = sample_inputs(cfg, 1)
    mode = LiveBytes()
    try:
        with torch.set_grad_enabled(training), mode:
            out = net(x, t, y)
            del out
    except RuntimeError as err:  # a shape whose bytes overflow int64 (e.g. attention over 1e10 positions)
        if "overflow" not in str(err):
            raise
        return UNCOUNTABLE
    return mode.peak


def parameter_count(cfg) -> int:
    return _cached(cfg, "params", lambda net: sum(p.numel() for p in net.parameters()))


def activation_bytes(cfg, training: bool) -> int:
    """Activation bytes per sample: a training forward (kept for backward), or a sampling one (no_grad)."""
    return _cached(cfg, f"act{training}", lambda net: activation_peak(net, cfg, training))


def sample_bytes(cfg) -> int:
    """One sample (image or 2-D point) in float32."""
    return FLOAT_BYTES * (2 if cfg.model.kind == "mlp" else cfg.model.in_channels * cfg.data.image_size ** 2)


def training_memory(cfg) -> int:
    """Weights, gradients, Adam's two moments, the EMA copy (and one per post-hoc EMA profile), plus the
    activations of a train.batch_size micro-batch through forward and backward."""
    copies = 5 + len(cfg.train.ema_profiles)
    per_sample = int(BACKWARD_FACTOR * activation_bytes(cfg, training=True))
    return FLOAT_BYTES * parameter_count(cfg) * copies + per_sample * cfg.train.batch_size


def sampling_memory(cfg, batch_size: int, num_outputs: int = 0, guided: bool = False) -> int:
    """Weights, the activations of one batch (doubled by classifier-free guidance) and the float32 results
    kept for `num_outputs` samples."""
    batch = batch_size * (2 if guided else 1)
    return (FLOAT_BYTES * parameter_count(cfg) + activation_bytes(cfg, training=False) * batch
            + sample_bytes(cfg) * num_outputs)
