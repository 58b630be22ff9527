"""Editing quality on real digits the model never trained on (issue #14): inpainting, inversion, SDEdit, on a CPU.

    python -m bench.edit_quality --checkpoint checkpoints/bench_quality_holdout/last.pt --data ../shared/data/mnist
                                                   # ~20 min of one core: write bench/RESULTS.md
    python -m bench.edit_quality --checkpoint CKPT --num 32 --inpaint-rows ddim:50:0:1:1,ddim:50:0:5:5 \\
        --invert-steps 10 --strengths 0.5 --no-write  # a quick look, the table printed only

The checkpoint must have been trained with data.holdout > 0 (config.DataConfig.holdout): those images of its
training split (dataset.build_dataset(held_out=True)) were never trained on. Every size is a flag:
  1. the first --num held-out digits are the inputs; all held-out digits are the FID reference;
  2. a digit classifier (features.train_classifier) trained on the KEPT images only (the training split
     minus the held-out ones), so it never saw the inputs either; cached under data/classifiers/;
  3. inpainting (editing.algorithms.inpaint, RePaint) of each --masks region (images.builtin_mask: bottom half, centre
     square of half the side) for each --inpaint-rows entry sampler:steps:eta:resample:jump. The default
     "DDPM-50" rows are ddim with eta=1 on a 50-step grid, which is the DDPM posterior step on that
     respaced grid (RePaint's own setting is that with T=250, resample 10, jump 10: 2410 model evaluations
     per image, ~13 min per 200 digits on one core; the ddpm sampler itself walks all T=1000 steps); the
     DDIM-50 rows use eta=0, sample.py's default for --inpaint. On both: plain replacement (resample 1),
     sample.py's default resample 5 / jump 5, and the paper's resample 10 / jump 10.
     Scores: the classifier's accuracy on the true labels, the classifier-feature FID against all held-out
     digits, the largest |result - input| over the kept pixels (must be exactly 0), the wall time;
  4. DDIM inversion (editing.algorithms.invert) and reconstruction (sample ddim, eta 0, from the inverted x_T) at each
     of --invert-steps: PSNR (data range [-1, 1], so peak 2);
  5. SDEdit (editing.algorithms.edit, ddim --sdedit-steps, eta 0) at each of --strengths: the distance the images
     moved from the inputs, FID and label accuracy;
  6. writes the tables between <!-- editing:start --> and <!-- editing:end --> in bench/RESULTS.md (--no-write:
     print only). Every row draws its noise from its own seeded generator (reproducible at one --batch-size).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import zlib
from pathlib import Path

import torch

import evaluation.features as feat
from bench.quality_report import RESULTS, commit, machine, markers, write_section
from config import ConfigError
from dataset import build_dataset
from editing.algorithms import INPAINT_SAMPLERS, edit, inpaint, invert, repaint_schedule, sdedit_timesteps
from evaluation.metrics import EvalError, frechet_distance, gaussian_stats
from sampling.images import BUILTIN_MASKS, builtin_mask
from sampling.loading import load_for_sampling
from sampling.pictures import to_uint8_images
from storage.checkpoints import CheckpointError
from storage.data_files import DatasetMissingError
from storage.paths import CLASSIFIERS

REPO = Path(__file__).resolve().parents[1]

START, END = markers("editing")
# sampler:steps:eta:resample:jump. ddim eta 1 = the DDPM posterior step on the respaced grid.
INPAINT_ROWS = "ddim:50:1:1:1,ddim:50:1:5:5,ddim:50:1:10:10,ddim:50:0:1:1,ddim:50:0:5:5,ddim:50:0:10:10"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.edit_quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="a model trained with data.holdout > 0")
    p.add_argument("--data", help="data folder (default: the checkpoint's data.root, relative to the repository)")
    p.add_argument("--num", type=int, default=200, help="held-out digits to edit (the first ones)")
    p.add_argument("--masks", default="bottom,center", help=f"regions to inpaint, of {', '.join(BUILTIN_MASKS)}")
    p.add_argument("--inpaint-rows", default=INPAINT_ROWS, help="comma-separated sampler:steps:eta:resample:jump")
    p.add_argument("--invert-steps", default="10,50,200", help="DDIM steps of the inversion round trips")
    p.add_argument("--strengths", default="0.3,0.5,0.7", help="SDEdit strengths")
    p.add_argument("--sdedit-steps", type=int, default=50, help="DDIM grid SDEdit walks the tail of")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--classifier-dir", help="where the classifier is cached (default data/classifiers/"
                   "bench_editing_<split>_kept<holdout>_<steps>steps in the repository)")
    p.add_argument("--seed", type=int, default=0, help="classifier and sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-write", action="store_true", help="print the tables only, leave RESULTS.md alone")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- plan (checked before any work)
def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"--{name} {text!r} is not a comma-separated list of numbers: e.g. --{name} 10,50")
    return values


def _inpaint_row(spec: str, diffusion) -> dict:
    """'sampler:steps:eta:resample:jump' -> the row's settings and model evaluations per image; refused now
    if inpaint would refuse it later."""
    parts = spec.split(":")
    try:
        sampler, steps, eta, resample, jump = parts[0], parts[1], float(parts[2]), int(parts[3]), int(parts[4])
        steps = None if steps == "all" else int(steps)
    except (IndexError, ValueError):
        raise ConfigError(f"--inpaint-rows entry {spec!r} is not sampler:steps:eta:resample:jump, e.g. "
                          "ddim:50:0:5:5 (steps 'all' for ddpm)") from None
    if sampler not in INPAINT_SAMPLERS or resample < 1 or jump < 1:
        raise ConfigError(f"--inpaint-rows entry {spec!r}: sampler must be {' or '.join(INPAINT_SAMPLERS)}, "
                          "resample and jump >= 1")
    eta = diffusion.check_eta(sampler, eta)
    grid = diffusion.sampling_timesteps(sampler, steps)
    if resample > 1 and jump >= len(grid):
        raise ConfigError(f"--inpaint-rows entry {spec!r}: jump {jump} leaves no block on {len(grid)} steps")
    path = repaint_schedule(len(grid), resample, jump)
    return {"sampler": sampler, "steps": steps, "grid": len(grid), "eta": eta, "resample": resample,
            "jump": jump, "nfe": sum(b < a for a, b in zip(path, path[1:]))}


def make_plan(args, diffusion) -> dict:
    """Every list flag parsed and checked against the model (exit 1 with one line before any long work)."""
    masks = [m for m in args.masks.split(",") if m]
    bad = [m for m in masks if m not in BUILTIN_MASKS]
    if bad or not masks:
        raise ConfigError(f"--masks {args.masks!r}: use regions of {', '.join(BUILTIN_MASKS)}, e.g. bottom,center")
    for name in ("num", "batch_size", "classifier_steps", "sdedit_steps", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    plan = {"masks": masks, "rows": [_inpaint_row(s, diffusion) for s in args.inpaint_rows.split(",") if s],
            "invert": _numbers(args.invert_steps, int, "invert-steps"),
            "strengths": _numbers(args.strengths, float, "strengths")}
    for steps in plan["invert"]:
        diffusion.sampling_timesteps("ddim", steps)
    plan["sdedit_grids"] = [len(sdedit_timesteps(diffusion, s, "ddim", args.sdedit_steps)) for s in plan["strengths"]]
    nfe = (len(masks) * sum(r["nfe"] for r in plan["rows"]) + 2 * sum(plan["invert"]) + sum(plan["sdedit_grids"]))
    print(f"plan: {nfe} model evaluations per digit, {args.num} digits", flush=True)
    return plan


# ----------------------------------------------------------------------------- data, classifier, scores
def held_out_digits(cfg, data_root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out images of the checkpoint's training split (float, [-1, 1]) and their labels."""
    if not cfg.data.holdout:
        raise ConfigError("this checkpoint was trained on its whole split (data.holdout=0), so no digit is unseen: "
                          "train one with data.holdout=1000 (see bench/RESULTS.md) and pass it")
    held = build_dataset(dataclasses.replace(cfg.data, root=data_root), train=True, held_out=True)
    items = [held[i] for i in range(len(held))]
    return torch.stack([x for x, _ in items]).float(), torch.tensor([int(y) for _, y in items])


class Scorer:
    """Label accuracy and classifier-feature FID of images in [-1, 1] (scored as uint8, as saved PNGs are)
    against the Gaussian of the reference images' features."""

    def __init__(self, classifier: Path, reference: torch.Tensor):
        self.extractor = feat.ClassifierFeatures(classifier, torch.device("cpu"))
        self.mu, self.sigma = gaussian_stats(feat.extract(self.extractor, to_uint8_images(reference),
                                                          desc="reference features")[0])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        feats, logits = feat.extract(self.extractor, to_uint8_images(images), desc="scoring")
        accuracy = (torch.from_numpy(logits).argmax(1) == labels).float().mean().item()
        return {"accuracy": accuracy, "fid": frechet_distance(*gaussian_stats(feats), self.mu, self.sigma)}


def known_pixel_error(result: torch.Tensor, x_known: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |result - x_known| over the kept pixels (mask == 1): inpainting must return them exactly."""
    keep = mask.bool().expand_as(x_known)
    return (result.float() - x_known.float()).abs()[keep].max().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, data range [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4 / mse)


# ----------------------------------------------------------------------------- the runs
def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per row, seeded by the row's name: rows are reproducible on their own."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def row_name(row: dict) -> str:
    if row["sampler"] == "ddpm":
        return "DDPM-1000"
    if row["eta"] == 1:
        return f"DDPM-{row['grid']} (ddim η=1)"
    return f"DDIM-{row['grid']} (η={row['eta']:g})"


def run_inpainting(model, diffusion, cfg, x, labels, scorer, plan, args) -> list[dict]:
    """Per mask: the reference rows (originals, region left blank) and one row per inpainting setting."""
    out = []
    for region in plan["masks"]:
        mask = builtin_mask(region, x.shape[-1]).bool()
        out.append({"mask": region, "name": "originals (reference)", **scorer(x, labels)})
        blank = torch.where(mask, x, torch.full_like(x, -1.0))
        out.append({"mask": region, "name": "region blanked (background)", **scorer(blank, labels)})
        for row in plan["rows"]:
            name = f"{region} {row_name(row)} r{row['resample']} j{row['jump']}"
            gen, start = _generator(args.seed, name), time.perf_counter()
            result = _batched(lambda b: inpaint(
                diffusion, model, b, mask.expand(len(b), -1, -1, -1), sampler=row["sampler"], steps=row["steps"],
                eta=row["eta"], resample=row["resample"], jump=row["jump"], generator=gen,
                clip_x0=cfg.sample.clip_x0), x, args.batch_size)
            wall = time.perf_counter() - start
            out.append({"mask": region, "name": row_name(row), **row, "wall_s": wall,
                        "known_err": known_pixel_error(result, x, mask), **scorer(result, labels)})
            print(_progress_line(out[-1]), flush=True)
    return out


def _progress_line(r: dict) -> str:
    return (f"{r['mask']} {r['name']} r{r['resample']} j{r['jump']}: accuracy {r['accuracy']:.3f}, FID "
            f"{r['fid']:.2f}, known-pixel error {r['known_err']:g}, {r['wall_s']:.0f} s")


def run_inversion(model, diffusion, cfg, x, labels, scorer, plan, args) -> list[dict]:
    """DDIM inversion to x_T and back at each step count: PSNR of the reconstruction."""
    out = []
    for steps in plan["invert"]:
        start = time.perf_counter()

        def round_trip(b):
            x_T = invert(diffusion, model, b, steps=steps)
            return diffusion.sample(model, b.shape, "ddim", steps, eta=0.0, x_T=x_T, clip_x0=cfg.sample.clip_x0)
        rec = _batched(round_trip, x, args.batch_size)
        scores = psnr(rec, x)
        out.append({"steps": steps, "psnr": scores.mean().item(), "psnr_min": scores.min().item(),
                    "wall_s": time.perf_counter() - start, **scorer(rec, labels)})
        print(f"inversion {steps} steps: PSNR {out[-1]['psnr']:.2f} dB, {out[-1]['wall_s']:.0f} s", flush=True)
    return out


def run_sdedit(model, diffusion, cfg, x, labels, scorer, plan, args) -> list[dict]:
    """SDEdit (DDIM, eta 0) at each strength: how far the images move and how real they stay."""
    out = []
    for strength, grid in zip(plan["strengths"], plan["sdedit_grids"]):
        gen, start = _generator(args.seed, f"sdedit {strength}"), time.perf_counter()
        result = _batched(lambda b: edit(diffusion, model, b, strength, sampler="ddim", steps=args.sdedit_steps,
                                         eta=0.0, generator=gen, clip_x0=cfg.sample.clip_x0),
                          x, args.batch_size)
        moved = (result - x).flatten(1)
        out.append({"strength": strength, "grid": grid, "rms": moved.pow(2).mean(1).sqrt().mean().item(),
                    "l2": moved.norm(dim=1).mean().item(), "wall_s": time.perf_counter() - start,
                    **scorer(result, labels)})
        print(f"SDEdit {strength:g}: RMS moved {out[-1]['rms']:.3f}, FID {out[-1]['fid']:.2f}", flush=True)
    return out


# ----------------------------------------------------------------------------- the tables
def inpaint_table(rows: list[dict], n: int) -> list[str]:
    lines = [f"| region generated | sampler | resample / jump | NFE per image | label accuracy ↑ | FID ↓ (N={n}) | "
             "max known-pixel error | wall time |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "nfe" not in r:
            lines.append(f"| {r['mask']} | *{r['name']}* | – | – | {r['accuracy']:.3f} | {r['fid']:.2f} | – | – |")
            continue
        kind = "plain replacement" if r["resample"] == 1 else f"RePaint {r['resample']} / {r['jump']}"
        lines.append(f"| {r['mask']} | {r['name']} | {kind} | {r['nfe']} | {r['accuracy']:.3f} | {r['fid']:.2f} | "
                     f"{r['known_err']:g} | {r['wall_s']:.0f} s |")
    return lines


def inversion_table(rows: list[dict]) -> list[str]:
    lines = ["| DDIM steps (invert + reconstruct) | mean PSNR ↑ | worst PSNR | label accuracy | wall time |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['steps']} + {r['steps']} | {r['psnr']:.2f} dB | {r['psnr_min']:.2f} dB | {r['accuracy']:.3f} | "
              f"{r['wall_s']:.0f} s |" for r in rows]
    return lines


def sdedit_table(rows: list[dict], n: int, steps: int) -> list[str]:
    lines = [f"| strength | steps walked (of DDIM-{steps}) | RMS distance moved | L2 distance moved | "
             f"label accuracy | FID ↓ (N={n}) | wall time |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['strength']:g} | {r['grid']} | {r['rms']:.3f} | {r['l2']:.2f} | {r['accuracy']:.3f} | "
              f"{r['fid']:.2f} | {r['wall_s']:.0f} s |" for r in rows]
    return lines


def verdicts(rows: list[dict]) -> list[str]:
    """Per region and grid: did the best RePaint row recover the label more often than plain replacement?"""
    out = []
    for key in dict.fromkeys((r["mask"], r["name"]) for r in rows if "nfe" in r):
        group = [r for r in rows if (r["mask"], r["name"]) == key and "nfe" in r]
        plain = next((r for r in group if r["resample"] == 1), None)
        repaint = [r for r in group if r["resample"] > 1]
        if plain and repaint:
            best = max(repaint, key=lambda r: r["accuracy"])
            word = "beats" if best["accuracy"] > plain["accuracy"] else "does NOT beat"
            out.append(f"- {key[0]}, {key[1]}: RePaint {best['resample']} / {best['jump']} {word} plain replacement "
                       f"on label recovery ({best['accuracy']:.3f} vs {plain['accuracy']:.3f}; FID "
                       f"{best['fid']:.2f} vs {plain['fid']:.2f}).")
    return out


def render(args, plan, results: dict, info: dict) -> str:
    n = info["num"]
    lines = [START, "## Editing quality on held-out digits (issue #14, CPU)", "",
             f"- date: {info['date']}; machine: {info['machine']}; commit `{info['commit']}`",
             f"- load average (1 min) at start / end: {info['load'][0]:.1f} / {info['load'][1]:.1f}"
             + (" — the machine was shared, wall times are inflated" if max(info["load"]) > 2.5 else ""),
             f"- command: `{info['command']}` ({info['total_min']:.1f} min in all)",
             f"- model: {info['model']}",
             f"- inputs: the first {n} of the {info['num_ref']} held-out digits (data.holdout: never trained on); "
             f"FID = Fréchet distance of the 128-d classifier features against all {info['num_ref']} held-out "
             f"digits (at N={n} biased upwards: compare with the *originals* row, the floor)",
             f"- classifier: {info['classifier']}",
             "", "### Inpainting", "", *inpaint_table(results["inpaint"], n), "", *verdicts(results["inpaint"]),
             "", "### DDIM inversion round trip", "", *inversion_table(results["invert"]),
             "", "### SDEdit (image-to-image)", "", *sdedit_table(results["sdedit"], n, args.sdedit_steps), "", END]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def setup(args) -> tuple:
    """Model, plan, inputs and scorer: everything checked and loaded before the long runs."""
    model, diffusion, cfg, ckpt = load_for_sampling(args.checkpoint, "cpu")
    plan = make_plan(args, diffusion)
    data_root = args.data or str(REPO / cfg.data.root)
    reference, labels = held_out_digits(cfg, data_root)
    if args.num > len(reference):
        raise ConfigError(f"--num {args.num} is more than the {len(reference)} held-out digits: use --num <= "
                          f"{len(reference)}")
    data_cfg = dataclasses.replace(cfg.data, root=data_root)
    folder = Path(args.classifier_dir) if args.classifier_dir else (
        REPO / CLASSIFIERS / f"bench_editing_{cfg.data.split}_kept{cfg.data.holdout}_{args.classifier_steps}steps")
    # on the kept images of the training split only: the held-out inputs are new to the classifier as well
    path = feat.cached_classifier(data_cfg, data_cfg.split, folder, args.classifier_steps, args.seed)
    scorer = Scorer(path, reference)
    meta = scorer.extractor.meta
    classifier = (f"features.DigitClassifier, {meta['steps']} steps on the {meta['num_train']} kept images of the "
                  f"{meta['split']} split (never the held-out digits), accuracy {meta['accuracy']:.3f} on "
                  f"{meta['num_test']} other kept images it did not train on; on the first {args.num} held-out "
                  f"digits: see the *originals* rows")
    params = sum(p.numel() for p in model.parameters())
    described = (f"`{args.checkpoint}` (step {ckpt.get('step', '?')}, {params / 1e6:.2f}M parameters, "
                 f"{cfg.data.dataset} {cfg.data.split} split at {cfg.data.image_size} px, data.holdout="
                 f"{cfg.data.holdout}, {cfg.diffusion.objective}-prediction, {cfg.diffusion.schedule} schedule, "
                 f"EMA weights)")
    return model, diffusion, cfg, plan, reference, labels, scorer, {"model": described, "classifier": classifier,
                                                                     "num_ref": len(reference)}


def run(args) -> tuple[dict, str]:
    """The whole benchmark: (results, markdown section)."""
    torch.set_num_threads(args.threads)
    load_start, wall_start = os.getloadavg()[0], time.perf_counter()
    model, diffusion, cfg, plan, reference, labels, scorer, info = setup(args)
    x, y = reference[:args.num], labels[:args.num]
    results = {name: fn(model, diffusion, cfg, x, y, scorer, plan, args)
               for name, fn in (("inpaint", run_inpainting), ("invert", run_inversion), ("sdedit", run_sdedit))}
    info.update(date=time.strftime("%Y-%m-%d %H:%M %Z"), machine=machine(), commit=commit(), num=len(x),
                load=(load_start, os.getloadavg()[0]), command="python -m bench.edit_quality " + args.command,
                total_min=(time.perf_counter() - wall_start) / 60)
    return results, render(args, plan, results, info)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    try:
        results, section = run(args)
    except (ConfigError, CheckpointError, DatasetMissingError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(section)
    if not args.no_write:
        write_section(section, RESULTS, name="editing")
        print(f"wrote the editing section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
