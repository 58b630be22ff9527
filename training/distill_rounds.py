"""Progressive distillation as a Trainer run (issue #16; [PD] Salimans & Ho 2022, Algorithm 2): distill.py's
library code. The math of one step is distillation.py; this module is the loop around it.

One Trainer run covers every round: train.max_steps = rounds x M (M = --round-steps), and the optimizer step s
belongs to round s // M. At a round boundary the round's final student (its EMA weights, what sample.py uses)
becomes the teacher of the next round AND the next student's initial weights; the EMA restarts from them, the
Adam moments are cleared and the learning-rate schedule (warm-up, cosine) restarts, so each round is the run
Algorithm 2 describes. Round 1's teacher is the teacher checkpoint's EMA weights.

Why one run and not one per round: the Trainer's resume is exact (RNG, data order, optimizer) within a run, and
the current teacher is saved in every checkpoint (`teacher_model`), so a run stopped anywhere, a round boundary
included, resumes bitwise-exactly (CPU) with nothing to look up in other files. The triples (t, t_mid, t_next)
and the noise are drawn from the Trainer's global RNG streams (seeded per rank from data_order.NOISE and saved
in each checkpoint), the way Diffusion.training_losses draws t and noise for train.py.

Outputs in checkpoints/<teacher_run>_distill/: last.pt and step files as train.py, plus steps_NNNN.pt at the end
of each round (the N-step student). Every file's config says the student's grid (sample.sampler=ddim,
sample.steps=N, sample.eta=0, diffusion.timestep_spacing=GRID_SPACING), so sample.py / evaluate.py use it without
flags; `distill` in the checkpoint records the teacher file, the rounds and the step counts.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from config import Config, ConfigError, config_with_overrides, to_dict, validate
from storage.checkpoints import CheckpointError, copy_checkpoint
from training.distillation import (GRID_SPACING, distillation_rounds, distillation_target, sample_triples, student_loss,
    student_triples)
from training.parts import lr_factor
from training.trainer import Trainer
from utils import autocast

# Keys a distillation may override: how to train, not what the model is (the teacher's weights fix that).
OVERRIDABLE = ("train.", "device", "run_name", "data.num_workers", "data.root", "data.download",
               "sample.num_samples", "sample.batch_size")


@dataclass
class DistillPlan:
    """What a distillation does: the teacher (file and weights), N0 -> N in halving rounds of M steps each."""
    teacher: str                   # the teacher checkpoint's path (recorded)
    teacher_weights: dict          # round 1's teacher: the checkpoint's EMA (else raw) weights
    start_steps: int               # N0: the teacher's DDIM grid
    steps: int                     # N: the final student's
    round_steps: int               # M: optimizer steps per round
    guidance_scale: float          # folded into the student (1 = unguided)
    rounds: list = dataclasses.field(default_factory=list)  # student steps per round, [N0/2, ..., N]

    def record(self) -> dict:
        """The `distill` entry of every checkpoint (no weights)."""
        return {"teacher": self.teacher, "rounds": list(self.rounds), "start_steps": self.start_steps,
                "steps": self.steps, "round_steps": self.round_steps, "guidance_scale": self.guidance_scale}


def distill_config(teacher_cfg: Config, plan: DistillPlan, overrides: list[str]) -> Config:
    """The run's config: the teacher's, run_name <teacher_run>_distill, the students' grid, no warm-up (each
    round starts from trained weights), user train.* overrides, then max_steps = rounds x M. Fills plan.rounds;
    ConfigError for a toy teacher, an impossible N0 -> N, guidance on an unconditional model, a model override."""
    if teacher_cfg.model.kind == "mlp":
        raise ConfigError("distillation needs an image model: this teacher is a 2-D toy model (model.kind=mlp); "
                          "pass a checkpoint of an image run (e.g. configs/digits.yaml)")
    plan.rounds = distillation_rounds(plan.start_steps, plan.steps, teacher_cfg.diffusion.num_timesteps)
    if plan.guidance_scale != 1.0 and teacher_cfg.model.num_classes == 0:
        raise ConfigError(f"--guidance-scale {plan.guidance_scale:g} needs a class-conditional teacher; this one "
                          "is unconditional: drop --guidance-scale")
    if any(o.split("=", 1)[0] == "train.max_steps" for o in overrides):
        raise ConfigError("distill.py sets train.max_steps itself (rounds x --round-steps): drop train.max_steps "
                          "and pass --round-steps M")
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(OVERRIDABLE)]
    if bad:
        raise ConfigError(f"distill.py cannot override {bad[0].split('=', 1)[0]!r}: the model, data and "
                          f"diffusion are the teacher's; allowed: {', '.join(OVERRIDABLE)}")
    base = to_dict(teacher_cfg)
    base["run_name"] = f"{teacher_cfg.run_name}_distill"
    base["diffusion"]["timestep_spacing"] = GRID_SPACING
    base["train"]["warmup_steps"] = 0
    cfg = config_with_overrides(base, overrides)
    cfg.train.max_steps = len(plan.rounds) * plan.round_steps
    set_student_grid(cfg, plan.rounds[0], folded_guidance=teacher_cfg.model.num_classes > 0)
    return validate(cfg)


def set_student_grid(cfg: Config, steps: int, folded_guidance: bool) -> None:
    """The sampling defaults of an N-step student: deterministic DDIM on the distillation grid. Guidance is in
    the student's weights (or was not used): sampling must not guide again."""
    cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta = "ddim", steps, 0.0
    cfg.diffusion.timestep_spacing = GRID_SPACING
    cfg.train.sample_steps = steps
    if folded_guidance:
        cfg.sample.guidance_scale = 1.0


def check_resume_plan(ckpt: dict, plan: DistillPlan, path) -> None:
    """A resume continues the same distillation: same N0, N, M and guidance as the checkpoint's."""
    saved = ckpt.get("distill")
    if not isinstance(saved, dict) or "teacher_model" not in ckpt:
        raise CheckpointError(f"cannot resume from {path}: it is not a distill.py checkpoint (no teacher inside); "
                              f"start without --resume (add --overwrite to replace that run)")
    mine = plan.record()
    diffs = [f"{k} {saved.get(k)!r} -> {mine[k]!r}" for k in ("start_steps", "steps", "round_steps", "guidance_scale")
             if saved.get(k) != mine[k]]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: the distillation differs ({'; '.join(diffs)}); pass the "
                          f"checkpoint's --start-steps/--steps/--round-steps/--guidance-scale")


class DistillTrainer(Trainer):
    """The Trainer with a frozen teacher: compute_loss is the student's distillation loss ([PD] Alg. 2)."""

    def __init__(self, cfg: Config, resume=None, checkpoint: Optional[dict] = None, overwrite: bool = False,
                 stop_at: Optional[int] = None, *, plan: DistillPlan):
        self.plan, self._overwrite = plan, overwrite
        super().__init__(cfg, resume, checkpoint, overwrite, stop_at)

    def setup_model(self) -> None:
        """Student and EMA start from the teacher's weights; the schedule restarts each round."""
        super().setup_model()
        self.net.load_state_dict(self.plan.teacher_weights)
        self.ema.model.load_state_dict(self.plan.teacher_weights)
        self.teacher = copy.deepcopy(self.ema.model).eval().requires_grad_(False)
        factor, m = lr_factor(dataclasses.replace(self.tcfg, max_steps=self.plan.round_steps)), self.plan.round_steps
        for group in self.optimizer.param_groups:  # undo the base scheduler's first step before the new one
            group["lr"] = group["initial_lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: factor(s % m))
        self._set_round(0)

    def _set_round(self, index: int) -> None:
        self.round = index
        steps = self.plan.rounds[index]
        self.triples = student_triples(self.diffusion, steps, self.plan.start_steps)
        set_student_grid(self.cfg, steps, folded_guidance=self.cfg.model.num_classes > 0)

    def setup_state(self, ckpt: Optional[dict], resumed_from) -> None:
        """A fresh run (after prepare_run_dir refused or, with --overwrite, cleared the step files) must not
        leave another distillation's round students next to its own: --overwrite deletes them too."""
        stale = sorted(self.run_dir.glob("steps_*.pt")) if ckpt is None and self.dist.is_main else []
        if stale and not self._overwrite:
            raise ConfigError(f"{self.run_dir}/ holds the students of another distillation ({stale[0].name}): "
                              "continue it with --resume, or pass --overwrite to delete them and start over")
        for path in stale:
            path.unlink()
        super().setup_state(ckpt, resumed_from)

    def restore_state(self, ckpt: dict) -> None:
        super().restore_state(ckpt)
        self.teacher.load_state_dict(ckpt["teacher_model"])
        self._set_round(int(ckpt["distill"]["round"]))

    def _next_round(self) -> None:
        """[PD] Alg. 2: the student becomes the teacher, and the next student starts as a copy of it."""
        student = self.ema.model.state_dict()
        self.teacher.load_state_dict(student)
        self.net.load_state_dict(student)
        self.ema.num_updates = 0
        self.optimizer.state.clear()
        self.loss_watch.level.zero_()  # a new round's loss has no level yet: not "exploding" against the last
        self._set_round(self.round + 1)

    def compute_loss(self, batch):
        x0, y = batch
        t, t_mid, t_next = sample_triples(self.triples, x0.shape[0], device=x0.device)  # global RNG: resumable
        xt = self.diffusion.q_sample(x0, t, torch.randn_like(x0))
        with autocast(self.device, self.amp):
            teacher_fn = self.diffusion.guided_model(self.teacher, y, self.plan.guidance_scale)
            x0_target, weight = distillation_target(self.diffusion, teacher_fn, xt, t, t_mid, t_next,
                                                    clip_x0=self.cfg.sample.clip_x0)
            out = self.model(xt, t, y).float()
        return student_loss(self.diffusion, out, xt, t, x0_target, weight), t

    def train_step(self) -> None:
        if self.step // self.plan.round_steps > self.round:
            self._next_round()
        super().train_step()
        if self.step % self.plan.round_steps == 0:  # the round's student: saved (and shown) as steps_NNNN.pt
            self.save()
            if self.dist.is_main:
                copy_checkpoint(self.run_dir / "last.pt", self.run_dir / f"steps_{self.plan.rounds[self.round]:04d}.pt")
            if not self.finished and self.step % self.tcfg.sample_every:
                self.sample()

    def checkpoint_state(self, rng_states: list) -> dict:
        state = super().checkpoint_state(rng_states)
        state["teacher_model"] = self.teacher.state_dict()
        state["distill"] = dict(self.plan.record(), round=self.round, student_steps=self.plan.rounds[self.round])
        return state

