"""Tests that a wrong training step, sampler or metric fails (issue #13). The resume tests compare the code
with itself, so a deterministic bug passes them; each test here compares with an independent computation:
the EMA formula, one big batch vs accumulated micro-batches, the clipped gradient norm, the dtype autocast
gives, the labels the network sees, diffusers' DDPMScheduler, clipped x0, distinct samples per batch, and
the Frechet distance by numpy/scipy.

The Trainer is driven one train_step() at a time on a tiny CPU config (8x8 digits, an 8-channel U-Net, T=20,
fp32, dropout 0) in a temporary working directory; hooks on the network and the optimizer observe it.
"""
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation.metrics as mt
import sampling.generation as generation
import training.trainer as train_mod
from config import load_config
from diffusion import Diffusion, build_diffusion

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
TINY = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.dropout=0.0",
        "model.num_classes=0", "diffusion.num_timesteps=20", "train.batch_size=16", "train.warmup_steps=0",
        "train.amp=off", "train.channels_last=false", "train.compile=false", "train.log_every=1000",
        "train.sample_every=1000", "train.ckpt_every=1000", "train.sample_steps=2", "sample.steps=2"]


def tiny(run_name, *extra):
    return load_config(DIGITS, TINY + [f"run_name={run_name}", *extra])


pytestmark = pytest.mark.usefixtures("workdir")  # tests/conftest.py


@contextmanager
def trainer(run_name, *extra):
    t = train_mod.Trainer(tiny(run_name, *extra), None, None, False, None)
    try:
        yield t
    finally:
        t.close()


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def randomize(net, seed=0):
    """Random non-zero weights: the U-Net zero-initialises its output layers, which leaves most gradients of
    a first step zero (and a test on them weak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def grads_before_each_step(t):
    """The gradients the optimizer is about to apply (after accumulation and clipping), one list per step."""
    seen = []
    t.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        [p.grad.detach().clone() for p in t.net.parameters()]))
    return seen


def fixed_t_and_noise(t, t_all, noise_all):
    """training_losses draws t and the noise from the global RNG, whose stream depends on how the batch is
    split; here they come from fixed tables, in the order of the examples. Returns the x0 seen, in order."""
    original, seen = t.diffusion.training_losses, []

    def losses(model, x0, y=None, t=None, noise=None):
        start, n = sum(len(x) for x in seen), len(x0)
        seen.append(x0.detach().clone())
        return original(model, x0, y, t_all[start:start + n], noise_all[start:start + n])
    t.diffusion.training_losses = losses
    return seen


# ----------------------------------------------------------------------------- the training step
def test_ema_is_updated_after_the_optimizer_step_with_the_configured_decay():
    with trainer("ema", "train.ema_decay=0.9", "train.ema_warmup=false", "train.lr=0.01") as t:
        for _ in range(2):  # the first step starts from ema == weights, the second from ema != weights
            ema_before, net_before = params(t.ema.model), params(t.net)
            t.train_step()
            net_after, ema_after = params(t.net), params(t.ema.model)
            for old, new, got in zip(ema_before, net_after, ema_after):
                torch.testing.assert_close(got, 0.9 * old + 0.1 * new, rtol=1e-6, atol=1e-7)
            # The weights moved far more than the tolerance: an EMA of the weights before the step fails.
            moved = max((a - b).abs().max() for a, b in zip(net_after, net_before))
            assert 0.1 * moved > 1e-4


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    B, T = 8, 20
    g = torch.Generator().manual_seed(0)
    t_all = torch.randint(0, T, (2 * B,), generator=g)
    noise_all = torch.randn(2 * B, 1, 8, 8, generator=g)
    runs = {}
    for name, extra in [("accum", [f"train.batch_size={B}", "train.grad_accum=2"]),
                        ("whole", [f"train.batch_size={2 * B}", "train.grad_accum=1"])]:
        with trainer(name, *extra, "train.grad_clip=0") as t:
            randomize(t.net)
            grads, x0 = grads_before_each_step(t), fixed_t_and_noise(t, t_all, noise_all)
            t.train_step()
            runs[name] = grads[0], torch.cat(x0), params(t.net)
    (g_acc, x_acc, w_acc), (g_one, x_one, w_one) = runs["accum"], runs["whole"]
    assert torch.equal(x_acc, x_one)  # the same examples, in the same order
    for a, b in zip(g_acc, g_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # measured: 2e-8 apart, gradients up to 0.07
    assert all(a.abs().max() > 0 for a in g_one)  # every parameter takes part
    for a, b in zip(w_acc, w_one):  # Adam's first step moves each weight by about lr = 1e-3; measured 8e-7 apart
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gradient_clipping_scales_the_applied_gradient_to_the_clip_norm():
    clip = 1e-4
    with trainer("clip", f"train.grad_clip={clip}") as t:
        randomize(t.net)
        raw = {}
        for p in t.net.parameters():  # the accumulated gradient, before clipping
            p.register_post_accumulate_grad_hook(lambda p: raw.__setitem__(p, p.grad.detach().clone()))
        applied = grads_before_each_step(t)
        t.train_step()
        raw = [raw[p] for p in t.net.parameters()]
    raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    applied_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in applied[0]]))
    assert raw_norm > 100 * clip
    assert applied_norm == pytest.approx(clip, rel=1e-4)
    for a, r in zip(applied[0], raw):  # the direction is kept: every gradient scaled by clip / norm
        torch.testing.assert_close(a, r * (clip / raw_norm), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_training_forward_runs_in_the_autocast_dtype(amp, dtype):
    with trainer("amp", f"train.amp={amp}") as t:
        convs = [m for m in t.net.modules() if isinstance(m, torch.nn.Conv2d)]
        seen = []
        for conv in convs:
            conv.register_forward_hook(lambda m, inputs, out: seen.append(out.dtype) if m.training else None)
        t.train_step()
    assert len(seen) == len(convs) and set(seen) == {dtype}


def labels_seen(t):
    seen = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append((args[2] if len(args) > 2 else kwargs["y"]).clone())
    t.net.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("p", [1.0, 0.5, 0.0])
def test_label_dropout_gives_the_null_label_at_the_configured_rate(p):
    with trainer("cfg", "model.num_classes=10", f"train.cond_drop_prob={p}", "train.batch_size=64") as t:
        seen = labels_seen(t)
        for _ in range(4):
            t.train_step()
    y = torch.cat(seen)
    assert len(y) == 256 and ((y == -1) | ((y >= 0) & (y < 10))).all()
    dropped = (y == -1).float().mean().item()
    if p in (0.0, 1.0):
        assert dropped == p
    else:
        assert 0.35 < dropped < 0.65  # Binomial(256, 0.5): 4.7 standard deviations either side
    if p < 1:
        assert len(set(y[y >= 0].tolist())) == 10  # the real labels still come through


# ----------------------------------------------------------------------------- samplers
def toy_model(xt, t, y=None):
    """A smooth stand-in network (an eps prediction) of x_t and t; its x0 estimates leave [-1, 1] now and then,
    so clip_x0 changes the trajectory."""
    return 0.9 * torch.tanh(xt) + 0.3 * torch.sin(xt * 3 + t.view(-1, *[1] * (xt.ndim - 1)).float() / 7)


def recording(model):
    inputs = []

    def fn(xt, t, y=None):
        inputs.append(xt.clone())
        return model(xt, t, y)
    return fn, inputs


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_trajectory_equals_diffusers_ddpmscheduler(var_type, clip):
    from diffusers import DDPMScheduler
    T, shape = 100, (2, 3, 4, 4)
    d = Diffusion(num_timesteps=T, schedule="linear", var_type=var_type)
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type=var_type, clip_sample=clip)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fn, ours = recording(toy_model)
    final = d.sample(fn, shape, sampler="ddpm", x_T=x_T, generator=torch.Generator().manual_seed(2),
                     clip_x0=clip, progress=False)
    ours.append(final)
    theirs, x, g = [x_T], x_T.clone(), torch.Generator().manual_seed(2)
    for t in range(T - 1, -1, -1):  # the scheduler's default timesteps: T-1, ..., 0
        x = sched.step(toy_model(x, torch.full((shape[0],), t)), t, x, generator=g).prev_sample
        theirs.append(x)
    assert len(ours) == len(theirs) == T + 1
    for step, (a, b) in enumerate(zip(ours, theirs)):
        # Measured: <= 1.3e-5 apart down to t = 10, then up to 1.5e-4, where diffusers' float32 1 - abar_t
        # (1e-4 at t = 0) loses digits. Ignoring fixed_large puts them >= 4e-2 apart at every step.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3, msg=lambda m: f"after {step} steps: {m}")


def test_diffusion_var_type_from_the_config_changes_ddpm_samples():
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = {}
    for var_type in ("fixed_large", "fixed_small"):
        d = build_diffusion(tiny("var", "diffusion.num_timesteps=50", f"diffusion.var_type={var_type}"))
        out[var_type] = d.sample(toy_model, x_T.shape, "ddpm", x_T=x_T, progress=False,
                                 generator=torch.Generator().manual_seed(2))
    assert (out["fixed_large"] - out["fixed_small"]).abs().max() > 1e-2


@pytest.mark.parametrize("objective, output", [("eps", -30.0), ("x0", 5.0), ("v", 30.0)])
@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("ddpm", None), ("dpmpp2m", 10)])
def test_samplers_clip_the_x0_estimate_only_when_asked(objective, output, sampler, steps):
    """A network whose x0 estimate is far outside the data range. Every sampler's last step returns the last
    x0 estimate (DDPM: t=0 has posterior mean = x0; DDIM and DPM-Solver++ end at abar = 1), so with clip_x0
    the output lies in [-1, 1] and without it far outside."""
    d = Diffusion(num_timesteps=50, objective=objective)
    model = lambda xt, t, y=None: torch.full_like(xt, output)  # noqa: E731
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    out = {clip: d.sample(model, x_T.shape, sampler=sampler, steps=steps, x_T=x_T, clip_x0=clip,
                          generator=torch.Generator().manual_seed(4), progress=False) for clip in (True, False)}
    assert out[True].abs().max() <= 1 + 1e-5
    assert out[False].abs().max() > 3
    if objective == "x0":  # the x0 estimate is the constant itself: clipped to 1, or kept at 5
        torch.testing.assert_close(out[True], torch.ones_like(x_T))
        torch.testing.assert_close(out[False], torch.full_like(x_T, output))


def test_batched_generation_draws_new_noise_for_every_batch():
    """One seeded generator per run, continued from batch to batch: re-seeding it for every batch repeats the
    first batch's samples (here 3 + 3 + 1), which biases FID low."""
    cfg = load_config(DIGITS, TINY + ["run_name=gen"])
    d = Diffusion(num_timesteps=20)
    x = generation.generate(toy_model, d, cfg, 7, 3, 0, sampler="ddim", steps=2, progress=False)
    assert x.shape == (7, 1, 8, 8)
    flat = x.flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert distance.min() > 1e-3  # no two samples alike (within or across batches)


# ----------------------------------------------------------------------------- FID
def fid_by_hand(a, b, ddof=1):
    """Heusel et al. 2017 with the unbiased covariance (np.cov, ddof=1) and scipy's general sqrtm."""
    import scipy.linalg
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_an_independent_computation_with_unbiased_covariances():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 5))
    b = rng.normal(size=(20, 5)) @ rng.normal(size=(5, 5)) * 0.7 + 0.2
    expected = fid_by_hand(a, b)
    assert abs(fid_by_hand(a, b, ddof=0) - expected) > 0.03 * expected  # 20 samples: biased covariances show
    assert mt.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    mu, sigma = mt.gaussian_stats(b)
    assert mt.frechet_distance(*mt.gaussian_stats(a), mu, sigma) == pytest.approx(expected, rel=1e-6)
    # The reference itself agrees with a published implementation (torch-fidelity's, also np.cov + sqrtm).
    fidelity = pytest.importorskip("torch_fidelity.metric_fid")
    stats = [fidelity.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    assert fidelity.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"] == \
        pytest.approx(expected, rel=1e-6)
