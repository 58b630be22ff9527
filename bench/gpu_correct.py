"""bench/gpu_check.py's plan, check records and part runner, and its correctness part: train.py runs in fp16 and
bf16 whose loss falls, SIGTERM + torchrun resume, the NaN guard under GradScaler, a DDP step. A helper module
(no __main__), so that the script imports it."""
from __future__ import annotations

import contextlib
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

import torch
import torch.distributed as dist

import bench.unet_bench as tp
from config import load_config
from storage.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

CIFAR10 = REPO / "configs" / "cifar10.yaml"
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
    import training.trainer as train_mod
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
