"""data.holdout: a fixed part of the training split is never trained on and can be read back."""
import dataclasses

import pytest
import torch

from config import Config, ConfigError, DataConfig, validate
from dataset import build_dataset, holdout_indices


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_holdout_partitions_the_split_the_same_way_every_time():
    kept, held = holdout_indices(100, 10)
    assert len(held) == 10 and len(kept) == 90
    assert sorted(kept.tolist() + held.tolist()) == list(range(100))
    again_kept, again_held = holdout_indices(100, 10)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert held.tolist() != list(range(90, 100))  # a seeded draw, not the tail


def test_training_set_never_contains_a_held_out_image():
    cfg = DataConfig(dataset="digits", image_size=8, holdout=200)
    whole = _images(build_dataset(dataclasses.replace(cfg, holdout=0)))
    train, held = _images(build_dataset(cfg)), _images(build_dataset(cfg, held_out=True))
    assert len(train) == len(whole) - 200 and len(held) == 200
    _, held_index = holdout_indices(len(whole), 200)
    assert torch.equal(held, whole[held_index])
    # digits has exact duplicates, so compare by index: the kept images are exactly the others
    kept_index = sorted(set(range(len(whole))) - set(held_index.tolist()))
    assert torch.equal(train, whole[kept_index])


def test_bad_holdout_values_are_refused():
    with pytest.raises(ConfigError, match="data.holdout=5000 must be below the 1797"):
        build_dataset(DataConfig(dataset="digits", image_size=8, holdout=5000))
    with pytest.raises(ConfigError, match="data.holdout=0"):
        build_dataset(DataConfig(dataset="digits", image_size=8), held_out=True)
    cfg = Config()
    cfg.data.holdout = -1
    with pytest.raises(ConfigError, match="data.holdout"):
        validate(cfg)


def test_scoring_reads_the_trained_part_of_the_training_split_only():
    from evaluation.features import split_dataset
    cfg = DataConfig(dataset="digits", image_size=8, holdout=200)
    assert len(split_dataset(cfg, "train")) == 1797 - 200  # FID reference = what the model trained on
    assert len(split_dataset(cfg, "test")) == 1797  # another split keeps all of its images
