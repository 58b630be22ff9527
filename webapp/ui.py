"""The page (Gradio Blocks): a run picker (the server's own list: the browser sends a run name) and one tab per
mode the run's model supports, the others hidden; webapp/tabs.py builds the tabs. build_ui(models) returns the
Blocks, queued, not launched (app.py launches it)."""
from __future__ import annotations

import gradio as gr

from sampling.conditioning import conditioned
from webapp.models import Loaded, Models
from webapp.tabs import label_choices, condition_tab, img2img_tab, inpaint_tab, interpolate_tab, invert_tab, sample_tab
from webapp.ui_parts import model_event, on_page

TABS = {"sample": ("Sample", sample_tab), "inpaint": ("Inpaint", inpaint_tab),
        "img2img": ("Image to image", img2img_tab), "interpolate": ("Interpolation", interpolate_tab),
        "invert": ("Inversion", invert_tab), "condition": ("Super-resolve / colourise", condition_tab)}


def modes(loaded: Loaded) -> dict[str, bool]:
    """The tabs this model supports: editing needs an image model without an image condition; an
    image-conditioned model has its condition tab."""
    cfg = loaded.source.cfg
    editable = cfg.model.kind != "mlp" and not conditioned(cfg)
    return {"sample": True, "inpaint": editable, "img2img": editable, "interpolate": editable, "invert": editable,
            "condition": conditioned(cfg)}


def describe(loaded: Loaded) -> str:
    cfg, s = loaded.source.cfg, loaded.source.cfg.sample
    text = (f"**{loaded.name}**: {cfg.model.kind} model, {cfg.data.image_size}px, T = "
            f"{loaded.source.diffusion.num_timesteps}, loaded with `{' '.join(loaded.argv)}`")
    if loaded.source.distill:
        text += (f"\n\n**Distilled student**: it samples in its own {s.steps} DDIM steps (sample.steps, set below); "
                 "other step counts are not what it learned.")
    return text


def build_ui(models: Models) -> gr.Blocks:
    """The page for `models`, opened on its default run (loaded here, once, before the URL is printed)."""
    loaded = models.get(models.default())
    with gr.Blocks(title="ddpm-lab") as page:
        gr.Markdown("# ddpm-lab")
        run = gr.Dropdown(models.names(), value=loaded.name, label="run (checkpoints/)", elem_id="run-picker")
        info = gr.Markdown(describe(loaded), elem_id="run-info")
        tabs, fields, shown = {}, {}, modes(loaded)
        with gr.Tabs():
            for key, (title, build) in TABS.items():
                with gr.Tab(title, id=key, elem_id=f"tab-{key}", visible=shown[key]) as tabs[key]:
                    fields[key] = build(models, run, loaded)

        @on_page
        def switch(name):
            new = models.get(name)
            visible, cfg = modes(new), new.source.cfg
            cond = cfg.model.num_classes > 0
            return (describe(new), *(gr.update(visible=visible[k]) for k in TABS),
                    gr.update(value=cfg.sample.steps), gr.update(value=cfg.sample.sampler),
                    gr.update(visible=cond), gr.update(visible=cond, choices=label_choices(new)))
        outputs = [info, *tabs.values()] + [fields["sample"][k] for k in ("steps", "sampler", "guidance", "label")]
        run.change(switch, [run], outputs, **model_event("switch_run"))
    page.queue(default_concurrency_limit=1)
    return page
