"""Sampling a trained model: a checkpoint to (model, diffusion, config), batched generation with per-sample
seeds, post-hoc EMA, image-conditioned models (conditions and their transforms) and the pictures (grids, GIFs,
trajectories, plots). The editing modes built on it live in editing/; training uses this package for its
sample grids."""
from sampling.generation import SampleNoise, generate, sampling_settings
from sampling.loading import load_for_sampling
from sampling.pictures import save_image_grid, save_samples

__all__ = ["SampleNoise", "generate", "load_for_sampling", "sampling_settings", "save_image_grid", "save_samples"]
