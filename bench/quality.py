"""Sample quality vs sampler and step count, on real MNIST digits, on a CPU.

    python bench/quality.py                        # train (~50 min), sample with every sampler (~25 min), write
                                                   # bench/RESULTS.md
    python bench/quality.py --num-samples 2000 --image-size 28      # more compute, better numbers
    python bench/quality.py --samplers ddim:50,dpmpp2m:20 --set diffusion.objective=eps --tag eps --no-write
    python bench/quality.py --skip-train           # re-score the last trained model (e.g. after a sampler change)

What it does (every size is a flag):
  1. reads the MNIST test split (10,000 real digits, t10k IDX files) from ../shared/data/mnist, resized to
     --image-size (16 by default, so that DDPM-1000 stays affordable on 2 cores); exits 0 if it is absent;
  2. trains the digit classifier of evaluate.py on that split (features of "classifier FID");
  3. trains a small U-Net (configs/mnist.yaml with the overrides below) through train.train(cfg);
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
  5. writes a markdown table between <!-- quality:start --> and <!-- quality:end --> in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import evaluate as ev  # noqa: E402
import features as feat  # noqa: E402
from config import DataConfig, load_config  # noqa: E402
from utils import save_checkpoint  # noqa: E402

MNIST = REPO.parent / "shared" / "data" / "mnist"
RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
SAMPLERS = "ddpm:1000,ddim:10,ddim:20,ddim:50,ddim:100,ddim:50:1,dpmpp2m:10,dpmpp2m:20"  # sampler:steps[:eta]
NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


def ensure_classifier(args, data_cfg: DataConfig, folder: Path) -> dict:
    path = feat.classifier_path("mnist", args.image_size, folder)
    if not path.is_file():
        ckpt = feat.train_classifier(data_cfg, "test", steps=args.classifier_steps, seed=args.seed, device="cpu")
        save_checkpoint(ckpt, path)
    return feat.load_classifier(path)[1]


def run_evaluate(ckpt: Path, sampler: str, steps: int, eta: float, seed: int, args, common: list[str]) -> dict:
    """One `python evaluate.py` run (in-process); returns its JSON record. DDPM draws only ddpm_samples;
    the others are also scored on their first ddpm_samples samples."""
    run_name = f"bench_quality{'_' + args.tag if args.tag else ''}"
    n_ddpm = min(args.ddpm_samples, args.num_samples)
    n = n_ddpm if sampler == "ddpm" else args.num_samples
    also = ["--also-at", str(n_ddpm)] if n > n_ddpm else []
    argv = ["--checkpoint", str(ckpt), "--num-samples", str(n), *also, "--sampler", sampler,
            "--steps", str(steps), *(["--eta", str(eta)] if sampler == "ddim" else []), "--seed", str(seed),
            "--batch-size", str(args.sample_batch_size), "--run-name", run_name, *common]
    print("python evaluate.py " + " ".join(argv), flush=True)
    if ev.main(argv) != 0:
        raise SystemExit(f"evaluate.py failed for {sampler}:{steps}")
    lines = (REPO / "results" / "eval" / f"{run_name}.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def real_floors(args, data_cfg: DataConfig, dirs: dict, seeds: list[int]) -> dict:
    """Metrics of N random real images of the reference split (one draw per seed), for each N used: what a
    perfect model would score. {N: {metric: [value per seed]}}"""
    extractor = feat.ClassifierFeatures(feat.classifier_path("mnist", args.image_size, dirs["classifier"]),
                                        torch.device("cpu"))
    ref = ev.reference_stats(data_cfg, "test", extractor, None, dirs["ref"])
    sizes = sorted({args.num_samples, min(args.ddpm_samples, args.num_samples)})
    floors = {n: {} for n in sizes}
    split = feat.split_dataset(data_cfg, "test")  # read once; each seed draws its own subset of it
    for seed in seeds:
        images, _ = feat.load_split_uint8(data_cfg, "test", limit=args.num_samples, seed=seed + 123, dataset=split)
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
        for n in sizes:
            for key, value in ev.score_images(images[:n], ref, extractor, seed=seed).items():
                floors[n].setdefault(key, []).append(value)
    return floors


def mean_sd(values: list) -> str:
    """'12.34 ± 0.56' (sample sd over seeds), or the single value."""
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores ({model}), torch {torch.__version__} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fid_at(record: dict, n: int):
    """FID of a record's first n samples (None if it has fewer)."""
    m = record["metrics"]
    if record["num_samples"] == n:
        return m["fid"]
    return m.get("at_n", {}).get(str(n), {}).get("fid")


def table_rows(groups: list[list[dict]], floors: dict, n_all: int, n_ddpm: int) -> list[str]:
    """One row per sampler: FIDs as mean ± sd over the sampling seeds, the other metrics as means."""
    small = n_ddpm < n_all
    head = f"| sampler | steps (NFE) | FID ↓ (N={n_all}) |" + (f" FID ↓ (N={n_ddpm}) |" if small else "")
    rows = [head + " precision ↑ | recall ↑ | classifier IS ↑ | sampling wall time (per seed) |",
            "| --- | ---: | ---: |" + (" ---: |" if small else "") + " ---: | ---: | ---: | ---: |"]
    for group in groups:
        r, n = group[0], group[0]["num_samples"]
        mean = {key: statistics.fmean(g["metrics"][key] for g in group) for key in ("precision", "recall", "is")}
        full = mean_sd([g["metrics"]["fid"] for g in group]) if n == n_all else "–"
        mark = f" (N={n})" if n != n_all else ""
        wall = statistics.fmean(g["sampling_wall_s"] for g in group)
        name = NAMES.get(r["sampler"], r["sampler"])
        name += f" (eta={r.get('eta', 0.0):g})" if r["sampler"] == "ddim" else ""
        rows.append(f"| {name} | {r['steps'] or 1000} | {full} |"
                    + (f" {mean_sd([fid_at(g, n_ddpm) for g in group])} |" if small else "")
                    + f" {mean['precision']:.3f}{mark} | {mean['recall']:.3f}{mark} | {mean['is']:.2f}{mark} | "
                    f"{wall:.0f} s for {n} |")
    fl = {key: statistics.fmean(v) for key, v in floors[n_all].items() if key in ("precision", "recall", "is")}
    rows.append(f"| real MNIST test images (the metric's floor) | – | {mean_sd(floors[n_all]['fid'])} |"
                + (f" {mean_sd(floors[n_ddpm]['fid'])} |" if small else "")
                + f" {fl['precision']:.3f} | {fl['recall']:.3f} | {fl['is']:.2f} | – |")
    return rows


def render(args, groups: list[list[dict]], floors: dict, info: dict) -> str:
    """The markdown section: setup, table, whether the speed/quality targets hold."""
    n_all, n_ddpm = args.num_samples, min(args.ddpm_samples, args.num_samples)
    small = n_ddpm < n_all
    rows = table_rows(groups, floors, n_all, n_ddpm)
    ddpm_note = (f" DDPM-1000 (1000 network evaluations per sample) draws only its first {n_ddpm} samples to "
                 f"stay affordable; every other sampler is also scored on its first {n_ddpm} samples (same "
                 f"seed, so the same starting noise), and DDPM is compared in that column only."
                 if small else "")
    lines = [START, "## Sample quality vs sampler (MNIST test split, CPU)", "",
             f"- date: {info['date']}; machine: {info['machine']}; commit `{info['commit']}`",
             f"- load average (1 min) at start / end: {info['load'][0]:.1f} / {info['load'][1]:.1f}"
             + (" — the machine was shared, wall times are inflated" if max(info['load']) > 2.5 else ""),
             f"- command: `{info['command']}` ({info['total_min']:.0f} min in all)",
             f"- model: configs/mnist.yaml with `{' '.join(train_overrides(args)[1:])}`; "
             f"{info['params'] / 1e6:.2f}M parameters; {args.train_steps} steps, batch {args.batch_size} "
             f"({info['train_s'] / 60:.1f} min of training"
             + (", done by an earlier run of this command: --skip-train reused its checkpoint)" if args.skip_train
                else ")"),
             f"- scoring: `evaluate.py --features classifier`: the 128-d penultimate features of the digit "
             f"classifier (trained {args.classifier_steps} steps on the same split, accuracy "
             f"{info['classifier']['accuracy']:.3f} on {info['classifier']['accuracy_on']}); reference = all "
             f"{info['num_ref']} test images at {args.image_size}x{args.image_size}; EMA weights; sampling seeds "
             f"{args.sample_seeds} (FIDs: mean ± sd over them, other metrics: means; the targets compare means), "
             f"samples quantized to uint8; precision/recall with k=3 on N samples vs N reference images. FIDs "
             f"at these N are biased upwards (see the real-image floor) and comparable only at equal N."
             + ddpm_note, "", *rows, ""]
    fids = {}  # (sampler, steps, "all" | "small") -> mean FID over the seeds
    for group in (g for g in groups if not g[0].get("eta")):  # the targets are about deterministic DDIM
        key = (group[0]["sampler"], group[0]["steps"] or 1000)
        for column, n in (("all", n_all), ("small", n_ddpm)):
            values = [fid_at(g, n) for g in group]
            if None not in values:
                fids[(*key, column)] = statistics.fmean(values)
    lines += targets(fids)
    return "\n".join(lines + ["", END])


def targets(fid: dict) -> list[str]:
    """fid[(sampler, steps, "all" | "small")]: FID at N (all) and at the DDPM sample count (small)."""
    out = []
    dpm20, ddim50 = fid.get(("dpmpp2m", 20, "all")), fid.get(("ddim", 50, "all"))
    if dpm20 is not None and ddim50 is not None:
        verdict = "holds" if dpm20 <= ddim50 else "does NOT hold"
        out.append(f"- Target \"DPM-Solver++ at 20 steps no worse than DDIM at 50\": {verdict} "
                   f"(FID {dpm20:.2f} vs {ddim50:.2f}).")
    ddim50, ddpm = fid.get(("ddim", 50, "small")), fid.get(("ddpm", 1000, "small"))
    if ddim50 is not None and ddpm is not None:
        verdict = "holds" if ddim50 <= 1.1 * ddpm else "does NOT hold"
        out.append(f"- Target \"DDIM-50 within 10% of DDPM-1000\": {verdict} (FID {ddim50:.2f} vs {ddpm:.2f}, "
                   f"{100 * (ddim50 / ddpm - 1):+.1f}%).")
    return out


def write_section(section: str, path: Path = RESULTS) -> None:
    """Replace the text between our markers (or append it), leaving every other section untouched."""
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)


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
    # The bench classifier (trained on the test split, for a fixed number of steps) has its own folder.
    dirs = {"classifier": Path(f"data/classifiers/bench_{args.classifier_steps}steps"), "ref": ev.REF_DIR}
    classifier = ensure_classifier(args, cfg.data, dirs["classifier"])
    print(f"classifier accuracy {classifier['accuracy']:.4f} on {classifier['accuracy_on']}", flush=True)
    ckpt = Path("checkpoints") / cfg.run_name / "last.pt"
    timing = ckpt.parent / "bench_train_time.json"  # so that --skip-train still reports the training time
    if not (args.skip_train and ckpt.is_file()):
        from trainer import train
        summary = train(cfg, overwrite=True)
        if summary["exit_code"] != 0:
            return summary["exit_code"]
        timing.write_text(json.dumps({"train_s": summary["wall_time_s"], "load": os.getloadavg()[0]}))
    train_s = json.loads(timing.read_text())["train_s"] if timing.is_file() else float("nan")
    common = ["--features", "classifier", "--classifier-dir", str(dirs["classifier"]), "--ref-dir", str(dirs["ref"]),
              "--device", "cpu", "--quiet"]
    seeds = [int(seed) for seed in args.sample_seeds.split(",")]
    groups = []  # per sampler: one record per sampling seed
    for item in args.samplers.split(","):
        sampler, steps, *eta = item.split(":")
        eta = float(eta[0]) if eta else 0.0
        groups.append([run_evaluate(ckpt, sampler, int(steps), eta, seed, args, common) for seed in seeds])
    floors = real_floors(args, cfg.data, dirs, seeds)
    from model import build_model, count_parameters
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "commit": commit(),
            "load": (load_start, os.getloadavg()[0]), "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
            "params": count_parameters(build_model(cfg)), "train_s": train_s, "classifier": classifier,
            "num_ref": groups[0][0]["reference"]["num_images"], "total_min": (time.perf_counter() - wall_start) / 60}
    section = render(args, groups, floors, info)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote the quality section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
