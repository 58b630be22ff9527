"""EMA of the weights: the classic decay with warm-up, and EDM2's power-function profiles (the snapshots that
post-hoc EMA, sampling/posthoc.py, rebuilds any length from)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from sampling.posthoc import power_ema_beta, sigma_rel_to_gamma, snapshot_name
from storage.checkpoints import CheckpointError
from storage.files import write_output


class EMA:
    """Exponential moving average of the weights, with decay warm-up min(decay, (1 + n) / (10 + n)) over the
    n updates so far, so early averages are not dominated by the random init.

    Not torch.optim.swa_utils.AveragedModel (get_ema_multi_avg_fn): its first update copies the weights
    instead of averaging them into the initial copy, it has no decay warm-up, and its state dict (a
    `module.` prefix, an n_averaged buffer) is not the checkpoint format (`ema`: the bare network's keys,
    `ema_num_updates`). So: the public in-place Tensor.lerp_, one call per tensor."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1 - self.current_decay()                       # ema <- ema + weight * (param - ema)
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param, weight)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1


class PowerFunctionEMA:
    """K power-function EMAs of a network's floating-point parameters and buffers (one float32 tensor list
    each), updated after every optimizer step. state_dict() is plain tensors, so checkpoints stay
    weights_only-loadable and a resume continues bitwise."""

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = [name for name, value in net.state_dict().items() if value.is_floating_point()]
        self.averages = [[value.detach().float().clone() for value in self._values(net)] for _ in self.sigma_rels]
        self.snapshot_steps: list[int] = []     # the snapshots this run's history wrote (see reconstruct_weights)

    def _values(self, net: torch.nn.Module) -> list[torch.Tensor]:
        state = net.state_dict()
        return [state[name] for name in self.names]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        """Average in the weights after optimizer step `step` (1, 2, ...). Buffers are averaged like
        parameters: this U-Net's are constants, so their average is themselves."""
        values = [v.float() for v in self._values(net)]
        for gamma, average in zip(self.gammas, self.averages):
            weight = 1.0 - power_ema_beta(gamma, step)
            for tensor, value in zip(average, values):
                tensor.lerp_(value, weight)

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "snapshot_steps": list(self.snapshot_steps),
                "averages": [dict(zip(self.names, average)) for average in self.averages]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise CheckpointError(f"the checkpoint tracks the EMA profiles {state['sigma_rels']}, the config "
                                  f"{self.sigma_rels}: resume with the checkpoint's train.ema_profiles")
        for average, saved in zip(self.averages, state["averages"]):
            for tensor, name in zip(average, self.names):
                tensor.copy_(saved[name])
        self.snapshot_steps = [int(s) for s in state["snapshot_steps"]]

    def write_snapshot(self, folder: Path, step: int) -> Path:
        """folder/ema_XXXXXXX.pt: every profile at `step` (atomic; torch.save of plain tensors)."""
        path = Path(folder) / snapshot_name(step)
        state = {"step": int(step), **{k: v for k, v in self.state_dict().items() if k != "snapshot_steps"}}
        write_output(path, lambda f: torch.save(state, f), replace=True)  # in the checked run folder
        if step not in self.snapshot_steps:
            self.snapshot_steps.append(int(step))
        return path
