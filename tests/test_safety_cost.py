"""Safety table of the cost checks (issue #23): a request that cannot fit the machine (a config's network,
a stored config, a pretrained folder's config.json, a count flag, a data file that inflates without end) is
refused before anything is allocated, with the estimate, the limit and the fix; --memory-limit and
--max-model-calls raise the limits. Each hostile case runs under an address-space limit (`ulimit -v`), where
the code before limits/ died in the allocator with a traceback; plus unit tests of the estimates."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from test_sample import make_checkpoint, random_state, tiny_config

from config import load_config, to_dict
from model import build_model
from safety import DIGITS, REPO, TINY, Case, run_case
from storage.checkpoints import save_checkpoint

CAP = 6 * 2 ** 30  # address space of a hostile command: torch itself maps ~3.2 GB, so ~3 GB are left
CPU = ["--device", "cpu"]
TRAIN = ["train.py", "--config", DIGITS, *TINY]
SAMPLE = ["sample.py", "--checkpoint", "c.pt", "--steps", "2", *CPU]
EDIT_INPUT = ["--inpaint", "in.png", "--mask", "center"]
MEMORY = r"needs ~[\d.e+]+ [KMGTP]?B \(an estimate\); this machine allows .*--memory-limit"
CALLS = r"plans [\d.e+]+ network evaluations .*--max-model-calls"


def says(*parts: str) -> str:
    """A pattern: the error line holds every part, in any order."""
    return r"error: " + "".join(f"(?=.*{p})" for p in parts)
NOTHING = ("checkpoints/*/*.pt", "results/images/*/*/*.png", "out/*")


def ckpt(*extra, stored=()):
    """c.pt of the tiny digits U-Net; `stored`: overrides written into its config only (a forged file)."""
    def setup(root: Path):
        cfg = tiny_config(extra=extra)
        if not stored:
            make_checkpoint(root / "c.pt", cfg)
        else:
            forged = to_dict(load_config(DIGITS, [*TINY, "run_name=tiny", *stored]))
            save_checkpoint({"step": 5, "config": forged, "model": random_state(cfg, 1),
                             "ema": random_state(cfg, 2)}, root / "c.pt")
        from PIL import Image
        Image.new("L", (8, 8), 128).save(root / "in.png")
    return setup


def trained_run(stored: list[str]):
    """c.pt: a tiny run's checkpoint after one step (full training state), its config forged with `stored`."""
    def setup(root: Path):
        subprocess.run([sys.executable, str(REPO / "train.py"), "--config", DIGITS, *TINY, "run_name=tiny",
                        "train.max_steps=1"], cwd=root, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1",
                                                                                          "PATH": "/usr/bin:/bin"})
        state = torch.load(root / "checkpoints" / "tiny" / "last.pt", weights_only=True)
        state["config"] = to_dict(load_config(DIGITS, [*TINY, "run_name=tiny", *stored]))
        save_checkpoint(state, root / "c.pt")
    return setup


def pretrained(sample_size: int):
    """./p: a diffusers UNet2DModel folder of the tiny network whose config.json says sample_size."""
    def setup(root: Path):
        from safetensors.torch import save_file

        from interop.diffusers import convert_state_dict_to_diffusers, ours_to_diffusers_config
        cfg = tiny_config()
        unet, scheduler = ours_to_diffusers_config(cfg)
        (root / "p").mkdir()
        (root / "p" / "config.json").write_text(json.dumps({**unet, "sample_size": sample_size}))
        (root / "p" / "scheduler_config.json").write_text(json.dumps(scheduler))
        weights = convert_state_dict_to_diffusers(build_model(cfg).state_dict())
        save_file({k: v.contiguous() for k, v in weights.items()},
                  str(root / "p" / "diffusion_pytorch_model.safetensors"))
    return setup


def classifier(num_classes: int):
    """clf/digits_8.pt: a classifier file whose metadata claims num_classes (its weights are 10 classes')."""
    def setup(root: Path):
        ckpt()(root)
        from evaluation.features import DigitClassifier
        meta = {"kind": "digit_classifier", "dataset": "digits", "image_size": 8, "channels": 1,
                "num_classes": num_classes}
        save_checkpoint({"config": meta, "model": DigitClassifier(10, 1).state_dict()}, root / "clf" / "digits_8.pt")
    return setup


def mnist_bomb(root: Path):
    """data/MNIST/raw: the four files of 6 images each, the training images' .gz with 1.5 GB of zeros after
    the data its header promises (1.5 MB on disk)."""
    from test_dataset import write_mnist
    raw = root / "data" / "MNIST" / "raw"
    for split in ("train", "t10k"):
        write_mnist(raw, n=6, compress=True, split=split)
    path = raw / "train-images-idx3-ubyte.gz"
    inner = gzip.decompress(path.read_bytes())
    pack = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    chunk, body = bytes(2 ** 24), [pack.compress(inner)]
    body += [pack.compress(chunk) for _ in range(90)] + [pack.flush()]
    path.write_bytes(b"".join(body))


CASES = [
    # A config's network that cannot exist here: refused before the run folder, the data or any weight.
    Case("train-channels", [*TRAIN, "model.channels=100000"], 1, says(MEMORY, r".*model\.channels"),
         absent=("checkpoints/*",), address_space=CAP),
    Case("train-image-size", [*TRAIN, "data.image_size=100000"], 1, says(MEMORY, r".*train\.batch_size"),
         absent=("checkpoints/*",), address_space=CAP),
    Case("train-res-blocks", [*TRAIN, "model.num_res_blocks=100", "model.channels=4096"], 1,
         says(MEMORY, r".*model\.num_res_blocks"), absent=("checkpoints/*",), address_space=CAP),
    Case("train-channel-mult", [*TRAIN, "model.channel_mult=[1,100000]"], 1,
         says(MEMORY, r".*channel_mult=\[1, 100000\]"), absent=("checkpoints/*",), address_space=CAP),
    # ... or stored in a checkpoint (its weights could not fit anyway: the check comes before building it).
    Case("resume-stored-channels", ["train.py", "--resume", "c.pt"], 1, says(MEMORY),
         trained_run(["model.channels=100000"]), keep=("c.pt",), address_space=CAP),
    Case("sample-stored-channels", SAMPLE, 1, says(MEMORY, r".*model\.channels=100000"),
         ckpt(stored=["model.channels=100000"]), keep=("c.pt",), absent=NOTHING, address_space=CAP),
    Case("sample-stored-image-size", SAMPLE, 1, says(MEMORY, r".*data\.image_size=100000"),
         ckpt(stored=["data.image_size=100000"]), keep=("c.pt",), absent=NOTHING, address_space=CAP),
    Case("pretrained-sample-size", ["sample.py", "--pretrained", "./p", "--num-samples", "1", *CPU], 1,
         says(MEMORY, r".*image_size=100000"), pretrained(100000), keep=("p/*",), absent=NOTHING,
         address_space=CAP),
    # Count flags that size an allocation or a loop.
    Case("sample-num-samples", [*SAMPLE, "--num-samples", "10000000000"], 1, says(CALLS, r".*--num-samples"),
         ckpt(), absent=NOTHING, address_space=CAP),
    Case("sample-batch-and-samples", [*SAMPLE, "--num-samples", "100000000", "--batch-size", "100000000",
                                      "--max-model-calls", "none"], 1,
         says(MEMORY, r".*--num-samples or --batch-size"), ckpt(), absent=NOTHING, address_space=CAP),
    Case("interpolate-frames", [*SAMPLE, "--interpolate", "--seeds", "1", "2", "--frames", "100000000"], 1,
         says(MEMORY, r".*--frames"), ckpt(), absent=NOTHING, address_space=CAP),
    Case("inpaint-resample", [*SAMPLE, *EDIT_INPUT, "--resample", "1000000000"], 1, says(CALLS, r".*--resample"),
         ckpt(), absent=NOTHING, address_space=CAP),
    Case("inpaint-num-samples", [*SAMPLE, *EDIT_INPUT, "--num-samples", "10000000000", "--max-model-calls", "none"],
         1, says(MEMORY, r".*--num-samples"), ckpt(), absent=NOTHING, address_space=CAP),
    Case("evaluate-num-samples", ["evaluate.py", "--checkpoint", "c.pt", "--num-samples", "10000000000", *CPU,
                                  "--features", "classifier", "--classifier-dir", "clf"], 1, says(CALLS), ckpt(),
         address_space=CAP),
    Case("evaluate-classifier-classes", ["evaluate.py", "--checkpoint", "c.pt", "--num-samples", "4", "--batch-size",
                                         "4", *CPU, "--features", "classifier", "--classifier-dir", "clf"], 1,
         r"num_classes=1000000000, not a whole number in 2\.\.100000.*train-classifier", classifier(10 ** 9),
         keep=("clf/*",),
         address_space=CAP),
    # A gzip file that inflates far past the size its IDX header promises: read as a stream, refused at the end.
    Case("mnist-gzip-bomb", ["dataset.py", "--dataset", "mnist", "--root", "data", "--image-size", "28",
                             "--no-download"], 1, r"error: .*train-images-idx3-ubyte\.gz' is truncated or corrupt: "
         r"its header says \(6, 28, 28\).*more \(trailing data\).*delete it", mnist_bomb, keep=("data/MNIST/raw/*",),
         address_space=4 * 2 ** 30),
    # The limits are flags: lowered, raised, or a bad value.
    Case("memory-limit-lowered", [*SAMPLE, "--memory-limit", "1KB"], 1, r"needs ~.* --memory-limit 1 KB: lower",
         ckpt(), absent=NOTHING),
    Case("memory-limit-none", [*SAMPLE, "--memory-limit", "none", "--num-samples", "2", "--out", "o"], 0,
         r"wrote 2 images", ckpt()),
    Case("memory-limit-bad", [*SAMPLE, "--memory-limit", "lots"], 1, r"--memory-limit 'lots' is not a size", ckpt()),
    Case("model-calls-lowered", [*SAMPLE, "--max-model-calls", "3"], 1, r"plans \d+ network evaluations .*limit 3",
         ckpt(), absent=NOTHING),
    Case("train-memory-limit", [*TRAIN, "--memory-limit", "1MB", "train.max_steps=1"], 1,
         r"training .* --memory-limit 1 MB: lower train\.batch_size", absent=("checkpoints/*",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_cost_safety(case, tmp_path):
    run_case(case, tmp_path)


# ----------------------------------------------------------------------------- the estimates
@pytest.mark.parametrize("extra", [[], ["model.num_classes=10", "model.attention_resolutions=[4]"],
                                   ["model.channel_mult=[1,2,2]", "model.num_res_blocks=2", "data.task=superres",
                                    "data.sr_factor=2"]])
def test_parameter_count_is_the_real_models(extra):
    from limits import parameter_count
    cfg = load_config(DIGITS, [*TINY, *extra])
    assert parameter_count(cfg) == sum(p.numel() for p in build_model(cfg).parameters())


def test_the_presets_are_counted_on_the_meta_device():
    from limits import parameter_count
    for preset, params in [("mnist", 6_469_889), ("cifar10", 35_746_307)]:
        assert parameter_count(load_config(REPO / "configs" / f"{preset}.yaml")) == params


PEAK = """
import sys, torch
sys.path.insert(0, {repo!r})
from config import load_config
from model import build_model
torch.set_num_threads(1)
cfg = load_config({digits!r}, {tiny!r} + ["model.channels=32", "data.image_size=32"])
net = build_model(cfg)
def step(b):
    x, t = torch.randn(b, 1, 32, 32), torch.zeros(b, dtype=torch.long)
    net(x, t).square().mean().backward()
def kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
step(1)
# The peak RSS since now (clear_refs 5 resets VmHWM): ru_maxrss keeps the peak of the imports, which can
# exceed the step's and read as no growth at all.
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
step({batch})
print((kib("VmHWM:") - before) * 1024)
"""


def test_the_activation_estimate_is_within_a_factor_2_of_the_measured_peak():
    """A real forward + backward of a 32-channel U-Net at 32x32, batch 64: the growth of the process's peak RSS."""
    from limits import activation_bytes
    batch = 64
    code = PEAK.format(repo=str(REPO), digits=DIGITS, tiny=TINY, batch=batch)
    measured = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}).stdout.split()[-1])
    cfg = load_config(DIGITS, [*TINY, "model.channels=32", "data.image_size=32"])
    estimate = 1.0 * activation_bytes(cfg, training=True) * batch  # limits.cost.BACKWARD_FACTOR
    assert measured / 2 < estimate < measured * 2, (estimate, measured)


def test_training_memory_counts_weights_adam_ema_and_activations():
    from limits import activation_bytes, parameter_count, training_memory
    cfg = load_config(DIGITS, TINY)
    params, act = parameter_count(cfg), activation_bytes(cfg, training=True)
    assert training_memory(cfg) == 4 * params * 5 + int(1.0 * act) * cfg.train.batch_size
    assert activation_bytes(cfg, training=False) < act  # no saved tensors without autograd


def test_check_memory_names_the_estimate_the_limit_and_the_flag():
    from limits import CostError, check_memory, set_limits
    set_limits(memory=10 ** 6)
    try:
        with pytest.raises(CostError, match=r"it needs ~2 MB \(an estimate\); --memory-limit 1 MB: lower x, or "
                                            r"raise the limit with --memory-limit 2\.5MB \(or none\)"):
            check_memory(2 * 10 ** 6, "it", "lower x")
        check_memory(10 ** 6, "it", "lower x")
    finally:
        set_limits()



def test_planned_pngs_beyond_the_free_disk_are_refused(tmp_path):
    from limits import CostError, check_sampling, set_limits
    cfg = load_config(DIGITS, TINY)
    set_limits(memory=None, model_calls=None)  # the disk is the only limit left
    try:
        with pytest.raises(CostError, match=r"would write ~[\d.]+ PB .* free: lower --num-samples"):
            check_sampling(cfg, 10 ** 14, 4, 1, "cpu", out_folder=tmp_path / "out", what="sampling")
        check_sampling(cfg, 10, 4, 1, "cpu", out_folder=tmp_path / "out", what="sampling")
    finally:
        set_limits()
