"""generation.py: every sample has its own noise, seeded from (seed, index), so sample i of a seed is the
same image whatever the batch size (issue #13), for every noise the sampler draws: x_T and each stochastic
step (ddpm, ddim with eta=1), unconditional and class-conditional with guidance; and the sampling defaults
sample.py and evaluate.py share."""
from pathlib import Path

import pytest
import torch

import sampling.generation as generation
from config import load_config
from diffusion import Diffusion, build_diffusion
from model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "model.attention_resolutions=[]",
        "data.image_size=8", "diffusion.num_timesteps=10", "model.dropout=0.0", "sample.steps=5",
        "train.sample_steps=5"]


def tiny(num_classes: int = 0):
    cfg = load_config(REPO / "configs" / "digits.yaml", TINY + [f"model.num_classes={num_classes}"])
    model, g = build_model(cfg).eval(), torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero weights everywhere (the U-Net zero-initialises its output layer)
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, build_diffusion(cfg), cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("num_classes, kw", [
    (0, dict(sampler="ddpm", steps=None)),
    (0, dict(sampler="ddim", steps=5, eta=1.0)),
    (3, dict(sampler="ddpm", steps=None, guidance_scale=2.0)),
    (3, dict(sampler="ddim", steps=5, eta=1.0, guidance_scale=2.0)),
], ids=["ddpm", "ddim-eta1", "ddpm-guided", "ddim-eta1-guided"])
def test_sample_i_does_not_depend_on_the_batch_size(num_classes, kw):
    model, diffusion, cfg = tiny(num_classes)
    labels = [i % 3 for i in range(9)] if num_classes else None
    draw = {b: generation.generate(model, diffusion, cfg, 9, b, seed=4, labels=labels, amp="off", progress=False,
                                   **kw) for b in (1, 7)}
    # The noise is bitwise the same (next test); the network's float sums may differ in the last bit between
    # batch sizes (CPU kernels block by batch): ~2e-7 here. Shared noise across a batch differs by O(1).
    torch.testing.assert_close(draw[1], draw[7], rtol=0, atol=1e-5)
    flat = draw[7].flatten(1)
    assert (torch.cdist(flat, flat) + 1e9 * torch.eye(9)).min() > 1e-3  # and no two samples alike
    other_seed = generation.generate(model, diffusion, cfg, 2, 2, seed=5, labels=labels and labels[:2],
                                     amp="off", progress=False, **kw)
    assert not torch.allclose(other_seed, draw[1][:2])


def test_every_step_draws_each_samples_noise_from_its_own_stream():
    """Sample i's stream gives its x_T and then its step noise: a sampler that takes x_T from SampleNoise
    and the step noise from one shared generator would pass a test of x_T alone."""
    calls = []

    class Spy(generation.SampleNoise):
        def randn(self, shape, device=None, dtype=None):
            calls.append(tuple(shape))
            return super().randn(shape, device, dtype)
    d = Diffusion(num_timesteps=4)
    d.sample(lambda x, t, y=None: torch.zeros_like(x), (3, 2), sampler="ddpm", generator=Spy(0, range(3)),
             progress=False)
    assert calls == [(3, 2)] * 4  # x_T and the steps t = 3, 2, 1 (no noise at t = 0)
    a, b = generation.SampleNoise(0, [0, 1, 2]).randn((3, 5)), generation.SampleNoise(0, [2]).randn((1, 5))
    torch.testing.assert_close(a[2:], b, rtol=0, atol=0)  # stream of index 2, whoever else is in the batch


def test_sampling_defaults_come_from_the_checkpoint_and_eta_only_for_ddim():
    _, diffusion, cfg = tiny(3)
    cfg.sample.eta, cfg.sample.guidance_scale, cfg.sample.steps = 0.5, 2.5, 4
    kw = generation.sampling_settings(cfg, diffusion.num_timesteps, sampler="ddim")
    assert (kw["eta"], kw["guidance_scale"], kw["steps"]) == (0.5, 2.5, 4)
    kw = generation.sampling_settings(cfg, diffusion.num_timesteps, sampler="ddpm")
    assert (kw["eta"], kw["steps"]) == (0.0, None)  # a stored eta is ddim's default, never ddpm's
    assert generation.sampling_settings(cfg, 10, "ddim", steps=3, eta=1.0, guidance_scale=1.0)["eta"] == 1.0
    with pytest.raises(generation.SampleError, match="--steps 11 is more than"):
        generation.sampling_settings(cfg, 10, "ddim", steps=11)
    with pytest.raises(generation.SampleError, match="--eta is used only by the ddim sampler"):
        generation.sampling_settings(cfg, 10, "ddpm", eta=0.5)
