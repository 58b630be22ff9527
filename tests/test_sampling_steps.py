"""The sampling loop as steps: one step function over explicit (t, t_prev) pairs, a generator of per-step
records that owns the progress bar, and samplers that refuse options they do not use (issue #13)."""
import io

import pytest
import torch
from tqdm.auto import tqdm as real_tqdm

import diffusion as diffusion_module
from config import ConfigError
from diffusion import DATA_T, Diffusion

# (sampler, steps, eta): every sampler, ddim both deterministic and ancestral
SAMPLERS = [("ddpm", None, None), ("ddim", 7, 0.0), ("ddim", 7, 0.5), ("dpmpp2m", 6, None)]


class CountingModel:
    """A smooth t-dependent model that counts its calls and, if given, notes a progress bar's count at each."""

    def __init__(self, bars=None):
        self.calls, self.bars, self.bar_counts = 0, bars, []

    def __call__(self, xt, t, y=None):
        if self.bars is not None:
            self.bar_counts.append(self.bars[-1].n if self.bars else None)
        self.calls += 1
        return torch.tanh(xt) * 0.5 + t[:, None].float() / 100


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_progress_bar_advances_once_per_model_evaluation(monkeypatch, sampler, steps, eta):
    """The bar must count the steps as they run: at the k-th model call it shows k finished steps (it
    used to be consumed by list(tqdm(...)) before the first step, so it read 'done' from the start)."""
    bars = []

    def recording_tqdm(*args, **kwargs):
        bars.append(real_tqdm(*args, **{**kwargs, "file": io.StringIO(), "mininterval": 0}))
        return bars[-1]
    monkeypatch.setattr(diffusion_module, "tqdm", recording_tqdm)
    d = Diffusion(num_timesteps=20)
    model = CountingModel(bars)
    kwargs = {} if eta is None else {"eta": eta}  # (eta=None is new: the old code took floats only)
    d.sample(model, (3, 2), sampler, steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
    n = len(d.sampling_timesteps(sampler, steps))
    assert len(bars) == 1 and model.calls == n
    assert model.bar_counts == list(range(n))  # k steps done when the (k+1)-th evaluation starts
    assert bars[0].n == n and bars[0].total == n


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_sample_steps_yields_one_record_per_evaluation_as_it_runs(sampler, steps, eta):
    d = Diffusion(num_timesteps=20)
    model = CountingModel()
    timesteps = d.sampling_timesteps(sampler, steps)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    gen = d.sample_steps(model, x_T, timesteps, sampler, eta=eta, generator=torch.Generator().manual_seed(2),
                         progress=False)
    assert model.calls == 0  # nothing runs before the first record is asked for
    records = []
    for rec in gen:
        assert model.calls == len(records) + 1  # one evaluation per record, run lazily
        records.append(rec)
    assert [(r.i, r.t, r.t_prev) for r in records] == [
        (i, t, t_prev) for i, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [DATA_T]))]
    # The same trajectory as sample(), which reports through its callback
    seen = []
    x = d.sample(model, (3, 2), sampler, steps=steps, eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(2),
                 progress=False, callback=lambda i, t, xt, x0: seen.append((i, t, xt, x0)))
    assert torch.equal(x, records[-1].xt)
    assert all(torch.equal(s[2], r.xt) and torch.equal(s[3], r.x0_pred) and s[:2] == (r.i, r.t)
               for s, r in zip(seen, records, strict=True))


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_hand_written_loop_over_step_reproduces_sample(sampler, steps, eta):
    """The public step function is all a sampler is: a caller can run (and later change) the loop."""
    d = Diffusion(num_timesteps=20, objective="v")
    model = CountingModel()
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    g, state, e = torch.Generator().manual_seed(4), None, d.check_eta(sampler, eta)
    for t, t_prev in d.step_pairs(d.sampling_timesteps(sampler, steps)):
        out = model(x, torch.full((4,), t))
        noise = torch.randn(x.shape, generator=g) if d.needs_noise(sampler, t_prev, e) else None
        x, _, state = d.step(sampler, out, x, t, t_prev, eta=e, noise=noise, state=state, clip_x0=True)
    expected = d.sample(model, (4, 2), sampler, steps=steps, eta=eta, x_T=x_T,
                        generator=torch.Generator().manual_seed(4), progress=False)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp2m"])
def test_samplers_without_eta_refuse_it(sampler):
    d = Diffusion(num_timesteps=20)
    model = CountingModel()
    with pytest.raises(ValueError, match="samplers that take eta: ddim"):
        d.sample(model, (2, 2), sampler, eta=0.5, progress=False)
    assert model.calls == 0  # refused before any work
    # What the scripts pass every sampler by default still works: eta 0 or not given
    for eta in (None, 0.0):
        d.sample(model, (2, 2), sampler, steps=None if sampler == "ddpm" else 3, eta=eta, progress=False)


def test_ddpm_refuses_a_timestep_spacing():
    with pytest.raises(ConfigError, match="spacing 'trailing' does not apply"):
        Diffusion(num_timesteps=20).sample(CountingModel(), (2, 2), "ddpm", timestep_spacing="trailing",
                                           progress=False)


@pytest.mark.parametrize("timesteps, match", [([], "non-empty"), ([5, 7, 0], "decreasing"), ([20, 3], "0..19"),
                                              ([5, 4, 2, 1, 0], "every timestep")])
def test_sample_steps_checks_the_grid_before_any_step(timesteps, match):
    d, model = Diffusion(num_timesteps=20), CountingModel()
    with pytest.raises(ConfigError, match=match):
        d.sample_steps(model, torch.zeros(2, 2), timesteps, "ddpm")
    assert model.calls == 0


def test_alpha_bar_prev_is_one_before_step_zero():
    d = Diffusion(num_timesteps=20)
    x = torch.zeros(3, 1, 4, 4)
    assert torch.equal(d.alpha_bar_prev(DATA_T, x), torch.ones(3, 1, 1, 1))
    assert torch.equal(d.alpha_bar_prev(5, x), d.alphas_cumprod[5].expand(3, 1, 1, 1))
    # gather indexes coefficients only: no hidden value at t = -1 (which gave 1 for betas, posterior variance ...)
    assert torch.equal(d.gather(d.betas, torch.tensor([3, 0]), 2), d.betas[[3, 0]][:, None])


def test_step_refuses_wrong_noise_and_impossible_pairs():
    d = Diffusion(num_timesteps=20)
    x, out = torch.randn(2, 2), torch.randn(2, 2)
    with pytest.raises(ValueError, match="needs noise"):
        d.step("ddpm", out, x, 5, 4)
    with pytest.raises(ValueError, match="takes no noise"):
        d.step("ddim", out, x, 5, 0, eta=0.0, noise=torch.randn(2, 2))
    with pytest.raises(ValueError, match="cannot step"):
        d.step("ddpm", out, x, 5, 2, noise=torch.randn(2, 2))
    with pytest.raises(ValueError, match="cannot step"):
        d.step("dpmpp2m", out, x, 5, 8)


def test_deterministic_ddim_step_runs_both_ways():
    """DDIM inversion (the next issue) is the eta = 0 step with t_prev > t: with the same eps, up then
    down returns to the start (x0 and eps are unchanged along a DDIM ODE step)."""
    d = Diffusion(num_timesteps=100, schedule="cosine")
    eps = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    x10 = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    x60, x0_up, _ = d.step("ddim", eps, x10, 10, 60)
    back, x0_down, _ = d.step("ddim", eps, x60, 60, 10)
    assert torch.isfinite(x60).all()
    torch.testing.assert_close(x0_down, x0_up, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back, x10, atol=1e-5, rtol=1e-5)
