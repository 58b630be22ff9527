"""Progressive distillation (issue #16): the math of one distillation step, for any objective.

A student learns to do in ONE deterministic DDIM step what the teacher does in TWO; then the student becomes
the teacher and the step count halves again ([PD] Algorithm 2). This module has no optimizer, loop or file:
distill.py (on top of the Trainer) calls, per round and per batch,

    triples = student_triples(diffusion, student_steps, start_steps)    # once per round
    t, t_mid, t_next = sample_triples(triples, batch_size, device=...)  # [PD] Alg. 2: i ~ Cat[1, ..., N]
    xt = diffusion.q_sample(x0, t, noise)                               # z_t ~ q(z_t | x)
    x0_target, weight = distillation_target(diffusion, teacher_fn, xt, t, t_mid, t_next)
    loss = student_loss(diffusion, student(xt, t, y), xt, t, x0_target, weight).mean()

teacher_fn is any callable (xt, t) -> model output with t a (B,) long tensor; for a class-conditional teacher
with classifier-free guidance pass `diffusion.guided_model(teacher, y, guidance_scale)`: the student then learns
the guided two-step map and samples guided in one evaluation per step (no second, unconditional pass).
The distilled N-step student samples with `Diffusion.sample(..., sampler="ddim", eta=0, steps=N,
timestep_spacing=GRID_SPACING)`: exactly the grid it was trained on. Pass distillation_target the clip_x0 the
teacher samples with (Diffusion.sample's default is True): the target is then a weighted mean of clamped x0,
inside [-1, 1], so the student's own clamp at sampling leaves it alone and it reproduces the clipped teacher.

References:
  [PD]   Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  [DDIM] Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from config import ConfigError
from diffusion import DATA_T, Diffusion
from utils import is_int

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
