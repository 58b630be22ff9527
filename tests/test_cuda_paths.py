"""The CUDA code paths, checked on CPU by monkeypatching torch.cuda (issue #17): the amp choice on pre-Ampere
GPUs, cuda:N becoming the current device, one clear error for a GPU the machine does not have, and two
DDP hazards run for real over gloo (the data set built by local rank 0 first; a non-finite-weights
verdict that every rank acts on)."""
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import training.parts as train_utils
from config import ConfigError
from utils import get_device, resolve_amp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with 2 CUDA devices as far as the code can tell; returns the set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    return calls


@pytest.mark.parametrize("capability, native, expected", [((7, 5), False, "fp16"), ((7, 0), False, "fp16"),
                                                          ((8, 0), True, "bf16"), ((9, 0), True, "bf16")])
def test_auto_amp_is_fp16_below_ampere_even_where_bf16_is_emulated(monkeypatch, capability, native, expected):
    # T4 / V100: torch.cuda.is_bf16_supported() is True by default (emulation counts), cuDNN has no bf16 conv
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    assert resolve_amp("auto", torch.device("cuda")) == expected
    assert resolve_amp("bf16", torch.device("cuda")) == "bf16"  # an explicit mode still wins


def test_cuda_n_becomes_the_current_device(two_gpus):
    assert get_device("cuda:1") == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 1)]
    assert get_device("auto") == torch.device("cuda") and len(two_gpus) == 1  # no index: leave the default


@pytest.mark.parametrize("name", ["cuda:2", "cuda:7"])
def test_a_gpu_the_machine_lacks_is_one_config_error_naming_the_count(two_gpus, name):
    with pytest.raises(ConfigError, match=r"GPU \d, but this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        get_device(name)
    assert two_gpus == []


def test_cuda_without_cuda_is_still_a_runtime_error_for_older_callers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):  # sample.py catches RuntimeError
        get_device("cuda:1")
    with pytest.raises(ConfigError, match="CUDA is not available"):   # evaluate.py catches ConfigError
        get_device("cuda")


def test_local_rank_beyond_the_gpus_is_one_config_error(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(train_utils.dist, "init_process_group", lambda *a, **k: pytest.fail("init before check"))
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=3 names GPU 3, but this machine has 2 CUDA device"):
        train_utils.setup_distributed("cuda")
    assert two_gpus == []


# ----------------------------------------------------------------------------- 2 gloo ranks
TINY = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.num_heads=1", "model.num_classes=0",
        "diffusion.num_timesteps=20", "train.batch_size=8", "train.warmup_steps=2", "train.amp=off",
        "train.log_every=2", "train.sample_every=1000", "train.ckpt_every=2", "train.max_steps=4",
        "run_name=nan", "train.num_sample_images=4", "train.sample_steps=2", "sample.steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, workdir):
    """Rank 0's data set takes 1 s to build; rank 1's EMA turns NaN right before the first save."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(workdir)
    torch.set_num_threads(1)
    import training.trainer as train_mod
    from config import load_config
    log = Path(workdir) / f"rank{rank}.log"
    build, save = train_mod.build_dataset, train_mod.Trainer.save

    def slow_build(*args, **kwargs):
        log.write_text(f"start {time.time()}\n")
        time.sleep(1.0 if rank == 0 else 0.0)
        data = build(*args, **kwargs)
        with log.open("a") as f:
            f.write(f"end {time.time()}\n")
        return data

    def poisoned_save(self):
        if rank == 1:
            next(self.ema.model.parameters()).data.fill_(float("nan"))
        return save(self)

    train_mod.build_dataset, train_mod.Trainer.save = slow_build, poisoned_save
    try:
        train_mod.train(load_config(REPO / "configs" / "digits.yaml", TINY))
        outcome = "no error"
    except train_mod.NonFiniteLossError as err:
        outcome = f"NonFiniteLossError: {err}"
    with log.open("a") as f:
        f.write(f"outcome {outcome}\n")


def _read(log: Path) -> dict:
    return dict(line.split(" ", 1) for line in log.read_text().splitlines())


def test_ddp_builds_data_on_local_rank_0_first_and_all_ranks_stop_on_nonfinite_weights(tmp_path):
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, "a rank hangs (waiting in a collective for one that raised?)"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    r0, r1 = _read(tmp_path / "rank0.log"), _read(tmp_path / "rank1.log")
    assert float(r1["start"]) >= float(r0["end"]), "rank 1 read the data set while rank 0 was still building it"
    for r in (r0, r1):  # only rank 1's weights went bad; both ranks know and stop
        assert r["outcome"].startswith("NonFiniteLossError: the weights became non-finite at step 2"), r
    assert not (tmp_path / "checkpoints" / "nan" / "last.pt").exists()
