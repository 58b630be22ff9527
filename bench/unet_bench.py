"""Building blocks of bench/throughput.py and bench/gpu_check.py: our U-Net and diffusers' UNet2DModel built as
the same network with the same weights, timed variants (device, dtype, memory format, compile), interleaved
timing, FLOP counts and peaks, the report table and the RESULTS.md section writer. See throughput.py for what
is measured and how."""
from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from config import ConfigError, load_config
from diffusion import Diffusion
from model import build_model
from utils import autocast

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLE_STEPS = 50  # DDIM-50: what "sampling images/s" refers to


# ----------------------------------------------------------------------------- environment
def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    info = {"cpu": cpu, "nproc": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "commit": git_commit()}
    with contextlib.suppress(ImportError):
        import diffusers
        info["diffusers"] = diffusers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- networks
def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random perturbation of every parameter: no zero-initialised layer, so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def diffusers_twin(cfg, state_dict: dict) -> torch.nn.Module:
    """diffusers.UNet2DModel with our config and weights (interop.py's mappings), returning a tensor."""
    from diffusers import UNet2DModel

    import interop.diffusers as interop
    unet_config, _ = interop.ours_to_diffusers_config(cfg)
    net = UNet2DModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    net.load_state_dict(interop.convert_state_dict_to_diffusers(state_dict))
    return Returning(net)


class Returning(torch.nn.Module):
    """model(x, t, y) -> tensor for diffusers (whose forward returns a dataclass), like our networks."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        return self.net(x, t, class_labels=y, return_dict=False)[0]


def nominal_flops(cfg) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of the standard network, counted on the meta device
    (where our Upsample takes the plain interpolate + 3x3 conv path, and attention is counted as bmm)."""
    size, ch = cfg.data.image_size, cfg.model.in_channels
    with torch.device("meta"):
        net = build_model(cfg)
        x, t = torch.randn(2, ch, size, size), torch.zeros(2, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, t)
    fwd = counter.get_total_flops() / 2
    with counter:
        out.sum().backward()
    return fwd, fwd + counter.get_total_flops() / 2


@dataclass
class Net:
    name: str
    cfg: object
    ours: torch.nn.Module
    theirs: Optional[torch.nn.Module]
    fwd_flops: float
    train_flops: float
    check: str


def build_net(name: str, seed: int, with_diffusers: bool, overrides: tuple = ()) -> Net:
    cfg = load_config(REPO / "configs" / f"{name}.yaml", list(overrides))
    torch.manual_seed(seed)
    ours = randomized(build_model(cfg), seed)
    theirs, check = None, "diffusers not timed"
    if with_diffusers:
        try:
            theirs = diffusers_twin(cfg, ours.state_dict())
            check = same_outputs(cfg, ours, theirs)
        except ImportError as e:
            check = f"diffusers unavailable ({e}); pip install -r requirements-bench.txt"
        except ConfigError as e:  # a config diffusers' UNet2DModel cannot express
            check = f"no diffusers twin: {e}"
    return Net(name, cfg, ours, theirs, *nominal_flops(cfg), check)


def labels(cfg, batch: int, g: torch.Generator) -> Optional[torch.Tensor]:
    """Class labels for class-conditional networks (None for unconditional ones)."""
    classes = cfg.model.num_classes
    return torch.randint(0, classes, (batch,), generator=g) if classes > 0 else None


def same_outputs(cfg, ours, theirs) -> str:
    size, ch = cfg.data.image_size, cfg.model.in_channels
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, ch, size, size, generator=g), torch.tensor([3, 900]), labels(cfg, 2, g)
    with torch.no_grad():
        a, b = ours.eval()(x, t, y), theirs.eval()(x, t, y)
    diff = (a - b).abs().max().item()
    if diff > 1e-4 * max(1.0, a.abs().max().item()):
        raise RuntimeError(f"{cfg.run_name}: our network and diffusers' disagree (max |diff| {diff:.2e}); "
                           "the comparison would not be of the same network")
    return f"same network: fp32 outputs agree to {diff:.1e}"


# ----------------------------------------------------------------------------- peak FLOP/s
def best_of(fn: Callable, device: torch.device, n: int = 3) -> float:
    fn()
    sync(device)
    best = math.inf
    for _ in range(n):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of a large square matmul (4096 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 4096
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n ** 3 / best_of(lambda: a @ b, device) / 1e9


def conv_reference(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of one of the network's 3x3 convolutions (256 -> 256 channels at 16x16, batch 32, channels_last)."""
    x = torch.randn(32, 256, 16, 16, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = best_of(lambda: F.conv2d(x, w, padding=1), device)
    return 2 * 32 * 256 * 16 * 16 * 256 * 9 / seconds / 1e9


# ----------------------------------------------------------------------------- what is timed
@dataclass(frozen=True)
class Variant:
    device: torch.device
    dtype: str
    fmt: str           # nchw | cl
    compiled: bool
    backend: str = "inductor"  # torch.compile backend ("eager": tracing only, for quick CPU dry runs)

    @property
    def label(self) -> str:
        return f"{self.dtype} {'channels_last' if self.fmt == 'cl' else 'NCHW'}{' compile' if self.compiled else ''}"

    def autocast(self):
        return autocast(self.device, "off" if self.dtype == "fp32" else self.dtype)

    def memory(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.fmt == "cl" else x.contiguous()


@dataclass
class Runner:
    """One network prepared for one variant (a fresh copy of the weights, its optimizer, fixed inputs)."""
    train_step: Callable
    sample: Callable


def make_runner(model: torch.nn.Module, cfg, v: Variant, batch: int, timed_steps: int, seed: int) -> Runner:
    net = copy.deepcopy(model).to(v.device)
    if v.fmt == "cl":
        net = net.to(memory_format=torch.channels_last)
    call = torch.compile(net, backend=v.backend) if v.compiled else net
    g = torch.Generator().manual_seed(seed)
    size, ch = cfg.data.image_size, cfg.model.in_channels
    xt, noise, x_T = (v.memory(torch.randn(batch, ch, size, size, generator=g)).to(v.device) for _ in range(3))
    t = torch.randint(0, cfg.diffusion.num_timesteps, (batch,), generator=g).to(v.device)
    y = labels(cfg, batch, g)
    y = y.to(v.device) if y is not None else None
    opt = make_optimizer(net, v.device)
    scaler = torch.amp.GradScaler(v.device.type) if v.dtype == "fp16" else None

    def train_step() -> None:  # no .item(): nothing waits for the device inside a step
        net.train()
        with v.autocast():
            out = call(xt, t, y)
        loss = F.mse_loss(out.float(), noise)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    diffusion = Diffusion.from_config(cfg.diffusion).to(v.device)

    def sample() -> None:
        net.eval()
        with torch.no_grad(), v.autocast():
            diffusion.sample(call, x_T.shape, sampler="ddim", steps=timed_steps, x_T=x_T, y=y, progress=False)
    return Runner(train_step, sample)


def make_optimizer(net: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
    try:
        return torch.optim.AdamW(net.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        return torch.optim.AdamW(net.parameters(), foreach=True, **kwargs)


@dataclass
class Timing:
    seconds: float = math.nan    # median wall seconds of one call
    cpu_seconds: float = math.nan  # median process CPU seconds of one call (all threads)
    cpu_ratio: float = math.nan  # median process CPU seconds / wall seconds
    reps: int = 0
    first_s: float = math.nan    # the first (warm-up) call: includes compilation
    error: str = ""


def interleaved(fns: dict, device: torch.device, args, warmup: int) -> dict:
    """Warm every function up, then time them in ABBA order; medians per function."""
    out = {name: Timing() for name in fns}
    for name, fn in list(fns.items()):
        try:
            for i in range(warmup):
                wall, _ = timed(fn, device)
                out[name].first_s = wall if i == 0 else out[name].first_s
                out[name].seconds = wall
        except Exception as e:  # e.g. a compile failure: report it, time the others
            out[name].error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            del fns[name]
    slowest = max([out[n].seconds for n in fns] or [1.0])
    reps = max(args.reps, min(args.max_reps, math.ceil(args.target_seconds / slowest)))
    samples = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            samples[name].append(timed(fns[name], device))
    for name, vals in samples.items():
        walls = [w for w, _ in vals]
        ratios = [c / w for w, c in vals]
        out[name].seconds, out[name].cpu_ratio = statistics.median(walls), statistics.median(ratios)
        out[name].cpu_seconds = statistics.median([c for _, c in vals])
        out[name].reps = reps
    return out


def timed(fn: Callable, device: torch.device) -> tuple[float, float]:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- running and reporting
@dataclass
class Row:
    net: str
    variant: Variant
    task: str
    batch: int
    flops_per_image: float
    calls_per_batch: float     # timed calls per batch of the task (sample: 50 / timed DDIM steps)
    timings: dict = field(default_factory=dict)  # "ours" / "theirs" -> Timing

    def ips(self, who: str) -> float:
        t = self.timings.get(who)
        return self.batch / (t.seconds * self.calls_per_batch) if t and not t.error else math.nan


def variants_for(device: torch.device, args) -> list[Variant]:
    dtypes = (args.dtypes or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16")).split(",")
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return [Variant(device, d, f, c) for c in compiled for d in dtypes for f in args.formats.split(",")]


def run_net(net: Net, device: torch.device, args, peaks: dict) -> list[Row]:
    steps = args.timed_steps or (SAMPLE_STEPS if device.type == "cuda" else 3)
    rows = []
    for v in variants_for(device, args):
        models = {"ours": net.ours, "theirs": net.theirs} if net.theirs is not None else {"ours": net.ours}
        runners = {who: make_runner(m, net.cfg, v, args.batch, steps, args.seed) for who, m in models.items()}
        warmup = 2 if v.compiled else 1
        for task in args.tasks.split(","):
            if task == "train":
                row = Row(net.name, v, task, args.batch, net.train_flops, 1.0)
            else:
                row = Row(net.name, v, task, args.batch, SAMPLE_STEPS * net.fwd_flops, SAMPLE_STEPS / steps)
            fns = {who: (r.train_step if task == "train" else r.sample) for who, r in runners.items()}
            row.timings = interleaved(fns, device, args, warmup)
            rows.append(row)
            print(format_row(row, peaks), flush=True)
        del runners
    return rows


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def format_row(row: Row, peaks: dict) -> str:
    ours, theirs = row.ips("ours"), row.ips("theirs")
    gflops = ours * row.flops_per_image / 1e9
    peak = peaks.get((row.variant.device.type, row.variant.dtype), math.nan)
    t = row.timings
    cpu = "/".join(fmt(t[w].cpu_ratio) for w in ("ours", "theirs") if w in t)
    cpu_time_ratio = t["theirs"].cpu_seconds / t["ours"].cpu_seconds if "theirs" in t else math.nan
    notes = "; ".join(f"{w}: {t[w].error}" for w in t if t[w].error)
    if row.variant.compiled:
        notes += " first call " + "/".join(fmt(t[w].first_s, 0) + " s" for w in t)
    return (f"| {row.net} | {row.variant.device.type} | {row.task} | {row.variant.label} | {fmt(ours, 2)} | "
            f"{fmt(theirs, 2)} | {fmt(ours / theirs, 2)} | {fmt(cpu_time_ratio, 2)} | {fmt(gflops, 0)} | "
            f"{fmt(100 * gflops / peak, 0)} | {cpu} | {row.timings['ours'].reps} | {notes.strip()} |")


HEADER = ("| Network | Device | Task | Mode | ours img/s | diffusers img/s | ours / diffusers | same, by CPU "
          "time | ours GFLOP/s | % of matmul peak | cpu/wall (ours/theirs) | reps | notes |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")


def best_rows(group: list[Row]) -> dict:
    """{"ours": row, "theirs": row}: the fastest measured mode of each implementation (or None)."""
    best = {}
    for who in ("ours", "theirs"):
        candidates = [r for r in group if r.ips(who) == r.ips(who)]
        best[who] = max(candidates, key=lambda r: r.ips(who)) if candidates else None
    return best


def best_table(rows: list[Row], target: float = 1.3) -> str:
    """Per network, device and task: each implementation in its own fastest mode, against the target."""
    lines = ["| Network | Device | Task | ours best (img/s, mode) | diffusers best (img/s, mode) | ours / diffusers "
             f"| target >= {target}x |", "|---|---|---|---|---|---:|---|"]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row.net, row.variant.device.type, row.task), []).append(row)
    for (net, device, task), group in groups.items():
        best = best_rows(group)
        cell = {w: (f"{b.ips(w):.2f} ({b.variant.label})" if b else "-") for w, b in best.items()}
        ratio = best["ours"].ips("ours") / best["theirs"].ips("theirs") if all(best.values()) else math.nan
        verdict = "-" if ratio != ratio else ("met" if ratio >= target else "not met")
        lines.append(f"| {net} | {device} | {task} | {cell['ours']} | {cell['theirs']} | {fmt(ratio, 2)} "
                     f"| {verdict} |")
    return "\n".join(lines)


def profile_train_step(net: Net, device: torch.device, args) -> None:
    from torch.profiler import ProfilerActivity, profile
    v = variants_for(device, args)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for who, model in (("ours", net.ours), ("diffusers", net.theirs)):
        if model is None:
            continue
        runner = make_runner(model, net.cfg, v, args.batch, 1, args.seed)
        runner.train_step()
        with profile(activities=activities) as prof:
            runner.train_step()
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n## profile: {who}, {net.name}, {v.label}, one train step at batch {args.batch}")
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile))


def measure_peaks(devices: list[torch.device], args) -> tuple[dict, dict]:
    peaks, convs = {}, {}
    for device in devices:
        for name in (args.dtypes or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16")).split(","):
            if device.type == "cpu" and name == "fp16":
                continue  # no fast fp16 matmul on CPU; fp16 rows show no % of peak
            peaks[(device.type, name)] = matmul_peak(device, DTYPES[name])
            convs[(device.type, name)] = conv_reference(device, DTYPES[name])
    return peaks, convs


def report(rows: list[Row], info: dict, peaks: dict, convs: dict, nets: list[Net], loads: tuple,
           args) -> str:
    command = "python -m bench.throughput" + "".join(f" {a}" for a in sys.argv[1:])
    peak_text = "; ".join(f"{d} {n}: matmul {peaks[(d, n)]:.0f} GFLOP/s, 3x3 conv {convs[(d, n)]:.0f} GFLOP/s"
                          for d, n in peaks)
    machine_text = (f"{info['cpu']}, nproc {info['nproc']}, torch threads {info['threads']}"
                    + (f", GPU {info['gpu']}" if "gpu" in info else ""))
    lines = [START, "## Throughput: our U-Net vs diffusers' UNet2DModel (the same network)", "",
             f"- Command: `{command}`",
             f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; commit {info['commit']}",
             f"- Machine: {machine_text}; torch {info['torch']}, diffusers {info.get('diffusers', '-')}, "
             f"Python {info['python']}",
             f"- Load average (1/5/15 min) before: {loads[0]}, after: {loads[1]}",
             f"- Peaks measured in the same run: {peak_text}",
             f"- Batch {args.batch}; train = forward + MSE + backward + fused AdamW step, dropout of the config "
             "on; sample = DDIM-50 under no_grad, timed over "
             f"{args.timed_steps or '3 (CPU) / 50 (CUDA)'} DDIM steps and scaled to 50.",
             *[f"- {n.name}: {sum(p.numel() for p in n.ours.parameters()) / 1e6:.1f}M parameters, "
               f"{n.fwd_flops / 1e9:.2f} GFLOP forward / {n.train_flops / 1e9:.2f} GFLOP train step per image, "
               f"dropout {n.cfg.model.dropout}, {n.cfg.model.num_classes or 'no'} classes; {n.check}"
               for n in nets],
             "", "### Each in its fastest mode", "", best_table(rows), "", "### Every mode", "", HEADER,
             *[format_row(r, peaks) for r in rows], "",
             "Ours and diffusers' run interleaved (ABBA) in one process with the same weights, inputs and "
             "optimizer; img/s from the median repetition. GFLOP/s = img/s x the standard network's FLOPs "
             "(our Upsample computes the same function with fewer). cpu/wall near the thread count means the "
             "cores were not shared; absolute numbers from a loaded machine are low, ratios less affected. "
             "'same, by CPU time' is diffusers' / our process CPU seconds per call: with --threads 1 it is "
             "nearly immune to other jobs on the machine (with more threads it counts spin-waiting too).",
             END]
    return "\n".join(lines)


def write_section(section: str, path: Path, start: str = START, end: str = END) -> None:
    """Replace the text between the markers (or append the section); other sections are left as they are."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
