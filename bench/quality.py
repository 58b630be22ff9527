"""Sample quality vs sampler and step count, on real MNIST digits, on a CPU.

    python -m bench.quality                        # train (~50 min), sample with every sampler (~25 min), write
                                                   # bench/RESULTS.md
    python -m bench.quality --num-samples 2000 --image-size 28      # more compute, better numbers
    python -m bench.quality --samplers ddim:50,dpmpp2m:20 --set diffusion.objective=eps --tag eps --no-write
    python -m bench.quality --skip-train           # re-score the last trained model (e.g. after a sampler change)
    python -m bench.quality --tag holdout --set data.holdout=1000 --distill 64:1:1000 --section distill \
        --samplers ddpm:1000,ddim:50 --skip-train # distil it 64 -> 1 steps; rows per student (issue #16)

What it does (every size is a flag):
  1. reads the MNIST test split (10,000 real digits, t10k IDX files) from ../shared/data/mnist, resized to
     --image-size (16 by default, so that DDPM-1000 stays affordable on 2 cores); exits 0 if it is absent;
  2. trains the digit classifier of evaluate.py on that split (features of "classifier FID");
  3. trains a small U-Net (configs/mnist.yaml with the overrides below) with `python train.py` (a subprocess);
  4. draws --num-samples samples with each sampler (ddpm:1000, ddim:10/20/50/100 with eta=0, ddim:50 with
     eta=1, dpmpp2m:10/20; one batch size) for each of --sample-seeds and scores them with `python
     evaluate.py` (FID, k-NN precision/recall, classifier IS) against all 10,000 images of the split the
     model was trained on. DDPM-1000 costs 50x the network evaluations of DDIM-20 (~5 min per seed for
     500); with --ddpm-samples below --num-samples it draws only that many, and every sampler is also scored
     on its first that many samples (the same starting noise), the column DDPM is compared in. (At N=250
     the FID's own noise, ±4 between draws of real images, is as large as the DDIM/DDPM gap being
     measured: hence N=500 for DDPM too.) The metric's floor at each N is the row "real images": N real
     digits from that split scored the same way. FIDs are means over the seeds: one seed's FID at N=500
     moved by up to 8 points between seeds, more than most sampler differences;
  5. with --distill N0:N:M, first distils the model with `python distill.py` (N0 -> N steps in halving rounds of
     M optimizer steps) and adds two rows per round: the student, and the teacher's DDIM at the student's step
     count on the same ("trailing") grid, the no-distillation baseline;
  6. writes a markdown table between <!-- quality:start --> and <!-- quality:end --> in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import evaluation.features as feat
import evaluation.scoring as scoring
from bench.quality_report import (  # noqa: F401
    END,
    RESULTS,
    START,
    commit,
    machine,
    mean_sd,
    render,
    table_rows,
    targets,
    write_section,
)
from config import DataConfig, load_config
from storage.paths import CLASSIFIERS, FID_REFS, RunPaths, eval_records_file

REPO = Path(__file__).resolve().parents[1]

MNIST = REPO.parent / "shared" / "data" / "mnist"
SAMPLERS = "ddpm:1000,ddim:10,ddim:20,ddim:50,ddim:100,ddim:50:1,dpmpp2m:10,dpmpp2m:20"  # sampler:steps[:eta]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=str(MNIST), help="folder with t10k-images-idx3-ubyte(.gz) and labels")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--channels", type=int, default=32, help="U-Net base width")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="more training config overrides (e.g. diffusion.objective=eps)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per sampler")
    p.add_argument("--ddpm-samples", type=int, default=500, help="samples for DDPM-1000; if fewer than "
                   "--num-samples, every sampler is also scored on its first that many samples")
    p.add_argument("--samplers", default=SAMPLERS, help="comma-separated sampler:steps or ddim:steps:eta")
    p.add_argument("--sample-batch-size", type=int, default=250)
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0, help="training and classifier seed")
    p.add_argument("--sample-seeds", default="0,1,2", help="comma-separated sampling seeds: every FID is the "
                   "mean over them (at N=500 one seed's FID swings by several points)")
    p.add_argument("--tag", default="", help="suffix of the run name (for comparing training settings)")
    p.add_argument("--skip-train", action="store_true", help="reuse checkpoints/<run>/last.pt if it exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--distill", metavar="N0:N:M", help="also distil the trained model (python distill.py "
                   "--start-steps N0 --steps N --round-steps M) and add a row per round's student, plus the "
                   "teacher's DDIM on the students' grid at each student's step count")
    p.add_argument("--distill-set", nargs="*", default=[], metavar="key=value",
                   help="distill.py train.* overrides (e.g. train.lr=2e-4)")
    p.add_argument("--section", default="quality", help="the RESULTS.md section written: between "
                   "<!-- SECTION:start --> and <!-- SECTION:end --> (another name keeps the quality table)")
    p.add_argument("--no-write", action="store_true", help="print the table only, leave RESULTS.md alone")
    return p.parse_args(argv)


def train_overrides(args) -> list[str]:
    """configs/mnist.yaml shrunk to CPU minutes: 3 levels (16 -> 8 -> 4 px), one res block each, attention
    only in the middle block, v-prediction on the cosine schedule with min-SNR weighting and EMA 0.999 (the
    winners of the comparisons in RESULTS.md)."""
    return [f"run_name=bench_quality{'_' + args.tag if args.tag else ''}", f"seed={args.seed}", "device=cpu",
            f"data.root={args.data}", "data.split=test", f"data.image_size={args.image_size}",
            "data.num_workers=0", f"model.channels={args.channels}", "model.channel_mult=[1,2,2]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.dropout=0.0",
            "diffusion.schedule=cosine", "diffusion.objective=v", "diffusion.loss_weighting=min_snr",
            f"train.batch_size={args.batch_size}",
            f"train.max_steps={args.train_steps}",
            "train.warmup_steps=100", "train.lr=0.001", "train.lr_schedule=cosine", "train.ema_decay=0.999",
            "train.amp=bf16", "train.log_every=100", f"train.sample_every={args.train_steps}",
            f"train.ckpt_every={args.train_steps}", "train.sample_steps=20", "train.num_sample_images=64",
            *args.set]


def run_train(args) -> float | None:
    """`python train.py` on configs/mnist.yaml with train_overrides (a subprocess: scripts never import
    scripts); its wall seconds (including the ~3 s of starting Python and torch), or None if it failed."""
    argv = ["--config", str(REPO / "configs" / "mnist.yaml"), "--overwrite", *train_overrides(args)]
    print("python train.py " + " ".join(argv), flush=True)
    start = time.perf_counter()
    if subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO).returncode != 0:
        print("train.py failed: see its output above", file=sys.stderr)
        return None
    return time.perf_counter() - start


def run_distill(args, teacher: Path) -> dict | None:
    """`python distill.py` on the trained model (a subprocess): {"command", "wall_s", "rounds": [(steps,
    seconds), ...], "students": {steps: path}}, saved beside the students so that --skip-train reuses them;
    None if it failed."""
    n0, n, m = (int(part) for part in args.distill.split(":"))
    folder = teacher.parent.with_name(teacher.parent.name + "_distill")
    timing = folder / "bench_distill_time.json"
    argv = ["--teacher", str(teacher), "--start-steps", str(n0), "--steps", str(n),
            "--round-steps", str(m), "--overwrite", *args.distill_set]
    command = "python distill.py " + " ".join(argv)
    if not (args.skip_train and timing.is_file() and json.loads(timing.read_text())["command"] == command):
        print(command, flush=True)
        start = time.time()
        if subprocess.run([sys.executable, str(REPO / "distill.py"), *argv], cwd=REPO).returncode != 0:
            print("distill.py failed: see its output above", file=sys.stderr)
            return None
        steps = sorted((int(p.stem.split("_")[1]) for p in folder.glob("steps_*.pt")), reverse=True)
        ends = [start] + [(folder / f"steps_{k:04d}.pt").stat().st_mtime for k in steps]
        rounds = [(k, ends[i + 1] - ends[i]) for i, k in enumerate(steps)]  # a round ends with its student file
        timing.write_text(json.dumps({"command": command, "wall_s": time.time() - start, "rounds": rounds}))
    record = json.loads(timing.read_text())
    record["students"] = {k: folder / f"steps_{k:04d}.pt" for k, _ in record["rounds"]}
    return record


def run_evaluate(ckpt: Path, sampler: str, steps: int, eta: float, seed: int, args, common: list[str],
                 spacing: str | None = None) -> dict:
    """One `python evaluate.py` run (a subprocess); returns its JSON record. DDPM draws only ddpm_samples;
    the others are also scored on their first ddpm_samples samples."""
    run_name = f"bench_quality{'_' + args.tag if args.tag else ''}"
    n_ddpm = min(args.ddpm_samples, args.num_samples)
    n = n_ddpm if sampler == "ddpm" else args.num_samples
    also = ["--also-at", str(n_ddpm)] if n > n_ddpm else []
    argv = ["--checkpoint", str(ckpt), "--num-samples", str(n), *also, "--sampler", sampler,
            "--steps", str(steps), *(["--eta", str(eta)] if sampler == "ddim" else []), "--seed", str(seed),
            *(["--timestep-spacing", spacing] if spacing else []),
            "--batch-size", str(args.sample_batch_size), "--run-name", run_name, *common]
    print("python evaluate.py " + " ".join(argv), flush=True)
    if subprocess.run([sys.executable, str(REPO / "evaluate.py"), *argv], cwd=REPO).returncode != 0:
        raise SystemExit(f"evaluate.py failed for {sampler}:{steps}")
    lines = (REPO / eval_records_file(run_name)).read_text().splitlines()
    return json.loads(lines[-1])


def real_floors(args, data_cfg: DataConfig, dirs: dict, seeds: list[int]) -> dict:
    """Metrics of N random real images of the reference split (one draw per seed), for each N used: what a
    perfect model would score. {N: {metric: [value per seed]}}"""
    extractor = feat.ClassifierFeatures(feat.classifier_path("mnist", args.image_size, dirs["classifier"]),
                                        torch.device("cpu"))
    ref = scoring.reference_stats(data_cfg, "test", extractor, None, dirs["ref"])
    sizes = sorted({args.num_samples, min(args.ddpm_samples, args.num_samples)})
    floors = {n: {} for n in sizes}
    split = feat.split_dataset(data_cfg, "test")  # read once; each seed draws its own subset of it
    for seed in seeds:
        images, _ = feat.load_split_uint8(data_cfg, "test", limit=args.num_samples, seed=seed + 123, dataset=split)
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
        for n in sizes:
            for key, value in scoring.score_images(images[:n], ref, extractor, seed=seed).items():
                floors[n].setdefault(key, []).append(value)
    return floors


def score_all(args, ckpt: Path, common: list[str], distilled: dict | None) -> list[list[dict]]:
    """Every row's records, one per sampling seed: the samplers of --samplers, then with --distill the teacher's
    DDIM on the students' (trailing) grid at each student's step count and each round's student."""
    seeds = [int(seed) for seed in args.sample_seeds.split(",")]
    groups = []
    for item in args.samplers.split(","):
        sampler, steps, *eta = item.split(":")
        eta = float(eta[0]) if eta else 0.0
        groups.append([run_evaluate(ckpt, sampler, int(steps), eta, seed, args, common) for seed in seeds])
    for steps, student in sorted((distilled or {}).get("students", {}).items(), key=lambda kv: -int(kv[0])):
        groups.append([run_evaluate(ckpt, "ddim", int(steps), 0.0, seed, args, common, spacing="trailing")
                       for seed in seeds])
        groups.append([run_evaluate(student, "ddim", int(steps), 0.0, seed, args, common) for seed in seeds])
    return groups


def trained_model(args, ckpt: Path) -> float | None:
    """Train unless --skip-train finds the checkpoint; the training's wall seconds (nan if unknown), None if it
    failed. The time is kept beside the checkpoint so that --skip-train still reports it."""
    timing = ckpt.parent / "bench_train_time.json"
    if not (args.skip_train and ckpt.is_file()):
        train_s = run_train(args)
        if train_s is None:
            return None
        timing.write_text(json.dumps({"train_s": train_s, "load": os.getloadavg()[0]}))
    return json.loads(timing.read_text())["train_s"] if timing.is_file() else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not any((data / f).is_file() for f in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")):
        print(f"MNIST test split not found in '{data}' (t10k-images-idx3-ubyte.gz): nothing to benchmark.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)  # checkpoints/, results/ and data/ caches of the repository
    load_start, wall_start = os.getloadavg()[0], time.perf_counter()
    cfg = load_config(REPO / "configs" / "mnist.yaml", train_overrides(args))
    # The bench classifier (trained on the training images, for a fixed number of steps) has its own folder.
    held = f"_minus{cfg.data.holdout}" if cfg.data.holdout else ""
    dirs = {"classifier": CLASSIFIERS / f"bench_{args.classifier_steps}steps{held}", "ref": FID_REFS}
    classifier_file = feat.cached_classifier(cfg.data, "test", dirs["classifier"], args.classifier_steps, args.seed)
    classifier = feat.load_classifier(classifier_file)[1]
    print(f"classifier accuracy {classifier['accuracy']:.4f} on {classifier['accuracy_on']}", flush=True)
    ckpt = RunPaths(cfg.run_name).checkpoints / "last.pt"
    train_s = trained_model(args, ckpt)
    distilled = run_distill(args, ckpt) if args.distill and train_s is not None else None
    if train_s is None or (args.distill and distilled is None):
        return 1
    common = ["--features", "classifier", "--classifier-dir", str(dirs["classifier"]), "--ref-dir", str(dirs["ref"]),
              "--device", "cpu", "--quiet"]
    groups = score_all(args, ckpt, common, distilled)
    floors = real_floors(args, cfg.data, dirs, [int(seed) for seed in args.sample_seeds.split(",")])
    from model import build_model, count_parameters
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "commit": commit(),
            "load": (load_start, os.getloadavg()[0]), "command": "python -m bench.quality " + " ".join(sys.argv[1:]),
            "params": count_parameters(build_model(cfg)), "train_s": train_s, "classifier": classifier,
            "overrides": " ".join(train_overrides(args)[1:]), "distill": distilled,
            "num_ref": groups[0][0]["reference"]["num_images"], "total_min": (time.perf_counter() - wall_start) / 60}
    if args.distill:
        info["title"] = "Progressive distillation: students vs their teacher (MNIST, CPU)"
    section = render(args, groups, floors, info)
    print(section)
    if not args.no_write:
        write_section(section, name=args.section)
        print(f"wrote the {args.section} section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
