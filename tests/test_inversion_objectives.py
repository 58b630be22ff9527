"""DDIM inversion for v- and x0-prediction models (editing.invert / _ddim_up, Diffusion.predict_x0_eps) and
sample.py --invert with --timestep-spacing (edit_runs._plan_invert).

test_editing.py inverts an eps model only, where converting the model output to (x0, eps) at the wrong
timestep changes nothing (eps is the output itself). Here the same exact denoiser of Gaussian data is written in
each parameterisation (v = a eps - s x0, [PD] Sec. 4), and invert's x_T is checked against a closed-form DDIM
inversion computed in float64 in this file, independently of the library's conversion. Both image presets
(digits, mnist) are v models."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import make_checkpoint, run_main, tiny_config

from commands import sample_command
from diffusion import Diffusion
from editing.algorithms import invert

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MU = torch.tensor([0.4, -0.3, 0.1, 0.0], dtype=torch.float64)
STD = torch.tensor([0.6, 0.5, 0.7, 0.4], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.8, 0.5, -0.4], [0.8, 1.0, 0.6, -0.3], [0.5, 0.6, 1.0, -0.2], [-0.4, -0.3, -0.2, 1.0]],
                    dtype=torch.float64)
COV = STD[:, None] * CORR * STD[None]
T, STEPS = 1000, 50


def posterior_mean(xt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(MU, COV), x_t = a x0 + s eps (s^2 = 1 - a^2):
    MU + a COV (a^2 COV + s^2 I)^-1 (x_t - a MU)."""
    gain = a * COV @ torch.linalg.inv(a ** 2 * COV + (1 - a ** 2) * torch.eye(4, dtype=torch.float64))
    return MU + (xt.double() - a * MU) @ gain.T


class Oracle:
    """The exact denoiser of the Gaussian, as a model of `objective`; records the timesteps it is called at."""

    def __init__(self, d: Diffusion):
        self.d, self.timesteps = d, []

    def __call__(self, xt, t, y=None):
        assert bool((t == t[0]).all())
        self.timesteps.append(int(t[0]))
        abar = self.d.alphas_cumprod[t[0]].double()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = posterior_mean(xt, a)
        eps = (xt.double() - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.d.objective].float()


def grid(spacing: str, steps: int = STEPS, total: int = T) -> list[int]:
    """The decreasing DDIM grids, written out here (leading: [DDIM] D.2; trailing ends at T-1; linspace)."""
    if spacing == "leading":
        ts = [i * (total // steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(total - i * total / steps) - 1 for i in range(steps)]
    else:
        ts = [round(i * (total - 1) / (steps - 1)) for i in range(steps)]
    return sorted(set(ts), reverse=True)


def reference_inversion(d: Diffusion, x0: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Closed-form DDIM inversion in float64 ([DDIM] Eq. 12 run upwards, eta 0): from level t to t_next the eps
    is the exact denoiser's at (x_t, t_next), eps = (x - a_next E[x0 | x]) / s_next; then
    x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) (abar = 1 at the data) and
    x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps."""
    abar_of = {-1: torch.tensor(1.0, dtype=torch.float64)}
    abar_of.update({t: d.alphas_cumprod[t].double() for t in timesteps})
    levels = [-1, *reversed(timesteps)]
    x = x0.double()
    for t, t_next in zip(levels, levels[1:]):
        abar, abar_next = abar_of[t], abar_of[t_next]
        a_next, s_next = abar_next.sqrt(), (1 - abar_next).sqrt()
        eps = (x - a_next * posterior_mean(x, a_next)) / s_next
        x_data = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        x = a_next * x_data + s_next * eps
    return x


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MU + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T).float()


@pytest.fixture(scope="module")
def x0():
    return data(256, seed=11)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("objective", ["v", "x0", "eps"])
def test_inversion_matches_the_closed_form_for_every_objective(x0, objective, spacing):
    """invert's x_T equals the float64 closed form step by step, whatever the model predicts: the output of a v or
    x0 model must be converted at the timestep the model was evaluated at (the step's target t_next)."""
    d = Diffusion(T, schedule="cosine", objective=objective)
    oracle = Oracle(d)
    x_T = invert(d, oracle, x0, steps=STEPS, progress=False, timestep_spacing=spacing)
    ts = grid(spacing)
    assert oracle.timesteps == ts[::-1]  # the grid asked for, upwards, one evaluation per step
    expected = reference_inversion(d, x0, ts)
    err = (x_T.double() - expected).abs().max().item()
    assert err < 1e-4, err  # float32 against float64 (measured 2e-6 to 3e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_the_inverted_noise_does_not_depend_on_the_parameterisation(x0, spacing):
    """One denoiser written three ways inverts to one x_T (the eps model is the one test_editing.py checks)."""
    out = {}
    for objective in ("eps", "v", "x0"):
        d = Diffusion(T, schedule="cosine", objective=objective)
        out[objective] = invert(d, Oracle(d), x0, steps=STEPS, progress=False, timestep_spacing=spacing)
    assert (out["v"] - out["eps"]).abs().max() < 2e-3
    assert (out["x0"] - out["eps"]).abs().max() < 2e-3


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("objective", ["v", "x0"])
def test_invert_then_ddim_sampling_reconstructs_for_v_and_x0_models(x0, objective, spacing):
    """Inversion then deterministic DDIM on the same grid gives the data back (first order: at 50 steps the max
    error is ~0.07, test_editing.py), and the ODE carries the data to N(0, I); the result tracks the closed form
    of the continuous ODE for Gaussian data, x_t - a MU = (a^2 COV + s^2 I)^1/2 COV^-1/2 (x0 - MU)."""
    d = Diffusion(T, schedule="cosine", objective=objective)
    oracle = Oracle(d)
    x_T = invert(d, oracle, x0, steps=STEPS, progress=False, timestep_spacing=spacing)
    back = d.sample(oracle, x0.shape, "ddim", steps=STEPS, x_T=x_T, clip_x0=False, progress=False,
                    timestep_spacing=spacing)
    err = (back - x0).abs().max().item()
    assert err < 0.1, err  # measured 0.06
    assert (back - x0).abs().mean() < 0.03  # measured 0.016-0.018
    assert x_T.mean().abs() < 0.2 and (x_T.std() - 1).abs() < 0.15
    # the exact probability-flow map from x0 to the grid's top level
    abar = d.alphas_cumprod[grid(spacing)[0]].double()
    evals, evecs = torch.linalg.eigh(COV)
    m = evecs @ torch.diag(((abar * evals + 1 - abar) / evals).sqrt()) @ evecs.T
    exact = abar.sqrt() * MU + (x0.double() - MU) @ m.T
    assert (x_T.double() - exact).abs().mean() < 0.06  # measured 0.031-0.037 (the discretisation)


# ----------------------------------------------------------------------------- sample.py --invert --timestep-spacing
CLI_GRIDS = {"leading": [16, 12, 8, 4, 0], "trailing": [19, 15, 11, 7, 3], "linspace": [19, 14, 10, 5, 0]}  # T=20, 5


@pytest.fixture
def spied(workdir, monkeypatch):
    """A tiny v-prediction digits checkpoint (T = 20), two 8x8 inputs, and the timesteps the U-Net is called at."""
    make_checkpoint(workdir / "c.pt", tiny_config())
    rng = np.random.default_rng(3)
    (workdir / "ins").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(workdir / "ins" / f"in{i}.png")
    seen = []
    real = sample_command.load_for_sampling

    def load(*args, **kwargs):
        model, diffusion, cfg, ckpt = real(*args, **kwargs)
        assert diffusion.objective == "v"
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1].tolist()))
        return model, diffusion, cfg, ckpt
    monkeypatch.setattr(sample_command, "load_for_sampling", load)
    return seen


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_invert_on_the_command_line_walks_the_grid_of_the_spacing_asked_for(spied, spacing):
    """--invert inverts AND reconstructs on the --timestep-spacing grid (default: the config's, leading): up the
    grid, one call per step, for both images at once, then down the same grid."""
    flags = [] if spacing is None else ["--timestep-spacing", spacing]
    run_main(["--checkpoint", "c.pt", "--invert", "ins", "--steps", "5", "--out", "inv", *flags])
    ts = CLI_GRIDS[spacing or "leading"]
    assert spied == [[t, t] for t in ts[::-1]] + [[t, t] for t in ts]


def test_a_trailing_reconstruction_differs_from_a_leading_one(spied, workdir):
    """Not only the calls: the written reconstruction depends on the spacing."""
    for spacing in ("leading", "trailing"):
        run_main(["--checkpoint", "c.pt", "--invert", "ins", "--steps", "5", "--out", spacing,
                  "--timestep-spacing", spacing])
    lead = [np.asarray(Image.open(workdir / "leading" / f"{j:06d}.png")) for j in range(2)]
    trail = [np.asarray(Image.open(workdir / "trailing" / f"{j:06d}.png")) for j in range(2)]
    assert any((a != b).any() for a, b in zip(lead, trail))
    assert spied[:5] == [[t, t] for t in CLI_GRIDS["leading"][::-1]]
    assert spied[10:15] == [[t, t] for t in CLI_GRIDS["trailing"][::-1]]
