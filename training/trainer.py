"""The Trainer: setup, the training step, logging, sampling and checkpoints of one run. train.py is its
command line. A variant of training (e.g. progressive distillation, training/distillation.py) does not subclass
it: it passes a LOSS object (training/loss.py), called on each micro-batch (the default: DiffusionLoss, the
diffusion's training loss), and HOOKS (training/hooks.py) called at named points of the run, which act through
the Trainer's public methods (load_weights, reset_optimizer, set_lr_schedule, save, ...) and add their own
checkpoint entries. The checkpoint's entries: training/checkpoint_state.py; what the run reports (start and end
lines, the summary, the divergence error): training/run_report.py.

Resume is exact (bitwise on CPU, same thread count): data order, flips and every RNG state continue where
the run stopped (training/data_order.py, training/resume.py, which also refuses changed model/diffusion/data
settings). Unhealthy steps (a non-finite loss or gradient: skipped; an exploding loss: parts.LossWatch) stop
the run after train.max_nonfinite in a row, naming the last good checkpoint, which rotation never deletes
(storage/run_folder.CheckpointHealth, with the run lock and --overwrite). Each step reads its numbers on the
host once (parts.read_step, which says why).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from config import Config, ConfigError
from dataset import build_dataset, check_data
from diffusion import build_diffusion
from limits import check_training
from model import build_model
from sampling.conditioning import conditioned
from sampling.conditions import held_out_conditions
from storage.checkpoints import copy_checkpoint, load_resume_checkpoint, resume_path, save_checkpoint
from storage.paths import RESULTS as RESULTS_ROOT
from storage.paths import RunPaths
from storage.run_folder import CheckpointHealth, lock_run_dir, prepare_run_dir
from training.checkpoint_state import restore_trainer_entries, trainer_entries
from training.data_order import NOISE, training_stream
from training.ema import EMA, PowerFunctionEMA
from training.loss import DiffusionLoss
from training.parts import (LossWatch, StopSignals, agreed_code, all_finite, build_optimizer, gather_rng_states,
    lr_factor, read_step, setup_distributed, unscale_and_clip, wrap_model)
from training.resume import check_resumable, warn_thread_count
from training.run_report import (NONFINITE, STOP_AT, NonFiniteLossError, announce, divergence_error, interruption,
    report_end, run_summary)
from training.runlog import RunLogger, reduce_interval, save_training_grid, write_interval
from utils import autocast, derive_seed, resolve_amp, resolve_channels_last, seed_everything


class Trainer:
    """One run: `run()` repeats train_step() and logs / saves / samples at their intervals until
    train.max_steps, a stop signal (SIGINT / SIGTERM: save, then stop), stop_at, or divergence.
    `loss`: called as loss(trainer, batch) -> (per-example losses, t) on each micro-batch (default
    DiffusionLoss()); `hooks`: TrainerHook objects, called in order at their points of the run."""

    def __init__(self, cfg: Config, resume: Optional[bool | str | Path] = None, checkpoint: Optional[dict] = None,
                 overwrite: bool = False, stop_at: Optional[int] = None, *, loss=None, hooks=()):
        self.cfg, self.tcfg, self.stop_at = cfg, cfg.train, stop_at
        self.loss, self.hooks = loss if loss is not None else DiffusionLoss(), list(hooks)
        self.data = self.logger = self.signals = self.dist = self.lock = None
        self._threads = torch.get_num_threads()
        try:
            self._setup(resume, checkpoint, overwrite)
        except BaseException:
            self.close()  # a failed setup must not leave threads, workers or a process group behind
            raise

    # -- setup ---------------------------------------------------------------------------------------
    def _setup(self, resume: Optional[bool | str | Path], ckpt: Optional[dict], overwrite: bool) -> None:
        cfg = self.cfg
        self.dist, self.device = setup_distributed(cfg.device)
        if self.device.type == "cpu" and self.tcfg.cpu_threads:
            torch.set_num_threads(self.tcfg.cpu_threads)  # restored in close()
        self.run_dir, self.images_dir = RunPaths(cfg.run_name).checkpoints, RunPaths(cfg.run_name).images
        self.amp = resolve_amp(self.tcfg.amp, self.device)  # the mode in use ('auto' resolved)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.amp=fp16 needs a CUDA GPU (fp16 training needs torch.amp.GradScaler); "
                              f"the device is {self.device}: use train.amp=bf16 (fast on recent CPUs) or off")
        if resume is not None and ckpt is None:  # after the DDP rendezvous: rank 0 may just have written it
            resume = resume_path(resume, cfg.run_name)
            ckpt = load_resume_checkpoint(resume)
        resumed_from = Path(resume) if isinstance(resume, (str, Path)) else None
        if ckpt is not None:
            check_resumable(ckpt, cfg, resumed_from)
            warn_thread_count(ckpt, self.device)
        check_training(cfg, self.device)  # before the run folder, the data or any tensor of the model
        self.lock = lock_run_dir(self.run_dir, self.dist)
        prepare_run_dir(cfg.run_name, self.dist, resuming=ckpt is not None, overwrite=overwrite)
        self.setup_data()
        self.setup_model()
        for hook in self.hooks:
            hook.on_setup(self, ckpt)
        self.setup_state(ckpt, resumed_from)
        self.model = wrap_model(self.net, self.dist, self.device, compile=self.tcfg.compile)
        self.logger = (RunLogger(cfg, start_step=self.step, history=self.history, results_root=RESULTS_ROOT)
                       if self.dist.is_main else None)
        self.signals = StopSignals().install()

    def setup_data(self) -> None:
        cfg, info = self.cfg, self.dist
        first = not info.enabled or info.local_rank == 0
        if not first:  # local rank 0 downloads / unpacks alone; the others then read what it wrote
            dist.barrier(group=info.control)
        try:
            base = build_dataset(cfg.data, train=True)
        finally:  # also when it failed: the others then fail with the same error instead of waiting
            if first and info.enabled:
                dist.barrier(group=info.control)
        check_data(cfg, base)
        self.base_dataset = base
        # An image-conditioned model's grids: the same held-out conditions every time, so they show progress
        self.sample_conditions = None
        if conditioned(cfg) and info.is_main and self.tcfg.num_sample_images:
            self.sample_conditions = held_out_conditions(cfg, self.tcfg.num_sample_images)[0]
        self.data = training_stream(base, cfg, rank=info.rank, world_size=info.world_size, device=self.device)

    def setup_model(self) -> None:
        """Network, diffusion, EMA, optimizer, GradScaler (fp16); hooks add their extra networks in on_setup."""
        cfg, tcfg = self.cfg, self.tcfg
        seed_everything(cfg.seed)  # the same initial weights on every rank
        net = build_model(cfg).to(self.device)
        self.channels_last = cfg.model.kind == "unet" and resolve_channels_last(tcfg.channels_last, self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.diffusion = build_diffusion(cfg).to(self.device)
        self.ema = EMA(net, decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)
        self.phema = PowerFunctionEMA(net, tcfg.ema_profiles) if tcfg.ema_profiles else None  # post-hoc EMA
        self.optimizer = build_optimizer(net, tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(tcfg))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.params = [p for p in net.parameters() if p.requires_grad]

    def setup_state(self, ckpt: Optional[dict], resumed_from: Optional[Path]) -> None:
        """The loop's counters, the RNG (fresh) or the state of `ckpt` (restore_state, then each hook's
        restore: more state, e.g. distillation's rounds, comes back through a TrainerHook), the loss watch and
        the checkpoint rotation."""
        self.step, self.history, self.last_saved = 0, [], None
        self.skipped_total, self.streak = 0, 0  # streak: unhealthy steps in a row
        self.window, self.by_t = [], [0.0] * 8  # per step since the last log: (loss, grad norm, skipped)
        if ckpt is None:
            seed_everything(derive_seed(self.cfg.seed, NOISE, self.dist.rank))  # per-rank noise streams
        else:
            self.restore_state(ckpt)
            for hook in self.hooks:
                hook.restore(self, ckpt)
        log_state = (ckpt or {}).get("log_state") or {}
        self.loss_watch = LossWatch(self.device, log_state.get("loss_level",
                                                               LossWatch.level_from_history(self.history)))
        self.start_step = self.step
        self.health = CheckpointHealth(self.run_dir, keep_last=self.tcfg.keep_last, resumed_from=resumed_from,
                                       start_step=self.step)

    def restore_state(self, ckpt: dict) -> None:
        """The Trainer's training state of `ckpt` (checkpoint_state.restore_trainer_entries); hyper-parameters
        (lr, betas, weight decay, fused) come from the current config. Hooks then restore theirs."""
        restore_trainer_entries(self, ckpt)

    # -- what hooks change between rounds (e.g. distillation) ---------------------------------------
    def load_weights(self, weights: dict) -> None:
        """The network and its EMA take `weights` (a state dict of the bare network); the EMA's decay warm-up
        restarts."""
        self.net.load_state_dict(weights)
        self.ema.model.load_state_dict(weights)
        self.ema.num_updates = 0

    def reset_optimizer(self) -> None:
        """Forget the optimizer's state (Adam's moments and step counts); its hyper-parameters stay."""
        self.optimizer.state.clear()

    def reset_loss_watch(self) -> None:
        """The loss watch forgets its running level: the next losses are not "exploding" against older ones."""
        self.loss_watch.level.zero_()

    def set_lr_schedule(self, factor) -> None:
        """A new LR schedule, lr = train.lr x factor(scheduler step). Call it in TrainerHook.on_setup: a resume
        then restores the schedule's position into the new schedule."""
        for group in self.optimizer.param_groups:  # undo the old scheduler's first step before the new one
            group["lr"] = group["initial_lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # -- one step ------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(x0, y) on the device; y is None for an unconditional model, -1 (the null label of classifier-free
        guidance) where label dropout hit."""
        x0, y = self.data.next()
        x0 = x0.to(self.device, non_blocking=True)                    # (B, C, H, W) or (B, 2)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if self.cfg.model.num_classes == 0:
            return x0, None
        y = y.to(self.device, non_blocking=True)
        if self.tcfg.cond_drop_prob > 0:
            y = torch.where(torch.rand(y.shape, device=self.device) < self.tcfg.cond_drop_prob, -1, y)
        return x0, y

    def compute_loss(self, batch: tuple[torch.Tensor, Optional[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses (B,) and their timesteps t (B,) for one micro-batch: the loss object's
        (distillation: the student's loss against the teacher's targets)."""
        return self.loss(self, batch)

    def train_step(self) -> None:
        """train.grad_accum micro-batches, clipping, then the update of weights, LR and EMA. A step whose loss
        or gradient is non-finite on any rank changes no weight, optimizer or EMA state on every rank."""
        for hook in self.hooks:
            hook.on_step_start(self)
        self.model.train()
        accum, T = self.tcfg.grad_accum, self.diffusion.num_timesteps
        step_loss = torch.zeros((), device=self.device)
        by_t = torch.zeros(2, 4, device=self.device)                  # loss sum, count per quarter of [0, T)
        for micro in range(accum):
            batch = self.next_batch()
            sync = micro == accum - 1 or not self.dist.enabled        # DDP: one gradient all-reduce per step
            with nullcontext() if sync else self.model.no_sync():
                losses, t = self.compute_loss(batch)
                loss = losses.mean() / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            step_loss += loss.detach()
            by_t[0].index_add_(0, t * 4 // T, losses.detach())
            by_t[1].index_add_(0, t * 4 // T, torch.ones_like(losses))
        grad_norm = unscale_and_clip(self.params, self.optimizer, self.scaler, self.tcfg.grad_clip, self.device)
        loss, norm, nonfinite_loss, nonfinite_grad, exploding, *by_t = read_step(step_loss, grad_norm, by_t,
                                                                                 self.loss_watch, self.dist)
        skip = bool(nonfinite_loss or nonfinite_grad)
        self._update(skip)
        # fp16: gradient overflows are the GradScaler's normal way to find its scale; only losses count.
        bad = bool(exploding) or (bool(nonfinite_loss) if self.scaler is not None else skip)
        self.step += 1
        self.streak = self.streak + 1 if bad else 0
        self.skipped_total += skip
        self.health.record(self.step, bad)
        self.window.append((math.nan, 0.0, True) if skip else (loss, norm, False))
        if not skip:
            self.by_t = [a + b for a, b in zip(self.by_t, by_t)]
        for hook in self.hooks:
            hook.on_step_end(self)

    def _update(self, skip: bool) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)   # skips a step whose gradients overflowed; adapts the scale
            self.scaler.update()
        elif not skip:
            self.optimizer.step()
        self.scheduler.step()                  # skipped steps count: the schedule follows the step number
        if not skip:
            self.ema.update(self.net)          # after the optimizer step: the EMA averages the new weights
        if self.phema is not None:             # every step (a skipped one's unchanged weights too): its profile
            self.phema.update(self.net, self.step + 1)  # is a function of the step number
        self.optimizer.zero_grad(set_to_none=True)

    # -- logging, sampling, checkpoints ----------------------------------------------------------------
    def log(self) -> None:
        """Write the steps since the last log (DDP: losses averaged over the ranks; runlog.write_interval) and
        reset the window."""
        if not self.window:
            return
        window, (losses, by_t) = self.window, reduce_interval(self.window, self.by_t, self.dist)
        elapsed = time.perf_counter() - self._interval_start - self._paused
        self.window, self.by_t, self._interval_start, self._paused = [], [0.0] * 8, time.perf_counter(), 0.0
        if self.dist.is_main:
            write_interval(self, window, losses, by_t, elapsed)

    @torch.no_grad()
    def sample(self) -> Optional[Path]:
        """EMA samples with DDIM (train.sample_steps) from a FIXED generator, so grids are comparable over
        time; forked RNG, so sampling never changes the training streams (resume stays exact)."""
        if not self.dist.is_main or self.tcfg.num_sample_images == 0:  # 0: no sample grids
            return None
        start, path = time.perf_counter(), self.images_dir / f"step_{self.step:07d}.png"
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), autocast(self.device, self.amp):
            save_training_grid(self.diffusion, self.ema.model, self.cfg, path, self.base_dataset,
                         title=f"{self.cfg.run_name} step {self.step}: EMA, DDIM {self.tcfg.sample_steps}",
                         conditions=self.sample_conditions)
        self.logger.image("samples/ema_ddim", path, self.step)
        self.logger.plot(force=True)
        self._paused += time.perf_counter() - start
        return path

    def save_ema_snapshot(self) -> Optional[Path]:
        """checkpoints/<run>/ema/ema_XXXXXXX.pt: the post-hoc EMA profiles now (rank 0; posthoc_ema.py)."""
        if self.phema is None or not self.dist.is_main:
            return None
        start = time.perf_counter()
        path = self.phema.write_snapshot(RunPaths(self.cfg.run_name).ema_snapshots, self.step)
        self._paused += time.perf_counter() - start
        return path

    def checkpoint_state(self, rng_states: list) -> dict:
        """Every checkpoint's entries: the Trainer's (checkpoint_state.trainer_entries), then each hook's."""
        state = trainer_entries(self, rng_states)
        for hook in self.hooks:
            state.update(hook.checkpoint_state(self))
        return state

    def save(self) -> Optional[Path]:
        """step_XXXXXXX.pt and last.pt (atomic writes), then prune to train.keep_last step files.
        Collective under DDP: every rank's RNG state goes into rank 0's file, and no rank saves weights
        that went non-finite on any rank."""
        if self.last_saved == self.step:
            return None
        start = time.perf_counter()
        self.log()  # flush the interval, so the saved loss history is complete
        rng_states = gather_rng_states(self.dist)
        if not all_finite([self.net, self.ema.model], self.dist):
            raise NonFiniteLossError(f"the weights became non-finite at step {self.step}; nothing was saved. "
                                     f"{self.health.hint(self.last_saved)}")
        self.last_saved = self.step
        if not self.dist.is_main:
            return None
        step_file = self.run_dir / f"step_{self.step:07d}.pt"
        save_checkpoint(self.checkpoint_state(rng_states), step_file)
        copy_checkpoint(step_file, self.run_dir / "last.pt")  # the same bytes, serialised once
        self.health.saved.append(self.step)
        self.health.rotate(self.step)
        self._paused += time.perf_counter() - start
        return self.run_dir / "last.pt"

    # -- the loop ------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.step >= self.tcfg.max_steps

    def stop_code(self) -> int:
        """0 = go on; else the reason, agreed on by all ranks (largest wins): a signal number, STOP_AT,
        or NONFINITE."""
        code = self.signals.signum or 0
        if self.stop_at is not None and self.step >= self.stop_at:
            code = max(code, STOP_AT)
        if self.streak >= self.tcfg.max_nonfinite:
            code = NONFINITE
        return agreed_code(code, self.dist)

    def run(self) -> dict:
        """Steps until finished or stopped; log, save, then sample at their intervals and after the last
        step (save before sampling: a failure there must not lose the run)."""
        start = time.perf_counter()
        self._interval_start, self._paused, self.images_per_sec = start, 0.0, 0.0
        announce(self)
        code = self.stop_code()
        while not code and not self.finished:
            self.train_step()
            if self.logger:
                self.logger.bar.update(1)
            for every, action in ((self.tcfg.ema_snapshot_every, self.save_ema_snapshot),
                                  (self.tcfg.log_every, self.log), (self.tcfg.ckpt_every, self.save),
                                  (self.tcfg.sample_every, self.sample)):
                if self.step % every == 0 or self.finished:
                    action()
            code = self.stop_code()
        if self.finished and code != NONFINITE:
            code = 0  # a signal during the last step: the run is complete anyway
        return self._finish(code, time.perf_counter() - start)

    def _finish(self, code: int, wall: float) -> dict:
        if code == NONFINITE:
            self.log()
            raise divergence_error(self)
        if code and self.step > self.start_step:
            self.save()
        interrupted = interruption(code)
        if self.dist.is_main:
            report_end(self, interrupted, wall)
        return run_summary(self, code, interrupted, wall)

    def close(self) -> None:
        torch.set_num_threads(self._threads)
        if self.signals:
            self.signals.restore()
        if self.data:
            self.data.close()
        if self.logger:
            self.logger.close()
            self.logger = None
        if self.dist and self.dist.owner and dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it (that aborts the process)
            dist.destroy_process_group()
        if self.lock:  # last: the data workers (forked with the lock's descriptor) are gone by now
            self.lock.release()
            self.lock = None


# ----------------------------------------------------------------------------- entry points
def train(cfg: Config, resume: Optional[bool | str | Path] = None, *, checkpoint: Optional[dict] = None,
          overwrite: bool = False, stop_at: Optional[int] = None, loss=None, hooks=()) -> dict:
    """Train (or resume: True = checkpoints/<run_name>/last.pt, or a path) and return a summary dict:
    step, interrupted (None | 'SIGINT' | 'SIGTERM' | 'stop_at'), exit_code, checkpoint, wall_time_s,
    images_per_sec, skipped_steps, final_loss, and the bare `model` and `ema` modules.
    `checkpoint`: an already loaded resume checkpoint; `stop_at`: stop (saving, like a signal) once this
    step is reached; `loss`, `hooks`: a variant of training's loss object and TrainerHooks (see Trainer).
    Under torchrun (WORLD_SIZE > 1) every process calls this."""
    trainer = Trainer(cfg, resume or None, checkpoint, overwrite, stop_at, loss=loss, hooks=hooks)
    try:
        return trainer.run()
    finally:
        trainer.close()
