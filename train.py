"""Train a diffusion model from a YAML preset.

    python train.py                                      # configs/cifar10.yaml: the DDPM paper recipe
    python train.py --config configs/digits.yaml         # quickstart: 2 CPU cores, a few minutes
    python train.py --config configs/mnist.yaml train.lr=1e-4 model.dropout=0.0
    python train.py --config configs/digits.yaml --resume           # continue checkpoints/digits/last.pt
    python train.py --resume checkpoints/digits/step_0002000.pt     # config comes from the checkpoint
    torchrun --nproc_per_node 4 train.py                 # DDP: train.batch_size is PER PROCESS (per GPU)

Outputs of run R: checkpoints/R/{last.pt, step_XXXXXXX.pt}, results/logs/R/ (tensorboard --logdir
results/logs), results/images/R/step_XXXXXXX.png (EMA samples, fixed seed), results/plots/R/loss.png.

Exit codes: 0 done; 1 user error (config, checkpoint, missing data, diverged training: the message says
what to do); 130 / 143 (128 + signal number, the shell convention) after Ctrl-C / SIGTERM stopped the run
and saved a checkpoint, so `python train.py && python sample.py` does not go on with an unfinished run.

Resume is exact (bitwise on CPU): the data order and random flips continue exactly where the run
stopped (see data_order.py); every rank's python/numpy/torch/CUDA RNG state is saved and restored
(dropout, t, noise). (Same hardware and CPU thread count assumed: see train_utils.cpu_threads.) A resume
may change train.* (max_steps, lr, intervals, ...), device, run_name and data.num_workers/root/download;
a changed seed, model.*, diffusion.* or other data.* key is refused with the list of differences. A fresh
run never overwrites an existing checkpoints/<run_name>/ unless --overwrite is given.

A step whose loss or gradient is non-finite is skipped (no weight, optimizer or EMA change), counted and
logged; train.max_nonfinite of them in a row stop the run (exit 1), leaving the last checkpoint intact.
"""
from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from config import Config, ConfigError, load_config, to_dict
from data_order import NOISE, DataStream, EpochBatches, KeyedItems
from dataset import DatasetMissingError, build_dataset, check_data
from diffusion import build_diffusion
from model import build_model, count_parameters
from train_utils import (EMA, LaggedRead, RunLogger, StepStats, StopSignals, build_optimizer, config_for_resume,
                         cpu_threads, load_resume_checkpoint, lr_factor, resume_differences, setup_distributed)
from utils import (CheckpointError, derive_seed, get_rng_state, list_checkpoints, resolve_amp, resolve_channels_last,
                   save_checkpoint, save_image_grid, save_scatter_plot, seed_everything, set_rng_state)

from paths import CHECKPOINTS as CHECKPOINT_ROOT, RESULTS as RESULTS_ROOT  # noqa: E402  (paths.py names the folders)
STOP_AT, NONFINITE = 1, 1000                 # stop codes next to signal numbers (largest wins across ranks)


class NonFiniteLossError(RuntimeError):
    """Training diverged: too many non-finite steps in a row; the message names the last good checkpoint."""


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Setup, one step, logging, sampling and checkpoints of one run; `run()` drives the loop."""

    def __init__(self, cfg: Config, resume: Optional[Path], checkpoint: Optional[dict], overwrite: bool,
                 stop_at: Optional[int]):
        self.cfg, self.tcfg, self.stop_at = cfg, cfg.train, stop_at
        self.data = self.logger = self.signals = self.dist = None
        self._threads = torch.get_num_threads()
        try:
            self._setup(resume, checkpoint, overwrite)
        except BaseException:
            self.close()  # a failed setup must not leave threads, workers or a process group behind
            raise

    def _setup(self, resume: Optional[Path], checkpoint: Optional[dict], overwrite: bool) -> None:
        cfg = self.cfg
        self.dist, self.device = setup_distributed(cfg.device)
        if self.device.type == "cpu" and (threads := cpu_threads(cfg.model.kind)) is not None:
            torch.set_num_threads(threads)  # restored in close()
        self.run_dir = CHECKPOINT_ROOT / cfg.run_name
        self.images_dir = RESULTS_ROOT / "images" / cfg.run_name
        self._resolve_amp()
        if resume is not None and checkpoint is None:
            checkpoint = load_resume_checkpoint(resume)
        if checkpoint is not None:
            self._check_resume_config(checkpoint, resume)
        self._prepare_run_dir(resuming=checkpoint is not None, overwrite=overwrite)
        self._setup_data()
        self._setup_model()
        self._setup_state(checkpoint)
        self.model = self._wrap(self.net)
        self.streak_reader = LaggedRead(self.device)
        self.logger = RunLogger(cfg, self.step, self.history, RESULTS_ROOT) if self.dist.is_main else None
        self.signals = StopSignals().install()

    # -- setup ---------------------------------------------------------------------------------------
    def _resolve_amp(self) -> None:
        self.amp = resolve_amp(self.tcfg.amp, self.device)  # the mode in use ('auto' resolved)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.amp=fp16 needs a CUDA GPU (fp16 training needs torch.amp.GradScaler); "
                              f"the device is {self.device}: use train.amp=bf16 (fast on recent CPUs) or off")

    def _check_resume_config(self, ckpt: dict, resume: Optional[Path]) -> None:
        diffs = resume_differences(ckpt["config"], self.cfg)
        if diffs:
            raise ConfigError(f"cannot resume from {resume or 'the checkpoint'}: these settings differ from the "
                              "checkpoint's (old -> new):\n" + "\n".join(diffs) + "\nUse the checkpoint's values, "
                              "or start a separate run with run_name=NEW_NAME (without --resume).")

    def _prepare_run_dir(self, resuming: bool, overwrite: bool) -> None:
        existing = list_checkpoints(self.run_dir) + [p for p in [self.run_dir / "last.pt"] if p.is_file()]
        if self.dist.enabled:  # every rank has looked before rank 0 may delete anything
            dist.barrier(group=self.dist.control)
        if resuming or not existing:
            return
        if not overwrite:
            raise ConfigError(f"{self.run_dir}/ already holds a run ({', '.join(p.name for p in existing[-2:])}). "
                              f"Continue it with --resume, start a separate run with run_name=NEW_NAME, or "
                              f"pass --overwrite to delete it and start over.")
        if self.dist.is_main:
            for path in existing:
                path.unlink(missing_ok=True)
            shutil.rmtree(RESULTS_ROOT / "logs" / self.cfg.run_name, ignore_errors=True)
            for png in self.images_dir.glob("step_*.png"):
                png.unlink()

    def _setup_data(self) -> None:
        cfg = self.cfg
        base = build_dataset(cfg.data, train=True)
        check_data(cfg, base)
        self.base_dataset = base
        sampler = EpochBatches(len(base), self.tcfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        items = KeyedItems(base, cfg.seed, augmented=cfg.data.random_flip)
        self.data = DataStream(items, sampler, cfg.data.num_workers, self.device.type == "cuda", cfg.seed)

    def _setup_model(self) -> None:
        cfg, tcfg = self.cfg, self.tcfg
        seed_everything(cfg.seed)  # the same initial weights on every rank
        net = build_model(cfg).to(self.device)
        self.channels_last = (cfg.model.kind == "unet"
                              and resolve_channels_last(tcfg.channels_last, self.device))
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.diffusion = build_diffusion(cfg).to(self.device)
        self.ema = EMA(net, tcfg.ema_decay, tcfg.ema_warmup)
        self.optimizer = build_optimizer(net, tcfg)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.lr_lambda = lr_factor(tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.params = [p for p in net.parameters() if p.requires_grad]

    def _setup_state(self, ckpt: Optional[dict]) -> None:
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.step, self.history, self.last_saved = 0, [], None
        self.skipped_total, self.streak, self.worst_streak = zero(), zero(), zero()
        self.stats = StepStats(self.tcfg.log_every, self.device)
        if ckpt is None:
            seed_everything(derive_seed(self.cfg.seed, NOISE, self.dist.rank))  # per-rank noise streams
        else:
            self._restore(ckpt)
        self.start_step = self.step

    def _restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        self.ema.num_updates.fill_(float(ckpt["ema_num_updates"]))
        # Hyper-parameters (lr, betas, weight decay, fused) come from the current config, state from the file.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.scheduler.base_lrs = [self.tcfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:  # the same expression LambdaLR uses: bitwise equal
            group["lr"] = self.tcfg.lr * self.lr_lambda(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.scaler is not None and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.step, self.last_saved = int(ckpt["step"]), int(ckpt["step"])
        self.data.load_state_dict(ckpt["data_state"])
        log_state = ckpt.get("log_state") or {}
        self.skipped_total.fill_(float(log_state.get("skipped_total", 0)))
        self.history = [float(v) for v in log_state.get("loss_history", torch.zeros(0)).tolist()]
        rng = ckpt["rng"]
        if self.dist.rank < len(rng["ranks"]):
            set_rng_state(rng["ranks"][self.dist.rank])
        else:
            seed_everything(derive_seed(self.cfg.seed, NOISE, self.dist.rank, self.step))
            tqdm.write(f"note: rank {self.dist.rank} has no saved RNG state (the checkpoint was written by "
                       f"{len(rng['ranks'])} process(es)): it starts a fresh noise stream")

    def _wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        model = net
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        if self.tcfg.compile:
            model = torch.compile(model)
        return model

    def autocast(self):
        if self.amp == "off":
            return nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one step ------------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x0, y = self.data.next()
        x0 = x0.to(self.device, non_blocking=True)                    # (B, C, H, W) or (B, 2)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if self.cfg.model.num_classes == 0:
            return x0, None
        y = y.to(self.device, non_blocking=True)
        if self.tcfg.cond_drop_prob > 0:  # label dropout: -1 is the null label of classifier-free guidance
            y = torch.where(torch.rand(y.shape, device=self.device) < self.tcfg.cond_drop_prob, -1, y)
        return x0, y

    def train_step(self) -> None:
        """grad_accum micro-batches, clip, optimizer/EMA update. No host sync: a non-finite step is
        skipped on the device (fused AdamW's found_inf flag, a zero EMA weight)."""
        self.model.train()
        accum, T = self.tcfg.grad_accum, self.diffusion.num_timesteps
        step_loss = torch.zeros((), device=self.device)
        q_sum, q_count = torch.zeros(4, device=self.device), torch.zeros(4, device=self.device)
        for micro in range(accum):
            x0, y = self._next_batch()
            last = micro == accum - 1
            with (nullcontext() if last or not self.dist.enabled else self.model.no_sync()):
                with self.autocast():
                    losses, t = self.diffusion.training_losses(self.model, x0, y)  # (B,), (B,)
                loss = losses.mean() / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            step_loss += loss.detach()
            quartile = t * 4 // T                                     # t in [0, T/4) -> 0, ...
            q_sum.index_add_(0, quartile, losses.detach())
            q_count.index_add_(0, quartile, torch.ones_like(losses))
        grad_norm = self._unscale_and_clip()
        flags = torch.stack([~torch.isfinite(step_loss), ~torch.isfinite(grad_norm)]).float()
        if self.dist.enabled:  # a NaN on any rank skips the step on all ranks
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip = flags.max()
        self._optimizer_step(skip)
        self.scheduler.step()
        self.ema.update(self.net, skip)
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: gradient overflows are the GradScaler's normal way to find its scale; only losses count.
        bad = flags[0] if self.scaler is not None else skip
        self.streak = (self.streak + 1) * bad
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)
        self.skipped_total += skip
        self.stats.record(step_loss, q_sum, q_count, grad_norm, skip)
        self.step += 1

    def _unscale_and_clip(self) -> torch.Tensor:
        """Total gradient norm BEFORE clipping (what is logged)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.tcfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip, foreach=True)
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True).to(self.device)

    def _optimizer_step(self, skip: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips steps whose gradients overflowed
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = skip   # the fused kernel skips the update (and its step count)
            self.optimizer.step()
        elif not bool(skip):                  # foreach fallback: one host read per step
            self.optimizer.step()

    # -- logging, sampling, checkpoints ----------------------------------------------------------------
    def log(self) -> None:
        """Reduce the interval's device-side numbers (the one host sync per log_every steps) and write them."""
        st, n = self.stats, self.stats.n
        if n == 0:
            return
        packed = torch.cat([st.loss[:n], st.q_sum, st.q_count])
        if self.dist.enabled:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed[:n] /= self.dist.world_size
        values = packed.tolist()
        extra = torch.stack([st.grad_norm_sum, st.grad_norm_max, st.skipped, self.skipped_total]).tolist()
        elapsed = time.perf_counter() - self._interval_start - self._paused
        st.reset()
        self._interval_start, self._paused = time.perf_counter(), 0.0
        if not self.dist.is_main:
            return
        losses, q_sum, q_count = values[:n], values[n:n + 4], values[n + 4:]
        self.history.extend(losses)
        finite = [v for v in losses if math.isfinite(v)]
        ok = n - int(extra[2])
        images = n * self.tcfg.batch_size * self.tcfg.grad_accum * self.dist.world_size
        scalars = {"train/loss": sum(finite) / len(finite) if finite else float("nan"),
                   "train/lr": self.scheduler.get_last_lr()[0],
                   "train/grad_norm": extra[0] / ok if ok else float("nan"), "train/grad_norm_max": extra[1],
                   "train/images_per_sec": images / max(elapsed, 1e-9), "train/skipped_steps": extra[3],
                   "train/epoch": self.data.epoch + self.data.position / self.data.sampler.batches_per_epoch}
        T = self.diffusion.num_timesteps
        for i in range(4):
            lo, hi = i * T // 4, (i + 1) * T // 4 - 1
            if q_count[i]:
                scalars[f"loss_by_t/t{lo:04d}-{hi:04d}"] = q_sum[i] / q_count[i]
        if self.scaler is not None:
            scalars["train/grad_scale"] = self.scaler.get_scale()
        self.logger.scalars(self.step, scalars)
        self.images_per_sec = scalars["train/images_per_sec"]
        postfix = {"loss": f"{scalars['train/loss']:.4f}", "lr": f"{scalars['train/lr']:.2e}",
                   "img/s": f"{self.images_per_sec:.0f}"}
        if extra[3]:
            postfix["skipped"] = int(extra[3])
        self.logger.bar.set_postfix(postfix, refresh=False)
        self.logger.plot()

    @torch.no_grad()
    def sample(self) -> Optional[Path]:
        """EMA samples with DDIM (train.sample_steps) from a FIXED generator, so grids are comparable over
        time; forked RNG, so sampling never changes the training streams (resume stays exact)."""
        if not self.dist.is_main:
            return None
        start, cfg, n = time.perf_counter(), self.cfg, self.tcfg.num_sample_images
        toy = cfg.model.kind == "mlp"
        shape = (n, 2) if toy else (n, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
        classes = cfg.model.num_classes
        y = torch.arange(n, device=self.device) % classes if classes else None
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), self.autocast():
            gen = torch.Generator().manual_seed(cfg.seed)
            x = self.diffusion.sample(self.ema.model, shape, "ddim", steps=self.tcfg.sample_steps, generator=gen,
                                      y=y, guidance_scale=cfg.sample.guidance_scale,
                                      clip_x0=cfg.sample.clip_x0 and not toy, progress=False)
        path = self.images_dir / f"step_{self.step:07d}.png"
        if toy:
            data = torch.stack([self.base_dataset[i][0] for i in range(min(len(self.base_dataset), n))])
            save_scatter_plot(data, x, path, f"{cfg.run_name} step {self.step}: EMA, DDIM {self.tcfg.sample_steps}")
        else:
            save_image_grid(x.float(), path, nrow=classes if classes and n >= classes else None)
        self.logger.image("samples/ema_ddim", path, self.step)
        self.logger.plot(force=True)
        self._paused += time.perf_counter() - start
        self.last_sample_step = self.step
        return path

    def checkpoint_state(self, rng_states: list) -> dict:
        return {"step": self.step, "config": to_dict(self.cfg), "model": self.net.state_dict(),
                "ema": self.ema.model.state_dict(), "ema_num_updates": float(self.ema.num_updates),
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": {"world_size": self.dist.world_size, "ranks": rng_states},
                "data_state": self.data.state_dict(),
                "log_state": {"skipped_total": int(self.skipped_total),
                              "loss_history": torch.tensor(self.history, dtype=torch.float32)}}

    def save(self) -> Optional[Path]:
        """step_XXXXXXX.pt and last.pt (atomic writes), then prune to train.keep_last step files.
        Collective under DDP: every rank's RNG state goes into rank 0's file."""
        if self.last_saved == self.step:
            return None
        start = time.perf_counter()
        self.log()  # flush the interval, so the saved loss history is complete
        rng_states = [get_rng_state()]
        if self.dist.enabled:
            rng_states = [None] * self.dist.world_size
            dist.all_gather_object(rng_states, get_rng_state(), group=self.dist.control)
        self.last_saved = self.step
        if not self.dist.is_main:
            return None
        tensors = list(self.net.parameters()) + list(self.ema.model.parameters())
        if not bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all()):
            raise NonFiniteLossError(f"the weights became non-finite at step {self.step}; nothing was saved. "
                                     f"{self._last_good_hint()}")
        state = self.checkpoint_state(rng_states)
        save_checkpoint(state, self.run_dir / f"step_{self.step:07d}.pt")
        save_checkpoint(state, self.run_dir / "last.pt")
        ours = [p for p in list_checkpoints(self.run_dir) if int(p.stem.split("_")[1]) <= self.step]
        for old in ours[:-self.tcfg.keep_last]:
            old.unlink(missing_ok=True)
        self._paused += time.perf_counter() - start
        return self.run_dir / "last.pt"

    def _last_good_hint(self) -> str:
        last = self.run_dir / "last.pt"
        if self.last_saved is not None and last.is_file():
            return (f"The last good checkpoint is {last} (step {self.last_saved}); to continue from it, lower "
                    f"train.lr or set train.grad_clip (and use train.amp=bf16 or off rather than fp16), then "
                    f"run with --resume {last}.")
        return "No checkpoint was written yet: lower train.lr or set train.grad_clip and start again."

    # -- the loop ------------------------------------------------------------------------------------
    def stop_code(self) -> int:
        """0 = go on; else the reason, agreed on by all ranks (largest wins): a signal number, STOP_AT,
        or NONFINITE. The non-finite streak is read without a GPU sync (LaggedRead)."""
        code = self.signals.signum or 0
        if self.stop_at is not None and self.step >= self.stop_at:
            code = max(code, STOP_AT)
        if self.streak_reader(self.worst_streak) >= self.tcfg.max_nonfinite:
            code = NONFINITE
        if self.dist.enabled:
            flag = torch.tensor([code])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist.control)
            code = int(flag)
        return code

    def run(self) -> dict:
        tcfg, start = self.tcfg, time.perf_counter()
        self._interval_start, self._paused, self.images_per_sec, self.last_sample_step = start, 0.0, 0.0, None
        self._announce()
        code = self.stop_code() if self.step < tcfg.max_steps else 0
        while self.step < tcfg.max_steps and not code:
            self.train_step()
            if self.logger:
                self.logger.bar.update(1)
            done = self.step == tcfg.max_steps
            if self.step % tcfg.log_every == 0 or done:
                self.log()
            if self.step % tcfg.sample_every == 0 or done:
                self.sample()
            if self.step % tcfg.ckpt_every == 0 or done:
                self.save()
            code = self.stop_code()
        if self.step >= tcfg.max_steps and code != NONFINITE:
            code = 0  # a signal during the last step: the run is complete anyway
        return self._finish(code, time.perf_counter() - start)

    def _announce(self) -> None:
        if not self.dist.is_main:
            return
        cfg, tcfg = self.cfg, self.tcfg
        where = f"resuming at step {self.step}" if self.step else "starting"
        threads = f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""
        tqdm.write(f"training {cfg.run_name}: {where} of {tcfg.max_steps} | {count_parameters(self.net) / 1e6:.2f}M "
                   f"parameters | {len(self.base_dataset)} items, batch {tcfg.batch_size} x {tcfg.grad_accum} accum "
                   f"x {self.dist.world_size} process(es) | {self.device}{threads}, amp {self.amp}, "
                   f"{'channels_last' if self.channels_last else 'NCHW'} | "
                   f"checkpoints in {self.run_dir}/", file=sys.stdout)
        sys.stdout.flush()

    def _finish(self, code: int, wall: float) -> dict:
        if code == NONFINITE:
            self.log()
            raise NonFiniteLossError(
                f"stopping at step {self.step}: {self.tcfg.max_nonfinite} steps in a row had a non-finite "
                f"loss or gradient (train.max_nonfinite={self.tcfg.max_nonfinite}); they were skipped and "
                f"nothing was saved since. {self._last_good_hint()}")
        if code and self.step > self.start_step:
            self.save()
        interrupted = None if not code else ("stop_at" if code == STOP_AT else signal.Signals(code).name)
        if self.dist.is_main:
            self._report(interrupted, wall)
        return {"run_name": self.cfg.run_name, "step": self.step, "start_step": self.start_step,
                "interrupted": interrupted, "exit_code": 128 + code if code > STOP_AT else 0,
                "checkpoint": str(self.run_dir / "last.pt"), "wall_time_s": wall,
                "images_per_sec": self.images_per_sec, "skipped_steps": int(self.skipped_total),
                "final_loss": next((v for v in reversed(self.history) if math.isfinite(v)), float("nan")),
                "model": self.net, "ema": self.ema.model}

    def _report(self, interrupted: Optional[str], wall: float) -> None:
        last = self.run_dir / "last.pt"
        if self.logger:
            self.logger.close()
            self.logger = None
        if interrupted and interrupted != "stop_at" and self.last_saved is None:
            print(f"stopped by {interrupted} before the first step: nothing was saved", flush=True)
        elif interrupted and interrupted != "stop_at":
            launcher = (f"torchrun --nproc_per_node {self.dist.world_size} train.py" if self.dist.enabled
                        else "python train.py")
            print(f"stopped by {interrupted} at step {self.step}: saved {last}\n"
                  f"resume with: {launcher} --resume {last}", flush=True)
        elif not interrupted:
            print(f"finished {self.cfg.run_name}: step {self.step} in {wall / 60:.1f} min | checkpoint {last} | "
                  f"samples {self.images_dir}/ | loss plot {RESULTS_ROOT / 'plots' / self.cfg.run_name}/loss.png | "
                  f"tensorboard --logdir {RESULTS_ROOT / 'logs'} | sample with: "
                  f"python sample.py --checkpoint {last}", flush=True)

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
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- entry points
def train(cfg: Config, resume: Optional[bool | str | Path] = None, *, checkpoint: Optional[dict] = None,
          overwrite: bool = False, stop_at: Optional[int] = None) -> dict:
    """Train (or resume: True = checkpoints/<run_name>/last.pt, or a path) and return a summary dict:
    step, interrupted (None | 'SIGINT' | 'SIGTERM' | 'stop_at'), exit_code, checkpoint, wall_time_s,
    images_per_sec, skipped_steps, final_loss, and the bare `model` and `ema` modules.
    `checkpoint`: an already loaded resume checkpoint; `stop_at`: stop (saving, like a signal) once this
    step is reached. Under torchrun (WORLD_SIZE > 1) every process calls this."""
    if resume is True:
        resume = CHECKPOINT_ROOT / cfg.run_name / "last.pt"
    trainer = Trainer(cfg, Path(resume) if resume else None, checkpoint, overwrite, stop_at)
    try:
        return trainer.run()
    finally:
        trainer.close()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a diffusion model.", epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset (default configs/cifar10.yaml; with --resume PATH the "
                                    "checkpoint's own config)")
    p.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue checkpoints/<run_name>/last.pt of the config, or the checkpoint PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if checkpoints/<run_name>/ holds a run (deletes its checkpoints and logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    # `--resume train.lr=1e-4` means a bare --resume followed by an override, not a file named so.
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint, resume = None, args.resume
        if resume is None or resume is True:
            cfg = load_config(args.config, args.overrides)
        if resume is True:  # the run of the given config
            resume = CHECKPOINT_ROOT / cfg.run_name / "last.pt"
            checkpoint = load_resume_checkpoint(resume)
        elif resume is not None:  # a file: its own config unless --config is given
            checkpoint = load_resume_checkpoint(resume)
            cfg = (load_config(args.config, args.overrides) if args.config
                   else config_for_resume(checkpoint, args.overrides))
        summary = train(cfg, resume, checkpoint=checkpoint, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, DatasetMissingError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint for the unfinished step
        print("aborted without saving (the last checkpoint on disk is intact)", file=sys.stderr)
        return 128 + signal.SIGINT
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
