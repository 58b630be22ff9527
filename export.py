"""Export a ddpm-lab checkpoint to Hugging Face diffusers (a DDPMPipeline folder).

    python export.py --checkpoint checkpoints/cifar10/last.pt --format diffusers --out my-ddpm

An image-conditioned model (data.task superres / colorize) becomes a UNet2DModel with the condition's extra
input channels (in_channels = out_channels + condition channels); see condition_note for how to call it.
The conversion is interop/diffusers.py's (the reverse, running diffusers weights here, is interop/pretrained.py's:
sample.py --pretrained). Settings diffusers cannot express are refused with a ConfigError naming each.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from config import ConfigError, UserError
from interop.diffusers import export_diffusers
from sampling.loading import check_finite
from storage.checkpoints import CheckpointError, read_checkpoint
from storage.files import output_folder_problem
from utils import ArgumentParser


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = ArgumentParser(description="Export a ddpm-lab checkpoint to another format.")
    p.add_argument("--checkpoint", required=True, help="ddpm-lab checkpoint, e.g. checkpoints/cifar10/last.pt")
    p.add_argument("--format", default="diffusers", choices=["diffusers"],
                   help="diffusers: a DDPMPipeline folder (UNet2DModel + DDPMScheduler)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    out = Path(args.out)
    try:
        problem = output_folder_problem(out)
        if problem:
            raise ConfigError(f"--out {problem}: choose a folder path")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise ConfigError(f"--out '{out}' exists and is not empty: choose a new folder or pass --force")
        ckpt, cfg = read_checkpoint(args.checkpoint)
        key = "model" if args.no_ema else "ema"
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"'{args.checkpoint}' has no {key!r} weights"
                                  + ("" if args.no_ema else ": pass --no-ema to export the raw weights"))
        check_finite(ckpt[key], args.checkpoint, "raw" if args.no_ema else "EMA")
        export_diffusers(cfg, ckpt[key], out)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported the {'raw' if args.no_ema else 'EMA'} weights of step {ckpt.get('step', '?')} to {out}/\n"
          f"  load: diffusers.DDPMPipeline.from_pretrained('{out}'), or python sample.py --pretrained {out}")
    if cfg.model.num_classes > 0:
        print(f"  class-conditional: DDPMPipeline passes no class labels, so call pipe.unet(x, t, class_labels=y) "
              f"in your own loop; label {cfg.model.num_classes} is the null (unconditional) label")
    if cfg.data.task != "generate":
        print(condition_note(cfg))
    return 0


def condition_note(cfg) -> str:
    """How to call an exported image-conditioned U-Net: no diffusers pipeline passes a condition image."""
    size = cfg.data.image_size
    how = (f"the {size // cfg.data.sr_factor}x{size // cfg.data.sr_factor} low-res image in [-1, 1] upsampled with "
           f"F.interpolate(low, size=({size}, {size}), mode='bicubic', align_corners=False).clamp(-1, 1)"
           if cfg.data.task == "superres" else
           "the grey image in [-1, 1] (ITU-R 601 luma, as PIL's convert('L')), shape (B, 1, H, W)")
    return (f"  image-conditioned (data.task={cfg.data.task}): DDPMPipeline passes no condition image, so in your "
            f"own scheduler loop call pipe.unet(torch.cat([x_t, cond], dim=1), t).sample with cond = {how}")


if __name__ == "__main__":
    sys.exit(main())
