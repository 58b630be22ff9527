"""A local web page for a trained model (Gradio): sampling with live previews, inpainting on a painted region,
image-to-image, interpolation, inversion, super-resolution / colourisation, each result with the sample.py
command that writes the same PNGs byte for byte.

    python app.py                                      # the newest checkpoint under checkpoints/
    python app.py --checkpoint checkpoints/digits/last.pt --port 7861
    python app.py --pretrained exported/digits         # an export.py / diffusers folder, as sample.py --pretrained

The page binds 127.0.0.1 (this machine only); --host 0.0.0.0 lets other machines in, with a warning: anyone who
reaches the port can run the model. It is never shared through a public link. Results go where sample.py puts
them (results/images/<run>/...), uploads to results/images/<run>/app-inputs/.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool

from config import UserError  # noqa: E402
from storage.checkpoints import CheckpointError  # noqa: E402
from storage.paths import CHECKPOINTS  # noqa: E402
from utils import ArgumentParser  # noqa: E402
from webapp import MAX_UPLOAD_BYTES, Models, build_ui  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")
QUICKSTART = "python train.py --config configs/digits.yaml"


def parse_args(argv: Optional[list[str]] = None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="checkpoint file (default: the newest under checkpoints/)")
    source.add_argument("--pretrained", metavar="DIR", help="an exported or diffusers model, as sample.py takes it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p.parse_args(argv)


def open_models(args) -> Models:
    """The server's runs, the default one loaded; no checkpoint at all is the quickstart's hint."""
    models = Models(args.checkpoint, args.pretrained, args.device)
    if models.default() is None:
        raise CheckpointError(f"no checkpoint found under {CHECKPOINTS}/ (in {os.getcwd()}): train one first with "
                              f"`{QUICKSTART}`, or pass --checkpoint PATH")
    return models


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.host not in LOOPBACK:
        print(f"warning: --host {args.host} lets other machines reach the page, and anyone who reaches port "
              f"{args.port} can run the model and write under results/: bind 127.0.0.1 unless you mean it",
              file=sys.stderr)
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port} is not a port: use 1..65535 (e.g. 7860)", file=sys.stderr)
        sys.exit(1)
    try:
        page = build_ui(open_models(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                prevent_thread_lock=True, max_file_size=4 * MAX_UPLOAD_BYTES, quiet=True)
    print(f"ddpm-lab page: http://{args.host}:{args.port}/  (Ctrl+C stops it)", flush=True)
    page.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
