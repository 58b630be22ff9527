"""Sample quality: FID, precision/recall and classifier scores of a checkpoint's samples (or a PNG folder)
against cached statistics of the training set.

    python evaluate.py --checkpoint checkpoints/mnist/last.pt --num-samples 10000 --sampler dpmpp2m --steps 20
    python evaluate.py --samples results/images/mnist/samples --dataset mnist
    python evaluate.py train-classifier --dataset mnist          # the digit classifier behind --features classifier

Protocol (each result is one JSON line in results/eval/<run_name>.jsonl, with everything below in it):
  - samples are drawn with per-sample seeds (sample i of a seed is the same at any batch size), quantized to
    uint8 (utils.to_uint8_images) like saved PNGs, and only then fed to the feature extractor; the reference
    images go through the same quantization;
  - features: Inception-v3 pool3 (2048-d, the TTUR pt_inception-2015-12-05 weights, run by torch-fidelity,
    which resizes to 299 exactly as the original TensorFlow FID code), or for grey digit-like data the
    128-d penultimate layer of a small CNN trained on that data set ("classifier FID");
  - FID: Frechet distance of Gaussians fitted to the sample and reference features (Heusel et al. 2017);
  - precision / recall: k-NN manifolds (Kynkaanniemi et al. 2019, k=3), on equally many sample and reference
    features (a seeded subset of the reference), since k-NN radii depend on the set size;
  - classifier scores (when the extractor has logits): the Inception Score formula exp(E_x KL(p(y|x) || p(y)))
    (Salimans et al. 2016; with the digit classifier it is the usual "MNIST IS", at most the number of classes),
    and label_entropy = H(p(y)) / log(K), 1.0 when the predicted classes are perfectly balanced. The same
    scores of the reference images are stored next to them (ref_is, ref_label_entropy) for scale.
An image-conditioned checkpoint (data.task superres / colorize) is scored on held-out images instead: PSNR,
SSIM, consistency and FID of its outputs and of the bicubic (or grey) baseline, in one record
(evaluation/conditioned.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from config import SAMPLERS, SPACINGS, DataConfig, UserError, check_value, plain_name
from evaluation.conditioned import evaluate_conditioned, summary_lines
from evaluation.features import CLASSIFIER_DATASETS, INCEPTION_FILE, build_extractor, classifier_path, train_classifier
from evaluation.metrics import EvalError
from evaluation.scoring import count_problem, reference_stats, score_images
from limits import add_limit_args, apply_limit_args, check_sampling
from sampling.conditioning import conditioned
from sampling.generation import check_flag_values, generate, random_labels, sampling_settings
from sampling.loading import load_for_sampling
from sampling.pictures import to_uint8_images
from storage.checkpoints import save_checkpoint
from storage.files import check_output_path, output_folder_problem, write_bytes_output
from storage.paths import CLASSIFIERS, DATA, EVAL_RECORDS, FID_REFS, INCEPTION, eval_records_file
from utils import ArgumentParser, get_device, resolve_amp


# ============================================================================= samples
def draw_samples(model, diffusion, cfg, args, kw: dict) -> tuple[torch.Tensor, float]:
    """Samples as uint8 (N, C, S, S) through generation.generate with the settings `kw`: every sample has its
    own seeded noise, so a seed gives the same samples on any device and at any batch size. Class-conditional
    models get uniform labels (generation.random_labels). Returns (images, seconds)."""
    labels = random_labels(cfg.model.num_classes, args.num_samples, args.seed)
    start = time.perf_counter()
    x0 = generate(model, diffusion, cfg, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                  labels=labels, amp=args.amp, progress=not args.quiet, **kw)
    return to_uint8_images(x0), time.perf_counter() - start


def load_png_folder(folder: str | Path, channels: int) -> torch.Tensor:
    """All PNGs in a folder (sorted, not recursive) as uint8 (N, C, H, W); they must share one size."""
    from PIL import Image
    if not Path(folder).is_dir():
        what = "is not a folder" if Path(folder).exists() else "does not exist"
        raise EvalError(f"--samples '{folder}' {what}: pass the folder that sample.py wrote the images to")
    files = sorted(Path(folder).glob("*.png"))
    numbered = [f for f in files if f.stem.isdigit()]
    files = numbered or files  # sample.py writes 000000.png ... beside grid.png and trajectory.png
    if not files:
        raise EvalError(f"no .png files in '{folder}': pass the folder that sample.py wrote the images to")
    arrays = []
    for f in files:
        with Image.open(f) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        if arrays and array.shape != arrays[0].shape:
            raise EvalError(f"'{f}' is {array.shape[:2]} but '{files[0]}' is {arrays[0].shape[:2]}: the folder "
                            "must hold single samples of one size (no grids)")
        arrays.append(array)
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked[:, None] if channels == 1 else stacked.permute(0, 3, 1, 2).contiguous()


# ============================================================================= results
def write_result(record: dict, run_name: str, results_dir: Path = EVAL_RECORDS) -> Path:
    """Append one JSON line to <results_dir>/<run_name>.jsonl."""
    path = eval_records_file(run_name, results_dir)
    check_output_path(path, replace=True, root=results_dir)  # never through a link out of --results-dir
    earlier = path.read_bytes() if path.is_file() else b""  # rewritten whole, atomically: a full disk keeps them
    return write_bytes_output(path, earlier + (json.dumps(record, sort_keys=False) + "\n").encode(), replace=True,
                              root=results_dir)


SAMPLING_KEYS = ("sampler", "steps", "eta", "seed", "guidance_scale", "timestep_spacing", "amp", "sampling_wall_s")


def _distilled_from(ckpt: Optional[dict]) -> Optional[dict]:
    """A distill.py student's teacher file, student steps and teacher steps (None for other checkpoints)."""
    plan = (ckpt or {}).get("distill")
    if not isinstance(plan, dict):
        return None
    return {"teacher": plan.get("teacher"), "student_steps": plan.get("student_steps"),
            "teacher_start_steps": plan.get("start_steps"), "guidance_scale": plan.get("guidance_scale")}


def protocol_record(args, run_name: str, ckpt: Optional[dict], sampling: Optional[dict], num_samples: int,
                    extractor, ref: dict, metrics: dict, eval_wall_s: float) -> dict:
    """Everything needed to reproduce and compare a number (sampling fields are None for --samples)."""
    sampling = sampling or dict.fromkeys(SAMPLING_KEYS)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_name": run_name, "command": " ".join(["python evaluate.py", *sys.argv[1:]]),
        "checkpoint": args.checkpoint, "checkpoint_step": None if ckpt is None else int(ckpt.get("step", -1)),
        "ema": None if ckpt is None else (not args.no_ema and ckpt.get("ema") is not None),
        "ema_length": args.ema_length,
        "distilled_from": _distilled_from(ckpt),
        "samples_dir": args.samples, **sampling, "num_samples": num_samples, "batch_size": args.batch_size,
        "feature_extractor": extractor.name,
        "reference": {"dataset": ref["dataset"], "split": ref["split"], "image_size": int(ref["image_size"]),
                      "num_images": int(ref["num_images"]), "root": str(ref["root"]), "cache": ref["path"]},
        "metrics": metrics, "eval_wall_s": eval_wall_s,
        "device": str(args.device), "torch": torch.__version__, "host": platform.node(),
    }


# ============================================================================= command line
DEFAULT_SIZES = {"mnist": 28, "fashion_mnist": 28, "digits": 16}


def _eval_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="FID, precision/recall and classifier scores of a checkpoint's "
                                "samples (or a PNG folder) against cached training-set statistics. "
                                "Train the digit classifier with: python evaluate.py train-classifier --help")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="train.py checkpoint to sample from (e.g. checkpoints/mnist/last.pt)")
    src.add_argument("--samples", help="folder of sample PNGs to score instead (needs --dataset)")
    p.add_argument("--num-samples", type=int, default=10000, help="samples to draw (with --samples: the most "
                   "PNGs to read); FIDs are only comparable at equal N")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config; ddpm uses all T)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise in [0, 1] (default: the checkpoint's "
                   "sample.eta, 0 = deterministic)")
    p.add_argument("--timestep-spacing", choices=SPACINGS, help="default: the checkpoint's diffusion config")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="sampling autocast; auto = bf16 on GPUs and on CPUs with native bf16, else off")
    p.add_argument("--guidance-scale", type=float, default=None, help="class-conditional models (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--ema-length", type=float, metavar="SIGMA_REL", help="a post-hoc EMA of this relative "
                   "length (e.g. 0.08), rebuilt from the run's snapshots (needs train.ema_profiles)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--features", choices=("auto", "classifier", "inception"), default="auto",
                   help="auto: the digit classifier for mnist/fashion_mnist/digits, Inception-v3 otherwise")
    p.add_argument("--inception-weights", help=f"local {INCEPTION_FILE} (default: {INCEPTION}/ or download)")
    p.add_argument("--dataset", help="reference data set (default: the checkpoint's)")
    p.add_argument("--root", help="reference data folder (default: the checkpoint's data.root)")
    p.add_argument("--split", choices=("train", "test"), help="reference split (default: the training split)")
    p.add_argument("--image-size", type=int, help="reference resolution (default: the checkpoint's / the PNGs')")
    p.add_argument("--num-ref", type=int, default=None, help="reference images (default: the whole split)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    p.add_argument("--also-at", type=int, nargs="*", default=[], metavar="N",
                   help="also score the first N samples (to compare with a run of N samples)")
    p.add_argument("--run-name", help="results/eval/<run-name>.jsonl (default: the checkpoint's run_name)")
    p.add_argument("--results-dir", default=str(EVAL_RECORDS))
    p.add_argument("--ref-dir", default=str(FID_REFS))
    p.add_argument("--classifier-dir", default=str(CLASSIFIERS))
    p.add_argument("--quiet", action="store_true", help="no per-step progress bars")
    add_limit_args(p)
    return p


def _reference_config(args, cfg=None) -> DataConfig:
    """The reference data: the checkpoint's data section (its training split) with flags on top."""
    base = vars(cfg.data) if cfg is not None else {"root": "data", "split": "train"}
    return DataConfig(**{**base, "dataset": args.dataset or base.get("dataset"), "root": args.root or base["root"],
                         "split": args.split or base["split"],
                         "image_size": args.image_size or base.get("image_size") or getattr(args, "png_size", None)})


def check_arguments(args) -> torch.device:
    """Every check that needs no checkpoint, before anything big is loaded: counts, device, output folders."""
    for flag, value in [("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                        ("--num-ref", args.num_ref), ("--k", args.k), *[("--also-at", n) for n in args.also_at]]:
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be a positive integer, got {value}")
    check_flag_values(seed=args.seed, steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale)
    check_value("data.image_size", args.image_size, "--image-size")
    problem = None if args.samples is not None else count_problem(args.num_samples, args.num_ref, args.k,
                                                                     args.also_at)
    if problem:
        raise EvalError(problem)
    check_ema_length(args)
    for flag, folder in [("--results-dir", args.results_dir), ("--ref-dir", args.ref_dir)]:
        problem = output_folder_problem(folder)
        if problem:
            raise EvalError(f"{flag} {problem}: choose another folder")
    if args.run_name is not None:  # a plain name, never a path out of --results-dir
        check_output_path(eval_records_file(args.run_name, args.results_dir), replace=True, root=args.results_dir)
    if args.dataset is not None:  # it names cache files (classifier, reference statistics)
        plain_name("--dataset", args.dataset, "the cache files under data/", "--dataset digits")
    try:
        return get_device(args.device)
    except RuntimeError as e:  # unknown name, or CUDA asked for but absent
        raise EvalError(f"--device {args.device}: {str(e).splitlines()[0]}") from None


def check_ema_length(args) -> None:
    """--ema-length: a valid sigma_rel, for a checkpoint's EMA weights (checked before anything loads)."""
    if args.ema_length is None:
        return
    from sampling.posthoc import ema_length_problem
    conflict = "--samples" if args.samples is not None else ("--no-ema" if args.no_ema else None)
    problem = ema_length_problem(args.ema_length, conflict, "a --checkpoint")
    if problem:
        raise EvalError(problem)


def png_source(args) -> tuple[torch.Tensor, str]:
    """--samples: (uint8 images of the PNG folder, run name)."""
    if not args.dataset:
        raise EvalError("--samples needs --dataset (and --root where the data lives) to pick the reference")
    images = load_png_folder(args.samples, 3 if args.dataset in ("cifar10", "folder") else 1)
    images = images[: args.num_samples]
    args.png_size = images.shape[-1]
    return images, args.run_name or Path(args.samples).name


def checkpoint_source(args, device: torch.device) -> tuple[tuple, dict, str]:
    """--checkpoint: ((model, diffusion, cfg, ckpt), sampling settings, run name); flags checked before
    anything is sampled, with the defaults sample.py uses (generation.sampling_settings)."""
    model, diffusion, cfg, ckpt = load_for_sampling(args.checkpoint, device, use_ema=not args.no_ema,
                                                    ema_length=args.ema_length)
    if cfg.data.dataset == "toy2d":
        raise EvalError("FID and precision/recall here are for images; toy2d checkpoints are 2-D points")
    kw = sampling_settings(cfg, diffusion.num_timesteps, args.sampler, args.steps, args.eta,
                           args.timestep_spacing, args.guidance_scale)
    args.sampler = kw["sampler"]
    steps = len(diffusion.sampling_timesteps(kw["sampler"], kw["steps"], kw["timestep_spacing"]))
    check_sampling(cfg, args.num_samples, args.batch_size, steps, device,  # before references and extractors
                   guided=cfg.model.num_classes > 0 and kw["guidance_scale"] != 1.0)
    return (model, diffusion, cfg, ckpt), kw, args.run_name or cfg.run_name


def print_summary(run_name: str, what: str, images, extractor, ref: dict, metrics: dict, path: Path,
                  sampling: Optional[dict]) -> None:
    print(f"{run_name} ({what}, N={len(images)}, features {extractor.name}, reference {ref['key']}):")
    for label, values in [(f"N={len(images)}", metrics), *[(f"N={n}", m) for n, m in metrics.get("at_n", {}).items()]]:
        print(f"  {label}: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in values.items() if k != "at_n"))
    took = f"sampling took {sampling['sampling_wall_s']:.1f} s; " if sampling else ""
    print(f"  {took}result appended to {path}")


def evaluate_main(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    apply_limit_args(args)
    device = check_arguments(args)
    args.device = str(device)
    cfg = ckpt = images = None
    if args.samples is not None:
        images, run_name = png_source(args)
    else:
        (model, diffusion, cfg, ckpt), kw, run_name = checkpoint_source(args, device)
    if eval_records_file(run_name, args.results_dir).is_dir():
        raise EvalError(f"'{eval_records_file(run_name, args.results_dir)}' is a folder, not a results file: pass "
                        "another --run-name or --results-dir")
    data_cfg = _reference_config(args, cfg)
    # Extractor and reference first: a missing classifier or weights file fails before minutes of sampling.
    extractor = build_extractor(args.features, data_cfg.dataset, data_cfg.image_size, device,
                                Path(args.classifier_dir), args.inception_weights)
    ref = reference_stats(data_cfg, data_cfg.split, extractor, args.num_ref, Path(args.ref_dir), args.batch_size)
    problem = count_problem(args.num_samples if images is None else len(images), len(ref["features"]), args.k,
                            args.also_at)
    if problem:  # before any sampling
        raise EvalError(problem)
    if cfg is not None and conditioned(cfg):  # an image-conditioned model: scored against held-out targets
        return evaluate_conditioned_main(args, (model, diffusion, cfg, ckpt), kw, run_name, extractor, ref, device)
    sampling = None
    if images is None:
        images, seconds = draw_samples(model, diffusion, cfg, args, kw)
        sampling = {"sampler": kw["sampler"], "steps": kw["steps"], "eta": kw["eta"], "seed": args.seed,
                    "guidance_scale": kw["guidance_scale"], "timestep_spacing": args.timestep_spacing or
                    cfg.diffusion.timestep_spacing, "amp": resolve_amp(args.amp, device), "sampling_wall_s": seconds}
    start = time.perf_counter()
    metrics = score_images(images, ref, extractor, args.k, args.batch_size, args.seed, tuple(args.also_at))
    record = protocol_record(args, run_name, ckpt, sampling, len(images), extractor, ref, metrics,
                             time.perf_counter() - start)
    path = write_result(record, run_name, Path(args.results_dir))
    what = f"{args.sampler} steps={sampling['steps']}" if sampling else f"PNGs in {args.samples}"
    print_summary(run_name, what, images, extractor, ref, metrics, path, sampling)
    return 0


def evaluate_conditioned_main(args, loaded: tuple, kw: dict, run_name: str, extractor, ref: dict,
                              device: torch.device) -> int:
    """evaluation/conditioned.py's scores of the model and the baseline on --num-samples held-out images, one record."""
    model, diffusion, cfg, ckpt = loaded
    start = time.perf_counter()
    metrics, seconds = evaluate_conditioned(model, diffusion, cfg, args.num_samples, args.batch_size, args.seed,
                                            kw, args.amp, ref, extractor, args.k, progress=not args.quiet)
    sampling = {"sampler": kw["sampler"], "steps": kw["steps"], "eta": kw["eta"], "seed": args.seed,
                "guidance_scale": kw["guidance_scale"], "timestep_spacing": args.timestep_spacing or
                cfg.diffusion.timestep_spacing, "amp": resolve_amp(args.amp, device), "sampling_wall_s": seconds}
    record = protocol_record(args, run_name, ckpt, sampling, metrics["num_images"], extractor, ref, metrics,
                             time.perf_counter() - start - seconds)
    path = write_result(record, run_name, Path(args.results_dir))
    print(f"{run_name} ({cfg.data.task}, {args.sampler} steps={kw['steps']}, N={metrics['num_images']} "
          f"{metrics['conditions']}, features {extractor.name}):")
    print("\n".join(summary_lines(metrics)))
    print(f"  sampling took {seconds:.1f} s; result appended to {path}")
    return 0


def train_classifier_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="evaluate.py train-classifier",
                                description="Train and cache the digit classifier whose features give "
                                            "--features classifier FIDs.")
    p.add_argument("--dataset", choices=CLASSIFIER_DATASETS, required=True)
    p.add_argument("--root", default=str(DATA))
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--image-size", type=int, help="default: the preset's (mnist/fashion_mnist 28, digits 16)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-download", action="store_true", help="never touch the network")
    p.add_argument("--classifier-dir", default=str(CLASSIFIERS))
    add_limit_args(p)
    args = p.parse_args(argv)
    for flag, key, value in [("--steps", "train.max_steps", args.steps), ("--batch-size", "train.batch_size",
                             args.batch_size), ("--lr", "train.lr", args.lr), ("--seed", "seed", args.seed),
                             ("--image-size", "data.image_size", args.image_size)]:
        check_value(key, value, flag)  # the rules of the config keys these flags stand for
    apply_limit_args(args)
    size = args.image_size or DEFAULT_SIZES[args.dataset]
    data_cfg = DataConfig(dataset=args.dataset, root=args.root, split=args.split, image_size=size,
                          random_flip=False, download=not args.no_download)
    ckpt = train_classifier(data_cfg, args.split, args.steps, args.batch_size, args.lr, args.seed,
                            get_device(args.device))
    path = classifier_path(args.dataset, size, Path(args.classifier_dir))
    save_checkpoint(ckpt, path)
    meta = ckpt["config"]
    print(f"classifier accuracy {meta['accuracy']:.4f} on {meta['accuracy_on']} ({meta['num_test']} images); "
          f"trained {meta['steps']} steps on {meta['num_train']} images; saved to {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train-classifier"]:
            return train_classifier_main(argv[1:])
        return evaluate_main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
