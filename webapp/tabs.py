"""The tabs of the page: Sample (live previews), the editing tabs (Inpaint, Image-to-image, Interpolation,
Inversion) and the condition tab of an image-conditioned model: each a form, a button, the result and its sample.py
command (webapp/ui_parts.py's helpers). The element ids are the browser test's contract."""
from __future__ import annotations

import gradio as gr

from config import SAMPLERS
from editing.algorithms import INPAINT_SAMPLERS
from sampling.images import BUILTIN_MASKS
from webapp import handlers
from webapp.models import Loaded, Models
from webapp.requests import ALL_CLASSES, MAX_COUNT, MAX_FRAMES, MAX_REPAINT, MAX_STEPS
from webapp.ui_parts import (CheckedEditor, command_boxes, model_event, on_page, result_image, shown, stream_sampling,
                             upload_image)


def steps_seed(loaded: Loaded, prefix: str):
    cfg = loaded.source.cfg
    steps = gr.Number(cfg.sample.steps, label="steps", precision=0, minimum=1, maximum=MAX_STEPS,
                      elem_id=f"{prefix}-steps")
    seed = gr.Number(cfg.seed, label="seed", precision=0, minimum=0, elem_id=f"{prefix}-seed")
    return steps, seed


def inpaint_tab(models: Models, run, loaded: Loaded) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            editor = CheckedEditor(type="pil", label="image: paint the region to generate", sources=["upload"],
                                   brush=gr.Brush(colors=["#ff0000"], default_size=12, color_mode="fixed"),
                                   layers=False, transforms=(), elem_id="inpaint-editor")
            with gr.Row():
                held = gr.Number(0, label="held-out image", precision=0, minimum=0, elem_id="inpaint-heldout-index")
                pick = gr.Button("use this held-out image", elem_id="inpaint-heldout")
            region = gr.Dropdown(["painted", *BUILTIN_MASKS], value="painted", label="region to generate",
                                 elem_id="inpaint-region")
            resample = gr.Number(10, label="resample", precision=0, minimum=1, maximum=MAX_REPAINT,
                                 elem_id="inpaint-resample")
            jump = gr.Number(10, label="jump", precision=0, minimum=1, maximum=MAX_REPAINT, elem_id="inpaint-jump")
            sampler = gr.Dropdown(list(INPAINT_SAMPLERS), value="ddim", label="sampler", elem_id="inpaint-sampler")
            steps, seed = steps_seed(loaded, "inpaint")
            button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-run")
        with gr.Column(scale=1):
            result = result_image("inpaint-result")
            command, files = command_boxes("inpaint")

    @on_page
    def go(name, value, region, resample, jump, sampler, steps, seed):
        image, mask = handlers.painted_mask(value)
        return shown(handlers.inpaint(models.get(name), image, region, mask, resample, jump, sampler, steps, seed))

    @on_page
    def held_out(name, index):
        image = handlers.held_out_image(models.get(name), index)
        return {"background": image, "layers": [], "composite": image}
    pick.click(held_out, [run, held], [editor], api_name="held_out")
    button.click(go, [run, editor, region, resample, jump, sampler, steps, seed], [result, command, files],
                 **model_event("inpaint"))


def img2img_tab(models: Models, run, loaded: Loaded) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            image = upload_image(label="image", elem_id="img2img-input")
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="strength (1 = ignore the image)",
                                 elem_id="img2img-strength")
            sampler = gr.Dropdown(["ddim", "ddpm", "dpmpp2m"], value="ddim", label="sampler",
                                  elem_id="img2img-sampler")
            steps, seed = steps_seed(loaded, "img2img")
            button = gr.Button("Image to image", variant="primary", elem_id="img2img-run")
        with gr.Column(scale=1):
            result = result_image("img2img-result")
            command, files = command_boxes("img2img")
    go = on_page(lambda name, *values: shown(handlers.img2img(models.get(name), *values)))
    button.click(go, [run, image, strength, sampler, steps, seed], [result, command, files],
                 **model_event("img2img"))


def interpolate_tab(models: Models, run, loaded: Loaded) -> None:
    with gr.Row():
        a = upload_image(label="image A", elem_id="interp-a")
        b = upload_image(label="image B", elem_id="interp-b")
    with gr.Row():
        frames = gr.Number(8, label="frames", precision=0, minimum=2, maximum=MAX_FRAMES, elem_id="interp-frames")
        steps, seed = steps_seed(loaded, "interp")
    button = gr.Button("Interpolate", variant="primary", elem_id="interp-run")
    result = result_image("interp-result")
    command, files = command_boxes("interp")
    go = on_page(lambda name, *values: shown(handlers.interpolate(models.get(name), *values)))
    button.click(go, [run, a, b, frames, steps, seed], [result, command, files],
                 **model_event("interpolate"))


def invert_tab(models: Models, run, loaded: Loaded) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            image = upload_image(label="image", elem_id="invert-input")
            steps, seed = steps_seed(loaded, "invert")
            button = gr.Button("Invert and reconstruct", variant="primary", elem_id="invert-run")
        with gr.Column(scale=1):
            result = result_image("invert-result")
            command, files = command_boxes("invert")
    go = on_page(lambda name, *values: shown(handlers.invert(models.get(name), *values)))
    button.click(go, [run, image, steps, seed], [result, command, files],
                 **model_event("invert"))


def condition_tab(models: Models, run, loaded: Loaded) -> None:
    task = loaded.source.cfg.data.task
    with gr.Row():
        with gr.Column(scale=1):
            image = upload_image(label=f"{task} input (empty: held-out images)", sources=["upload"],
                                 elem_id="condition-input")
            sampler = gr.Dropdown(["ddim", "ddpm", "dpmpp2m"], value="ddim", label="sampler",
                                  elem_id="condition-sampler")
            steps, seed = steps_seed(loaded, "condition")
            count = gr.Number(4, label="count", precision=0, minimum=1, maximum=16, elem_id="condition-count")
            button = gr.Button("Run", variant="primary", elem_id="condition-run")
        with gr.Column(scale=1):
            result = result_image("condition-result")
            command, files = command_boxes("condition")
    go = on_page(lambda name, *values: shown(handlers.condition(models.get(name), *values)))
    button.click(go, [run, image, sampler, steps, seed, count], [result, command, files],
                 **model_event("condition"))


def label_choices(loaded: Loaded) -> list:
    from commands.sample_command import class_names
    cfg = loaded.source.cfg
    names = class_names(cfg)
    return [("one row per class", ALL_CLASSES)] + [(names[i] if i < len(names) else str(i), str(i))
                                                   for i in range(cfg.model.num_classes)]


def sample_tab(models: Models, run, loaded: Loaded) -> dict:
    cfg = loaded.source.cfg
    with gr.Row():
        with gr.Column(scale=1):
            sampler = gr.Dropdown(list(SAMPLERS), value=cfg.sample.sampler, label="sampler", elem_id="sample-sampler")
            steps = gr.Number(cfg.sample.steps, label="steps", precision=0, minimum=1, maximum=MAX_STEPS,
                              elem_id="sample-steps")
            eta = gr.Slider(0, 1, value=cfg.sample.eta, step=0.05, label="eta (DDIM)", elem_id="sample-eta")
            cond = cfg.model.num_classes > 0
            guidance = gr.Number(cfg.sample.guidance_scale, label="guidance scale", visible=cond,
                                 elem_id="sample-guidance")
            label = gr.Dropdown(label_choices(loaded), value=ALL_CLASSES, label="class label", visible=cond,
                                elem_id="sample-label")
            seed = gr.Number(cfg.seed, label="seed", precision=0, minimum=0, elem_id="sample-seed")
            count = gr.Number(min(16, MAX_COUNT), label="count", precision=0, minimum=1, maximum=MAX_COUNT,
                              elem_id="sample-count")
            button = gr.Button("Sample", variant="primary", elem_id="sample-run")
        with gr.Column(scale=2):
            grid = gr.Image(label="grid", type="pil", format="png", interactive=False, elem_id="sample-grid")
            preview = gr.Image(label="live preview: predicted x0 | x_t", type="pil", format="png", interactive=False,
                               elem_id="sample-preview")
    command, files = command_boxes("sample")

    @on_page
    def go(name, *values, progress=gr.Progress()):
        for kind, item in stream_sampling(models.get(name), values, progress):
            if kind == "done":
                yield (*shown(item)[:1], gr.skip(), *shown(item)[1:])
            else:
                yield gr.skip(), item, gr.skip(), gr.skip()
    button.click(go, [run, sampler, steps, eta, guidance, label, seed, count], [grid, preview, command, files],
                 **model_event("sample"))
    return {"steps": steps, "sampler": sampler, "guidance": guidance, "label": label}


