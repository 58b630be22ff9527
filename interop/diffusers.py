"""Interop with Hugging Face diffusers: the conversion between our U-Net/Diffusion and diffusers'
UNet2DModel/DDPMScheduler (configs and state dicts), and writing a DDPMPipeline folder. interop/pretrained.py reads
diffusers folders with it (sample.py --pretrained), export.py writes them.

model.UNet is the DDPM network exactly as diffusers' UNet2DModel builds it for the google/ddpm-* models,
so converting weights is renaming keys (see _RENAMES) plus fusing to_q/to_k/to_v into our one qkv Linear.
Settings our UNet or Diffusion cannot express are refused with a ConfigError that names each of them:
we never silently build a different network. Needs safetensors, not diffusers. Class-conditional:
num_class_embeds = num_classes + 1, the last row being our null label.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from config import (SAMPLERS, SPACINGS, Config, ConfigError, DataConfig, DiffusionConfig, ModelConfig, SampleConfig,
    TrainConfig, check_choice, cond_channels, from_dict, validate)
from model import build_model
from storage.checkpoints import CheckpointError
from storage.files import check_output_path, write_bytes_output
from utils import is_int

WEIGHTS = "diffusion_pytorch_model"

# Defaults of diffusers 0.42's UNet2DModel / DDPMScheduler: an older config.json omits keys that then
# take these values in diffusers, so we must read them the same way (tests check them against diffusers).
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None}
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
    "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # same formulas as diffusion.make_betas
OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# fixed_small_log draws noise with exp(0.5 log var) = sqrt(var): the same sampler as fixed_small.
VAR_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")  # DDPM-family beta schedules

# (key, supported?(full config), what we implement). Every failing row is listed in one ConfigError.
_UNET_RULES = [
    ("_class_name", lambda c: c.get("_class_name", "UNet2DModel") == "UNet2DModel", "UNet2DModel"),
    ("time_embedding_type", lambda c: c["time_embedding_type"] == "positional", "'positional' (sinusoidal)"),
    ("flip_sin_to_cos", lambda c: c["flip_sin_to_cos"] is False, "false (sin before cos, as in DDPM)"),
    ("freq_shift", lambda c: c["freq_shift"] == 1, "1 (frequencies exp(-ln(1e4) i / (half - 1)), as in DDPM)"),
    ("downsample_padding", lambda c: c["downsample_padding"] == 0, "0 (pad right/bottom = TF 'SAME')"),
    ("resnet_time_scale_shift", lambda c: c["resnet_time_scale_shift"] == "default", "'default' (add time)"),
    ("center_input_sample", lambda c: c["center_input_sample"] is False, "false"),
    ("act_fn", lambda c: c["act_fn"] in ("silu", "swish"), "'silu'"),
    ("mid_block_type", lambda c: c["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'"),
    ("add_attention", lambda c: c["add_attention"] is True, "true (attention in the middle block)"),
    ("mid_block_scale_factor", lambda c: c["mid_block_scale_factor"] == 1, "1"),
    ("downsample_type", lambda c: c["downsample_type"] == "conv", "'conv'"),
    ("upsample_type", lambda c: c["upsample_type"] == "conv", "'conv'"),
    ("class_embed_type", lambda c: c["class_embed_type"] is None, "null (class labels via num_class_embeds)"),
    ("num_class_embeds", lambda c: c["num_class_embeds"] is None or c["num_class_embeds"] >= 2,
     "null or >= 2 (num_classes + 1 null label)"),
    ("out_channels", lambda c: c["out_channels"] == c["in_channels"] - _cond_width(c),
     "equal to in_channels (minus the condition's channels of an image-conditioned export)"),
    ("attn_norm_num_groups", lambda c: c["attn_norm_num_groups"] in (None, c["norm_num_groups"]),
     "null (= norm_num_groups)"),
    ("time_embedding_dim", lambda c: c["time_embedding_dim"] in (None, 4 * c["block_out_channels"][0]),
     "null (4 x block_out_channels[0])"),
    ("sample_size", lambda c: _square(c["sample_size"]) is not None, "one int (square images)"),
    ("block_out_channels", lambda c: all(w % c["block_out_channels"][0] == 0 for w in c["block_out_channels"]),
     "multiples of block_out_channels[0] (model.channels x model.channel_mult)"),
]
_SCHEDULER_RULES = [
    ("_class_name", lambda c: c.get("_class_name", "DDPMScheduler") in SCHEDULER_CLASSES,
     " / ".join(SCHEDULER_CLASSES)),
    ("trained_betas", lambda c: c["trained_betas"] is None, "null"),
    ("beta_schedule", lambda c: c["beta_schedule"] in SCHEDULES, " / ".join(SCHEDULES)),
    ("rescale_betas_zero_snr", lambda c: not c["rescale_betas_zero_snr"], "false"),
    ("prediction_type", lambda c: c["prediction_type"] in OBJECTIVES, " / ".join(OBJECTIVES)),
    ("variance_type", lambda c: c["variance_type"] in VAR_TYPES, " / ".join(VAR_TYPES)),
    ("thresholding", lambda c: not c["thresholding"], "false (dynamic thresholding is not implemented)"),
    ("clip_sample_range", lambda c: not c["clip_sample"] or c["clip_sample_range"] == 1, "1.0"),
    ("timestep_spacing", lambda c: c["timestep_spacing"] in SPACINGS, " / ".join(SPACINGS)),
    ("steps_offset", lambda c: c["steps_offset"] == 0, "0 (our 'leading' sub-sequence starts at t=0)"),
]


# The types of the values that the rules and the conversion compute with (config.json is untrusted input).
_KINDS = {
    "int": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "int?": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
    "num": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "ints": (lambda v: isinstance(v, list) and v and all(is_int(w) and w > 0 for w in v),
             "a non-empty list of positive integers"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
}
_UNET_TYPES = {"in_channels": "int", "out_channels": "int", "layers_per_block": "int", "norm_num_groups": "int",
               "block_out_channels": "ints", "down_block_types": "strs", "up_block_types": "strs",
               "attention_head_dim": "int?", "num_class_embeds": "int?", "dropout": "num", "norm_eps": "num"}
_SCHEDULER_TYPES = {"num_train_timesteps": "int", "beta_start": "num", "beta_end": "num"}


def _type_problems(config: dict, types: dict, what: str) -> list[str]:
    return [f"{what} {key} must be {_KINDS[kind][1]}, got {config.get(key)!r}"
            for key, kind in types.items() if not _KINDS[kind][0](config.get(key))]


# An image-conditioned model (data.task, sampling/conditioning.py) takes its condition as extra input channels; the
# export records the task under this key, which diffusers ignores (a leading "_" marks private config keys).
CONDITION_KEY = "_ddpm_lab_condition"


def _condition(c: dict) -> Optional[dict]:
    """The recorded condition {"task", "sr_factor"} of an exported config.json, or None; checked values."""
    cond = c.get(CONDITION_KEY)
    if cond is None:
        return None
    if (not isinstance(cond, dict) or cond.get("task") not in ("superres", "colorize")
            or not is_int(cond.get("sr_factor")) or cond["sr_factor"] < 1):
        raise ConfigError(f"config.json {CONDITION_KEY} = {cond!r} must be {{\"task\": \"superres\" or "
                          "\"colorize\", \"sr_factor\": a positive integer}")
    return cond


# The sampling defaults a checkpoint records (config `sample`), which no diffusers scheduler key holds: the export
# writes them under this key of scheduler_config.json (spacing and clip_x0 have diffusers keys: timestep_spacing,
# clip_sample). A folder without it (any diffusers model) samples with our defaults.
SAMPLE_KEY = "_ddpm_lab_sample"
SAMPLE_FIELDS = ("sampler", "steps", "eta", "guidance_scale", "num_samples", "batch_size")


def _sample_config(s: dict, T: int) -> SampleConfig:
    """The sample section of a scheduler config: the recorded SAMPLE_KEY values (checked: untrusted input) over
    the defaults (ddim, min(50, T) steps, eta 0, no guidance, 64 samples), clip_x0 from clip_sample."""
    recorded = s.get(SAMPLE_KEY) or {}
    where = f"scheduler_config.json {SAMPLE_KEY}"
    if not isinstance(recorded, dict) or set(recorded) - set(SAMPLE_FIELDS):
        raise ConfigError(f"{where} = {recorded!r} must be an object with only the keys {', '.join(SAMPLE_FIELDS)}")
    try:
        sample = from_dict({"steps": min(50, T), **recorded, "clip_x0": bool(s["clip_sample"])}, SampleConfig,
                           "sample.")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_choice(f"{where} sampler", sample.sampler, SAMPLERS)
    ranges = [("steps", sample.steps is None or 1 <= sample.steps <= T, f"between 1 and T = {T}, or null"),
              ("eta", math.isfinite(sample.eta) and sample.eta >= 0, "a finite number >= 0"),
              ("guidance_scale", math.isfinite(sample.guidance_scale), "a finite number"),
              ("num_samples", sample.num_samples >= 1, ">= 1"), ("batch_size", sample.batch_size >= 1, ">= 1")]
    for key, ok, what in ranges:
        if not ok:
            raise ConfigError(f"{where} {key} = {getattr(sample, key)!r} must be {what}: re-export the checkpoint")
    return sample


def _cond_width(c: dict) -> int:
    """The condition's input channels: in_channels minus out_channels as cond_channels of the task has it."""
    cond = _condition(c)
    return 0 if cond is None else cond_channels(cond["task"], c["out_channels"])


def _square(size) -> Optional[int]:
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _attention_levels(c: dict) -> tuple[list[bool], list[str]]:
    """Which resolution levels have attention, and the problems with the block types."""
    down = [t.removeprefix("UNetRes") for t in c["down_block_types"]]
    up = [t.removeprefix("UNetRes") for t in c["up_block_types"]][::-1]  # up[i] mirrors down[i]
    problems = [f"down_block_types: {t!r} is not supported (DownBlock2D / AttnDownBlock2D)"
                for t in down if t not in ("DownBlock2D", "AttnDownBlock2D")]
    problems += [f"up_block_types: {t!r} is not supported (UpBlock2D / AttnUpBlock2D)"
                 for t in up if t not in ("UpBlock2D", "AttnUpBlock2D")]
    n = len(c["block_out_channels"])
    if len(down) != n or len(up) != n:
        return [], problems + ["down_block_types / up_block_types / block_out_channels differ in length"]
    attn = [d.startswith("Attn") for d in down]
    problems += [f"down_block_types[{i}] / up_block_types[{n - 1 - i}]: attention in only one path at a "
                 "resolution (our UNet attends in both or neither)"
                 for i in range(n) if attn[i] != up[i].startswith("Attn")]
    return attn, problems


def _unet_problems(c: dict) -> tuple[list[bool], list[str]]:
    problems = [f"{key} = {c.get(key)!r} is not supported (ddpm-lab implements {what})"
                for key, ok, what in _UNET_RULES if not ok(c)]
    attn, block_problems = _attention_levels(c)
    head = c["attention_head_dim"]
    widths = [w for w, a in zip(c["block_out_channels"], attn) if a] + c["block_out_channels"][-1:]
    if head is not None and any(w % head for w in widths):
        problems.append(f"attention_head_dim = {head} does not divide every attention width {widths}")
    return attn, problems + block_problems


def diffusers_config_to_ours(unet_config: dict, scheduler_config: dict) -> Config:
    """A full Config (model, diffusion, data.image_size, sample) from a diffusers UNet2DModel
    config.json and scheduler_config.json. ConfigError lists every setting we cannot express."""
    for name, config in (("config.json", unet_config), ("scheduler_config.json", scheduler_config)):
        if not isinstance(config, dict):
            raise ConfigError(f"the diffusers {name} holds a JSON {type(config).__name__}, not an object of settings")
    u, s = {**UNET_DEFAULTS, **unet_config}, {**SCHEDULER_DEFAULTS, **scheduler_config}
    wrong = _type_problems(u, _UNET_TYPES, "config.json") + _type_problems(s, _SCHEDULER_TYPES, "scheduler")
    if wrong:  # before the rules below compute with them
        raise ConfigError("this diffusers model's settings have the wrong types: " + "; ".join(wrong))
    attn, problems = _unet_problems(u)
    problems += [f"scheduler {key} = {s.get(key)!r} is not supported (ddpm-lab implements {what})"
                 for key, ok, what in _SCHEDULER_RULES if not ok(s)]
    if problems:
        raise ConfigError("this diffusers model cannot be run by ddpm-lab without changing the network or "
                          "schedule: " + "; ".join(problems))
    widths, size, T = list(u["block_out_channels"]), _square(u["sample_size"]), int(s["num_train_timesteps"])
    model = ModelConfig(
        kind="unet", in_channels=u["out_channels"], channels=widths[0],
        channel_mult=[w // widths[0] for w in widths],
        num_res_blocks=u["layers_per_block"], attention_resolutions=[size >> i for i, a in enumerate(attn) if a],
        num_heads=1, num_head_channels=u["attention_head_dim"] or -1, dropout=float(u["dropout"]),
        num_classes=(u["num_class_embeds"] or 1) - 1, norm_groups=u["norm_num_groups"],
        norm_eps=float(u["norm_eps"]))
    diffusion = DiffusionConfig(
        num_timesteps=T, schedule=SCHEDULES[s["beta_schedule"]], beta_start=float(s["beta_start"]),
        beta_end=float(s["beta_end"]), objective=OBJECTIVES[s["prediction_type"]],
        var_type=VAR_TYPES[s["variance_type"]], timestep_spacing=s["timestep_spacing"])
    cond = _condition(u) or {"task": "generate", "sr_factor": DataConfig.sr_factor}
    data = DataConfig(dataset="folder", image_size=size, random_flip=False, download=False, task=cond["task"],
                      sr_factor=cond["sr_factor"])
    cfg = Config(run_name="pretrained", data=data, model=model, diffusion=diffusion,
                 train=TrainConfig(sample_steps=min(50, T)), sample=_sample_config(s, T))
    try:  # the same field rules as every config (config.RANGES): a NaN norm_eps sampled black images
        return validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"config.json / scheduler_config.json give a value out of range: {err}") from None


def _export_head_dim(m: ModelConfig, attn_widths: list[int]) -> Optional[int]:
    """diffusers' attention_head_dim giving the same heads as ours at every attention layer."""
    if m.num_head_channels > 0:
        if any(w % m.num_head_channels for w in attn_widths):
            raise ConfigError(f"model.num_head_channels = {m.num_head_channels} does not divide the attention "
                              f"widths {attn_widths}: diffusers would build a different attention")
        return m.num_head_channels
    if m.num_heads == 1:
        return None  # diffusers: null = one head per attention layer, as in DDPM
    head_dims = sorted({w // m.num_heads for w in attn_widths})
    if len(head_dims) > 1:
        raise ConfigError(f"model.num_heads = {m.num_heads} gives head widths {head_dims} at attention widths "
                          f"{attn_widths}, but diffusers' UNet2DModel uses one head width for every attention "
                          "layer: set model.num_head_channels instead")
    return head_dims[0]


def ours_to_diffusers_config(cfg: Config) -> tuple[dict, dict]:
    """(UNet2DModel config, DDPMScheduler config) describing our network and schedule."""
    m, d = cfg.model, cfg.diffusion
    if m.kind != "unet":
        raise ConfigError(f"model.kind = {m.kind!r} (the MLP denoiser for 2-D points) has no diffusers "
                          "equivalent: UNet2DModel is an image U-Net. Export works for U-Net models "
                          "(presets cifar10, mnist, digits)")
    widths = [m.channels * k for k in m.channel_mult]
    attn = [(cfg.data.image_size >> i) in m.attention_resolutions for i in range(len(widths))]
    head_dim = _export_head_dim(m, [w for w, a in zip(widths, attn) if a] + widths[-1:])
    version = _diffusers_version()
    unet = {"_class_name": "UNet2DModel", "_diffusers_version": version, **UNET_DEFAULTS,
            "sample_size": cfg.data.image_size, "out_channels": m.in_channels,
            "in_channels": m.in_channels + cond_channels(cfg.data.task, m.in_channels),
            "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "norm_eps": m.norm_eps,
            "block_out_channels": widths, "layers_per_block": m.num_res_blocks, "dropout": m.dropout,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn][::-1],
            "attention_head_dim": head_dim, "norm_num_groups": m.norm_groups,
            "num_class_embeds": m.num_classes + 1 if m.num_classes > 0 else None}
    if cfg.data.task != "generate":
        unet[CONDITION_KEY] = {"task": cfg.data.task, "sr_factor": cfg.data.sr_factor}
    theirs = {ours: name for table in (SCHEDULES, OBJECTIVES, VAR_TYPES)
              for name, ours in reversed(table.items())}  # fixed_small -> fixed_small, not fixed_small_log
    scheduler = {"_class_name": "DDPMScheduler", "_diffusers_version": version, **SCHEDULER_DEFAULTS,
                 "num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
                 "beta_schedule": theirs[d.schedule], "variance_type": theirs[d.var_type],
                 "prediction_type": theirs[d.objective], "clip_sample": cfg.sample.clip_x0,
                 "timestep_spacing": d.timestep_spacing,
                 SAMPLE_KEY: {key: getattr(cfg.sample, key) for key in SAMPLE_FIELDS}}
    return unet, scheduler


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("diffusers")
    except PackageNotFoundError:  # diffusers is optional for us: name the oldest version we support
        return "0.30.0"


# ----------------------------------------------------------------------------- state dicts
_RENAMES = [  # (diffusers, ours) on keys wrapped in dots, so that only whole names match
    (".time_embedding.linear_1.", ".time_mlp.0."), (".time_embedding.linear_2.", ".time_mlp.2."),
    (".conv_norm_out.", ".norm_out."), (".class_embedding.", ".class_emb."), (".down_blocks.", ".down."),
    (".up_blocks.", ".up."), (".mid_block.", ".mid."), (".resnets.", ".res."), (".attentions.", ".attn."),
    (".time_emb_proj.", ".time_proj."), (".conv_shortcut.", ".skip."), (".downsamplers.0.", ".resample."),
    (".upsamplers.0.", ".resample."), (".group_norm.", ".norm."), (".to_out.0.", ".proj.")]
# Attention names of diffusers < 0.14, still found in hub files such as google/ddpm-cifar10-32's .bin.
_OLD_ATTENTION = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]


def _rename(key: str, pairs) -> str:
    key = f".{key}."
    for old, new in pairs:
        key = key.replace(old, new)
    return key[1:-1]


def convert_diffusers_state_dict(sd: dict) -> dict:
    """diffusers UNet2DModel state_dict -> model.UNet state_dict (q, k, v fused into qkv)."""
    renamed = {}
    for key, value in sd.items():
        if ".attentions." in key:
            key = _rename(key, _OLD_ATTENTION)
        renamed[_rename(key, _RENAMES)] = value
    out = {}
    for key, value in renamed.items():
        head, _, leaf = key.rpartition(".")  # leaf: weight | bias
        if head.endswith(".to_q"):
            base = head[:-len("to_q")]
            try:
                out[f"{base}qkv.{leaf}"] = torch.cat([renamed[f"{base}to_{c}.{leaf}"] for c in "qkv"], dim=0)
            except KeyError as e:
                raise CheckpointError(f"attention weights are incomplete: {e.args[0]} is missing") from None
        elif not head.endswith((".to_k", ".to_v")):
            out[key] = value
    return out


def convert_state_dict_to_diffusers(sd: dict) -> dict:
    """model.UNet state_dict -> diffusers UNet2DModel state_dict (the inverse of the above)."""
    inverse = [(ours, theirs) for theirs, ours in _RENAMES if ".resample." not in ours]
    out = {}
    for key, value in sd.items():
        sampler = ".downsamplers.0." if key.startswith("down.") else ".upsamplers.0."
        key = _rename(_rename(key, [(".resample.", sampler)]), inverse)
        if key.endswith((".qkv.weight", ".qkv.bias")):
            base, leaf = key.rsplit(".qkv.", 1)
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{base}.{name}.{leaf}"] = part
        else:
            out[key] = value
    return out


def build_with_weights(cfg: Config, sd: dict, source: str) -> torch.nn.Module:
    """build_model(cfg) holding exactly the tensors of `sd` (strict; float32). The network is built on the
    meta device, so no time is spent on a random initialisation that would be overwritten."""
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"weights in {source} do not fit the network its config describes: "
                              f"{str(e).splitlines()[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"weights in {source} do not match the network its config describes: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.float()


# ----------------------------------------------------------------------------- export
def export_diffusers(cfg: Config, state_dict: dict, out: Path) -> Path:
    """Write a DDPMPipeline folder: model_index.json, unet/ (config + safetensors), scheduler/."""
    unet_config, scheduler_config = ours_to_diffusers_config(cfg)  # refuse before writing anything
    model = build_with_weights(cfg, state_dict, "the checkpoint")  # the weights must fit its config
    tensors = {k: v.detach().float().contiguous().clone()
               for k, v in convert_state_dict_to_diffusers(model.state_dict()).items()}
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        raise CheckpointError("writing diffusers weights needs the safetensors package: "
                              "pip install safetensors") from None
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": unet_config["_diffusers_version"],
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    files = {out / "model_index.json": index, out / "unet" / "config.json": unet_config,
             out / "scheduler" / "scheduler_config.json": scheduler_config}
    files = {path: (json.dumps(content, indent=2) + "\n").encode() for path, content in files.items()}
    files[out / "unet" / f"{WEIGHTS}.safetensors"] = safetensors_bytes(tensors, metadata={"format": "pt"})
    for path in files:  # every file checked (no link out of --out) before the first is written
        check_output_path(path, replace=True, root=out)  # replace: export.py refused a non-empty --out without --force
    for path, data in files.items():
        write_bytes_output(path, data, replace=True, root=out)
    return out
