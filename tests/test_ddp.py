"""train.py under DistributedDataParallel: 2 CPU processes over gloo (torch.multiprocessing), launched the
way torchrun does it (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* environment variables).

Checks that both ranks hold bitwise-identical weights and EMA after training, that they trained on
disjoint data shards, and that an interrupted + resumed 2-process run equals an uninterrupted one bitwise.
"""
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TINY = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.dropout=0.1",
        "diffusion.num_timesteps=20", "train.batch_size=8", "train.warmup_steps=2", "train.amp=off",
        "train.log_every=3", "train.sample_every=1000", "train.ckpt_every=1000", "train.num_sample_images=4",
        "train.sample_steps=2", "sample.steps=2", "train.max_steps=6", "model.num_classes=10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, ports, workdir):
    """Three 2-process runs in the same two processes (imports are the slow part): straight to 6 steps,
    interrupted at step 2, resumed to 6. Each run initialises and destroys its own process group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    os.chdir(workdir)
    torch.set_num_threads(1)
    import training.trainer as train_mod
    from config import load_config
    from training.data_order import EpochBatches
    for port, (run_name, stop_at, resume) in zip(ports, RUNS):
        os.environ["MASTER_PORT"] = str(port)
        cfg = load_config(REPO / "configs" / "digits.yaml", TINY + [f"run_name={run_name}"])
        summary = train_mod.train(cfg, resume=resume, stop_at=stop_at)
        shard = EpochBatches(1797, 8, cfg.seed, rank, world).rank_indices(0)
        torch.save({"model": summary["model"].state_dict(), "ema": summary["ema"].state_dict(),
                    "step": summary["step"], "shard": shard}, Path(workdir) / f"{run_name}_{stop_at}_rank{rank}.pt")


RUNS = [("straight", None, None), ("resumed", 2, None), ("resumed", None, True)]


def _spawn(workdir):
    mp.spawn(_worker, args=(2, [_free_port() for _ in RUNS], str(workdir)), nprocs=2, join=True)
    return {(name, stop): [torch.load(workdir / f"{name}_{stop}_rank{r}.pt") for r in range(2)]
            for name, stop, _ in RUNS}


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_gloo_ranks_stay_identical_and_resume_exactly(tmp_path):
    from storage.checkpoints import load_checkpoint
    results = _spawn(tmp_path)
    r0, r1 = results[("straight", None)]
    assert r0["step"] == r1["step"] == 6
    _assert_equal_states(r0["model"], r1["model"])
    _assert_equal_states(r0["ema"], r1["ema"])
    shards = [set(r["shard"].tolist()) for r in (r0, r1)]
    assert shards[0] | shards[1] == set(range(1797))  # each rank sees its own half of every epoch;
    assert len(shards[0] & shards[1]) == 1             # 1797 is odd: one item pads rank 1 (DistributedSampler)
    straight = load_checkpoint(tmp_path / "checkpoints/straight/last.pt")
    _assert_equal_states(straight["model"], r0["model"])
    assert straight["rng"]["world_size"] == 2 and len(straight["rng"]["ranks"]) == 2
    assert not torch.equal(straight["rng"]["ranks"][0]["torch"], straight["rng"]["ranks"][1]["torch"])

    first = results[("resumed", 2)]
    assert first[0]["step"] == first[1]["step"] == 2
    q0, q1 = results[("resumed", None)]
    assert q0["step"] == q1["step"] == 6
    _assert_equal_states(q0["model"], q1["model"])
    resumed = load_checkpoint(tmp_path / "checkpoints/resumed/last.pt")
    for key in ("model", "ema"):
        _assert_equal_states(straight[key], resumed[key])
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        _assert_equal_states(a, b)
    assert straight["data_state"] == resumed["data_state"]
