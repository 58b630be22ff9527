"""Per-sample seeds that do not overlap (generation.SampleNoise, generate): sample i of seed s draws from a
stream seeded from the pair (s, i) (utils.derive_seed), so neighbouring seeds share no sample. A naive
seed + index scheme makes sample i + 1 of seed s sample i of seed s + 1 (and seed s + index shifted copies of
whole runs). Batch-size independence is tested in test_generation.py and not repeated here."""
import itertools
from pathlib import Path

import pytest
import torch

import sampling.generation as generation
from config import load_config
from diffusion import build_diffusion
from model import build_model
from utils import derive_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "model.attention_resolutions=[]",
        "data.image_size=8", "diffusion.num_timesteps=6", "model.dropout=0.0", "sample.steps=3",
        "train.sample_steps=3", "model.num_classes=0"]


def noise(seed: int, index: int, numel: int = 64) -> torch.Tensor:
    """The first `numel` normals of sample `index`'s stream under seed `seed`, drawn alone."""
    return generation.SampleNoise(seed, [index]).randn((1, numel))[0]


def test_neighbouring_seeds_share_no_noise_stream():
    seeds, indices = (0, 1, 2, 7, 41, 1000), range(6)
    for s, i in itertools.product(seeds, indices):
        assert not torch.equal(noise(s, i + 1), noise(s + 1, i)), (s, i)  # seed + index would collide here
        assert not torch.equal(noise(s, i), noise(i, s)) or s == i, (s, i)  # nor are seed and index swappable
    # nor far along a seed: an evaluation draws 50k samples, and seed * N + index schemes collide past N
    for s, offset in itertools.product((0, 5), (1000, 10_000, 50_000)):
        assert not torch.equal(noise(s, offset), noise(s + 1, 0)), (s, offset)
        assert not torch.equal(noise(s, offset + 3), noise(s + 1, 3)), (s, offset)
    # every (seed, index) of a small grid is its own stream: no two share even their first draw
    firsts = {(s, i): float(noise(s, i, 1)) for s, i in itertools.product(range(8), range(8))}
    assert len(set(firsts.values())) == len(firsts)


def test_one_streams_noise_is_reproducible_and_its_own_in_a_batch():
    batch = generation.SampleNoise(3, range(5)).randn((5, 2, 4, 4))
    for i in range(5):
        assert torch.equal(batch[i], generation.SampleNoise(3, [i]).randn((1, 2, 4, 4))[0])
    assert all(not torch.equal(batch[i], batch[j]) for i, j in itertools.combinations(range(5), 2))
    # the stream of (s, i) is a generator seeded with derive_seed(s, i): one hashed seed, not s + i
    g = torch.Generator().manual_seed(derive_seed(3, 4))
    assert torch.equal(batch[4], torch.randn((2, 4, 4), generator=g))
    assert derive_seed(3, 4) != derive_seed(4, 3) and derive_seed(3, 4) != derive_seed(2, 5)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(REPO / "configs" / "digits.yaml", TINY)
    model, g = build_model(cfg).eval(), torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero weights everywhere (the U-Net zero-initialises its output layer)
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, build_diffusion(cfg), cfg


@pytest.mark.parametrize("kw", [{"sampler": "ddim", "steps": 3, "eta": 0.0},
                                {"sampler": "ddpm", "steps": None}],
                         ids=["ddim-deterministic", "ddpm"])
def test_generated_samples_of_neighbouring_seeds_differ(tiny, kw):
    """Sample i + 1 of seed s is not sample i of seed s + 1 (x_T alone for DDIM eta=0; x_T and every step's
    noise for DDPM), and every sample of seeds s, s + 1, s + 2 is its own image - also across batches (batches
    of 2: a batch that seeded its streams from seed + start would repeat seed s + 2's first samples)."""
    model, diffusion, cfg = tiny
    n = 4
    runs = {s: generation.generate(model, diffusion, cfg, n, 2, seed=s, amp="off", progress=False, **kw)
            for s in (10, 11, 12)}
    for s in (10, 11):
        for i in range(n - 1):
            gap = (runs[s][i + 1] - runs[s + 1][i]).abs().max()
            assert gap > 1e-2, (s, i, float(gap))
    flat = torch.cat(list(runs.values())).flatten(1)
    assert (torch.cdist(flat, flat) + 1e9 * torch.eye(len(flat))).min() > 1e-2
    again = generation.generate(model, diffusion, cfg, n, 2, seed=11, amp="off", progress=False, **kw)
    torch.testing.assert_close(again, runs[11], rtol=0, atol=0)  # a seed is still reproducible
