"""Resuming with another number of processes (data_order.EpochBatches / DataStream, train_resume.restore_rng,
trainer.py). The contract (DataStream.load_state_dict): a checkpoint stores (epoch, batches consumed, batch size,
world size); a resume with another batch size x world size continues at the same epoch and the same number of
items consumed, counted in global batches (batch_size x world_size), rounding down. Epoch e's items are the
permutation of (seed, e) and global step j of W processes takes its positions j*G .. (j+1)*G - 1 (G = W x
batch_size, rank r every W-th of them, as DistributedSampler): so when the items consumed are a whole number of
new global batches, the resumed run sees exactly the global batches an uninterrupted run with the new layout
sees, and no item of the epoch is skipped or repeated. A rank the checkpoint did not have starts its own noise
stream.

Checked with one DataStream per rank in one process (the ranks share no state but the checkpoint), and once
through the Trainer: 2 steps on 1 process, resumed on 2 gloo processes."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from training.data_order import DataStream, EpochBatches, KeyedItems

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEED = 5


class Indices(torch.utils.data.Dataset):
    """Item i is the number i, so a batch is the tensor of the indices it holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def streams(n: int, batch_size: int, world_size: int) -> list[DataStream]:
    """One DataStream per rank, as each process of a run builds it (trainer.Trainer.setup_data)."""
    return [DataStream(KeyedItems(Indices(n), SEED, augmented=False),
                       EpochBatches(n, batch_size, SEED, rank=r, world_size=world_size),
                       num_workers=0, pin_memory=False, seed=SEED) for r in range(world_size)]


def global_steps(ranks: list[DataStream], k: int) -> list[list[list[int]]]:
    """The next k steps: per step, each rank's batch of indices."""
    return [[s.next().tolist() for s in ranks] for _ in range(k)]


def item_sequence(n: int, epochs: int) -> list[tuple[int, int]]:
    """(epoch, item) in the order an uninterrupted run consumes them: epoch e's permutation of (seed, e)."""
    one = EpochBatches(n, 1, SEED)
    return [(e, i) for e in range(epochs) for i in one.rank_indices(e).tolist()]


def flat(steps):
    return [i for step in steps for batch in step for i in batch]


def by_step(steps):
    """Each global step's indices, sorted (the ranks' split of a step is the order inside it)."""
    return [sorted(i for batch in step for i in batch) for step in steps]


def chunks(items, size):
    return [sorted(items[j:j + size]) for j in range(0, len(items), size)]


# (items, saved as (batch size, world size), k steps, resumed as (batch size, world size)); k x the saved global
# batch is a whole number of resumed global batches in each
CASES = [
    (48, (8, 1), 8, (4, 2)),   # 1 -> 2 processes, the same global batch of 8, resumed inside epoch 1
    (48, (4, 2), 8, (8, 1)),   # 2 -> 1, the same global batch
    (48, (4, 1), 6, (4, 2)),   # 1 -> 2, the same per-process batch: the global batch doubles
    (48, (4, 2), 3, (4, 1)),   # 2 -> 1, the global batch halves
    (48, (4, 1), 12, (4, 2)),  # saved at the very end of epoch 0
    (48, (2, 2), 6, (2, 3)),   # 2 -> 3 processes
    (48, (4, 2), 7, (4, 2)),   # the same layout: the plain exact resume
]


@pytest.mark.parametrize("n, saved, k, resumed", CASES, ids=[f"{s[1]}x{s[0]}-after-{k}-to-{r[1]}x{r[0]}"
                                                              for _, s, k, r in CASES])
def test_resume_with_another_world_size_continues_at_the_same_items(n, saved, k, resumed, capsys):
    (b0, w0), (b1, w1) = saved, resumed
    g0, g1 = b0 * w0, b1 * w1
    first = streams(n, b0, w0)
    before = global_steps(first, k)
    states = [s.state_dict() for s in first]
    assert all(state == states[0] for state in states)  # rank 0 saves it; every rank's is the same
    assert (states[0]["batch_size"], states[0]["world_size"]) == (b0, w0)
    capsys.readouterr()

    later = streams(n, b1, w1)
    for s in later:
        s.load_state_dict(states[0])
    after = global_steps(later, 9)  # into the next epoch in every case

    consumed = k * g0
    assert consumed % g1 == 0
    # exactly the batches (per rank) an uninterrupted run with the new layout takes from that item on
    straight = streams(n, b1, w1)
    global_steps(straight, consumed // g1)
    assert after == global_steps(straight, 9)
    # ... which continue the item order of the epochs: nothing skipped or seen twice
    sequence = [i for _, i in item_sequence(n, 3)]
    assert by_step(before) == chunks(sequence[:consumed], g0)
    assert by_step(after) == chunks(sequence[consumed:consumed + 9 * g1], g1)
    for step in after:  # the ranks of one step take disjoint shares of the global batch
        assert all(len(batch) == b1 for batch in step) and len({i for batch in step for i in batch}) == g1
    if (b0, w0) != (b1, w1):
        assert "batch size x processes changed" in capsys.readouterr().out


def test_a_position_between_global_batches_rounds_down_never_skipping():
    """4 x 1 process after 3 steps (12 items) resumed on 2 processes (global batch 8): 12 is no whole number of
    global batches, so the run continues at item 8 (one partial batch seen twice), never at 16 (skipping)."""
    n = 48
    first = streams(n, 4, 1)
    global_steps(first, 3)
    later = streams(n, 4, 2)
    for s in later:
        s.load_state_dict(first[0].state_dict())
    assert later[0].position == 1 and later[0].epoch == 0
    next_items = sorted(flat(global_steps(later, 1)))
    assert next_items == sorted(i for _, i in item_sequence(n, 1)[8:16])


def test_two_process_position_read_by_one_process_is_rescaled_by_the_world_size():
    """The arithmetic of the rescale itself: 5 steps of 3 x 2 processes are 30 items = 10 steps of 3 x 1."""
    two = streams(60, 3, 2)
    global_steps(two, 5)
    one = streams(60, 3, 1)[0]
    one.load_state_dict(two[1].state_dict())
    assert (one.epoch, one.position) == (0, 10)
    back = streams(60, 3, 2)
    for s in back:
        s.load_state_dict(one.state_dict())
    assert [(s.epoch, s.position) for s in back] == [(0, 5), (0, 5)]


# ----------------------------------------------------------------------------- noise streams of new ranks
def test_a_rank_the_checkpoint_lacks_gets_its_own_noise_stream():
    from training.resume import restore_rng
    from utils import get_rng_state
    torch.manual_seed(123)
    saved = {"world_size": 1, "ranks": [get_rng_state()]}
    expected0 = torch.randn(8)
    draws = []
    for rank in range(3):  # a 1-process checkpoint resumed on 3 processes
        restore_rng(saved, rank=rank, seed=SEED, step=10)
        draws.append(torch.randn(8))
    assert torch.equal(draws[0], expected0)  # rank 0 continues the saved stream exactly
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    assert not torch.equal(draws[2], draws[0])
    restore_rng(saved, rank=1, seed=SEED, step=10)
    assert torch.equal(torch.randn(8), draws[1])  # and reproducibly so
    # a 2-process checkpoint: each rank continues its own saved stream (2 -> 2, and rank 0 of 2 -> 1)
    states, next_draws = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(get_rng_state())
        next_draws.append(torch.randn(8))
    two = {"world_size": 2, "ranks": states}
    for rank in (1, 0):
        restore_rng(two, rank=rank, seed=SEED, step=10)
        assert torch.equal(torch.randn(8), next_draws[rank]), rank


# ----------------------------------------------------------------------------- through the Trainer
REPO = Path(__file__).resolve().parents[1]
TINY = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.num_classes=0",
        "diffusion.num_timesteps=20", "train.warmup_steps=2", "train.amp=off", "train.log_every=1000",
        "train.sample_every=1000", "train.ckpt_every=1000", "train.num_sample_images=0", "train.sample_steps=2",
        "sample.steps=2", "data.num_workers=0", "run_name=ws"]


def _recording_iter(log):
    original = EpochBatches.__iter__

    def __iter__(self):
        for batch in original(self):
            log.append([i for _, i in batch])
            yield batch
    return __iter__


def _resume_on_two(rank, world, port, workdir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(workdir)
    torch.set_num_threads(1)
    import training.trainer as train_mod
    from config import load_config
    log = []
    EpochBatches.__iter__ = _recording_iter(log)
    cfg = load_config(REPO / "configs" / "digits.yaml", TINY + ["train.batch_size=8", "train.max_steps=4"])
    summary = train_mod.train(cfg, resume=True)
    torch.save({"step": summary["step"], "batches": log}, Path(workdir) / f"rank{rank}.pt")


def len_digits():
    from sklearn.datasets import load_digits
    return len(load_digits().images)


def test_trainer_resumes_a_one_process_run_on_two_processes_at_the_next_items(workdir, monkeypatch):
    """2 steps of batch 16 on 1 process, then resumed on 2 gloo processes with batch 8 each (the same global
    batch) to step 4: steps 3 and 4 take the items an uninterrupted 1-process run's steps 3 and 4 take."""
    import training.trainer as train_mod
    from config import load_config
    from storage.checkpoints import load_checkpoint
    log = []
    cfg = load_config(REPO / "configs" / "digits.yaml", TINY + ["train.batch_size=16", "train.max_steps=4"])
    with monkeypatch.context() as mp_:
        mp_.setattr(EpochBatches, "__iter__", _recording_iter(log))
        assert train_mod.train(cfg, stop_at=2)["step"] == 2
    assert load_checkpoint(workdir / "checkpoints/ws/last.pt")["data_state"]["position"] == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resume_on_two, args=(2, port, str(workdir)), nprocs=2, join=True)
    ranks = [torch.load(workdir / f"rank{r}.pt") for r in range(2)]
    assert [r["step"] for r in ranks] == [4, 4]
    perm = EpochBatches(len_digits(), 1, cfg.seed).rank_indices(0).tolist()
    assert [sorted(a + b) for a, b in zip(*(r["batches"] for r in ranks))] == [sorted(perm[32:48]),
                                                                             sorted(perm[48:64])]
    assert [i for batch in log for i in batch] == perm[:32]  # the 1-process steps 1 and 2
    resumed = load_checkpoint(workdir / "checkpoints/ws/last.pt")["data_state"]
    assert (resumed["epoch"], resumed["position"], resumed["world_size"]) == (0, 4, 2)
