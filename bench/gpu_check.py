"""One command that checks the CUDA paths on a GPU machine and measures what the speed defaults rest on.

    python bench/gpu_check.py              # one H100/H200: < 8 min; writes its section of bench/RESULTS.md
    python bench/gpu_check.py --no-write   # print only
    python bench/gpu_check.py --dry-run    # every part on CPU with tiny sizes (~1 min); prints only
    python bench/gpu_check.py --parts correct,sample

Parts, in the order they run (each under its own time limit; a part that runs out is a FAIL):
  train    images/s of one training step of the cifar10 preset network at batch 128, ours vs diffusers'
           UNet2DModel of the same architecture and weights (bench/unet_bench.py builds both), timed
           interleaved in this process: fp32 (TF32 as torch's defaults leave it) / bf16 autocast / fp16
           autocast + GradScaler, each NCHW and channels_last; fused AdamW. MFU = images/s x the network's
           FLOPs per image / the GPU's dense bf16 peak (PEAK_BF16 below; n/a for a GPU not in the table)
  sample   DDIM-50 at batch 256 under bf16: our Diffusion.sample vs a diffusers pipeline-style loop
           (DDIMScheduler.step + UNet2DModel)
  measure  channels_last vs NCHW, cudnn.benchmark on vs off, DDIM eta=1 noise drawn by a CPU vs a GPU generator
  correct  train.py as subprocesses on the shared CIFAR-10 JPEGs (../shared/data/cifar10-jpg, unpacked to a
           temp folder, data.dataset=folder): 200 steps in fp16 and in bf16 (the loss falls and stays
           finite); a bf16 run stopped by SIGTERM and resumed under torchrun (1 process) logs the same
           losses as the straight run; the NaN guard skips an injected NaN step under the GradScaler; a DDP
           step and an all_reduce over NCCL
  compile  bf16 channels_last training step under torch.compile (compile seconds apart from step time)

--dry-run runs the same code on CPU: a tiny network, batch 4, 2 DDIM steps, short training runs on a subset
of the CIFAR-10 test JPEGs (scikit-learn's digits when the shared data is absent), gloo instead of NCCL,
fp32 in place of fp16 for train.py (which needs CUDA for fp16), torch.compile with the "eager" backend
(tracing only). It exists so that this script cannot rot between GPU runs (tests/test_gpu_check.py).
Exit code 1 if any check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import unet_bench as tp  # noqa: E402
from config import load_config  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from utils import load_checkpoint  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"
CIFAR10 = REPO / "configs" / "cifar10.yaml"
# Dense (no sparsity) bf16 tensor-core FLOP/s by device name, first match wins; None = not in the table.
PEAK_BF16 = [("H100 PCIe", None), ("H100 NVL", None), ("H200 NVL", None),
             ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
TINY_NET = ["data.image_size=8", "model.channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
            "model.attention_resolutions=[]", "model.norm_groups=4"]
# Where the shared data may be: <repo>/shared/data, ../shared/data from the repo, and from a git worktree of it.
DATA_DIRS = [REPO / "shared" / "data", REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data"]
# Seconds per part; compile (last) gets what is left of TOTAL_S, so that the whole run stays under 8 minutes.
LIMITS = {"train": 60, "sample": 30, "measure": 45, "correct": 180, "compile": None}
TOTAL_S, MIN_COMPILE_S = 460, 60
RESUME_RTOL = 1e-2  # GPU: cuDNN / cuBLAS kernels are not bitwise deterministic run to run (CPU: 0, bitwise)


@dataclass
class Plan:
    """Everything that differs between the GPU run and the CPU dry run."""
    dry: bool
    device: torch.device
    net: list            # overrides of configs/cifar10.yaml for the timed networks
    batch: int
    sample_batch: int
    sample_steps: int
    train_steps: int     # steps of the loss-falls runs
    run_extra: list      # more train.py overrides for the correctness runs
    cut_at: int          # the SIGTERM comes once the progress bar shows this step
    fmt: str             # the default memory format on this device
    backend: str         # torch.compile backend
    timing: SimpleNamespace = field(default_factory=SimpleNamespace)
    data_dirs: list = field(default_factory=lambda: list(DATA_DIRS))  # holding cifar10-jpg/


def make_plan(dry: bool) -> Plan:
    if dry:
        return Plan(True, torch.device("cpu"), TINY_NET, 4, 4, 2, 40,
                    TINY_NET + ["train.batch_size=16", "train.lr=1e-3", "data.num_workers=0"], 3, "nchw",
                    "eager", SimpleNamespace(reps=1, max_reps=1, target_seconds=0.0))
    return Plan(False, torch.device("cuda"), [], 128, 256, 50, 200, [], 50, "cl", "inductor",
                SimpleNamespace(reps=3, max_reps=20, target_seconds=1.5))


@dataclass
class Check:
    part: str
    name: str
    ok: bool
    numbers: str = ""
    note: str = ""
    skipped: bool = False  # only what cannot run where the script runs (fp16 training on CPU)

    @property
    def result(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"


# ----------------------------------------------------------------------------- parts and limits
@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"over its {seconds} s limit")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_part(name: str, fn: Callable, checks: list, elapsed: float) -> None:
    """fn appends its checks as it goes, so those done before a failure or the time limit still count."""
    start, before = time.perf_counter(), len(checks)
    try:
        with time_limit(LIMITS[name] or max(MIN_COMPILE_S, int(TOTAL_S - elapsed))):
            fn()
    except Exception as e:  # noqa: BLE001 - any failure of a part is a FAIL row, the others still run
        checks.append(Check(name, "part ran to the end", False, note=one_line(e)))
    wall = time.perf_counter() - start
    print(f"# {name}: {len(checks) - before} checks in {wall:.0f} s", flush=True)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def synced_empty_cache(device: torch.device) -> None:
    tp.sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- throughput
def bf16_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def ips_text(batch: int, timing, flops: float, peak: Optional[float]) -> str:
    if timing.error or not timing.seconds == timing.seconds:
        return "-"
    ips = batch / timing.seconds
    mfu = f"{100 * ips * flops / peak:.1f}%" if peak else "n/a"
    return f"{ips:.1f} img/s (MFU {mfu})"


def time_pair(fns: dict, plan: Plan, warmup: int = 1) -> dict:
    timings = tp.interleaved(dict(fns), plan.device, plan.timing, warmup)
    synced_empty_cache(plan.device)
    return timings


def pair_check(part: str, name: str, timings: dict, batch: int, flops: float, peak, note: str = "") -> Check:
    ours, theirs = timings["ours"], timings.get("theirs")
    numbers = f"ours {ips_text(batch, ours, flops, peak)}"
    if theirs is not None:
        numbers += f"; diffusers {ips_text(batch, theirs, flops, peak)}"
        if not (ours.error or theirs.error):
            numbers += f"; ours/diffusers {theirs.seconds / ours.seconds:.2f}x"
    errors = "; ".join(f"{who}: {t.error}" for who, t in timings.items() if t.error)
    return Check(part, name, not errors, numbers, "; ".join(x for x in (note, errors) if x))


def train_variant(net, plan: Plan, v, peak, checks: list, speeds: dict) -> None:
    models = {"ours": net.ours, "theirs": net.theirs} if net.theirs is not None else {"ours": net.ours}
    runners = {who: tp.make_runner(m, net.cfg, v, plan.batch, 1, 0) for who, m in models.items()}
    timings = time_pair({who: r.train_step for who, r in runners.items()}, plan, warmup=2 if v.compiled else 1)
    note = ""
    if v.dtype == "fp32" and plan.device.type == "cuda":
        note = (f"TF32 conv {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32} "
                "(torch defaults)")
    if v.compiled:
        note = "compile " + ", ".join(f"{w} {t.first_s - t.seconds:.0f} s" for w, t in timings.items() if not t.error)
    part = "compile" if v.compiled else "train"
    checks.append(pair_check(part, f"train b{plan.batch} {v.label}", timings, plan.batch, net.train_flops, peak,
                             note))
    if not timings["ours"].error:
        speeds[(v.dtype, v.fmt, v.compiled)] = plan.batch / timings["ours"].seconds


def part_train(net, plan: Plan, checks: list, speeds: dict, compiled: bool = False) -> None:
    peak = bf16_peak(plan.device)
    if compiled:
        variants = [tp.Variant(plan.device, "bf16", plan.fmt, True, plan.backend)]
    else:
        variants = [tp.Variant(plan.device, d, f, False) for d in ("fp32", "bf16", "fp16") for f in ("nchw", "cl")]
    for v in variants:
        train_variant(net, plan, v, peak, checks, speeds)


def diffusers_loop(net, plan: Plan, v) -> Callable:
    """The loop of diffusers' DDIMPipeline: scheduler.set_timesteps, then unet + scheduler.step per step."""
    from diffusers import DDIMScheduler

    import interop

    _, scheduler_config = interop.ours_to_diffusers_config(net.cfg)
    accepted = inspect.signature(DDIMScheduler.__init__).parameters
    scheduler = DDIMScheduler(**{k: x for k, x in scheduler_config.items() if k in accepted})
    unet = copy.deepcopy(net.theirs.net).to(plan.device).eval()
    if v.fmt == "cl":
        unet = unet.to(memory_format=torch.channels_last)
    size, ch = net.cfg.data.image_size, net.cfg.model.in_channels
    x_T = v.memory(torch.randn(plan.sample_batch, ch, size, size, generator=torch.Generator().manual_seed(0)))
    x_T = x_T.to(plan.device)

    def run() -> None:
        scheduler.set_timesteps(plan.sample_steps)
        x = x_T
        with torch.no_grad(), v.autocast():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return run


def part_sample(net, plan: Plan, checks: list) -> None:
    v = tp.Variant(plan.device, "bf16", plan.fmt, False)
    fns = {"ours": tp.make_runner(net.ours, net.cfg, v, plan.sample_batch, plan.sample_steps, 0).sample}
    if net.theirs is not None:
        fns["theirs"] = diffusers_loop(net, plan, v)
    timings = time_pair(fns, plan)
    flops = plan.sample_steps * net.fwd_flops
    checks.append(pair_check("sample", f"DDIM-{plan.sample_steps} b{plan.sample_batch} {v.label}", timings,
                             plan.sample_batch, flops, bf16_peak(plan.device)))


# ----------------------------------------------------------------------------- measurements
def ab_check(name: str, timings: dict, batch: int, note: str = "") -> Check:
    """Two variants of one thing: images/s of each and the ratio of the first to the second."""
    (a, ta), (b, tb) = timings.items()
    errors = "; ".join(f"{w}: {t.error}" for w, t in timings.items() if t.error)
    if errors:
        return Check("measure", name, False, note=errors)
    numbers = (f"{a} {batch / ta.seconds:.1f} img/s, {b} {batch / tb.seconds:.1f} img/s: "
               f"{a}/{b} {tb.seconds / ta.seconds:.2f}x")
    return Check("measure", name, True, numbers, note)


def memory_format_checks(speeds: dict, checks: list) -> None:
    for dtype in ("bf16", "fp32"):
        cl, nchw = speeds.get((dtype, "cl", False)), speeds.get((dtype, "nchw", False))
        name = f"channels_last vs NCHW, {dtype} train (ours)"
        if cl and nchw:
            checks.append(Check("measure", name, True, f"channels_last {cl:.1f}, NCHW {nchw:.1f} img/s: "
                                                       f"channels_last/NCHW {cl / nchw:.2f}x", "from the train rows"))
        else:
            checks.append(Check("measure", name, False, note="no train numbers (run the train part)"))


def cudnn_benchmark_check(net, plan: Plan) -> Check:
    v = tp.Variant(plan.device, "bf16", plan.fmt, False)
    step = tp.make_runner(net.ours, net.cfg, v, plan.batch, 1, 0).train_step
    before = torch.backends.cudnn.benchmark

    def flagged(flag: bool) -> Callable:
        def call() -> None:  # the flag is read per convolution call: toggling it between steps is enough
            torch.backends.cudnn.benchmark = flag
            step()
        return call
    try:
        timings = time_pair({"on": flagged(True), "off": flagged(False)}, plan)
    finally:
        torch.backends.cudnn.benchmark = before
    note = "cuDNN is CUDA only: no effect on CPU" if plan.device.type == "cpu" else f"torch default {before}"
    return ab_check(f"cudnn.benchmark, {v.label} train b{plan.batch} (ours)", timings, plan.batch, note)


def noise_generator_check(net, plan: Plan) -> Check:
    v = tp.Variant(plan.device, "bf16", plan.fmt, False)
    model = copy.deepcopy(net.ours).to(plan.device).eval()
    if v.fmt == "cl":
        model = model.to(memory_format=torch.channels_last)
    diffusion = Diffusion.from_config(net.cfg.diffusion).to(plan.device)
    size, ch = net.cfg.data.image_size, net.cfg.model.in_channels
    shape = (plan.sample_batch, ch, size, size)

    def sampler(where: torch.device) -> Callable:
        def run() -> None:
            g = torch.Generator(device=where).manual_seed(0)
            with torch.no_grad(), v.autocast():
                diffusion.sample(model, shape, "ddim", steps=plan.sample_steps, eta=1.0, generator=g, progress=False)
        return run
    timings = time_pair({"CPU generator": sampler(torch.device("cpu")), "device generator": sampler(plan.device)},
                        plan)
    note = "the same generator on CPU" if plan.device.type == "cpu" else ""
    return ab_check(f"DDIM-{plan.sample_steps} eta=1 noise, b{plan.sample_batch} {v.label}", timings,
                    plan.sample_batch, note)


def part_measure(net, plan: Plan, checks: list, speeds: dict) -> None:
    memory_format_checks(speeds, checks)
    checks.append(cudnn_benchmark_check(net, plan))
    synced_empty_cache(plan.device)
    checks.append(noise_generator_check(net, plan))


# ----------------------------------------------------------------------------- correctness: in process
class NaNAt(torch.nn.Module):
    """Wraps a network; its output is NaN on the `bad`-th training forward call (as tests/test_train.py does)."""

    def __init__(self, inner: torch.nn.Module, bad: int):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, x, t, y=None):
        out = self.inner(x, t, y)
        if self.training:
            self.calls += 1
            if self.calls == self.bad:
                out = out * float("nan")
        return out


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoint pieces (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def nan_guard_check(plan: Plan, data: list, work: Path) -> Check:
    """Step 3 of 6 has a NaN loss: it must change nothing (weights, EMA, Adam), the run goes on."""
    import trainer as train_mod
    amp = "bf16" if plan.dry else "fp16"  # fp16 = GradScaler, which train.py allows on CUDA only
    cfg = load_config(CIFAR10, [*TINY_NET, *data, "data.num_workers=0", "train.batch_size=16", "run_name=nan",
                                f"device={plan.device.type}", f"train.amp={amp}", "train.max_steps=6",
                                "train.ckpt_every=1", "train.keep_last=10", "train.warmup_steps=2",
                                "train.sample_every=1000000", "train.num_sample_images=4", "train.sample_steps=2"])
    build, cwd = train_mod.build_model, Path.cwd()
    train_mod.build_model = lambda c: NaNAt(build(c), 3)
    os.chdir(work)
    try:
        summary = train_mod.train(cfg)
    finally:
        train_mod.build_model = build
        os.chdir(cwd)
    s2, s3, s6 = (load_checkpoint(work / "checkpoints" / "nan" / f"step_{i:07d}.pt") for i in (2, 3, 6))
    unchanged = all(same(s2[k], s3[k]) for k in ("model", "ema", "ema_num_updates")) and same(
        s2["optimizer"]["state"], s3["optimizer"]["state"])
    trained_on = not same(s3["model"], s6["model"]) and all(torch.isfinite(v).all() for v in s6["model"].values())
    nan_logged = bool(torch.isnan(s6["log_state"]["loss_history"][2]))
    ok = unchanged and trained_on and nan_logged and summary["step"] == 6
    numbers = (f"NaN step skipped: weights/EMA/Adam {'unchanged' if unchanged else 'CHANGED'}, loss logged as "
               f"{'NaN' if nan_logged else 'finite'}; steps 4-6 {'trained, finite' if trained_on else 'NOT trained'}; "
               f"{summary['skipped_steps']} skipped in all")
    return Check("correct", f"NaN guard, amp={amp}{' + GradScaler' if amp == 'fp16' else ''}", ok, numbers,
                 "fp16 needs CUDA in train.py: bf16 on CPU" if plan.dry else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_step_check(plan: Plan) -> Check:
    """One DDP forward/backward and an all_reduce in a 1-rank process group of the device's backend."""
    cuda = plan.device.type == "cuda"
    backend, device = ("nccl", torch.device("cuda", 0)) if cuda else ("gloo", torch.device("cpu"))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 3).to(device),
                                                        device_ids=[0] if cuda else None)
        net(torch.randn(2, 3, 8, 8, device=device)).square().mean().backward()
        total = torch.full((1,), 2.0, device=device)
        dist.all_reduce(total)
        ok = float(total) == 2.0 and all(torch.isfinite(p.grad).all() for p in net.parameters())
    finally:
        dist.destroy_process_group()
    return Check("correct", f"DDP step + all_reduce over {backend} (1 rank, in process)", ok,
                 "gradients finite, all_reduce exact" if ok else "wrong all_reduce or non-finite gradients")


# ----------------------------------------------------------------------------- correctness: train.py runs
def prepare_data(plan: Plan, root: Path) -> tuple[list, Check]:
    """train.py overrides for the data: the shared CIFAR-10 JPEGs unpacked (dry run: 32 per class of the
    test split), else scikit-learn's digits."""
    split = "test" if plan.dry else "train"
    archives = [d / "cifar10-jpg" / f"cifar10-{split}-jpg.tar.gz" for d in plan.data_dirs]
    archive = next((a for a in archives if a.is_file()), None)
    if archive is None:
        return (["data.dataset=digits", "model.in_channels=1"],
                Check("correct", "training data", plan.dry, "scikit-learn digits",
                      f"no {archives[0].name} under {', '.join(str(d) for d in plan.data_dirs)}: pass --data"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        if plan.dry:
            members = first_per_class(members, 32)
        tar.extractall(root, members=members, filter="data")  # "data": no links or paths out of `root`
    return (["data.dataset=folder", f"data.root={root / split}"],
            Check("correct", "training data", True, f"{len(members)} CIFAR-10 {split} JPEGs", str(archive)))


def first_per_class(members: list, n: int) -> list:
    """The first n files of each split/<class>/ folder of the archive."""
    counts: dict = {}
    kept = []
    for m in members:
        label = m.name.split("/")[1]
        counts[label] = counts.get(label, 0) + 1
        if counts[label] <= n:
            kept.append(m)
    return kept


class Jobs:
    """train.py runs (plain or under torchrun) as subprocesses in one working folder; all are killed on exit."""

    def __init__(self, plan: Plan, work: Path):
        self.plan, self.work, self.procs = plan, work, {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1" if plan.dry else "4", "PYTHONWARNINGS": "ignore"}

    def start(self, name: str, argv: list, torchrun: bool = False) -> str:
        launcher = [sys.executable]
        if torchrun:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        with open(self.work / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen([*launcher, str(REPO / "train.py"), *argv], cwd=self.work,
                                                stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        return name

    def wait(self, name: str) -> int:
        return self.procs[name].wait()  # bounded by the part's time limit

    def text(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def tail(self, name: str) -> str:
        lines = [line for line in self.text(name).splitlines() if line.strip() and "it/s" not in line]
        return lines[-1][:200] if lines else "(no output)"

    def history(self, run: str) -> torch.Tensor:
        return load_checkpoint(self.work / "checkpoints" / run / "last.pt")["log_state"]["loss_history"]

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_args(plan: Plan, data: list, run: str, amp: str, steps: int) -> list:
    return ["--config", str(CIFAR10), *plan.run_extra, *data, f"run_name={run}", f"device={plan.device.type}",
            f"train.amp={amp}", f"train.max_steps={steps}", "train.warmup_steps=20", "train.log_every=10",
            "train.sample_every=1000000", "train.ckpt_every=1000000", "train.num_sample_images=16",
            "train.sample_steps=10"]


def interrupt(jobs: Jobs, name: str, at_step: int) -> tuple[Optional[int], str]:
    """SIGTERM once the run's progress bar shows `at_step` steps; (steps saved, "") or (None, why not)."""
    while not (done := re.findall(r"(\d+)/\d+ \[", jobs.text(name))) or int(done[-1]) < at_step:
        if jobs.procs[name].poll() is not None:
            return None, f"it ended before step {at_step}: {jobs.tail(name)}"
        time.sleep(0.02)
    jobs.procs[name].send_signal(signal.SIGTERM)
    if (rc := jobs.wait(name)) != 128 + signal.SIGTERM:
        return None, f"exit {rc} after SIGTERM, expected 143: {jobs.tail(name)}"
    return int(load_checkpoint(jobs.work / "checkpoints" / name / "last.pt")["step"]), ""


def loss_check(jobs: Jobs, run: str, steps: int, label: str) -> Check:
    """The run finished, its loss fell (mean of the last quarter below the first) and stayed finite (no
    skipped step in the second half; fp16's first steps may overflow while the GradScaler finds its scale)."""
    name = f"{steps} steps, {label}: loss falls, stays finite"
    if (rc := jobs.wait(run)) != 0:
        return Check("correct", name, False, note=f"exit {rc}: {jobs.tail(run)}")
    h = jobs.history(run)
    q = max(1, len(h) // 4)
    first, last = float(h[:q].nanmean()), float(h[-q:].nanmean())
    stays = bool(torch.isfinite(h[len(h) // 2:]).all())
    ok = len(h) == steps and stays and last < first
    skipped = int(torch.isnan(h).sum())
    return Check("correct", name, ok, f"loss {first:.4f} (first {q} steps) -> {last:.4f} (last {q}); "
                                      f"{skipped} skipped step(s){'' if stays else ', some in the second half'}")


def resume_check(jobs: Jobs, cut: int, steps: int) -> Check:
    """The interrupted + resumed run logged the same per-step losses as the straight one."""
    name = f"SIGTERM at step {cut}, torchrun --resume to {steps}: same losses as a straight run"
    for run in ("bf16_cut", "bf16"):
        if (rc := jobs.wait(run)) != 0:
            return Check("correct", name, False, note=f"{run}: exit {rc}: {jobs.tail(run)}")
    a, b = jobs.history("bf16_cut"), jobs.history("bf16")
    if len(a) != steps or len(b) != steps or not torch.equal(a.isnan(), b.isnan()):
        return Check("correct", name, False, note=f"{len(a)} vs {len(b)} steps, or different skipped steps")
    finite = ~a.isnan()
    rel = float(((a - b).abs() / b.abs())[finite].max()) if finite.any() else 0.0
    tol = 0.0 if jobs.plan.dry else RESUME_RTOL
    numbers = "bitwise equal" if rel == 0 else f"max relative difference of a step's loss {rel:.1e}"
    note = "resumed under torchrun (1 process); " + ("CPU: bitwise required" if jobs.plan.dry else
                                                     f"tolerance {tol:g} (CUDA kernels are not bitwise deterministic)")
    return Check("correct", name, rel <= tol, numbers, note)


def train_runs(plan: Plan, data: list, jobs: Jobs, checks: list) -> None:
    """Side by side: fp16 and bf16 runs of n steps, and a bf16 run cut by SIGTERM, then resumed to n under
    torchrun (1 process): it must log the straight bf16 run's losses, so torchrun trains, saves and resumes."""
    n = plan.train_steps
    for run in ("bf16", "bf16_cut") if plan.dry else ("fp16", "bf16", "bf16_cut"):
        jobs.start(run, run_args(plan, data, run, run.split("_")[0], n))
    cut, why = interrupt(jobs, "bf16_cut", plan.cut_at)
    if cut:
        jobs.start("bf16_cut", ["--resume", "checkpoints/bf16_cut/last.pt"], torchrun=True)
    checks.append(Check("correct", f"{n} steps, fp16 + GradScaler", True, skipped=True,
                        note="train.py trains fp16 on CUDA only") if plan.dry else
                  loss_check(jobs, "fp16", n, "fp16 + GradScaler"))
    checks.append(loss_check(jobs, "bf16", n, "bf16"))
    checks.append(resume_check(jobs, cut, n) if cut else
                  Check("correct", "SIGTERM, then --resume: same losses as a straight run", False, note=why))


def part_correct(plan: Plan, checks: list) -> None:
    synced_empty_cache(plan.device)  # the GPU memory the timings cached goes to the train.py processes
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        data, check = prepare_data(plan, work / "data")
        checks.append(check)
        checks.append(nan_guard_check(plan, data, work))
        checks.append(ddp_step_check(plan))
        jobs = Jobs(plan, work)
        try:
            train_runs(plan, data, jobs, checks)
        finally:
            jobs.kill_all()


# ----------------------------------------------------------------------------- report
def setup_lines(plan: Plan, net) -> list:
    peak = bf16_peak(plan.device)
    where = (f"CPU dry run ({torch.get_num_threads()} threads): tiny sizes, the numbers mean nothing" if plan.dry
             else f"{torch.cuda.get_device_name(plan.device)}, CUDA {torch.version.cuda}, "
                  f"cuDNN {torch.backends.cudnn.version()}")
    params = sum(p.numel() for p in net.ours.parameters()) / 1e6
    return [f"- Command: `python bench/gpu_check.py{''.join(' ' + a for a in sys.argv[1:])}`",
            f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; commit {tp.git_commit()}; torch "
            f"{torch.__version__}; {where}",
            f"- Network: cifar10 preset{' + ' + ' '.join(plan.net) if plan.net else ''}: {params:.1f}M parameters, "
            f"{net.fwd_flops / 1e9:.2f} GFLOP forward, {net.train_flops / 1e9:.2f} GFLOP per image of a training "
            f"step; {net.check}",
            f"- MFU against the dense bf16 peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a (not in PEAK_BF16)'}"
            f" for every mode; training batch {plan.batch}, sampling batch {plan.sample_batch}"]


def report(plan: Plan, net, checks: list, wall: float) -> str:
    rows = [f"| {c.part} | {c.name} | {c.result} | {c.numbers} | {c.note} |" for c in checks]
    passed = sum(c.ok and not c.skipped for c in checks)
    return "\n".join([START, "## GPU check (bench/gpu_check.py)", "", *setup_lines(plan, net), "",
                      "| Part | Check | Result | Numbers | Notes |", "|---|---|---|---|---|", *rows, "",
                      f"{passed} of {len(checks)} checks passed ({sum(c.skipped for c in checks)} skipped) "
                      f"in {wall / 60:.1f} min.", END])


# ----------------------------------------------------------------------------- main
PARTS = ("train", "sample", "measure", "correct", "compile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part on CPU with tiny sizes; prints only")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--data", help="the folder holding cifar10-jpg/*.tar.gz (default: ../shared/data and nearby)")
    args = p.parse_args(argv)
    args.parts = args.parts.split(",")
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here: run this on a GPU machine, or pass --dry-run to rehearse it on CPU",
              file=sys.stderr)
        return 1
    start, plan = time.perf_counter(), make_plan(args.dry_run)
    if args.data:
        plan.data_dirs.insert(0, Path(args.data))
    net = tp.build_net("cifar10", 0, True, plan.net)
    checks = [Check("setup", "diffusers twin of the network", net.theirs is not None, "", net.check)]
    speeds: dict = {}
    compile_net = dataclasses.replace(net, theirs=None) if plan.dry else net  # dry: halves the tracing time
    parts = {"train": lambda: part_train(net, plan, checks, speeds),
             "sample": lambda: part_sample(net, plan, checks),
             "measure": lambda: part_measure(net, plan, checks, speeds),
             "correct": lambda: part_correct(plan, checks),
             "compile": lambda: part_train(compile_net, plan, checks, speeds, compiled=True)}
    for name in PARTS:
        if name in args.parts:
            run_part(name, parts[name], checks, time.perf_counter() - start)
    section = report(plan, net, checks, time.perf_counter() - start)
    print("\n" + section, flush=True)
    if not (plan.dry or args.no_write):
        tp.write_section(section, Path(args.results), START, END)
        print(f"\nwrote {args.results}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
