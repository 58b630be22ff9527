"""One command that checks the CUDA paths on a GPU machine and measures what the speed defaults rest on.

    python -m bench.gpu_check              # one H100/H200: < 8 min; writes its section of bench/RESULTS.md
    python -m bench.gpu_check --no-write   # print only
    python -m bench.gpu_check --dry-run    # every part on CPU with tiny sizes (~1 min); prints only
    python -m bench.gpu_check --parts correct,sample

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
import copy
import dataclasses
import datetime
import inspect
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import bench.unet_bench as tp
from bench.gpu_correct import Check, Plan, make_plan, part_correct, run_part, synced_empty_cache
from diffusion import Diffusion

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"
# Dense (no sparsity) bf16 tensor-core FLOP/s by device name, first match wins; None = not in the table.
PEAK_BF16 = [("H100 PCIe", None), ("H100 NVL", None), ("H200 NVL", None),
             ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


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

    import interop.diffusers as interop

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


# ----------------------------------------------------------------------------- report
def setup_lines(plan: Plan, net) -> list:
    peak = bf16_peak(plan.device)
    where = (f"CPU dry run ({torch.get_num_threads()} threads): tiny sizes, the numbers mean nothing" if plan.dry
             else f"{torch.cuda.get_device_name(plan.device)}, CUDA {torch.version.cuda}, "
                  f"cuDNN {torch.backends.cudnn.version()}")
    params = sum(p.numel() for p in net.ours.parameters()) / 1e6
    return [f"- Command: `python -m bench.gpu_check{''.join(' ' + a for a in sys.argv[1:])}`",
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
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0], epilog=__doc__,
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
