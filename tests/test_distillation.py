"""Progressive distillation (issue #16) against closed forms: with the exact denoiser of 4-D Gaussian data as the
teacher, one student DDIM step aimed at the computed x0 target must land exactly where two teacher DDIM steps
land, and a chain of perfect students must reproduce the teacher's samples with half the steps per round."""
import pytest
import torch

import training.distillation as dist
from config import ConfigError
from diffusion import DATA_T, Diffusion, make_betas

OBJECTIVES = ["eps", "x0", "v"]
SCHEDULES = ["linear", "cosine"]
MU = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
STD = torch.tensor([0.6, 0.5, 0.7, 0.4], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.9, 0.6, -0.5], [0.9, 1.0, 0.7, -0.4], [0.6, 0.7, 1.0, -0.3], [-0.5, -0.4, -0.3, 1.0]],
                    dtype=torch.float64)
COV = STD[:, None] * CORR * STD[None]


def diffusion64(schedule: str = "linear", objective: str = "eps", T: int = 1000) -> Diffusion:
    """A float64 Diffusion whose DDIM coefficients are the float64 schedule itself (the module stores float32
    roundings, in which sqrt_abar^2 + sqrt_one_minus_abar^2 = 1 only to ~1e-7): errors here are rounding only."""
    d = Diffusion(num_timesteps=T, schedule=schedule, objective=objective).double()
    abar = torch.cumprod(1 - make_betas(schedule, T), 0)
    for name, value in {"alphas_cumprod": abar, "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1 - abar).sqrt(),
                        "snr": abar / (1 - abar)}.items():
        getattr(d, name).copy_(value)
    return d


def oracle(d: Diffusion):
    """The exact denoiser for x0 ~ N(MU, COV) (tests/test_editing.py's, per example t): x_t = a x0 + s eps is
    jointly Gaussian with x0, so E[x0 | x_t] = mu + a cov (a^2 cov + s^2 I)^-1 (x_t - a mu); output in the
    diffusion's objective and in x_t's dtype."""
    def fn(xt, t, y=None):
        a = d.sqrt_abar[t].double()[:, None, None]
        s = d.sqrt_one_minus_abar[t].double()[:, None, None]
        gain = a * COV @ torch.linalg.inv(a ** 2 * COV + s ** 2 * torch.eye(4, dtype=torch.float64))  # (B, 4, 4)
        x = xt.double()
        x0 = MU + (gain @ (x - a[:, 0] * MU)[:, :, None])[:, :, 0]
        return output_for(d, x0, x, t).to(xt.dtype)
    return fn


def output_for(d: Diffusion, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model output (eps / x0 / v) whose x0 is `x0` at (xt, t): eps from x_t = a x0 + s eps."""
    a, s = d.gather(d.sqrt_abar, t, xt.ndim), d.gather(d.sqrt_one_minus_abar, t, xt.ndim)
    return d.target(x0, (xt - a * x0) / s, t)


def steps(t: int, xt: torch.Tensor) -> torch.Tensor:
    return torch.full((xt.shape[0],), t, dtype=torch.long)


def noise(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def teacher_two_steps(d: Diffusion, teacher, xt, t, t_mid, t_next):
    """Two deterministic DDIM steps of the sampler itself (Diffusion.step), t -> t_mid -> t_next."""
    x_mid = d.step("ddim", teacher(xt, steps(t, xt)), xt, t, t_mid).prev_sample
    return d.step("ddim", teacher(x_mid, steps(t_mid, xt)), x_mid, t_mid, t_next).prev_sample


# ----------------------------------------------------------------------------- the target
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_one_student_step_lands_on_two_teacher_steps(objective, schedule):
    """Every step of a 4-step student (teacher: 8 steps), the last one ending at the data (t_next = DATA_T).
    float64, so the only error is rounding."""
    d = diffusion64(schedule, objective)
    teacher = oracle(d)
    triples = dist.student_triples(d, 4, 8)
    assert triples[-1][2] == DATA_T
    for i, (t, t_mid, t_next) in enumerate(triples):
        xt = d.q_sample(MU + noise(64, 1) @ torch.linalg.cholesky(COV).T, steps(t, noise(64)), noise(64, 2 + i))
        x0_target, _ = dist.distillation_target(d, teacher, xt, t, t_mid, t_next)
        student = d.step("ddim", output_for(d, x0_target, xt, steps(t, xt)), xt, t, t_next).prev_sample
        expected = teacher_two_steps(d, teacher, xt, t, t_mid, t_next)
        torch.testing.assert_close(student, expected, rtol=0, atol=1e-9)
        # and not trivially: one teacher step t -> t_next lands elsewhere
        one_step = d.step("ddim", teacher(xt, steps(t, xt)), xt, t, t_next).prev_sample
        assert (one_step - expected).abs().max() > 1e-5


def test_last_step_target_is_the_teachers_landing_point():
    """t_next = DATA_T: alpha'' = 1, sigma'' = 0, so the target is the teacher's x at the data itself."""
    d = diffusion64("linear", "v")
    teacher = oracle(d)
    (t, t_mid, t_next), = dist.student_triples(d, 1, 2)
    xt = noise(32)
    x0_target, _ = dist.distillation_target(d, teacher, xt, t, t_mid, t_next)
    torch.testing.assert_close(x0_target, teacher_two_steps(d, teacher, xt, t, t_mid, t_next), rtol=0, atol=1e-12)


def test_clipped_teacher_target_lies_in_the_data_range():
    """clip_x0=True (Diffusion.sample's default): the teacher's two steps use x0 clamped to [-1, 1]; the target,
    a weighted mean of those two x0 with weights >= 0, stays in [-1, 1], so the student's own clipped step
    (as Diffusion.sample takes it) lands on the teacher's clipped two-step result. Data far outside [-1, 1]."""
    d = diffusion64("cosine", "v")
    teacher, clipping = oracle(d), 0.0
    for t, t_mid, t_next in dist.student_triples(d, 4, 8):
        xt = d.q_sample(3 * MU + 2 * noise(64, 1), steps(t, noise(64)), noise(64, 2))
        x0_target, _ = dist.distillation_target(d, teacher, xt, t, t_mid, t_next, clip_x0=True)
        assert x0_target.abs().max() <= 1 + 1e-12
        x_mid = d.step("ddim", teacher(xt, steps(t, xt)), xt, t, t_mid, clip_x0=True).prev_sample
        expected = d.step("ddim", teacher(x_mid, steps(t_mid, xt)), x_mid, t_mid, t_next, clip_x0=True).prev_sample
        student = d.step("ddim", output_for(d, x0_target, xt, steps(t, xt)), xt, t, t_next, clip_x0=True)
        torch.testing.assert_close(student.prev_sample, expected, rtol=0, atol=1e-9)
        clipping = max(clipping, (teacher_two_steps(d, teacher, xt, t, t_mid, t_next) - expected).abs().max())
    assert clipping > 0.1  # the clipping mattered


def test_target_is_the_papers_formula():
    """[PD] Alg. 2: x~ = (z'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha), z'' from two DDIM steps;
    evaluated literally in float64 (the module's rearrangement avoids the cancellation z'' - r z_t)."""
    d = diffusion64("cosine", "eps")
    teacher = oracle(d)
    abar = d.alphas_cumprod
    for t, t_mid, t_next in dist.student_triples(d, 8, 64)[::3]:
        xt = noise(16, t)
        z2 = teacher_two_steps(d, teacher, xt, t, t_mid, t_next)
        ratio = (1 - abar[t_next]).sqrt() / (1 - abar[t]).sqrt()
        paper = (z2 - ratio * xt) / (abar[t_next].sqrt() - ratio * abar[t].sqrt())
        torch.testing.assert_close(dist.distillation_target(d, teacher, xt, t, t_mid, t_next)[0], paper,
                                   rtol=1e-9, atol=1e-9)


def test_target_is_accurate_in_float32_on_a_fine_grid():
    """float32, a 500-step student at high noise (steps of 2 timesteps): the literal formula subtracts
    z'' - (sigma''/sigma) z_t of two nearly equal images and loses ~1e-4 of x~; the module must not."""
    d32 = Diffusion(num_timesteps=1000, objective="x0")
    d64 = diffusion64("linear", "x0")
    xt = noise(256, 3)
    worst = 0.0
    for t, t_mid, t_next in dist.student_triples(d32, 500, 1000)[:5]:
        x32, _ = dist.distillation_target(d32, oracle(d32), xt.float(), t, t_mid, t_next)
        x64, _ = dist.distillation_target(d64, oracle(d64), xt, t, t_mid, t_next)
        worst = max(worst, (x32.double() - x64).abs().max().item())
    assert worst < 1e-5, worst


def test_one_student_step_per_example_in_a_batch():
    """A batch with a different student step per example (as training draws them) gives, row by row, the
    target of that step alone, and the same weights."""
    d = diffusion64("cosine", "v")
    teacher = oracle(d)
    triples = dist.student_triples(d, 4, 16)
    t, t_mid, t_next = dist.sample_triples(triples, 64, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {tr[0] for tr in triples}  # every step drawn
    xt = noise(64, 5)
    target, weight = dist.distillation_target(d, teacher, xt, t, t_mid, t_next)
    for i in range(0, 64, 7):
        row, w = dist.distillation_target(d, teacher, xt[i:i + 1], int(t[i]), int(t_mid[i]), int(t_next[i]))
        torch.testing.assert_close(target[i:i + 1], row, rtol=0, atol=1e-12)
        torch.testing.assert_close(weight[i:i + 1], w)


def test_bad_step_order_refused():
    d = Diffusion(num_timesteps=100)
    with pytest.raises(ValueError, match="t > t_mid > t_next"):
        dist.distillation_target(d, oracle(d), noise(2).float(), 50, 60, 10)


# ----------------------------------------------------------------------------- the chain
def perfect_student(d: Diffusion, teacher, triples, clip_x0: bool = False):
    """A student that has learnt its target exactly: at (x_t, t) it outputs the x0 target of its step at t."""
    lookup = {t: (t_mid, t_next) for t, t_mid, t_next in triples}

    def fn(xt, t, y=None):
        t_mid = torch.tensor([lookup[int(u)][0] for u in t])
        t_next = torch.tensor([lookup[int(u)][1] for u in t])
        return output_for(d, dist.distillation_target(d, teacher, xt, t, t_mid, t_next, clip_x0)[0], xt, t)
    return fn


def ddim_sample(d: Diffusion, model, x_T: torch.Tensor, n: int) -> torch.Tensor:
    """Diffusion.sample's deterministic DDIM loop on the grid the students are sampled with (n steps, GRID_SPACING),
    without the float32 cast of its model wrapper, so float64 stays float64."""
    x = x_T
    for t, t_prev in d.step_pairs(d.sampling_timesteps("ddim", n, dist.GRID_SPACING)):
        x = d.step("ddim", model(x, steps(t, x)), x, t, t_prev).prev_sample
    return x


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_chain_of_perfect_students_reproduces_the_teacher(objective):
    """Rounds 8 -> 4 -> 2 -> 1 steps, each student the next round's teacher ([PD] Alg. 2): every round's N-step
    DDIM samples equal the 8-step teacher's from the same x_T."""
    d = diffusion64("cosine", objective)
    x_T = noise(128, 7)
    teacher = oracle(d)
    expected = ddim_sample(d, teacher, x_T, 8)
    for n in dist.distillation_rounds(8, 1, d.num_timesteps):
        teacher = perfect_student(d, teacher, dist.student_triples(d, n, 8))
        torch.testing.assert_close(ddim_sample(d, teacher, x_T, n), expected, rtol=0, atol=1e-9)
    # and a different sampler output than the teacher's own n = 1 step (the test is not vacuous)
    assert (ddim_sample(d, oracle(d), x_T, 1) - expected).abs().max() > 1e-2
    # the samples are the data distribution's, roughly (8 DDIM steps on the exact denoiser)
    assert (expected.mean(0) - MU).abs().max() < 0.2


def test_perfect_student_through_diffusion_sample_in_float32():
    """The production path: float32, Diffusion.sample with the documented arguments (ddim, eta 0, N steps,
    GRID_SPACING, its default clip_x0=True, which the data reach) for a 4-step student distilled with clip_x0=True."""
    d = Diffusion(num_timesteps=1000, objective="v")
    x_T = noise(256, 9).float()
    teacher = oracle(d)
    expected = d.sample(teacher, (256, 4), "ddim", steps=8, eta=0, x_T=x_T, progress=False,
                        timestep_spacing=dist.GRID_SPACING)
    student = perfect_student(d, teacher, dist.student_triples(d, 4, 8), clip_x0=True)
    got = d.sample(student, (256, 4), "ddim", steps=4, eta=0, x_T=x_T, progress=False,
                   timestep_spacing=dist.GRID_SPACING)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("T, start, final", [(1000, 8, 1), (1000, 512, 4), (1000, 1000, 125), (1024, 1024, 1),
                                             (64, 48, 3), (1000, 6, 3)])
def test_student_grid_nests_in_the_teachers(T, start, final):
    d = Diffusion(num_timesteps=T)
    rounds = dist.distillation_rounds(start, final, T)
    assert rounds[0] == start // 2 and rounds[-1] == final and all(a == 2 * b for a, b in zip(rounds, rounds[1:]))
    for n in rounds:
        triples = dist.student_triples(d, n, start)
        teacher = d.sampling_timesteps("ddim", 2 * n, dist.GRID_SPACING)
        assert len(triples) == n
        assert [tr[0] for tr in triples] == d.sampling_timesteps("ddim", n, dist.GRID_SPACING) == teacher[0::2]
        assert [tr[1] for tr in triples] == teacher[1::2]
        assert [tr[2] for tr in triples] == [*teacher[2::2], DATA_T]
        assert triples[0][0] == T - 1  # starts where sampling from noise starts
        assert set(teacher) <= set(d.sampling_timesteps("ddim", start, dist.GRID_SPACING))


def test_other_spacings_do_not_nest():
    """Why GRID_SPACING is trailing: leading and linspace grids of N steps are not every other point of 2N."""
    d = Diffusion(num_timesteps=1000)
    for spacing in ("leading", "linspace"):
        assert d.sampling_timesteps("ddim", 3, spacing) != d.sampling_timesteps("ddim", 6, spacing)[0::2]


@pytest.mark.parametrize("start, final, match", [
    (12, 4, "times a power of two"), (8, 3, "times a power of two"), (24, 1, "times a power of two"),
    (4, 4, "need final_steps < start_steps"), (4, 8, "need final_steps < start_steps"),
    (2048, 1, "start_steps <= num_timesteps=1000"), (8, 0, "positive integers"), (8.0, 1, "positive integers"),
    (True, 1, "positive integers")])
def test_bad_step_counts_refused(start, final, match):
    d = Diffusion(num_timesteps=1000)
    with pytest.raises(ConfigError, match=match):
        dist.distillation_rounds(start, final, 1000)
    with pytest.raises(ConfigError, match=match):
        dist.student_triples(d, final, start)


# ----------------------------------------------------------------------------- weight and loss
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weight_is_truncated_snr(schedule):
    d = Diffusion(num_timesteps=1000, schedule=schedule)
    abar = torch.cumprod(1 - make_betas(schedule, 1000), 0)
    t = torch.arange(1000)
    expected = torch.maximum(abar / (1 - abar), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(dist.distillation_weight(d, t).double(), expected, rtol=1e-6, atol=0)
    assert (expected == 1).any() and (expected > 1).any()  # both branches of the max are exercised


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_zero_at_target_and_truncated_snr_mse_otherwise(objective):
    d = diffusion64("cosine", objective)
    t = torch.tensor([5, 200, 500, 800, 999] * 4)  # SNR above and below 1
    xt, x0_target = noise(20, 1), noise(20, 2)
    weight = dist.distillation_weight(d, t)
    exact = output_for(d, x0_target, xt, t)
    assert dist.student_loss(d, exact, xt, t, x0_target, weight).abs().max() < 1e-12
    x0_off = x0_target + 0.1 * noise(20, 3)
    loss = dist.student_loss(d, output_for(d, x0_off, xt, t), xt, t, x0_target, weight)
    assert loss.shape == (20,) and (loss > 0).all()
    # = [PD]'s max(x-MSE, eps-MSE) at the same x_t, whatever the objective
    a, s = d.gather(d.sqrt_abar, t, 2), d.gather(d.sqrt_one_minus_abar, t, 2)
    x_mse = (x0_off - x0_target).pow(2).mean(1)
    eps_mse = ((xt - a * x0_off) / s - (xt - a * x0_target) / s).pow(2).mean(1)
    torch.testing.assert_close(loss, torch.maximum(x_mse, eps_mse).to(loss.dtype), rtol=1e-6, atol=0)


def test_gradients_reach_the_student_not_the_teacher():
    d = Diffusion(num_timesteps=100, objective="v")
    teacher, student = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    triples = dist.student_triples(d, 2, 4)
    t, t_mid, t_next = dist.sample_triples(triples, 8, torch.Generator().manual_seed(0))
    xt = noise(8).float()
    x0_target, weight = dist.distillation_target(d, lambda x, u: teacher(x), xt, t, t_mid, t_next)
    assert not x0_target.requires_grad and not weight.requires_grad
    dist.student_loss(d, student(xt), xt, t, x0_target, weight).mean().backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


def test_classifier_free_guidance_teacher():
    """The guided teacher is Diffusion.guided_model: its mixed output out_u + w (out_c - out_u) is what the
    target is built from, per example t included."""
    d = Diffusion(num_timesteps=100, objective="eps")

    def model(xt, t, y):
        return xt * 0.1 * (y[:, None] + 2) + t[:, None] / 100
    y = torch.tensor([0, 1, 2, 1])
    t, t_mid, t_next = (torch.tensor(v) for v in ([99, 49, 99, 49], [74, 24, 74, 24], [49, -1, 49, -1]))
    xt = noise(4).float()
    got = dist.distillation_target(d, d.guided_model(model, y, 3.0), xt, t, t_mid, t_next)[0]
    null = torch.full_like(y, -1)
    by_hand = dist.distillation_target(
        d, lambda x, u: model(x, u, null) + 3.0 * (model(x, u, y) - model(x, u, null)), xt, t, t_mid, t_next)[0]
    torch.testing.assert_close(got, by_hand)
    unguided = dist.distillation_target(d, d.guided_model(model, y, 1.0), xt, t, t_mid, t_next)[0]
    assert (got - unguided).abs().max() > 1e-3
