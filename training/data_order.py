"""Data order of the Trainer (trainer.py): which items each step trains on, and how they are randomly flipped.

The order of epoch e is a pure function of (seed, e) and each flip one of (seed, e, item), never of the
worker processes or of what was loaded before: so a checkpoint stores only (epoch, batches consumed) and
a resumed run continues exactly there, replaying or skipping nothing.
"""
from __future__ import annotations

import math
import signal

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from config import ConfigError
from utils import derive_seed

# Purposes mixed into derive_seed, so their streams differ (NOISE: the Trainer's per-rank noise streams).
DATA_ORDER, FLIPS, NOISE = 1, 2, 3


class EpochBatches:
    """Batch sampler. Epoch e visits randperm(n) drawn from a generator seeded with (seed, e): a pure
    function, so a resume needs only (epoch, batches taken) and starts there without replaying anything.
    DDP: like DistributedSampler, the permutation is padded to a multiple of world_size and rank r takes
    positions r, r + W, ...; every rank drops its last partial batch, so all take the same number.
    Batches hold (epoch, index) keys for KeyedItems."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the data set has {n} items, fewer than train.batch_size={batch_size} x "
                              f"{world_size} process(es): lower train.batch_size")
        self.epoch, self.start = 0, 0

    def rank_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, DATA_ORDER, epoch))
        perm = torch.randperm(self.n, generator=g)
        perm = torch.cat([perm, perm[: self.per_rank * self.world_size - self.n]])  # pad as DistributedSampler
        return perm[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def __iter__(self):
        indices, bs = self.rank_indices(self.epoch).tolist(), self.batch_size
        for b in range(self.start, self.batches_per_epoch):
            yield [(self.epoch, i) for i in indices[b * bs:(b + 1) * bs]]


class KeyedItems(Dataset):
    """dataset[(epoch, i)] = base[i], with torch's CPU RNG seeded from (seed, epoch, i) around the call when
    the data set augments (random flips draw from that RNG). A flip then depends only on which item of
    which epoch is loaded - not on the worker process, data.num_workers or what was loaded before - so a
    resumed run sees the same flips as an uninterrupted one for any num_workers. (Restoring the global
    RNG from the checkpoint only covers num_workers=0: workers draw from their own per-iterator seeds.)
    fork_rng leaves the caller's stream untouched when items load in the main process."""

    def __init__(self, base: Dataset, seed: int, augmented: bool):
        self.base, self.seed, self.augmented = base, seed, augmented

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.augmented:
            return self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, FLIPS, epoch, index))
            return self.base[index]


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: SIGTERM/SIGINT are for the main process, which finishes the step and saves. torchrun,
    SLURM and Ctrl-C signal the whole process group; a worker killed by one would make the main process
    raise "DataLoader worker ... is killed by signal" in the middle of that save. The workers still exit
    when the main process shuts the loader down (or dies: they watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DataStream:
    """Endless batches over epochs. (epoch, position) counts batches CONSUMED, not prefetched."""

    def __init__(self, dataset: Dataset, sampler: EpochBatches, num_workers: int, pin_memory: bool, seed: int):
        # A private generator for the loader's base seed: iterators then never draw from the global RNG,
        # which a resumed run (new iterator mid-epoch) would otherwise consume differently.
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
                                 generator=torch.Generator().manual_seed(derive_seed(seed, DATA_ORDER)))
        self.sampler, self.epoch, self.position, self._it = sampler, 0, 0, None

    def next(self):
        while True:
            if self._it is None:
                self.sampler.epoch, self.sampler.start = self.epoch, self.position
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch

    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": self.epoch, "position": self.position, "batch_size": s.batch_size,
                "world_size": s.world_size, "num_items": s.n}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        self.epoch, self.position = state["epoch"], state["position"]
        if (state["batch_size"], state["world_size"]) != (s.batch_size, s.world_size):
            # Same epoch, same fraction of it; the order inside differs, so this resume is not exact.
            seen = state["position"] * state["batch_size"] * state["world_size"]
            self.position = seen // (s.batch_size * s.world_size)
            tqdm.write(f"note: batch size x processes changed from {state['batch_size']} x "
                       f"{state['world_size']} to {s.batch_size} x {s.world_size}: the data order continues "
                       f"at the same epoch position but is not identical to an uninterrupted run")
        self._it = None

    def close(self) -> None:
        self._it = self.loader = None  # shuts persistent workers down


def training_stream(base, cfg, rank: int, world_size: int, device) -> DataStream:
    """The Trainer's batches of data set `base`: this rank's share of each epoch's order (EpochBatches), the
    item-keyed flips (data.random_flip) and data.num_workers loader workers."""
    sampler = EpochBatches(len(base), batch_size=cfg.train.batch_size, seed=cfg.seed, rank=rank,
                           world_size=world_size)
    items = KeyedItems(base, seed=cfg.seed, augmented=cfg.data.random_flip)
    return DataStream(items, sampler, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                      seed=cfg.seed)
