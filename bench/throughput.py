"""Training and sampling throughput of our U-Net against diffusers' UNet2DModel built as the same network.

    python -m bench.throughput                     # CPU (+ GPU if present): fp32/bf16 x NCHW/channels_last,
                                                   # 3 networks, batch 32; writes bench/RESULTS.md
                                                   # (~8 min on 2 idle cores; 17 min with --threads 1 when shared)
    python -m bench.throughput --threads 1         # on a machine shared with other jobs: read "same, by CPU time"
    python -m bench.throughput --quick             # bf16, channels_last, batch 8: a 1-3 minute smoke run
    python -m bench.throughput --nets cifar10 --dtypes bf16 --formats nchw,cl --compile both --no-write
    python -m bench.throughput --nets cifar10 --profile 15   # + torch.profiler top ops of one train step

What it measures, per network (configs/<net>.yaml), device, dtype (autocast), memory format, compile:
  train   images/s of one optimizer step at batch B: forward, MSE on the noise, backward, AdamW
          (lr 2e-4, betas 0.9/0.999, fused where supported; GradScaler for fp16), dropout of the config on;
  sample  images/s of DDIM-50 at batch B under no_grad: the seconds of a timed DDIM run of --timed-steps
          steps (our Diffusion.sample, the same loop for both networks), scaled to 50 network evaluations.
Ours and diffusers' get the same weights (ours randomised, converted with interop.py, outputs checked equal),
the same inputs and the same optimizer, and are timed interleaved (ABBA order) in one process; medians.
GFLOP/s counts the standard network's FLOPs (torch.utils.flop_counter on the meta device: 12.4 GFLOP
forward per 32x32 image for the DDPM CIFAR-10 net, backward 2x forward) times images/s, for both networks;
our Upsample executes fewer FLOPs for the same function (model.py), so this is "useful" GFLOP/s.
% of peak divides by a large matmul's GFLOP/s of the same dtype measured here; oneDNN's 3x3 convolution can
run faster than torch.mm on CPU, so the script also prints a convolution reference. cpu/wall is process CPU
seconds per wall second: about the thread count when the cores were ours, lower when shared. Two threads
on two cores shared with other jobs make wall times swing by several x (OpenMP threads wait on each other);
then use --threads 1 and the CPU-time ratio, which other jobs barely move.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.unet_bench import (
    HEADER,
    RESULTS,
    build_net,
    load,
    machine,
    measure_peaks,
    profile_train_step,
    report,
    run_net,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="cifar10,mnist,digits", help="presets in configs/ (U-Nets)")
    p.add_argument("--devices", default="cpu,cuda", help="cuda is skipped when no GPU is available")
    p.add_argument("--dtypes", default=None, help="default: fp32,bf16 on CPU; fp32,bf16,fp16 on CUDA")
    p.add_argument("--formats", default="nchw,cl", help="memory formats: nchw, cl (channels_last)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile variants (CPU: ~6 min to compile the CIFAR-10 train step on 2 cores)")
    p.add_argument("--tasks", default="train,sample")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="minimum timed repetitions per network and variant")
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--target-seconds", type=float, default=4.0, help="add repetitions up to this per network")
    p.add_argument("--timed-steps", type=int, default=None, help="DDIM steps per timed sampling run "
                   "(default 3 on CPU, 50 on CUDA); images/s is always scaled to 50 steps")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-diffusers", action="store_true", help="time our network only")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N ops of one train step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="batch 8, bf16, channels_last, 2 reps, 1 DDIM step")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.dtypes, args.formats = 8, args.dtypes or "bf16", "cl"
        args.reps, args.target_seconds, args.timed_steps = 2, 0.0, args.timed_steps or 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices.split(",")
               if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    loads = [load()]
    info = machine()
    print(f"# {info}\n# load average before: {loads[0]}", flush=True)
    peaks, convs = measure_peaks(devices, args)
    print("# peaks (GFLOP/s):", {f"{d} {n}": round(p) for (d, n), p in peaks.items()}, flush=True)
    nets = [build_net(name, args.seed, not args.no_diffusers) for name in args.nets.split(",")]
    for n in nets:
        print(f"# {n.name}: {n.fwd_flops / 1e9:.2f} GFLOP forward per image; {n.check}", flush=True)
    rows = []
    print(HEADER, flush=True)
    for device in devices:
        for net in nets:
            rows += run_net(net, device, args, peaks)
            if args.profile:
                profile_train_step(net, device, args)
    loads.append(load())
    section = report(rows, info, peaks, convs, nets, loads, args)
    print("\n" + section)
    if args.write or not (args.no_write or args.quick):
        write_section(section, Path(args.results))
        print(f"\nwrote {args.results}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
