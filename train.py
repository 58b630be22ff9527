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
(dropout, t, noise). (Same hardware and CPU thread count assumed: train.cpu_threads pins the count, and a
resume warns when it differs.) A resume may change train.* (max_steps, lr, intervals, ...), device, run_name
and data.num_workers/root/download; a changed seed, model.*, diffusion.* or other data.* key is refused with
the list of differences. A fresh run never overwrites an existing checkpoints/<run_name>/ unless --overwrite
is given.

A step whose loss or gradient is non-finite is skipped (no weight, optimizer or EMA change), counted and
logged. A finite loss that explodes (above max(10 x its running level, 1): train_utils.LossWatch) is
trained on but, like a non-finite one, unhealthy: train.max_nonfinite unhealthy steps in a row stop the run
(exit 1), and the message names the last good checkpoint (the one whose next step still had a normal
loss), which checkpoint rotation never deletes. checkpoints/<run>/.lock keeps a second train.py off a run
in progress (it exits 1 naming the PID); a lock left by a dead process is taken over.
"""
from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import time
import zipfile
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
from train_utils import (EMA, LaggedRead, LossWatch, RunLock, RunLockedError, RunLogger, StepStats, StopSignals,
                         build_optimizer, config_for_resume, load_resume_checkpoint, lr_factor, resume_differences,
                         setup_distributed)
from utils import (CheckpointError, copy_checkpoint, derive_seed, get_rng_state, list_checkpoints, remove_temp_files,
                   resolve_amp, resolve_channels_last, save_checkpoint, save_image_grid, save_scatter_plot,
                   seed_everything, set_rng_state)

from paths import CHECKPOINTS as CHECKPOINT_ROOT, RESULTS as RESULTS_ROOT  # noqa: E402  (paths.py names the folders)
STOP_AT, NONFINITE = 1, 1000                 # stop codes next to signal numbers (largest wins across ranks)
# What --resume needs besides config/model (load_checkpoint checks those): weights-only files lack them.
RESUME_KEYS = ("step", "ema", "ema_num_updates", "optimizer", "lr_scheduler", "rng", "data_state")


class NonFiniteLossError(RuntimeError):
    """Training diverged: too many unhealthy steps (non-finite or exploding loss) in a row; the message names
    the last good checkpoint."""


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Setup, one step, logging, sampling and checkpoints of one run; `run()` drives the loop."""

    def __init__(self, cfg: Config, resume: Optional[bool | str | Path], checkpoint: Optional[dict], overwrite: bool,
                 stop_at: Optional[int]):
        self.cfg, self.tcfg, self.stop_at = cfg, cfg.train, stop_at
        self.data = self.logger = self.signals = self.dist = self.lock = None
        self._threads = torch.get_num_threads()
        try:
            self._setup(resume, checkpoint, overwrite)
        except BaseException:
            self.close()  # a failed setup must not leave threads, workers or a process group behind
            raise

    def _setup(self, resume: Optional[bool | str | Path], checkpoint: Optional[dict], overwrite: bool) -> None:
        cfg = self.cfg
        self.dist, self.device = setup_distributed(cfg.device)
        if self.device.type == "cpu" and self.tcfg.cpu_threads:
            torch.set_num_threads(self.tcfg.cpu_threads)  # restored in close()
        self.run_dir = CHECKPOINT_ROOT / cfg.run_name
        self.images_dir = RESULTS_ROOT / "images" / cfg.run_name
        self._resolve_amp()
        if resume is not None and checkpoint is None:  # after the DDP rendezvous: rank 0 may just have written it
            resume = resume_path(resume, cfg.run_name)
            checkpoint = load_resume_checkpoint(resume)
        self.resume_path = Path(resume) if isinstance(resume, (str, Path)) else None  # the file, for _last_good_file
        if checkpoint is not None:
            self._check_resume_config(checkpoint, resume)
            self._check_resume_threads(checkpoint)
        self._lock_run_dir()
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
        missing = [key for key in RESUME_KEYS if key not in ckpt]
        if missing:
            raise CheckpointError(f"cannot resume from {resume or 'the checkpoint'}: it has no {', '.join(missing)} "
                                  f"entr{'y' if len(missing) == 1 else 'ies'} (a weights-only or edited file, not "
                                  f"one train.py wrote): sample from it with sample.py, or resume from a "
                                  f"checkpoints/<run>/last.pt or step_*.pt that train.py saved")
        diffs = resume_differences(ckpt["config"], self.cfg)
        if diffs:
            raise ConfigError(f"cannot resume from {resume or 'the checkpoint'}: these settings differ from the "
                              "checkpoint's (old -> new):\n" + "\n".join(diffs) + "\nUse the checkpoint's values, "
                              "or start a separate run with run_name=NEW_NAME (without --resume).")

    def _lock_run_dir(self) -> None:
        """Rank 0 locks the run folder (RunLock), so a second train.py of the same run refuses instead of
        overwriting this one's files; then it clears temp files that killed saves left there."""
        error = None
        if self.dist.is_main:
            try:
                self.lock = RunLock(self.run_dir).acquire()
            except RunLockedError as err:
                error = err
        if self.dist.enabled:  # every rank stops if rank 0 could not lock
            flag = torch.tensor([float(error is not None)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist.control)
            if flag.item() and error is None:
                error = RunLockedError(f"{self.run_dir}/ is in use by another train.py (see rank 0's message)")
        if error is not None:
            raise error
        if self.dist.is_main and (removed := remove_temp_files(self.run_dir)):
            tqdm.write(f"note: removed {len(removed)} temp file(s) of interrupted saves from {self.run_dir}/")

    def _check_resume_threads(self, ckpt: dict) -> None:
        """CPU results depend on the thread count (reduction order): a different one is worth a warning."""
        saved, now = ckpt.get("cpu_threads"), torch.get_num_threads()
        if self.device.type == "cpu" and saved is not None and saved != now:
            tqdm.write(f"warning: the checkpoint was trained with {saved} CPU thread(s), this run uses {now}: the "
                       f"resume is not bitwise exact (set train.cpu_threads={saved} to match)", file=sys.stderr)

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
        first = not self.dist.enabled or self.dist.local_rank == 0
        if not first:  # local rank 0 downloads / unpacks alone; the others then read what it wrote
            dist.barrier(group=self.dist.control)
        try:
            base = build_dataset(cfg.data, train=True)
        finally:  # also when it failed: the others then fail with the same error instead of waiting
            if first and self.dist.enabled:
                dist.barrier(group=self.dist.control)
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
        # Health of the checkpoints (rank 0): the loss of the step after a checkpoint is the verdict on its
        # weights. saved_steps: steps saved by this process (and the one resumed from).
        self.saved_steps, self.bad_steps, self.logged_through = [], set(), 0
        if ckpt is None:
            seed_everything(derive_seed(self.cfg.seed, NOISE, self.dist.rank))  # per-rank noise streams
        else:
            self._restore(ckpt)
            self.saved_steps, self.logged_through = [self.step], self.step
        log_state = (ckpt or {}).get("log_state") or {}
        self.loss_watch = LossWatch(self.device, log_state.get("loss_level",
                                                               LossWatch.level_from_history(self.history)))
        self.start_step = self.step

    def _restore(self, ckpt: dict) -> None:
        # Hyper-parameters (lr, betas, weight decay, fused) come from the current config, state from the file.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self._load_weights(ckpt)
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        self._match_state_layout()
        self.ema.num_updates.fill_(float(ckpt["ema_num_updates"]))
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

    def _load_weights(self, ckpt: dict) -> None:
        """Model, EMA and optimizer state; weights that do not fit the network the stored config describes
        (an edited or foreign file) are one CheckpointError, not torch's multi-line RuntimeError."""
        try:
            self.net.load_state_dict(ckpt["model"])
            self.ema.model.load_state_dict(ckpt["ema"])
            saved = ckpt["optimizer"]["state"]
            for index, param in enumerate(self.optimizer.param_groups[0]["params"]):
                for key, value in saved.get(index, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                        raise ValueError(f"size mismatch for optimizer {key} of parameter {index}: "
                                         f"{tuple(value.shape)} in the file, {tuple(param.shape)} in the model")
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            detail = next((line for line in lines if "mismatch" in line or "Missing" in line), lines[-1])
            raise CheckpointError(f"cannot resume: the weights in the checkpoint do not fit the model its stored "
                                  f"config describes ({detail[:300]}); the file was edited or not written by "
                                  f"this train.py: resume from another checkpoint of the run, or start over "
                                  f"without --resume") from None

    def _match_state_layout(self) -> None:
        """Optimizer state tensors in their parameter's memory layout. load_state_dict keeps the strides they
        were saved with, so after a resume that toggles train.channels_last (or moves CPU -> GPU) the fused
        AdamW kernel would pair moments with the wrong elements (CPU) or refuse to run (CUDA)."""
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape
                        and value.stride() != param.stride()):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)

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
        finite = torch.isfinite(step_loss)
        flags = torch.stack([~finite, ~torch.isfinite(grad_norm)]).float()
        flags = torch.cat([flags, self.loss_watch(step_loss, finite).unsqueeze(0)])  # + exploding loss
        if self.dist.enabled:  # a NaN on any rank skips the step on all ranks
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip = flags[:2].max()  # an exploding but finite loss is trained on, and counts as unhealthy
        self._optimizer_step(skip)
        self.scheduler.step()
        self.ema.update(self.net, skip)
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: gradient overflows are the GradScaler's normal way to find its scale; only losses count.
        bad = torch.maximum(flags[0] if self.scaler is not None else skip, flags[2])
        self.streak = (self.streak + 1) * bad
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)
        self.skipped_total += skip
        self.stats.record(step_loss, q_sum, q_count, grad_norm, skip, bad)
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
        packed = torch.cat([st.loss[:n], st.q_sum, st.q_count, st.bad[:n]])  # bad: agreed by all ranks
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
        losses, q_sum, q_count = values[:n], values[n:n + 4], values[n + 4:n + 8]
        self.history.extend(losses)
        self.bad_steps.update(self.step - n + 1 + i for i, flag in enumerate(values[n + 8:]) if flag)
        self.logged_through = self.step
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
        if not self.dist.is_main or self.tcfg.num_sample_images == 0:  # 0: no sample grids
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
                "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                "log_state": {"skipped_total": int(self.skipped_total),
                              "loss_history": torch.tensor(self.history, dtype=torch.float32),
                              "loss_level": float(self.loss_watch.level)}}

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
        tensors = list(self.net.parameters()) + list(self.ema.model.parameters())
        finite = torch.stack([torch.isfinite(p).all() for p in tensors]).all().float().reshape(1).cpu()
        if self.dist.enabled:  # every rank raises, or none: no rank may wait in a collective for one that did
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.dist.control)
        if not bool(finite):
            raise NonFiniteLossError(f"the weights became non-finite at step {self.step}; nothing was saved. "
                                     f"{self._last_good_hint()}")
        self.last_saved = self.step
        if not self.dist.is_main:
            return None
        step_file = self.run_dir / f"step_{self.step:07d}.pt"
        save_checkpoint(self.checkpoint_state(rng_states), step_file)
        copy_checkpoint(step_file, self.run_dir / "last.pt")  # the same bytes, serialised once
        self.saved_steps.append(self.step)
        self._rotate()
        self._paused += time.perf_counter() - start
        return self.run_dir / "last.pt"

    def _rotate(self) -> None:
        """Keep the train.keep_last newest step files, and always the newest good one (see _good_step):
        a diverging run must not rotate away the last checkpoint it could be resumed from."""
        ours = [p for p in list_checkpoints(self.run_dir) if int(p.stem.split("_")[1]) <= self.step]
        good = self._good_step()
        keep = set(ours[-self.tcfg.keep_last:])
        if good is not None:
            keep.add(self.run_dir / f"step_{good:07d}.pt")
        for old in ours:
            if old not in keep:
                old.unlink(missing_ok=True)

    def _good_step(self) -> Optional[int]:
        """The newest step saved (or resumed from) whose weights are known to be good: the step after it had
        a finite, non-exploding loss (that loss is computed with exactly these weights)."""
        return next((s for s in reversed(self.saved_steps) if s < self.logged_through and s + 1 not in self.bad_steps),
                    None)

    def _last_good_hint(self) -> str:
        good, advice = self._good_step(), "lower train.lr or set train.grad_clip (and use train.amp=bf16 or off " \
                                          "rather than fp16)"
        path = self._good_path(good)
        if path is not None:
            after = [s for s in self.saved_steps if s > good]
            later = (f"; the checkpoints saved after it (step {after[0]}{f'-{after[-1]}' if len(after) > 1 else ''}, "
                     f"and so last.pt) hold weights of the unhealthy steps" if after else "")
            return (f"The last good checkpoint is {path} (step {good}: the step after it still had a normal "
                    f"loss){later}. To continue from it, {advice}, then run with --resume {path}.")
        if good is not None:
            return f"The last good checkpoint (step {good}) is no longer on disk: {advice} and start again."
        if self.saved_steps:
            return (f"No checkpoint of this run is known to be good: the step after each one saved "
                    f"({', '.join(map(str, self.saved_steps[-5:]))}) already had a non-finite or exploding loss. "
                    f"{advice[0].upper() + advice[1:]} and start again.")
        return f"No checkpoint was written yet: {advice} and start again."

    def _good_path(self, good: Optional[int]) -> Optional[Path]:
        """The file holding step `good`: its step file, or the file this run resumed from if that was not
        overwritten since (a last.pt is rewritten by every save)."""
        if good is None:
            return None
        step_file = self.run_dir / f"step_{good:07d}.pt"
        if step_file.is_file():
            return step_file
        resumed = self.resume_path
        if good == self.start_step and resumed is not None and resumed.is_file() and (
                self.last_saved == good or resumed.resolve() != (self.run_dir / "last.pt").resolve()):
            return resumed
        return None

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
            if self.step % tcfg.ckpt_every == 0 or done:
                self.save()  # before sampling: a failure there must not lose the run
            if self.step % tcfg.sample_every == 0 or done:
                self.sample()
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
                f"loss or gradient, or an exploding loss (above max({LossWatch.FACTOR:g} x its running level, "
                f"{LossWatch.FLOOR:g})) (train.max_nonfinite={self.tcfg.max_nonfinite}); the non-finite ones "
                f"were skipped. {self._last_good_hint()}")
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
        if self.lock:  # last: the data workers (forked with the lock's descriptor) are gone by now
            self.lock.release()
            self.lock = None


# ----------------------------------------------------------------------------- entry points
def train(cfg: Config, resume: Optional[bool | str | Path] = None, *, checkpoint: Optional[dict] = None,
          overwrite: bool = False, stop_at: Optional[int] = None) -> dict:
    """Train (or resume: True = checkpoints/<run_name>/last.pt, or a path) and return a summary dict:
    step, interrupted (None | 'SIGINT' | 'SIGTERM' | 'stop_at'), exit_code, checkpoint, wall_time_s,
    images_per_sec, skipped_steps, final_loss, and the bare `model` and `ema` modules.
    `checkpoint`: an already loaded resume checkpoint; `stop_at`: stop (saving, like a signal) once this
    step is reached. Under torchrun (WORLD_SIZE > 1) every process calls this."""
    trainer = Trainer(cfg, resume or None, checkpoint, overwrite, stop_at)
    try:
        return trainer.run()
    finally:
        trainer.close()


def resume_path(resume: bool | str | Path, run_name: str) -> Path:
    """The checkpoint --resume means: True = the config's run folder; a folder = its last.pt, or its newest
    step file when last.pt is missing; a file as given. Nothing there: a CheckpointError naming the runs
    that exist under checkpoints/ and the command that resumes each."""
    path = CHECKPOINT_ROOT / run_name if resume is True else Path(resume)
    if resume is True or path.is_dir():
        steps = list_checkpoints(path)
        path = path / "last.pt" if (path / "last.pt").is_file() or not steps else steps[-1]
    if path.is_file():
        return path
    raise CheckpointError(f"cannot resume: no checkpoint at {path}; {_existing_runs_hint()}")


def _existing_runs_hint() -> str:
    """'; '-joined resume commands for the runs under checkpoints/ that hold a checkpoint (a zip: torch.save's
    format; checked without loading, so this stays fast for big files)."""
    runs = []
    for folder in sorted(p for p in CHECKPOINT_ROOT.glob("*") if p.is_dir()):
        files = [f for f in [folder / "last.pt", *reversed(list_checkpoints(folder))] if zipfile.is_zipfile(f)]
        if files:
            runs.append(f"run '{folder.name}': python train.py --resume {files[0]}")
    if not runs:
        return (f"{CHECKPOINT_ROOT}/ holds no run: start one without --resume, "
                f"e.g. python train.py --config configs/digits.yaml")
    return "runs that exist: " + "; ".join(runs)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a diffusion model.", epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset (default configs/cifar10.yaml; with --resume PATH the "
                                    "checkpoint's own config)")
    p.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue checkpoints/<run_name>/last.pt of the config, or the checkpoint PATH, or a "
                        "run folder PATH (its last.pt, else its newest step file)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if checkpoints/<run_name>/ holds a run (deletes its checkpoints and logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    args = p.parse_intermixed_args(argv)  # flags and key=value overrides in any order
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
            resume = resume_path(True, cfg.run_name)
            checkpoint = load_resume_checkpoint(resume)
        elif resume is not None:  # a file or run folder: its own config unless --config is given
            resume = resume_path(resume, "")
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
