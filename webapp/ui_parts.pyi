"""The page's building blocks: upload components that check before Gradio decodes (CheckedImage, CheckedEditor),
the UserError -> gr.Error wrapper, the result boxes, and the live previews of a sampling run.

Uploads pass webapp.uploads.check_upload before Gradio decodes them, so a decompression bomb, a non-image or a
too-big file is one gr.Error line in the page and the server keeps serving. Every model call queues under one
concurrency id with concurrency_limit=1 (MODEL): two browsers at once both get their results, one after the other."""
from __future__ import annotations

import functools
import queue
import threading

import gradio as gr
import torch
from PIL import Image

from config import UserError
from sampling.pictures import image_grid
from webapp import handlers
from webapp.models import Loaded
from webapp.uploads import check_upload

MODEL = dict(concurrency_limit=1, concurrency_id="model")  # one model call at a time, queued
PREVIEWS = 8  # live previews per sampling run (predicted x0 | x_t of the first 16 samples)


def _checked(payload_file) -> None:
    if payload_file is None:
        return
    data = payload_file if isinstance(payload_file, (bytes, bytearray)) else getattr(payload_file, "path", None)
    if data is not None:
        try:
            check_upload(bytes(data) if isinstance(data, bytearray) else data)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None


class CheckedImage(gr.Image):
    """gr.Image whose upload is checked (bytes, pixels, decodes) before Gradio opens it. Make it with
    upload_image(): no __init__ of its own, since Gradio reads a component's settings from its __init__'s
    signature."""
    is_template = True  # the browser draws it as a plain gr.Image

    def preprocess(self, payload):
        _checked(payload)
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckedEditor(gr.ImageEditor):
    """gr.ImageEditor whose background upload is checked the same way."""
    is_template = True

    def preprocess(self, payload):
        if payload is not None:
            blobs = self.blob_storage.get(payload.id) if payload.id is not None else payload
            _checked(getattr(blobs, "background", None))
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


def on_page(fn):
    """A handler for the page: a user's mistake (config.UserError) becomes one gr.Error line."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e).splitlines()[0], print_exception=False) from None
    return call


def shown(result: handlers.Result) -> tuple:
    text = result.command + (f"\n# {result.note}" if result.note else "")
    return result.image, text, "\n".join(str(p) for p in result.files)


def preview_picture(x_t: torch.Tensor, x0: torch.Tensor) -> Image.Image:
    """Predicted x0 (left) and x_t (right) of the first 16 samples."""
    left, right = image_grid(x0[:16].float().cpu()), image_grid(x_t[:16].float().cpu().clamp(-1, 1))
    both = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width + 8, 0))
    return both


def stream_sampling(loaded: Loaded, values: tuple, progress):
    """handlers.sample in a thread; yields ("step", picture) every few steps and ("done", result) at the end."""
    sampler, steps = values[0], values[1]
    try:
        total = len(loaded.source.diffusion.sampling_timesteps(sampler, None if sampler == "ddpm" else int(steps)))
    except (TypeError, ValueError, OverflowError):  # a bad value: the handler says so in one line
        total = 1
    every, events = max(1, total // PREVIEWS), queue.Queue()

    def on_step(i, t, x_t, x0):
        if i % every == 0 or i == total - 1:
            events.put(("step", i, preview_picture(x_t, x0)))

    def work():
        try:
            events.put(("done", handlers.sample(loaded, *values, callback=on_step), None))
        except BaseException as e:  # passed to the page's thread, which raises it there
            events.put(("error", e, None))
    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, item, picture = events.get()
        if kind == "error":
            raise item
        if kind == "done":
            yield kind, item
            return
        progress((item + 1, total), desc=f"step {item + 1} of {total}")
        yield kind, picture


def command_boxes(prefix: str):
    command = gr.Textbox(label="the same PNGs, byte for byte, from the command line", interactive=False,
                         elem_id=f"{prefix}-command")
    files = gr.Textbox(label="files written", interactive=False, lines=2, max_lines=6, elem_id=f"{prefix}-files")
    return command, files


def result_image(elem_id: str):
    return gr.Image(label="result", type="pil", format="png", interactive=False, elem_id=elem_id)