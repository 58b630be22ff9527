"""Best samples per hour (issue #18): FID against wall time at fixed step budgets, ddpm-lab vs two peers.

    python -m bench.budget                                   # budgets 1000,4000 (hours on 2 cores)
    python -m bench.budget --time-only                       # seconds per step / per image; projects the full run
    python -m bench.budget --budgets 1000 --recipes ddpm-lab,ddpm-lab-old,lucidrains   # only these rows
    python -m bench.budget --budgets 3 --num-samples 16 --threads 1 --classifier-steps 20 --work /tmp/b --no-write

Resumable row by row: each finished (recipe, budget) row is appended to --rows (a JSONL file, kept in the repo
so that a later sitting continues), and a rerun with the same settings skips the rows already there. The
table and the plot are rebuilt from every row of the file with this run's settings.

On the MNIST test split (10,000 real digits, 28x28, t10k IDX files from --data), each recipe trains for each
budget of --budgets steps of --batch-size images with --threads CPU threads, then draws --num-samples samples
with its own DDIM-50 on its own EMA weights, saved as PNGs and scored by `python evaluate.py --samples`
(classifier-feature FID, k-NN precision/recall) against all 10,000 images it trained on:
  - ddpm-lab-old: the same, on bench/mnist_old.yaml, a frozen copy of configs/mnist.yaml as it was before the
    run-length-aware recipe (issue #25), so that "today's preset" stays measurable after the defaults change;
  - ddpm-lab: `python train.py --config configs/mnist.yaml train.max_steps=N train.batch_size=64` as a user runs
    it (plus the data location, the thread count, and no periodic sample grids: num_sample_images=0, so that
    the wall time is training only), sampled with `python sample.py --sampler ddim --steps 50`;
  - lucidrains (denoising-diffusion-pytorch) and diffusers (train_unconditional's recipe): their own networks,
    losses, optimizers, schedules, EMAs and DDIM samplers on the same tensors, in this process
    (bench/budget_peers.py says what each recipe is and what 28x28 forced).
Wall time = training only (its own clock; for ddpm-lab the train.py subprocess, ~3 s of Python start-up
included); sampling time is reported apart. The table and bench/budget_fid_vs_time.png go between
<!-- budget:start --> and <!-- budget:end --> of bench/RESULTS.md (--results).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.budget_peers import PEERS, Batches
from bench.quality_report import RESULTS, commit, machine, write_section
from config import DataConfig, load_config
from evaluation.features import classifier_path, load_split_uint8

REPO = Path(__file__).resolve().parents[1]

CANDIDATES = [REPO.parent / "shared" / "data" / "mnist", REPO.parents[1] / "shared" / "data" / "mnist"]
MNIST = next((p for p in CANDIDATES if p.is_dir()), CANDIDATES[0])
RECIPES = ("ddpm-lab", "ddpm-lab-old", "lucidrains", "diffusers")
PRESETS = {"ddpm-lab": REPO / "configs" / "mnist.yaml", "ddpm-lab-old": REPO / "bench" / "mnist_old.yaml"}
PRESET = PRESETS["ddpm-lab"]
ROWS = REPO / "bench" / "budget_rows.jsonl"
# What makes two rows comparable: a row is reused only when all of these match this run's arguments.
SETTINGS = ("batch_size", "threads", "num_samples", "seed", "classifier_steps")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=str(MNIST), help="folder with t10k-images-idx3-ubyte(.gz) and labels")
    p.add_argument("--budgets", default="1000,4000", help="comma-separated training steps")
    p.add_argument("--recipes", default="ddpm-lab,ddpm-lab-old,lucidrains",
                   help="comma-separated subset of " + ", ".join(RECIPES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of every recipe")
    p.add_argument("--num-samples", type=int, default=1000, help="samples scored per run (FID at this N)")
    p.add_argument("--sample-batch-size", type=int, default=100)
    p.add_argument("--classifier-steps", type=int, default=2000, help="steps of evaluate.py train-classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(REPO), help="working folder: checkpoints/, results/, data/ caches")
    p.add_argument("--rows", default=str(ROWS), help="JSONL file of finished rows: appended to, and rows already "
                   "there (same recipe, budget and settings) are skipped")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file whose budget section is written")
    p.add_argument("--no-write", action="store_true", help="print the table only, leave --results alone")
    p.add_argument("--time-only", action="store_true", help="measure seconds per training step and per DDIM-50 "
                   "image of each recipe (1 thread) and print the projected wall time of the full benchmark")
    p.add_argument("--timing-steps", type=int, default=10, help="--time-only: timed steps (after 2 warm-up)")
    return p.parse_args(argv)


def budgets_and_recipes(args) -> tuple[list[int], list[str]]:
    budgets = [int(b) for b in args.budgets.split(",")]
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not budgets or min(budgets) < 1:
        raise SystemExit(f"error: --recipes must name some of {', '.join(RECIPES)} and --budgets positive steps")
    return budgets, recipes


def data_config(args) -> DataConfig:
    return DataConfig(dataset="mnist", root=args.data, split="test", image_size=28, random_flip=False,
                      num_workers=0, download=False)


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str], work: Path, threads: int) -> tuple[float, float]:
    """`python <script> ...` in the working folder (scripts never import scripts); its wall and CPU seconds (the
    CPU seconds are what a quiet machine would take at 1 thread: rows measured under other load stay comparable)."""
    print("python " + " ".join(argv), flush=True)
    start, start_cpu = time.perf_counter(), child_cpu_s()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=work, env=env).returncode != 0:
        raise SystemExit(f"error: {argv[0]} failed (its output is above)")
    return time.perf_counter() - start, child_cpu_s() - start_cpu


# ----------------------------------------------------------------------------- the recipes
def ddpm_lab_overrides(args, steps: int, name: str = "ddpm-lab") -> list[str]:
    return [f"run_name=bench_budget_{name}_{steps}", f"train.max_steps={steps}",
            f"train.batch_size={args.batch_size}",
            f"seed={args.seed}", "device=cpu", f"data.root={args.data}", "data.split=test", "data.download=false",
            f"train.cpu_threads={args.threads}", "train.num_sample_images=0"]


def train_ddpm_lab(args, steps: int, work: Path, out: Path, name: str = "ddpm-lab") -> dict:
    """train.py on the recipe's preset, then sample.py DDIM-50 (the checkpoint's own eta) into `out`."""
    overrides = ddpm_lab_overrides(args, steps, name)
    train_s, train_cpu_s = run(["train.py", "--config", str(PRESETS[name]), "--overwrite", *overrides], work,
                               args.threads)
    ckpt = work / "checkpoints" / f"bench_budget_{name}_{steps}" / "last.pt"
    sample_s, _ = run(["sample.py", "--checkpoint", str(ckpt), "--sampler", "ddim", "--steps", "50",
                    "--num-samples", str(args.num_samples), "--batch-size", str(args.sample_batch_size),
                    "--seed", str(args.seed), "--device", "cpu", "--out", str(out), "--overwrite"], work, args.threads)
    from model import build_model, count_parameters
    params = count_parameters(build_model(load_config(PRESETS[name], overrides)))
    return {"train_s": train_s, "train_cpu_s": train_cpu_s, "sample_s": sample_s, "params": params}


def train_peer(name: str, args, steps: int, images: torch.Tensor, out: Path) -> dict:
    """The peer's recipe for `steps` steps on `images` (uint8), then its DDIM-50 samples saved as PNGs."""
    torch.set_num_threads(args.threads)
    recipe, batches = PEERS[name](steps, seed=args.seed), Batches(images, args.batch_size, seed=args.seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        recipe.step(batches.next())
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    start = time.perf_counter()
    samples = recipe.sample(args.num_samples, args.sample_batch_size, args.seed)
    sample_s = time.perf_counter() - start
    save_pngs(samples, out)
    return {"train_s": train_s, "train_cpu_s": train_cpu_s, "sample_s": sample_s, "params": recipe.params}


def save_pngs(images: torch.Tensor, out: Path) -> None:
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images[:, 0].numpy()):
        Image.fromarray(image, mode="L").save(out / f"{i:06d}.png")


def score(args, folder: Path, run_name: str, work: Path, common: list[str]) -> dict:
    """`python evaluate.py --samples folder`: its metrics (FID, precision, recall, ...)."""
    run(["evaluate.py", "--samples", str(folder), "--run-name", run_name, "--num-samples", str(args.num_samples),
         *common], work, args.threads)
    lines = (work / "results" / "eval" / f"{run_name}.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["metrics"]


def ensure_classifier(args, work: Path) -> Path:
    folder = work / "data" / "classifiers" / f"bench_budget_{args.classifier_steps}steps"
    if not classifier_path("mnist", 28, folder).is_file():
        run(["evaluate.py", "train-classifier", "--dataset", "mnist", "--root", args.data, "--split", "test",
             "--image-size", "28", "--steps", str(args.classifier_steps), "--seed", str(args.seed),
             "--device", "cpu", "--no-download", "--classifier-dir", str(folder)], work, args.threads)
    return folder


# ----------------------------------------------------------------------------- --time-only
class DdpmLabSteps:
    """ddpm-lab's training step and DDIM-50 on the preset, in this process through the library (the same
    pieces the Trainer runs: loss under the preset's autocast, clipping, fused AdamW, EMA), for --time-only."""
    name = "ddpm-lab"

    def __init__(self, args, steps: int):
        from diffusion import build_diffusion
        from model import build_model, count_parameters
        from training.ema import EMA
        from training.parts import build_optimizer
        from utils import resolve_amp
        self.cfg = load_config(PRESET, ddpm_lab_overrides(args, steps))
        torch.manual_seed(args.seed)
        self.model, self.diffusion = build_model(self.cfg), build_diffusion(self.cfg)
        self.opt, self.ema = build_optimizer(self.model, self.cfg.train), EMA(self.model, self.cfg.train.ema_decay)
        self.amp, self.params = resolve_amp(self.cfg.train.amp, torch.device("cpu")), count_parameters(self.model)

    def step(self, x: torch.Tensor) -> float:
        from utils import autocast
        self.model.train()
        with autocast(torch.device("cpu"), self.amp):
            loss = self.diffusion.training_losses(self.model, x.float() / 127.5 - 1, None)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return loss.item()

    def sample(self, n: int, batch_size: int, seed: int) -> torch.Tensor:
        from sampling.generation import generate
        from sampling.pictures import to_uint8_images
        x = generate(self.ema.model, self.diffusion, self.cfg, n, batch_size, seed, sampler="ddim", steps=50,
                     amp=self.amp, progress=False)
        return to_uint8_images(x)


def time_recipe(name: str, args, images: torch.Tensor, steps: int) -> dict:
    """Median seconds per training step (after 2 warm-up steps) and seconds per DDIM-50 image (one batch of 20),
    as wall time and as this process's CPU time: at 1 thread the CPU time is what the step costs on a quiet
    core, nearly immune to other jobs on the machine (the wall time is not)."""
    recipe = DdpmLabSteps(args, steps) if name == "ddpm-lab" else PEERS[name](steps, seed=args.seed)
    batches, wall, cpu = Batches(images, args.batch_size, seed=args.seed), [], []
    for i in range(2 + args.timing_steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        recipe.step(batches.next())
        if i >= 2:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    n = min(args.sample_batch_size, 20)
    start, start_cpu = time.perf_counter(), time.process_time()
    recipe.sample(n, n, args.seed)
    return {"recipe": name, "step_s": statistics.median(wall), "step_cpu_s": statistics.median(cpu),
            "image_s": (time.perf_counter() - start) / n, "image_cpu_s": (time.process_time() - start_cpu) / n,
            "params": recipe.params}


def time_only(args, images: torch.Tensor, budgets: list[int], recipes: list[str]) -> list[dict]:
    """Print per-recipe costs at 1 thread and the projected time of the full benchmark (from CPU seconds,
    i.e. on a quiet core, and from the wall seconds measured now)."""
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = [time_recipe(name, args, images, max(budgets)) for name in recipes]
    print(f"\nbatch {args.batch_size}, 1 thread, load average {load:.2f} -> {os.getloadavg()[0]:.2f}; projection "
          f"for budgets {budgets} and {args.num_samples} samples per run (CPU time | wall time now):")
    total = {"cpu": 0.0, "wall": 0.0}
    for r in rows:
        hours = {}
        for kind, step, image in (("cpu", r["step_cpu_s"], r["image_cpu_s"]), ("wall", r["step_s"], r["image_s"])):
            hours[kind] = (sum(budgets) * step / 3600, len(budgets) * args.num_samples * image / 3600)
            total[kind] += sum(hours[kind])
        print(f"  {r['recipe']:<11} {r['params'] / 1e6:5.2f} M params  step {r['step_cpu_s']:.2f} | {r['step_s']:.2f} s"
              f"  DDIM-50 image {r['image_cpu_s']:.2f} | {r['image_s']:.2f} s  -> train {hours['cpu'][0]:.1f} | "
              f"{hours['wall'][0]:.1f} h, sample {hours['cpu'][1]:.1f} | {hours['wall'][1]:.1f} h")
    print(f"  total {total['cpu']:.1f} h (CPU time, 1 quiet core) | {total['wall']:.1f} h (wall time now), plus "
          f"the classifier and scoring (minutes)")
    return rows


# ----------------------------------------------------------------------------- report
def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["train_s"])
        ax.plot([r["train_s"] / 60 for r in mine], [r["fid"] for r in mine], "o-", label=name)
        for r in mine:
            ax.annotate(str(r["steps"]), (r["train_s"] / 60, r["fid"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="training wall time (min)", ylabel="FID (classifier features)",
           title="MNIST: FID vs training time (labels: steps)")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def render(rows: list[dict], info: dict, image: str) -> str:
    lines = ["<!-- budget:start -->", "## Best samples per hour (issue #18)", "",
             f"Table built {info['date']}, commit {info['commit']}, {info['machine']}, from the rows of "
             f"{info['rows']} (each row: its own date, commit and load average at start / end); last command "
             f"`{info['command']}`. Batch {info['batch']}, "
             f"{info['threads']} thread(s); FID of N={info['n']} DDIM-50 EMA samples, classifier features, against "
             f"the {info['num_ref']} MNIST test images trained on. Wall time: training only.", "",
             "| recipe | steps | params | train wall (min) | train CPU (min) | sampling (s / 100 images) | FID "
             "| precision | recall | measured | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        load = "{:.1f} / {:.1f}".format(*r["load"]) if "load" in r else ""
        lines.append(f"| {r['recipe']} | {r['steps']} | {r['params'] / 1e6:.2f} M | {r['train_s'] / 60:.1f} | "
                     f"{r.get('train_cpu_s', float('nan')) / 60:.1f} | {100 * r['sample_s'] / info['n']:.1f} | "
                     f"{r['fid']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r.get('date', '')} {r.get('commit', '')} | {load} |")
    lines += ["", f"![FID vs training wall time]({image})", "<!-- budget:end -->"]
    return "\n".join(lines)


def settings(args) -> dict:
    return {key: getattr(args, key) for key in SETTINGS}


def read_rows(path: Path, args) -> list[dict]:
    """The finished rows of the JSONL file that were measured with this run's settings (others are kept in the
    file but left out of this table)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("settings") == settings(args)]


def append_row(path: Path, row: dict) -> None:
    """One JSON line per finished row, flushed at once: a run stopped midway keeps every row it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_all(args, budgets: list[int], recipes: list[str], images: torch.Tensor, work: Path) -> list[dict]:
    """Train, sample and score every (recipe, budget) not yet in --rows; returns all rows of these settings."""
    rows_file = Path(args.rows)
    done = {(r["recipe"], r["steps"]) for r in read_rows(rows_file, args)}
    todo = [(steps, name) for steps in budgets for name in recipes if (name, steps) not in done]
    print(f"{len(done)} row(s) with these settings already in {rows_file}; {len(todo)} to run", flush=True)
    classifiers = ensure_classifier(args, work) if todo else None
    common = ["--dataset", "mnist", "--root", args.data, "--split", "test", "--image-size", "28", "--features",
              "classifier", "--classifier-dir", str(classifiers), "--ref-dir", str(work / "data" / "fid_refs"),
              "--results-dir", str(work / "results" / "eval"), "--device", "cpu", "--quiet",
              "--batch-size", str(args.sample_batch_size), "--seed", str(args.seed)]
    for steps, name in todo:
        out = work / "results" / "images" / "bench_budget" / f"{name}_{steps}"
        load = os.getloadavg()[0]
        row = (train_ddpm_lab(args, steps, work, out, name) if name in PRESETS
               else train_peer(name, args, steps, images, out))
        metrics = score(args, out, f"bench_budget_{name}_{steps}", work, common)
        scores = {k: metrics[k] for k in ("fid", "precision", "recall")}
        append_row(rows_file, {"recipe": name, "steps": steps, **row, **scores, "settings": settings(args),
                               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit(),
                               "load": [load, os.getloadavg()[0]]})
        print(f"{name} {steps} steps: train {row['train_s']:.0f} s, FID {metrics['fid']:.2f}", flush=True)
    order = {name: i for i, name in enumerate(RECIPES)}
    return sorted(read_rows(rows_file, args), key=lambda r: (r["steps"], order.get(r["recipe"], 99)))


def main(argv=None) -> int:
    args = parse_args(argv)
    budgets, recipes = budgets_and_recipes(args)
    if not any((Path(args.data) / f).is_file() for f in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")):
        print(f"MNIST test split not found in '{args.data}' (t10k-images-idx3-ubyte.gz): nothing to benchmark.")
        return 0
    images, _ = load_split_uint8(data_config(args), "test")      # (10000, 1, 28, 28) uint8, read once
    if args.time_only:
        time_only(args, images, budgets, recipes)
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    command = "python -m bench.budget " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = run_all(args, budgets, recipes, images, work)
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit(), "machine": machine(),
            "load": (load_start, os.getloadavg()[0]), "command": command, "batch": args.batch_size,
            "threads": args.threads, "n": args.num_samples, "num_ref": len(images), "rows": args.rows}
    results = Path(args.results)
    image = results.parent / "budget_fid_vs_time.png"
    section = render(rows, info, image.name)
    print(section)
    if not args.no_write:
        plot(rows, image)
        write_section(section, path=results, name="budget")
        print(f"wrote the budget section of {results} and {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
