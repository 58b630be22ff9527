"""Sample from a trained checkpoint: image grids, per-image PNGs (for FID), animations, 2-D plots.

    python sample.py --sampler ddim                      # newest checkpoint under checkpoints/
    python sample.py --config configs/digits.yaml --steps 25 --animation
    python sample.py --checkpoint checkpoints/digits/last.pt --class-label 3 --guidance-scale 2
    python sample.py --forward --config configs/digits.yaml   # the forward-process figure
    python sample.py --pretrained google/ddpm-cifar10-32 --num-samples 16
    python sample.py --inpaint img.png --mask bottom       # editing: also --init-image, --interpolate, --invert

Model, diffusion and sampling defaults come from the config stored inside the checkpoint, so no model
flags are needed. Outputs go to results/images/<run_name>/<sampler>_<steps>_<seed>/ (see --out).
Every sample has its own seeded noise (sampling/generation.py): sample i of a seed is the same image at any
--batch-size, in sample.py and evaluate.py alike.

Output folders never lose a file sample.py did not write in the same call: each run lists its files in
ddpm-lab-samples.json there. A non-empty --out is refused without --overwrite, which then replaces only the
files an earlier run listed (and refuses if a new file would replace one it did not list). When the default
folder already holds files, the samples go to the next free <folder>-2, -3, ... instead (--overwrite: replace
the earlier run's files there).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

from commands import build_parser, check_request, run_request
from config import UserError
from storage.outputs import MANIFEST  # noqa: F401  (sample.MANIFEST: the manifest's name, for users of this script)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return build_parser(__doc__.split("\n\n")[0],
                        "Unset sampling flags take the checkpoint's `sample` config section.").parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_request(args)
        paths = run_request(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    images = [p for p in paths if re.fullmatch(r"\d{6}\.png", p.name)]
    for p in [p for p in paths if p not in images]:
        print(f"wrote {p}")
    if images:
        print(f"wrote {len(images)} images {images[0]} ... {images[-1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
