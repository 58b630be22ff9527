"""Editing with a trained model (issue #14): RePaint inpainting, DDIM inversion and SDEdit, checked against
closed forms. Data: a 4-D Gaussian with a full, strongly correlated covariance, for which the exact denoiser
E[x0 | x_t] and the exact conditional of some coordinates given the others are known."""
import ast
import io
import math
from pathlib import Path

import pytest
import torch
from tqdm.auto import tqdm as real_tqdm

import diffusion as diffusion_module
import editing.algorithms as editing
from config import ConfigError
from diffusion import Diffusion, NoiseSource, TorchNoise, noise_source
from editing.algorithms import edit, inpaint, invert
from model import UNet
from sampling.generation import SampleNoise

MU = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
STD = torch.tensor([0.6, 0.5, 0.7, 0.4], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.9, 0.6, -0.5], [0.9, 1.0, 0.7, -0.4], [0.6, 0.7, 1.0, -0.3], [-0.5, -0.4, -0.3, 1.0]],
                    dtype=torch.float64)
COV = STD[:, None] * CORR * STD[None]
KNOWN = torch.tensor([True, False, True, False])          # the coordinates inpainting keeps
X_KNOWN = torch.tensor([1.2, 0.0, -0.4, 0.0], dtype=torch.float64)  # their values (the others are ignored)


def posterior_gain(a: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """G with E[x0 | x_t] = mu + G (x_t - a mu) for x0 ~ N(mu, cov), x_t = a x0 + s eps: a cov (a^2 cov + s^2 I)^-1."""
    return a * cov @ torch.linalg.inv(a ** 2 * cov + (1 - a ** 2) * torch.eye(len(cov), dtype=torch.float64))


class GaussianOracle:
    """The exact denoiser for x0 ~ N(mu, cov), as tests/test_diffusion.py's Oracle but with a full covariance:
    x_t = a x0 + s eps is jointly Gaussian with x0, so E[x0 | x_t] = mu + a cov (a^2 cov + s^2 I)^-1 (x_t - a mu).
    Counts its calls."""

    def __init__(self, d: Diffusion, mu=MU, cov=COV, watch=None):
        self.d, self.mu, self.cov, self.calls = d, mu, cov, 0
        self.watch, self.seen, self.timesteps = watch, [], []  # seen: (t, mean, std) of the coordinates `watch`

    def __call__(self, xt, t, y=None):
        self.calls += 1
        self.timesteps.append(int(t[0]))
        if self.watch is not None:
            self.seen.append((int(t[0]), xt[:, self.watch].double().mean(0), xt[:, self.watch].double().std(0)))
        assert bool((t == t[0]).all())
        a, s = self.d.sqrt_abar[t[0]].double(), self.d.sqrt_one_minus_abar[t[0]].double()
        x0 = self.mu + (xt.double() - a * self.mu) @ posterior_gain(a, self.cov).T
        eps = (xt.double() - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.d.objective].float()


def gaussian_conditional(known=KNOWN, x_known=X_KNOWN):
    """Mean and covariance of the unknown coordinates given the known ones (Gaussian conditioning)."""
    k, u = known, ~known
    gain = COV[u][:, k] @ torch.linalg.inv(COV[k][:, k])
    return MU[u] + gain @ (x_known[k] - MU[k]), COV[u][:, u] - gain @ COV[k][:, u]


def z_scores(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """Largest error of the sample mean and of the sample covariance, in Monte-Carlo standard errors
    (se of a mean: sqrt(S_ii / n); of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / n))."""
    n, var = x.shape[0], cov.diagonal()
    z_mean = (x.mean(0) - mean) / (var / n).sqrt()
    z_cov = (torch.cov(x.T) - cov) / ((var[:, None] * var[None] + cov ** 2) / n).sqrt()
    return z_mean.abs().max().item(), z_cov.abs().max().item()


def assert_known_pixels_at_their_noise_level(d: Diffusion, oracle: GaussianOracle, n: int) -> None:
    """The model must see the known coordinates as q(x_t | x_known) = N(sqrt(abar_t) x_known, 1 - abar_t) at every
    evaluation, after a reverse step ([RePaint] Algorithm 1, line 5) as after a jump up (line 10)."""
    for t, mean, std in oracle.seen:
        a, s = d.sqrt_abar[t].double(), d.sqrt_one_minus_abar[t].double()
        assert ((mean - a * X_KNOWN[KNOWN]).abs() < 5 * s / math.sqrt(n) + 1e-4).all(), (t, mean, a * X_KNOWN[KNOWN])
        assert ((std - s).abs() < 5 * s / math.sqrt(2 * n) + 1e-4).all(), (t, std, s)


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MU + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T).float()


def short_diffusion(T: int = 200, **kwargs) -> Diffusion:
    """T steps with the betas of DDPM's 1000 scaled by 1000 / T, so x_T is still pure noise."""
    return Diffusion(T, beta_start=0.1 / T, beta_end=20 / T, **kwargs)


# ----------------------------------------------------------------------------- RePaint
def test_repaint_schedule_walks_each_block_resample_times():
    # 5 levels, blocks of 2 with bottoms 0 and 2 (the top level 4 is the top of the upper block)
    assert editing.repaint_schedule(5, 2, 2) == [4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0, -1]
    assert editing.repaint_schedule(5, 1, 3) == [4, 3, 2, 1, 0, -1]  # resample 1: straight down
    path = editing.repaint_schedule(250, 10, 10)  # the paper's setting: T = 250, r = 10, j = 10
    moves = [b - a for a, b in zip(path, path[1:])]
    assert set(moves) == {-1, 10} and path[0] == 249 and path[-1] == -1
    assert moves.count(-1) == 250 + 9 * 10 * 24  # 24 full blocks of 10 below level 249, 9 more passes each


def test_inpainting_matches_the_gaussian_conditional_and_resampling_beats_replacement():
    """[RePaint]: the unknown coordinates must follow p(x_u | x_k). Plain replacement (resample=1) ignores the
    correlation between the re-noised known coordinates and the unknown ones, so its conditional mean is
    pulled towards the marginal one (measured: 25 standard errors off); resampling harmonises them (3-5: RePaint
    is itself an approximation, exact only as resample * jump grows).
    fixed_large variance: the ancestral step with the exact mean E[x0|x_t] lacks the variance of x0|x_t,
    which beta_t (> beta~_t) makes up for on this coarse 200-step chain; the conditioning is what is tested."""
    d = short_diffusion(objective="v", var_type="fixed_large")
    n = 2000
    mean, cov = gaussian_conditional()
    x_known, mask = X_KNOWN.float().expand(n, 4), KNOWN.float().expand(n, 4)
    errors = {}
    for resample, jump in [(1, 1), (10, 5)]:
        oracle = GaussianOracle(d, watch=KNOWN)
        x = inpaint(d, oracle, x_known, mask, resample=resample, jump=jump, clip_x0=False, progress=False,
                    generator=torch.Generator().manual_seed(0))
        assert torch.equal(x[:, KNOWN], x_known[:, KNOWN])  # exactly the known values
        assert_known_pixels_at_their_noise_level(d, oracle, n)
        assert oracle.calls == 200 + (resample - 1) * jump * 39  # 39 blocks of 5 below the top level 199
        errors[resample] = z_scores(x[:, ~KNOWN].double(), mean, cov)
    assert max(errors[10]) < 6, errors  # within Monte-Carlo tolerance
    assert min(errors[1]) > 3 * max(errors[10]), errors  # and replacement clearly worse, mean and covariance


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_inpainting_on_a_ddim_grid_conditions_and_keeps_the_known_pixels(eta):
    """On a DDIM grid the jumps span several timesteps: q(x_t | x_t') with the alpha-bar ratio."""
    d = short_diffusion()
    n = 2000
    mean, cov = gaussian_conditional()
    x_known, mask = X_KNOWN.float().expand(n, 4), KNOWN.float().expand(n, 4)
    err = {}
    for resample in (1, 10):
        oracle = GaussianOracle(d, watch=KNOWN)
        x = inpaint(d, oracle, x_known, mask, sampler="ddim", steps=50, eta=eta, resample=resample, jump=2,
                    clip_x0=False, progress=False, generator=torch.Generator().manual_seed(1))
        assert torch.equal(x[:, KNOWN], x_known[:, KNOWN])
        assert_known_pixels_at_their_noise_level(d, oracle, n)
        err[resample] = (x[:, ~KNOWN].double().mean(0) - mean).abs().max().item()
    assert err[10] < 0.5 * err[1], err


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, None), ("ddim", 10, 0.5)])
def test_the_model_sees_the_known_pixels_at_their_noise_level_from_the_first_step(sampler, steps, eta):
    """With 20 steps of DDPM's betas x_T is far from noise (alpha-bar_T = 0.82), so starting the known pixels
    at the top from noise instead of q(x_T | x_known) shows."""
    d, n = Diffusion(20), 2000
    oracle = GaussianOracle(d, watch=KNOWN)
    x = inpaint(d, oracle, X_KNOWN.float().expand(n, 4), KNOWN.float(), sampler=sampler, steps=steps, eta=eta,
                resample=3, jump=2, clip_x0=False, progress=False, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x[:, KNOWN], X_KNOWN.float().expand(n, 4)[:, KNOWN])
    assert oracle.calls == len(oracle.seen) > 20 and oracle.seen[0][0] == (19 if sampler == "ddpm" else 18)
    assert_known_pixels_at_their_noise_level(d, oracle, n)


# ----------------------------------------------------------------------------- SDEdit
def test_sdedit_grid_is_the_tail_of_the_sampler_grid():
    d = Diffusion(1000)
    assert editing.sdedit_timesteps(d, 0.3, "ddim", 10, "leading") == [200, 100, 0]
    assert editing.sdedit_timesteps(d, 0.3, "ddim", 10, "trailing") == [299, 199, 99]
    assert editing.sdedit_timesteps(d, 0.3, "ddpm") == list(range(299, -1, -1))
    assert editing.sdedit_timesteps(d, 1.0, "ddim", 10) == d.sampling_timesteps("ddim", 10)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 50)])
@pytest.mark.parametrize("strength", [0.3, 0.7])
def test_sdedit_keeps_the_data_distribution(sampler, steps, strength):
    """[SDEdit]: x0 from the data, noised to t_start and denoised with the exact denoiser, is again a sample of
    the data: mean and covariance unchanged (and the output differs from the input)."""
    d = Diffusion(1000)
    x0 = data(3000, seed=2)
    oracle = GaussianOracle(d)
    x = edit(d, oracle, x0, strength, sampler=sampler, steps=steps, clip_x0=False, progress=False,
             generator=torch.Generator().manual_seed(3))
    assert oracle.calls == len(editing.sdedit_timesteps(d, strength, sampler, steps))
    z_mean, z_cov = z_scores(x.double(), MU, COV)
    assert z_mean < 5 and z_cov < 5, (z_mean, z_cov)
    if sampler == "ddpm":  # ancestral sampling draws x ~ p(x0 | x_t): Cov(x0, x) = a G cov, G at t_start
        a = d.sqrt_abar[oracle.timesteps[0]].double()
        cross = torch.cov(torch.cat([x0, x], 1).double().T)[:4, 4:]
        expected = a * posterior_gain(a, COV) @ COV
        se = ((COV.diagonal()[:, None] * COV.diagonal()[None] + expected ** 2) / x.shape[0]).sqrt()
        assert ((cross - expected) / se).abs().max() < 5, (cross, expected)
    assert (x - x0).pow(2).mean() > 0.01  # an edit, not a copy


# ----------------------------------------------------------------------------- DDIM inversion
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_round_trips_and_the_error_shrinks_with_steps(spacing):
    d = Diffusion(1000, schedule="cosine")
    x0 = data(256, seed=4)
    errors = []
    for steps in (10, 50, 250):
        oracle = GaussianOracle(d)
        x_T = invert(d, oracle, x0, steps=steps, progress=False, timestep_spacing=spacing)
        assert oracle.calls == steps
        grid = d.sampling_timesteps("ddim", steps, spacing)
        assert oracle.timesteps == grid[::-1]  # the sampler's grid, upwards
        back = d.sample(oracle, x0.shape, "ddim", steps=steps, x_T=x_T, clip_x0=False, progress=False,
                        timestep_spacing=spacing)
        errors.append((back - x0).abs().max().item())
    # First order: the error falls like 1 / steps (measured 0.26, 0.071, 0.017 leading; 0.28, 0.077, 0.018 trailing)
    assert errors[0] < 0.35 and errors[2] < 0.025, errors
    assert 3 < errors[0] / errors[1] < 6 and 3 < errors[1] / errors[2] < 6, errors
    # The ODE carries the data to the prior N(0, I)
    assert x_T.mean().abs() < 0.2 and (x_T.std() - 1).abs() < 0.1


# ----------------------------------------------------------------------------- a tiny U-Net, labels, progress
class LabelRecorder:
    """A tiny class-conditional U-Net with random weights that notes the labels of every call."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = UNet(1, 32, (1, 2), 1, (), 8, num_classes=3, dropout=0.0).eval()
        for p in self.net.parameters():  # the zero-initialised output layers would make the model constant
            torch.nn.init.normal_(p, std=0.05)
        self.in_channels, self.num_classes, self.labels = 1, 3, []

    def __call__(self, xt, t, y=None):
        self.labels.append(y.tolist())
        return self.net(xt, t, y)


@pytest.mark.parametrize("method", ["inpaint", "invert", "edit"])
def test_unet_smoke_shapes_and_labels_pass_through(method):
    d = Diffusion(20)
    model = LabelRecorder()
    g = torch.Generator().manual_seed(5)
    x0, y = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([2, 0])
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1  # keep the left half
    if method == "inpaint":
        x = inpaint(d, model, x0, mask, sampler="ddim", steps=5, eta=0.5, resample=2, jump=2, y=y,
                    guidance_scale=3.0, generator=g, progress=False)
        assert torch.equal(x[:, :, :, :4], x0[:, :, :, :4]) and not torch.equal(x, x0)
    elif method == "invert":
        x = invert(d, model, x0, steps=5, y=y, progress=False)
    else:
        x = edit(d, model, x0, 0.5, sampler="ddim", steps=5, y=y, guidance_scale=3.0, generator=g, progress=False)
    assert x.shape == x0.shape and torch.isfinite(x).all()
    guided = [[2, 0, -1, -1]] if method != "invert" else [[2, 0]]  # invert: the conditional model, no guidance
    assert model.labels and all(labels in guided for labels in model.labels)


@pytest.mark.parametrize("method", ["inpaint", "invert", "edit"])
def test_one_progress_bar_counts_the_model_evaluations(monkeypatch, method):
    bars, counts = [], []

    def recording_tqdm(*args, **kwargs):
        bars.append(real_tqdm(*args, **{**kwargs, "file": io.StringIO(), "mininterval": 0}))
        return bars[-1]
    monkeypatch.setattr(editing, "tqdm", recording_tqdm)
    monkeypatch.setattr(diffusion_module, "tqdm", recording_tqdm)
    d = Diffusion(20)

    def model(xt, t, y=None):
        counts.append(bars[-1].n)
        return torch.tanh(xt) * 0.5
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    if method == "inpaint":  # 20 steps + 2 more passes over the 9 blocks of 2 below the top level 19
        inpaint(d, model, x0, KNOWN.float(), resample=3, jump=2, generator=torch.Generator().manual_seed(7))
        expected = 20 + 2 * 2 * 9
    elif method == "invert":
        invert(d, model, x0, steps=7)
        expected = 7
    else:
        edit(d, model, x0, 0.5, generator=torch.Generator().manual_seed(7))
        expected = 10
    assert len(bars) == 1 and bars[0].total == expected and bars[0].n == expected
    assert counts == list(range(expected))  # k evaluations done when the (k+1)-th starts


# ----------------------------------------------------------------------------- bad input
class NeverCalled:
    in_channels, num_classes = 1, 3

    def __call__(self, *args):
        raise AssertionError("the model ran before the arguments were checked")


IMG, MASK = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)


@pytest.mark.parametrize("call, match", [
    (lambda d, m: inpaint(d, m, IMG, torch.ones(2, 1, 4, 4)), "mask of shape .* does not fit the image"),
    (lambda d, m: inpaint(d, m, IMG, MASK * 0.5), "only 0 .* and 1"),
    (lambda d, m: inpaint(d, m, torch.zeros(2, 3, 8, 8), MASK), "model takes images \\(B, 1, H, W\\)"),
    (lambda d, m: inpaint(d, m, IMG, MASK, y=torch.tensor([1])), "one per sample"),
    (lambda d, m: inpaint(d, m, IMG, MASK, y=torch.tensor([1, 3])), "below the model's 3 classes"),
    (lambda d, m: inpaint(d, m, IMG, MASK, sampler="dpmpp2m", steps=5), "cannot use sampler dpmpp2m.*ddpm or ddim"),
    (lambda d, m: inpaint(d, m, IMG, MASK, resample=0), "resample must be an integer >= 1"),
    (lambda d, m: inpaint(d, m, IMG, MASK, jump=0), "jump must be an integer >= 1"),
    (lambda d, m: inpaint(d, m, IMG, MASK, sampler="ddim", steps=5, resample=2, jump=5), "no block to resample"),
    (lambda d, m: inpaint(d, m, IMG, MASK, eta=1.0), "does not use eta"),
    (lambda d, m: invert(d, m, torch.zeros(2, 8, 8)), "model takes images"),
    (lambda d, m: invert(d, m, IMG, steps=0), "steps must be between"),
    (lambda d, m: edit(d, m, IMG, 0.0), "strength must be in \\(0, 1\\]"),
    (lambda d, m: edit(d, m, IMG, 1.5), "strength must be in \\(0, 1\\]"),
    (lambda d, m: edit(d, m, IMG, math.nan), "strength must be in \\(0, 1\\]"),
    (lambda d, m: edit(d, m, IMG, 0.02, sampler="ddim", steps=4, timestep_spacing="trailing"), "raise strength"),
    (lambda d, m: edit(d, m, torch.zeros(2, 2, 8, 8), 0.5), "model takes images"),
])
def test_bad_input_is_refused_before_any_model_evaluation(call, match):
    with pytest.raises(ConfigError, match=match):
        call(Diffusion(20), NeverCalled())


def test_editing_is_a_free_function_over_the_public_core():
    """Layout: the editing algorithms are functions of a Diffusion, over its public names only. diffusion.py does
    not import editing (no cycle), Diffusion has no editing methods, editing/ reads no `_private` attribute, and
    the noise source is a NoiseSource by type: None, a torch.Generator, a NoiseSource (SampleNoise); anything
    else, even with a `randn` of its own, is a clear TypeError before any model evaluation."""
    tree = ast.parse(Path(diffusion_module.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] == "editing"}
    assert not any(hasattr(Diffusion, name) for name in ("inpaint", "invert", "edit", "_t", "_randn", "_model_fn"))
    for path in Path(editing.__file__).parent.glob("*.py"):
        private = [(path.name, n.lineno, n.attr) for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")]
        assert not private

    g, per_sample = torch.Generator().manual_seed(0), SampleNoise(0, range(3))
    assert isinstance(noise_source(None), TorchNoise) and noise_source(g).generator is g
    assert noise_source(per_sample) is per_sample and isinstance(per_sample, NoiseSource)
    d = Diffusion(20)
    assert torch.equal(d.draw_noise((3, 4), torch.Generator().manual_seed(1)),
                       torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))

    class Duck:  # has a randn, but is no NoiseSource
        def randn(self, shape, device=None):
            return torch.zeros(shape)
    message = "generator must be None, a torch.Generator or a diffusion.NoiseSource"
    for bad in (Duck(), 7, "seed"):
        with pytest.raises(TypeError, match=message):
            noise_source(bad)
        with pytest.raises(TypeError, match=message):
            inpaint(d, NeverCalled(), IMG, MASK, generator=bad)
        with pytest.raises(TypeError, match=message):
            edit(d, NeverCalled(), IMG, 0.5, generator=bad)
        with pytest.raises(TypeError, match=message):  # deterministic DDIM draws nothing, and still refuses it
            d.sample(NeverCalled(), IMG.shape, "ddim", steps=4, x_T=IMG, generator=bad)
