"""Diffusion math checked against closed-form identities (no magic numbers)."""
import math

import pytest
import torch

from config import ConfigError
from diffusion import Diffusion, make_betas

OBJECTIVES = ["eps", "x0", "v"]
SCHEDULES = ["linear", "cosine"]


def test_buffers_are_float32_of_shape_T():
    d = Diffusion(num_timesteps=123)
    assert d.betas.dtype == torch.float32 and d.betas.shape == (123,)
    assert d.alphas_cumprod.dtype == torch.float32 and d.alphas_cumprod.shape == (123,)


def test_linear_schedule_matches_ddpm():
    d = Diffusion(num_timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(d.betas.double(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d.alphas_cumprod.double(), torch.cumprod(1 - expected, 0), rtol=1e-5, atol=1e-9)


def test_cosine_alphas_cumprod_matches_formula():
    T, s = 1000, 0.008
    d = Diffusion(num_timesteps=T, schedule="cosine")

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    unclipped = make_betas("cosine", T) < 0.999  # the formula holds until the 0.999 cap kicks in
    assert unclipped[:-1].all()
    torch.testing.assert_close(d.alphas_cumprod.double()[:-1], expected[:-1], rtol=1e-5, atol=1e-9)
    assert d.betas.max() <= 0.999 + 1e-7


def test_q_sample_marginal_mean_and_variance():
    d = Diffusion(num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t_int in [0, 250, 999]:
        x0 = torch.full((n, 1), 1.7)
        t = torch.full((n,), t_int, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(n, 1, generator=g))
        abar = d.alphas_cumprod[t_int].item()
        se_mean = math.sqrt((1 - abar) / n)
        assert abs(xt.mean().item() - math.sqrt(abar) * 1.7) < 5 * se_mean + 1e-6
        assert abs(xt.var().item() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n) + 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_matches_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x0) from the product of q(x_{t-1} | x0) and q(x_t | x_{t-1}) in float64."""
    d = Diffusion(num_timesteps=200, schedule=schedule)
    betas = make_betas(schedule, 200)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for t_int in [1, 50, 199]:
        ab_prev, alpha, beta = abar[t_int - 1], 1 - betas[t_int], betas[t_int]
        precision = 1 / (1 - ab_prev) + alpha / beta
        var = 1 / precision
        mean = var * (ab_prev.sqrt() * x0.double() / (1 - ab_prev) + alpha.sqrt() * xt.double() / beta)
        t = torch.full((5,), t_int, dtype=torch.long)
        got_mean, got_var = d.q_posterior(x0, xt, t)
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_var.double().flatten(), var.expand(5).double(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_conversions_round_trip(objective, schedule):
    d = Diffusion(num_timesteps=1000, schedule=schedule, objective=objective)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    t = torch.linspace(0, 998, 64).long()  # t=999 of cosine has abar ~ 0: x0 is unrecoverable there
    xt = d.q_sample(x0, t, eps)
    x0_hat, eps_hat = d.predict_x0_eps(d.target(x0, eps, t), xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=1e-3)


def test_clip_x0_keeps_x0_eps_consistent():
    d = Diffusion(num_timesteps=100)
    t = torch.full((8,), 50, dtype=torch.long)
    xt = torch.randn(8, 3) * 3
    x0, eps = d.predict_x0_eps(torch.randn(8, 3) * 5, xt, t, clip_x0=True)
    assert x0.abs().max() <= 1
    torch.testing.assert_close(d.q_sample(x0, t, eps), xt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weight_is_min_snr_times_x0_mse(objective):
    """[MSNR]: every objective's weighted loss equals min(SNR, gamma) * ||x0_hat - x0||^2."""
    d = Diffusion(num_timesteps=1000, objective=objective, loss_weighting="min_snr", min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    outputs = {}

    def model(xt, t_, y=None):
        outputs["out"] = torch.sin(xt * 3) + 0.1 * t_[:, None].float() / 1000
        return outputs["out"]
    losses, _ = d.training_losses(model, x0, t=t, noise=noise)
    xt = d.q_sample(x0, t, noise)
    x0_hat, _ = d.predict_x0_eps(outputs["out"], xt, t)
    expected = d.snr[t].clamp(max=5.0) * (x0_hat - x0).pow(2).mean(dim=1)
    torch.testing.assert_close(losses, expected, rtol=1e-3, atol=1e-5)


def test_loss_is_scalar_and_differentiable():
    d = Diffusion(num_timesteps=100)
    net = torch.nn.Linear(3, 3)
    loss = d.loss(lambda xt, t, y=None: net(xt), torch.randn(16, 3))
    loss.backward()
    assert loss.ndim == 0 and net.weight.grad is not None


def test_timestep_spacings():
    d = Diffusion(num_timesteps=1000)
    assert d.sampling_timesteps("ddpm") == list(range(999, -1, -1))
    assert d.sampling_timesteps("ddim", 10, "leading") == list(range(900, -1, -100))
    assert d.sampling_timesteps("ddim", 10, "trailing") == list(range(999, 0, -100))
    lin = d.sampling_timesteps("ddim", 10, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and len(lin) == 10
    assert len(d.sampling_timesteps("ddim", 1000, "linspace")) == 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="ddim", steps=1001), "steps must be between"),
    (dict(sampler="ddim", steps=0), "steps must be between"),
    (dict(sampler="ddpm", steps=10), "uses all T"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(sampler="ddim", eta=-0.1), "eta must be >= 0"),
])
def test_bad_sampler_arguments(kwargs, match):
    d = Diffusion(num_timesteps=1000)
    with pytest.raises(ConfigError, match=match):
        d.sample(lambda xt, t, y=None: xt, (2, 2), progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="quadratic"), "unknown schedule"),
    (dict(objective="score"), "unknown objective"),
    (dict(var_type="learned"), "unknown variance type"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Diffusion(**kwargs)


class Oracle:
    """Exact denoiser for data x0 ~ N(mu, sigma^2 I): E[x0 | x_t] is closed-form (Gaussian
    conditioning), so E[eps | x_t] and E[v | x_t] are too. Counts its calls."""

    def __init__(self, d: Diffusion, mu: torch.Tensor, sigma: float):
        self.d, self.mu, self.sigma, self.calls = d, mu, sigma, 0

    def __call__(self, xt, t, y=None):
        self.calls += 1
        a = self.d.sqrt_abar[t][:, None].double()
        s = self.d.sqrt_one_minus_abar[t][:, None].double()
        xt = xt.double()
        x0 = self.mu + a * self.sigma ** 2 / (a ** 2 * self.sigma ** 2 + s ** 2) * (xt - a * self.mu)
        eps = (xt - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.d.objective]
        return out.float()


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
# Ancestral steps (ddpm, ddim eta=1) plug E[x0|x_t] into the posterior and so lose a variance term that
# grows with the step size: eta=1 needs fine steps (with 50 the std is ~10% low), eta=0 does not.
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 50, 0.0), ("ddim", 500, 1.0),
                                                 ("dpmpp2m", 20, 0.0)])
def test_oracle_samples_match_data_distribution(objective, schedule, sampler, steps, eta):
    d = Diffusion(num_timesteps=1000, schedule=schedule, objective=objective)
    mu, sigma, n = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.5, 8000
    oracle = Oracle(d, mu, sigma)
    g = torch.Generator().manual_seed(4)
    x = d.sample(oracle, (n, 2), sampler=sampler, steps=steps, eta=eta, generator=g, clip_x0=False,
                 progress=False).double()
    # 6 standard errors for the mean, plus a small allowance for discretisation error.
    assert (x.mean(0) - mu).abs().max() < 6 * sigma / math.sqrt(n) + 0.01
    assert (x.std(0) - sigma).abs().max() < 6 * sigma / math.sqrt(2 * n) + 0.01
    assert oracle.calls == len(d.sampling_timesteps(sampler, steps))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_eta1_all_steps_equals_ddpm(objective):
    d = Diffusion(num_timesteps=100, objective=objective, var_type="fixed_small")
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = lambda xt, t, y=None: net(xt) + t[:, None].float() / 100  # noqa: E731
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    x_ddpm = d.sample(model, (64, 3), "ddpm", x_T=x_T, generator=torch.Generator().manual_seed(6),
                      clip_x0=True, progress=False)
    x_ddim = d.sample(model, (64, 3), "ddim", steps=100, eta=1.0, x_T=x_T, clip_x0=True,
                      generator=torch.Generator().manual_seed(6), progress=False)
    torch.testing.assert_close(x_ddim, x_ddpm, atol=1e-4, rtol=1e-4)


def test_same_generator_same_samples_and_callback():
    d = Diffusion(num_timesteps=50)
    model = lambda xt, t, y=None: 0.1 * xt  # noqa: E731
    seen = []
    a = d.sample(model, (4, 2), "ddim", steps=10, eta=0.5, generator=torch.Generator().manual_seed(7),
                 progress=False, callback=lambda i, t, xt, x0: seen.append((i, t, xt.shape, x0.shape)))
    b = d.sample(model, (4, 2), "ddim", steps=10, eta=0.5, generator=torch.Generator().manual_seed(7),
                 progress=False)
    assert torch.equal(a, b)
    assert [s[0] for s in seen] == list(range(10)) and seen[0][1] == 45 and seen[-1][1] == 0


def test_classifier_free_guidance_mixes_outputs():
    d = Diffusion(num_timesteps=10)
    calls = []

    def model(xt, t, y=None):
        calls.append(y.clone())
        return xt * 0 + (y[:, None] >= 0).float() * 2.0 - 1.0  # cond -> +1, uncond -> -1
    y = torch.tensor([3, 1])
    fn = d.guided_model(model, y, guidance_scale=3.0)
    out = fn(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, torch.full((2, 2), -1.0 + 3.0 * 2.0))  # u + s (c - u)
    assert calls[0].tolist() == [3, 1, -1, -1]
    plain = d.guided_model(model, y, guidance_scale=1.0)(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(plain, torch.ones(2, 2))


def test_dpmpp2m_matches_diffusers_reference_trajectory():
    """Our DPM-Solver++(2M) and diffusers' DPMSolverMultistepScheduler give the same samples from the
    same start on the oracle, on the same explicit time grid."""
    diffusers = pytest.importorskip("diffusers")
    d = Diffusion(num_timesteps=1000, schedule="cosine")
    oracle = Oracle(d, torch.tensor([1.5, -0.5], dtype=torch.float64), 0.5)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                  algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(timesteps=d.sampling_timesteps("dpmpp2m", 20))  # the same explicit grid
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(8))
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(oracle(x, torch.full((512,), int(t))), t, x).prev_sample
    ours = d.sample(oracle, (512, 2), "dpmpp2m", steps=20, x_T=x_T, clip_x0=False, progress=False)
    torch.testing.assert_close(ours, x, atol=2e-3, rtol=2e-3)
