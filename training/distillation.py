"""Progressive distillation (issue #16; [PD] Salimans & Ho 2022, Algorithm 2): distill.py's library code.

A student learns to do in ONE deterministic DDIM step what the teacher does in TWO; then the student becomes
the teacher and the step count halves again. The math of one step, for any objective (no optimizer, loop or
file), per round and per batch:

    triples = student_triples(diffusion, student_steps, start_steps)    # once per round
    t, t_mid, t_next = sample_triples(triples, batch_size, device=...)  # [PD] Alg. 2: i ~ Cat[1, ..., N]
    xt = diffusion.q_sample(x0, t, noise)                               # z_t ~ q(z_t | x)
    x0_target, weight = distillation_target(diffusion, teacher_fn, xt, t, t_mid, t_next)
    loss = student_loss(diffusion, student(xt, t, y), xt, t, x0_target, weight).mean()

teacher_fn is any callable (xt, t) -> model output with t a (B,) long tensor; for a class-conditional teacher
with classifier-free guidance pass `diffusion.guided_model(teacher, y, guidance_scale)`: the student then learns
the guided two-step map and samples guided in one evaluation per step. The N-step student samples with
`Diffusion.sample(..., sampler="ddim", eta=0, steps=N, timestep_spacing=GRID_SPACING)`, the grid it was trained
on. Pass distillation_target the clip_x0 the teacher samples with: the target is then a weighted mean of clamped
x0, inside [-1, 1], so the student's own clamp at sampling leaves it alone and it reproduces the clipped teacher.

The run: one Trainer run covers every round, with DistillationLoss as its loss and DistillRounds as its hook
(run_distillation). train.max_steps = rounds x M (M = --round-steps); optimizer step s belongs to round s // M.
At a round boundary the round's final student (its EMA weights, what sample.py uses) becomes the teacher of the
next round AND the next student's initial weights; the EMA restarts from them, the Adam moments are cleared and
the LR schedule (warm-up, cosine) restarts, so each round is the run Algorithm 2 describes. Round 1's teacher is
the teacher checkpoint's EMA weights. One run and not one per round: the Trainer's resume is exact within a run
and the current teacher is in every checkpoint (`teacher_model`), so a run stopped anywhere, a round boundary
included, resumes bitwise-exactly (CPU). Triples and noise come from the Trainer's global RNG streams, the way
Diffusion.training_losses draws t and noise for train.py.

Outputs in checkpoints/<teacher_run>_distill/: last.pt and step files as train.py, plus steps_NNNN.pt at the end
of each round (the N-step student). Every file's config says the student's grid (sample.sampler=ddim,
sample.steps=N, sample.eta=0, diffusion.timestep_spacing=GRID_SPACING), so sample.py / evaluate.py use it without
flags; `distill` in the checkpoint records the teacher file, the rounds and the step counts.

References:
  [PD]   Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  [DDIM] Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from config import Config, ConfigError, check_value, config_with_overrides, to_dict, validate
from diffusion import DATA_T, Diffusion
from storage.checkpoints import CheckpointError, copy_checkpoint
from training.hooks import TrainerHook
from training.parts import lr_factor
from training.trainer import Trainer, train
from utils import autocast, is_int

# The time grid of every round. "trailing" puts step i of N at round(T - i T / N) - 1, the integer version of
# [PD]'s t = i / N, so the N-step grid is exactly every other point of the 2N-step grid (i T / N = 2i T / 2N,
# and the two float divisions round alike): the student's (t, t_next) are the teacher's (t_{2i}, t_{2i+2}) and
# t_mid its t_{2i+1}, for every N. "leading" (i * (T // N), from 0 up) and "linspace" (i (T-1) / (N-1)) do not
# nest: with T = 1000 the 3-step leading grid is 666, 333, 0 but the 6-step one 830, 664, ..., 0; the student's
# first step must also start where the teacher's does, at the top of the grid, which "leading" never reaches.
GRID_SPACING = "trailing"


def distillation_rounds(start_steps: int, final_steps: int, num_timesteps: int) -> list[int]:
    """The student's step count of each round, from a start_steps-step teacher down to final_steps:
    [N0/2, N0/4, ..., final_steps]. Refuses (ConfigError) what halving cannot reach."""
    if not is_int(start_steps) or not is_int(final_steps) or final_steps < 1:
        raise ConfigError(f"distillation step counts must be positive integers, got start {start_steps!r} and "
                          f"final {final_steps!r}")
    if not final_steps < start_steps <= num_timesteps:
        raise ConfigError(f"distillation halves the step count from the teacher's start_steps={start_steps} to "
                          f"final_steps={final_steps}: need final_steps < start_steps <= num_timesteps="
                          f"{num_timesteps}; lower final_steps or raise start_steps")
    ratio, rest = divmod(start_steps, final_steps)
    if rest or ratio & (ratio - 1):
        raise ConfigError(f"start_steps={start_steps} must be final_steps={final_steps} times a power of two "
                          f"(each round halves the steps), e.g. start_steps="
                          f"{final_steps * 2 ** (ratio.bit_length() - 1)}")
    rounds, n = [], start_steps
    while n > final_steps:
        n //= 2
        rounds.append(n)
    return rounds


def student_triples(diffusion: Diffusion, student_steps: int, start_steps: int) -> list[tuple[int, int, int]]:
    """(t, t_mid, t_next) of each of the student's N steps, top first, in a distillation that started from a
    start_steps-step teacher (N0 = N * 2^k, k >= 1): the teacher's 2N-step DDIM grid (GRID_SPACING) is
    t_0 > t_1 > ... > t_{2N-1}; student step i goes t_{2i} -> t_{2i+1} -> t_{2i+2} ([PD] Alg. 2: t = i/N,
    t' = t - 0.5/N, t'' = t - 1/N), and the last one ends at the data, t_next = DATA_T."""
    distillation_rounds(start_steps, student_steps, diffusion.num_timesteps)  # validates N0 = N * 2^k
    teacher = diffusion.sampling_timesteps("ddim", 2 * student_steps, GRID_SPACING)
    nxt = [*teacher[2::2], DATA_T]
    return list(zip(teacher[0::2], teacher[1::2], nxt))


def sample_triples(triples: list[tuple[int, int, int]], batch_size: int,
                   generator: Optional[torch.Generator] = None, device=None):
    """One student step per example, uniformly ([PD] Alg. 2: t = i/N with i ~ Cat[1, ..., N]): three (B,) long
    tensors t, t_mid, t_next on `device` (drawn on the generator's device, so CPU seeds give the same steps)."""
    table = torch.tensor(triples, dtype=torch.long)
    idx = torch.randint(len(triples), (batch_size,), generator=generator)
    t, t_mid, t_next = table[idx].to(device).unbind(1)
    return t, t_mid, t_next


def _alpha_sigma(diffusion: Diffusion, t: torch.Tensor, ndim: int):
    """alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) at per-example timesteps t (B,), shaped (B, 1, ..., 1);
    t = DATA_T (< 0) is the data: alpha = 1, sigma = 0 (as `Diffusion.alpha_bar_prev`). Computed from
    alphas_cumprod like the DDIM step's target end, so the two-step teacher here is the sampler's."""
    abar_table = diffusion.alphas_cumprod
    abar = torch.where(t >= 0, abar_table[t.clamp(min=0)], torch.ones((), dtype=abar_table.dtype, device=t.device))
    abar = abar.view(-1, *[1] * (ndim - 1))
    return abar.sqrt(), (1 - abar).sqrt()


def _as_steps(t, xt: torch.Tensor) -> torch.Tensor:
    """An int or a (B,) tensor of timesteps as a (B,) long tensor on xt's device."""
    t = torch.as_tensor(t, dtype=torch.long, device=xt.device)
    return t.expand(xt.shape[0]) if t.ndim == 0 else t


@torch.no_grad()
def distillation_target(diffusion: Diffusion, teacher_fn: Callable, xt: torch.Tensor, t, t_mid, t_next,
                        clip_x0: bool = False):
    """([PD] Alg. 2) The x0 the student must predict at (xt, t) so that ONE deterministic DDIM step t -> t_next
    lands where TWO teacher DDIM steps t -> t_mid -> t_next land, and its loss weight max(SNR(t), 1).
    t, t_mid, t_next: ints or (B,) long tensors (one student step per example), t > t_mid > t_next >= DATA_T.
    teacher_fn(xt, t) -> model output in the diffusion's objective (e.g. `diffusion.guided_model(model, y, w)`).
    Returns (x0_target like xt, weight (B,)). No gradient flows into the teacher or the target."""
    t, t_mid, t_next = (_as_steps(s, xt) for s in (t, t_mid, t_next))
    if not ((t > t_mid) & (t_mid > t_next) & (t_next >= DATA_T)).all():
        raise ValueError("distillation steps need t > t_mid > t_next >= DATA_T for every example")
    (a, s), (a_mid, s_mid), (a_next, s_next) = (_alpha_sigma(diffusion, u, xt.ndim) for u in (t, t_mid, t_next))
    # Two teacher DDIM steps ([DDIM] Eq. 12, eta = 0: x' = alpha' x0 + sigma' eps), the x0 of each from the one
    # model-output conversion the samplers use (so eps / x0 / v teachers and clip_x0 behave as in sampling).
    x0_1, eps_1 = diffusion.predict_x0_eps(teacher_fn(xt, t), xt, t, clip_x0)
    x_mid = a_mid * x0_1 + s_mid * eps_1
    x0_2, _ = diffusion.predict_x0_eps(teacher_fn(x_mid, t_mid), x_mid, t_mid, clip_x0)
    # [PD] Alg. 2: x~ = (z'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha_t), solving the one-step
    # DDIM map z'' = (sigma''/sigma) z_t + (alpha'' - (sigma''/sigma) alpha) x~ for x~. Each teacher step is that
    # same map, z_mid = r1 z_t + d1 x0_1 and z'' = r2 z_mid + d2 x0_2 (r = sigma ratio, d = alpha' - r alpha), so
    # z'' - (sigma''/sigma) z_t = r2 d1 x0_1 + d2 x0_2 and alpha'' - (sigma''/sigma) alpha = r2 d1 + d2: x~ is the
    # weighted mean of the teacher's two x0 below. Same number, but without subtracting two nearly equal
    # noisy images (z'' ~ z_t at high noise), which in float32 costs up to ~4e-3 of x~ (500 steps of T = 1000,
    # measured against float64; this form: 1e-7).
    # d1, d2 >= 0 because the SNR alpha/sigma grows as t falls. At t_next = DATA_T, r2 = 0: x~ = x0_2 = z''.
    r2 = s_next / s_mid
    w1 = r2 * (a_mid - s_mid / s * a)
    w2 = a_next - r2 * a_mid
    x0_target = (w1 * x0_1 + w2 * x0_2) / (w1 + w2)
    return x0_target.to(xt.dtype), distillation_weight(diffusion, t)


def distillation_weight(diffusion: Diffusion, t: torch.Tensor) -> torch.Tensor:
    """[PD] Sec. 4 "truncated SNR" weighting: max(SNR(t), 1) on the x0 squared error, (B,). For a fixed z_t the
    eps error is sqrt(SNR) times the x0 error (eps = (z_t - alpha x0) / sigma), so this is
    max(||x0 - x~||^2, ||eps - eps~||^2), the paper's L = max(x-loss, eps-loss): finite at SNR -> 0, where
    the eps-loss (weight SNR on x0) would vanish and the step from pure noise would not be learned."""
    return diffusion.snr[t].clamp(min=1.0)


def student_loss(diffusion: Diffusion, student_out: torch.Tensor, xt: torch.Tensor, t, x0_target: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """Per-example distillation loss (B,): weight * mean((x0_student - x0_target)^2), x0_student from the
    student's output by `predict_x0_eps` (no clipping: its gradient must flow), so the student may be trained
    in any objective. Take .mean() for the scalar. The objective only changes the parametrisation, not the
    loss: for the same z_t, the v error is ||v - v~||^2 = (SNR + 1) ||x0 - x~||^2 and the eps error SNR ||x0 -
    x~||^2, so max(SNR, 1) x0-MSE is exactly [PD]'s truncated-SNR loss max(x-MSE, eps-MSE) for a v-, eps- or
    x0-student (the paper trains v students; its alternative "SNR+1" weighting would be the plain v-MSE)."""
    t = _as_steps(t, xt)
    x0_student, _ = diffusion.predict_x0_eps(student_out, xt, t)
    return weight * (x0_student - x0_target).pow(2).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------- the run
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
    check_value("sample.guidance_scale", plan.guidance_scale, "--guidance-scale")  # NaN gave an untrained student
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


class DistillationLoss:
    """[PD] Alg. 2's loss, the Trainer's loss object: per example a student step (t, t_mid, t_next) drawn
    uniformly from `triples` (global RNG: resumable), z_t = q_sample(x0, t, noise), and the student's
    truncated-SNR x0 error against the guided two-step teacher's target. DistillRounds sets `teacher` and the
    current round's `triples`."""

    def __init__(self, guidance_scale: float, teacher: Optional[torch.nn.Module] = None, triples=()):
        self.guidance_scale, self.teacher, self.triples = guidance_scale, teacher, list(triples)

    def __call__(self, trainer: Trainer, batch):
        x0, y = batch
        diffusion = trainer.diffusion
        t, t_mid, t_next = sample_triples(self.triples, x0.shape[0], device=x0.device)
        xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
        with autocast(trainer.device, trainer.amp):
            teacher_fn = diffusion.guided_model(self.teacher, y, self.guidance_scale)
            x0_target, weight = distillation_target(diffusion, teacher_fn, xt, t, t_mid, t_next,
                                                    clip_x0=trainer.cfg.sample.clip_x0)
            out = trainer.model(xt, t, y).float()
        return student_loss(diffusion, out, xt, t, x0_target, weight), t


class DistillRounds(TrainerHook):
    """The rounds of a distillation, as the Trainer's hook: the frozen teacher, the round's triples and grid,
    the round boundaries ([PD] Alg. 2) and the round students' files. `loss`: the run's DistillationLoss."""

    def __init__(self, plan: DistillPlan, overwrite: bool = False):
        self.plan, self.overwrite, self.round = plan, overwrite, 0
        self.shown_round: Optional[int] = None  # the round whose progress bar is on screen
        self.loss = DistillationLoss(plan.guidance_scale)

    def on_setup(self, trainer: Trainer, ckpt: Optional[dict]) -> None:
        """Student and EMA start from the teacher's weights; the LR schedule restarts each round. A fresh run
        (after prepare_run_dir refused or, with --overwrite, cleared the step files) must not leave another
        distillation's round students next to its own: --overwrite deletes them too."""
        plan = self.plan
        trainer.load_weights(plan.teacher_weights)
        self.loss.teacher = copy.deepcopy(trainer.ema.model).eval().requires_grad_(False)
        factor, m = lr_factor(dataclasses.replace(trainer.tcfg, max_steps=plan.round_steps)), plan.round_steps
        trainer.set_lr_schedule(lambda s: factor(s % m))
        self.set_round(trainer, 0)
        stale = sorted(trainer.run_dir.glob("steps_*.pt")) if ckpt is None and trainer.dist.is_main else []
        if stale and not self.overwrite:
            raise ConfigError(f"{trainer.run_dir}/ holds the students of another distillation ({stale[0].name}): "
                              "continue it with --resume, or pass --overwrite to delete them and start over")
        for path in stale:
            path.unlink()

    def set_round(self, trainer: Trainer, index: int) -> None:
        self.round = index
        steps = self.plan.rounds[index]
        self.loss.triples = student_triples(trainer.diffusion, steps, self.plan.start_steps)
        set_student_grid(trainer.cfg, steps, folded_guidance=trainer.cfg.model.num_classes > 0)

    def restore(self, trainer: Trainer, ckpt: dict) -> None:
        self.loss.teacher.load_state_dict(ckpt["teacher_model"])
        self.set_round(trainer, int(ckpt["distill"]["round"]))

    def on_step_start(self, trainer: Trainer) -> None:
        """[PD] Alg. 2 at a round boundary: the student becomes the teacher, and the next student starts as a
        copy of it (EMA, Adam moments, LR schedule and loss watch restart)."""
        if trainer.step // self.plan.round_steps > self.round:
            self.next_round(trainer)
        if self.shown_round != self.round and trainer.logger:
            self.show_round(trainer)

    def show_round(self, trainer: Trainer) -> None:
        """The round's own progress bar: "round 2/3: 8 → 4 steps" (a resumed run starts it part-way)."""
        plan, i = self.plan, self.round
        teacher_steps = plan.start_steps if i == 0 else plan.rounds[i - 1]
        trainer.logger.start_bar(f"round {i + 1}/{len(plan.rounds)}: {teacher_steps} → {plan.rounds[i]} steps",
                                 plan.round_steps, trainer.step - i * plan.round_steps)
        self.shown_round = i

    def next_round(self, trainer: Trainer) -> None:
        student = trainer.ema.model.state_dict()
        self.loss.teacher.load_state_dict(student)
        trainer.load_weights(student)
        trainer.reset_optimizer()
        trainer.reset_loss_watch()  # a new round's loss has no level yet: not "exploding" against the last
        self.set_round(trainer, self.round + 1)

    def on_step_end(self, trainer: Trainer) -> None:
        """The round's student: saved (and shown) as steps_NNNN.pt."""
        if trainer.step % self.plan.round_steps:
            return
        trainer.save()
        if trainer.dist.is_main:
            run_dir = trainer.run_dir
            copy_checkpoint(run_dir / "last.pt", run_dir / f"steps_{self.plan.rounds[self.round]:04d}.pt")
        if not trainer.finished and trainer.step % trainer.tcfg.sample_every:
            trainer.sample()

    def checkpoint_state(self, trainer: Trainer) -> dict:
        record = dict(self.plan.record(), round=self.round, student_steps=self.plan.rounds[self.round])
        return {"teacher_model": self.loss.teacher.state_dict(), "distill": record}


def run_distillation(cfg: Config, plan: DistillPlan, resume=None, *, checkpoint: Optional[dict] = None,
                     overwrite: bool = False, stop_at: Optional[int] = None) -> dict:
    """training.trainer.train with the distillation's loss and hook: cfg from distill_config, the rest (and
    the summary returned) as train()'s."""
    rounds = DistillRounds(plan, overwrite)
    return train(cfg, resume, checkpoint=checkpoint, overwrite=overwrite, stop_at=stop_at, loss=rounds.loss,
                 hooks=[rounds])
