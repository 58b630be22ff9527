"""bench/quality.py's report (a helper module, not a script): rows, targets and the RESULTS.md section.

A group is the records (evaluate.py JSON lines) of one sampler setting, one per sampling seed. A distill.py
student's records carry `distilled_from`; it is named and targeted as a student."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)"}


def markers(section: str = "quality") -> tuple[str, str]:
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


START, END = markers()


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


def row_name(record: dict) -> str:
    """'DDIM (eta=0)', 'DDIM (eta=0, trailing grid)', 'student of DDIM-64 (distilled)', ..."""
    source = record.get("distilled_from")
    if source:
        return f"**student** of DDIM-{source['teacher_start_steps']} (progressive distillation)"
    name = NAMES.get(record["sampler"], record["sampler"])
    if record["sampler"] == "ddim":
        trailing = ", trailing grid" if record.get("timestep_spacing") == "trailing" else ""
        name += f" (eta={record.get('eta', 0.0):g}{trailing})"
    return name


def group_key(record: dict) -> tuple:
    """What the targets call a row: ("student", steps), ("ddim-trailing", steps), ("ddim", 50), ..."""
    if record.get("distilled_from"):
        return ("student", record["steps"])
    trailing = "-trailing" if record["sampler"] == "ddim" and record.get("timestep_spacing") == "trailing" else ""
    return (record["sampler"] + trailing, record["steps"] or 1000)


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
        rows.append(f"| {row_name(r)} | {r['steps'] or 1000} | {full} |"
                    + (f" {mean_sd([fid_at(g, n_ddpm) for g in group])} |" if small else "")
                    + f" {mean['precision']:.3f}{mark} | {mean['recall']:.3f}{mark} | {mean['is']:.2f}{mark} | "
                    f"{wall:.0f} s for {n} |")
    fl = {key: statistics.fmean(v) for key, v in floors[n_all].items() if key in ("precision", "recall", "is")}
    rows.append(f"| real MNIST test images (the metric's floor) | – | {mean_sd(floors[n_all]['fid'])} |"
                + (f" {mean_sd(floors[n_ddpm]['fid'])} |" if small else "")
                + f" {fl['precision']:.3f} | {fl['recall']:.3f} | {fl['is']:.2f} | – |")
    return rows


def setup_lines(args, info: dict, n_all: int, n_ddpm: int) -> list[str]:
    """The bullet list above the table: when, where, what was trained and how it was scored."""
    ddpm_note = (f" DDPM-1000 (1000 network evaluations per sample) draws only its first {n_ddpm} samples to "
                 f"stay affordable; every other sampler is also scored on its first {n_ddpm} samples (same "
                 f"seed, so the same starting noise), and DDPM is compared in that column only."
                 if n_ddpm < n_all else "")
    lines = [f"- date: {info['date']}; machine: {info['machine']}; commit `{info['commit']}`",
             f"- load average (1 min) at start / end: {info['load'][0]:.1f} / {info['load'][1]:.1f}"
             + (" — the machine was shared, wall times are inflated" if max(info['load']) > 2.5 else ""),
             f"- command: `{info['command']}` ({info['total_min']:.0f} min in all)",
             f"- model: configs/mnist.yaml with `{info['overrides']}`; "
             f"{info['params'] / 1e6:.2f}M parameters; {args.train_steps} steps, batch {args.batch_size} "
             f"({info['train_s'] / 60:.1f} min of training"
             + (", done by an earlier run of this command: --skip-train reused its checkpoint)" if args.skip_train
                else ")")]
    if info.get("distill"):
        lines.append(distill_line(info["distill"]))
    lines.append(f"- scoring: `evaluate.py --features classifier`: the 128-d penultimate features of the digit "
                 f"classifier (trained {args.classifier_steps} steps on the training images, accuracy "
                 f"{info['classifier']['accuracy']:.3f} on {info['classifier']['accuracy_on']}); reference = all "
                 f"{info['num_ref']} training images at {args.image_size}x{args.image_size}; EMA weights; sampling "
                 f"seeds {args.sample_seeds} (FIDs: mean ± sd over them, other metrics: means; the targets compare "
                 f"means), samples quantized to uint8; precision/recall with k=3 on N samples vs N reference "
                 f"images. FIDs at these N are biased upwards (see the real-image floor) and comparable only at "
                 f"equal N." + ddpm_note)
    return lines


def distill_line(d: dict) -> str:
    rounds = ", ".join(f"{steps} steps {seconds / 60:.1f} min" for steps, seconds in d["rounds"])
    return (f"- distillation: `{d['command']}`: {d['wall_s'] / 60:.1f} min in all ({rounds}); each student "
            "samples with deterministic DDIM on the trailing grid it was distilled on, so the teacher's "
            "no-distillation baseline at the same step counts uses that grid too (\"trailing grid\" rows)")


def render(args, groups: list[list[dict]], floors: dict, info: dict) -> str:
    """The markdown section: setup, table, whether the speed/quality targets hold."""
    n_all, n_ddpm = args.num_samples, min(args.ddpm_samples, args.num_samples)
    start, end = markers(getattr(args, "section", "quality"))
    title = info.get("title", "Sample quality vs sampler (MNIST test split, CPU)")
    lines = [start, f"## {title}", "", *setup_lines(args, info, n_all, n_ddpm), "",
             *table_rows(groups, floors, n_all, n_ddpm), ""]
    fids, walls = {}, {}  # (kind, steps, "all" | "small") -> mean FID over the seeds; (kind, steps) -> wall s
    for group in (g for g in groups if not g[0].get("eta")):  # the targets are about deterministic DDIM
        key = group_key(group[0])
        walls[key] = statistics.fmean(g["sampling_wall_s"] / g["num_samples"] for g in group)
        for column, n in (("all", n_all), ("small", n_ddpm)):
            values = [fid_at(g, n) for g in group]
            if None not in values:
                fids[(*key, column)] = statistics.fmean(values)
    lines += targets(fids) + distill_targets(fids, walls)
    return "\n".join(lines + ["", end])


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


def distill_targets(fid: dict, walls: dict) -> list[str]:
    """Issue #16's targets: the 4-step student within 1.25x of the teacher's DDIM-50 FID, the 8-step one
    within 1.1x, each far better than the teacher's own DDIM at its step count; images/s at 4 vs 50 steps."""
    out, ddim50 = [], fid.get(("ddim", 50, "all"))
    for steps, factor in ((4, 1.25), (8, 1.1)):
        student, same = fid.get(("student", steps, "all")), fid.get(("ddim-trailing", steps, "all"))
        if student is None or ddim50 is None:
            continue
        verdict = "holds" if student <= factor * ddim50 else "does NOT hold"
        baseline = f"; the teacher's DDIM-{steps}: FID {same:.2f}" if same is not None else ""
        out.append(f"- Target \"{steps}-step student's FID ≤ {factor}x the teacher's DDIM-50\": {verdict} "
                   f"(FID {student:.2f} vs {ddim50:.2f} = {student / ddim50:.2f}x{baseline}).")
    if ("student", 4) in walls and ("ddim", 50) in walls:
        out.append(f"- Sampling speed: the 4-step student draws {1 / walls[('student', 4)]:.0f} images/s, the "
                   f"teacher's DDIM-50 {1 / walls[('ddim', 50)]:.0f} images/s "
                   f"({walls[('ddim', 50)] / walls[('student', 4)]:.1f}x faster, same machine, same run).")
    return out


def write_section(section: str, path: Path = RESULTS, name: str = "quality") -> None:
    """Replace the text between the section's markers (or append it), leaving every other section untouched."""
    start, end = markers(name)
    text = path.read_text() if path.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)
