"""Interop with Hugging Face diffusers: run published DDPM weights in our U-Net, export ours.

    model, diffusion, cfg = load_pretrained("google/ddpm-cifar10-32")   # hub id or local folder
    python export.py --checkpoint checkpoints/cifar10/last.pt --format diffusers --out my-ddpm

model.UNet is the DDPM network exactly as diffusers' UNet2DModel builds it for the google/ddpm-* models,
so converting weights is renaming keys (see _RENAMES) plus fusing to_q/to_k/to_v into our one qkv Linear.
Settings our UNet or Diffusion cannot express are refused with a ConfigError that names each of them:
we never silently build a different network. Needs safetensors (and huggingface_hub for hub ids), not
diffusers. Class-conditional: num_class_embeds = num_classes + 1, the last row being our null label.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from config import (SPACINGS, Config, ConfigError, DataConfig, DiffusionConfig, ModelConfig, SampleConfig,
                    TrainConfig, from_dict, validate)
from diffusion import build_diffusion
from model import build_model
from utils import CheckpointError, get_device, load_checkpoint, output_folder_problem

HUB_TIMEOUT_S = 10  # never hang on a firewalled network
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
    ("out_channels", lambda c: c["out_channels"] == c["in_channels"], "equal to in_channels"),
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The types of the values that the rules and the conversion compute with (config.json is untrusted input).
_KINDS = {
    "int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int?": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "num": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "ints": (lambda v: isinstance(v, list) and v and all(_is_int(w) and w > 0 for w in v),
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
    """A full Config (model, diffusion, data.image_size, sample.clip_x0) from a diffusers UNet2DModel
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
        kind="unet", in_channels=u["in_channels"], channels=widths[0],
        channel_mult=[w // widths[0] for w in widths],
        num_res_blocks=u["layers_per_block"], attention_resolutions=[size >> i for i, a in enumerate(attn) if a],
        num_heads=1, num_head_channels=u["attention_head_dim"] or -1, dropout=float(u["dropout"]),
        num_classes=(u["num_class_embeds"] or 1) - 1, norm_groups=u["norm_num_groups"],
        norm_eps=float(u["norm_eps"]))
    diffusion = DiffusionConfig(
        num_timesteps=T, schedule=SCHEDULES[s["beta_schedule"]], beta_start=float(s["beta_start"]),
        beta_end=float(s["beta_end"]), objective=OBJECTIVES[s["prediction_type"]],
        var_type=VAR_TYPES[s["variance_type"]], timestep_spacing=s["timestep_spacing"])
    data = DataConfig(dataset="folder", image_size=size, random_flip=False, download=False)
    return validate(Config(run_name="pretrained", data=data, model=model, diffusion=diffusion,
                           train=TrainConfig(sample_steps=min(50, T)),
                           sample=SampleConfig(steps=min(50, T), clip_x0=bool(s["clip_sample"]))))


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
            "sample_size": cfg.data.image_size, "in_channels": m.in_channels, "out_channels": m.in_channels,
            "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "norm_eps": m.norm_eps,
            "block_out_channels": widths, "layers_per_block": m.num_res_blocks, "dropout": m.dropout,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn][::-1],
            "attention_head_dim": head_dim, "norm_num_groups": m.norm_groups,
            "num_class_embeds": m.num_classes + 1 if m.num_classes > 0 else None}
    theirs = {ours: name for table in (SCHEDULES, OBJECTIVES, VAR_TYPES)
              for name, ours in reversed(table.items())}  # fixed_small -> fixed_small, not fixed_small_log
    scheduler = {"_class_name": "DDPMScheduler", "_diffusers_version": version, **SCHEDULER_DEFAULTS,
                 "num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
                 "beta_schedule": theirs[d.schedule], "variance_type": theirs[d.var_type],
                 "prediction_type": theirs[d.objective], "clip_sample": cfg.sample.clip_x0,
                 "timestep_spacing": d.timestep_spacing}
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


# ----------------------------------------------------------------------------- reading diffusers folders
def _hub_files(ext: str) -> list[str]:
    names = ["model_index.json", "config.json", "scheduler_config.json", f"{WEIGHTS}.{ext}"]
    return names + ["unet/config.json", f"unet/{WEIGHTS}.{ext}", "scheduler/scheduler_config.json"]


def _offline_error(repo_id: str, reason: str) -> CheckpointError:
    local = repo_id.split("/")[-1]
    return CheckpointError(
        f"cannot download '{repo_id}' from the Hugging Face Hub ({reason}) and it is not in the local cache. "
        f"On a machine with internet run `hf download {repo_id} --local-dir {local}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id} --local-dir {local}`), copy the folder here, then pass "
        f"`--pretrained ./{local}`")


def _from_cache(hub, repo_id: str, reason: str) -> Path:
    for ext in ("safetensors", "bin"):
        try:
            folder = Path(hub.snapshot_download(repo_id, allow_patterns=_hub_files(ext), local_files_only=True))
        except Exception:  # not cached, or cached incompletely
            continue
        if any(folder.glob(f"**/{WEIGHTS}.{ext}")):
            return folder
    raise _offline_error(repo_id, reason)


def _download(repo_id: str) -> Path:
    """Hub id -> local snapshot folder with only the files we read (one weights file)."""
    try:
        import huggingface_hub as hub
        from huggingface_hub.constants import HF_HUB_OFFLINE  # read at call time: tests may patch it
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(f"'{repo_id}' is not a local folder and downloading it needs huggingface_hub: "
                              "pip install huggingface_hub (or pass a local folder)") from None
    if HF_HUB_OFFLINE:
        return _from_cache(hub, repo_id, "HF_HUB_OFFLINE is set")
    try:
        info = hub.HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise CheckpointError(f"no model '{repo_id}' on the Hugging Face Hub (or it is private/gated), and no "
                              f"local folder of that name") from None
    except Exception as e:  # no network, DNS failure, proxy, timeout
        return _from_cache(hub, repo_id, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    names = {s.rfilename for s in info.siblings or []}
    ext = "safetensors" if names & {f"{WEIGHTS}.safetensors", f"unet/{WEIGHTS}.safetensors"} else "bin"
    files = [f for f in _hub_files(ext) if f in names]
    try:
        return Path(hub.snapshot_download(repo_id, revision=info.sha, allow_patterns=files,
                                          etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:
        raise _offline_error(repo_id, f"download failed: {type(e).__name__}: {str(e)[:120]}") from None


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"'{name_or_path}' is a file, not a folder: pass the diffusers model folder (with "
                              "model_index.json or config.json inside) or a Hugging Face Hub id")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name_or_path):  # ./x, /x, a/b/c, x: a local path
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*") if p.is_dir()], n=1)
        hint = f" (did you mean '{path.parent / near[0]}'?)" if near else ""
        raise CheckpointError(f"'{name_or_path}' is not a folder: it does not exist{hint}. A Hub id looks like "
                              "owner/name, e.g. google/ddpm-cifar10-32")
    return _download(name_or_path)


def _locate(folder: Path) -> tuple[Path, Optional[Path]]:
    """(UNet folder, scheduler config or None) of a pipeline folder or a bare UNet2DModel folder."""
    if (folder / "unet" / "config.json").is_file():
        unet, schedulers = folder / "unet", [folder / "scheduler" / "scheduler_config.json"]
    elif (folder / "config.json").is_file():
        unet = folder  # a bare UNet; its pipeline's scheduler may sit beside it
        schedulers = [folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"]
    else:
        raise CheckpointError(f"'{folder}' is not a diffusers model folder: expected unet/config.json (a "
                              "pipeline saved by DDPMPipeline.save_pretrained) or config.json + "
                              f"{WEIGHTS}.safetensors (a UNet2DModel folder)")
    return unet, next((p for p in schedulers if p.is_file()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read '{path}': {e}") from None


def _read_weights(unet_dir: Path) -> dict:
    """safetensors preferred; a .bin is read as untrusted input (weights_only)."""
    st, pt = unet_dir / f"{WEIGHTS}.safetensors", unet_dir / f"{WEIGHTS}.bin"
    if not st.is_file() and not pt.is_file():
        raise CheckpointError(f"no weights in '{unet_dir}': expected {st.name} or {pt.name} "
                              "(sharded and variant files such as *.fp16.safetensors are not read)")
    try:
        if st.is_file():
            from safetensors.torch import load_file
            return load_file(str(st))
        return torch.load(pt, map_location="cpu", weights_only=True)
    except ImportError:
        raise CheckpointError(f"reading {st} needs the safetensors package: pip install safetensors") from None
    except Exception as e:
        raise CheckpointError(f"weights file in '{unet_dir}' is corrupt or unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _describe(cfg: Config, name_or_path: str) -> None:
    """run_name from the model's name; a dataset guess from name and shape (e.g. for FID statistics)."""
    name = ([p for p in re.split(r"[/\\]", name_or_path) if p not in ("", ".", "unet")] or ["model"])[-1]
    cfg.run_name = "pretrained_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)  # a name, never a path (config.validate)
    shape, guesses = (cfg.model.in_channels, cfg.data.image_size), [
        ("cifar", "cifar10", (3, 32)), ("fashion", "fashion_mnist", (1, 28)), ("mnist", "mnist", (1, 28))]
    cfg.data.dataset = next((d for key, d, want in guesses if key in name.lower() and shape == want), "folder")


def load_pretrained(name_or_path: str, device="cpu") -> tuple[torch.nn.Module, torch.nn.Module, Config]:
    """(model in eval mode on `device`, Diffusion from the folder's scheduler, full Config) from a hub id
    (e.g. google/ddpm-cifar10-32) or a local diffusers folder (pipeline or bare UNet2DModel)."""
    unet_dir, scheduler_file = _locate(_resolve(str(name_or_path)))
    cfg = diffusers_config_to_ours(_read_json(unet_dir / "config.json"),
                                   _read_json(scheduler_file) if scheduler_file else {})
    if scheduler_file is None:  # after the checks above, so that an error stays the only line
        print(f"note: no scheduler_config.json next to '{unet_dir}': using diffusers' DDPMScheduler defaults "
              "(linear betas 1e-4..0.02, 1000 steps, fixed_small variance, epsilon, clip)", file=sys.stderr)
    _describe(cfg, str(name_or_path))
    cfg.device = str(device)
    model = build_with_weights(cfg, convert_diffusers_state_dict(_read_weights(unet_dir)), f"'{unet_dir}'")
    device = get_device(str(device))
    return model.to(device).eval(), build_diffusion(cfg).to(device), cfg


# ----------------------------------------------------------------------------- export
def export_diffusers(cfg: Config, state_dict: dict, out: Path) -> Path:
    """Write a DDPMPipeline folder: model_index.json, unet/ (config + safetensors), scheduler/."""
    unet_config, scheduler_config = ours_to_diffusers_config(cfg)  # refuse before writing anything
    model = build_with_weights(cfg, state_dict, "the checkpoint")  # the weights must fit its config
    tensors = {k: v.detach().float().contiguous().clone()
               for k, v in convert_state_dict_to_diffusers(model.state_dict()).items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("writing diffusers weights needs the safetensors package: "
                              "pip install safetensors") from None
    for sub in ("unet", "scheduler"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": unet_config["_diffusers_version"],
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    for path, content in [(out / "model_index.json", index), (out / "unet" / "config.json", unet_config),
                          (out / "scheduler" / "scheduler_config.json", scheduler_config)]:
        path.write_text(json.dumps(content, indent=2) + "\n")
    save_file(tensors, str(out / "unet" / f"{WEIGHTS}.safetensors"), metadata={"format": "pt"})
    return out


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a ddpm-lab checkpoint to another format.")
    p.add_argument("--checkpoint", required=True, help="ddpm-lab checkpoint, e.g. checkpoints/cifar10/last.pt")
    p.add_argument("--format", default="diffusers", choices=["diffusers"],
                   help="diffusers: a DDPMPipeline folder (UNet2DModel + DDPMScheduler)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return p.parse_args(argv)


def _load_checkpoint(path: str) -> tuple[dict, Config]:
    """load_checkpoint plus its stored config run through config.validate (untrusted, like the weights)."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:  # utils may not say so itself yet
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes), e.g. an interrupted copy or a full disk: "
                              "pass another checkpoint")
    ckpt = load_checkpoint(path)
    try:
        return ckpt, validate(from_dict(ckpt["config"]))
    except ConfigError as e:
        raise CheckpointError(f"the config stored in '{path}' is not valid for this ddpm-lab: {e}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    out = Path(args.out)
    try:
        problem = output_folder_problem(out)
        if problem:
            raise ConfigError(f"--out {problem}: choose a folder path")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise ConfigError(f"--out '{out}' exists and is not empty: choose a new folder or pass --force")
        ckpt, cfg = _load_checkpoint(args.checkpoint)
        key = "model" if args.no_ema else "ema"
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"'{args.checkpoint}' has no {key!r} weights"
                                  + ("" if args.no_ema else ": pass --no-ema to export the raw weights"))
        export_diffusers(cfg, ckpt[key], out)
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported the {'raw' if args.no_ema else 'EMA'} weights of step {ckpt.get('step', '?')} to {out}/\n"
          f"  load: diffusers.DDPMPipeline.from_pretrained('{out}'), or python sample.py --pretrained {out}")
    if cfg.model.num_classes > 0:
        print(f"  class-conditional: DDPMPipeline passes no class labels, so call pipe.unet(x, t, class_labels=y) "
              f"in your own loop; label {cfg.model.num_classes} is the null (unconditional) label")
    return 0


if __name__ == "__main__":
    sys.exit(main())
