"""Run published diffusers DDPM weights in our U-Net: load_pretrained("google/ddpm-cifar10-32") (a hub id)
or a local diffusers folder -> (model, diffusion, config). The conversion itself is interop/diffusers.py's; this
module finds and reads the files (hub downloads with a timeout, offline cache, untrusted weights)."""
from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from config import Config
from diffusion import build_diffusion
from limits import check_model
from interop.diffusers import WEIGHTS, build_with_weights, convert_diffusers_state_dict, diffusers_config_to_ours
from storage.checkpoints import CheckpointError
from utils import get_device

HUB_TIMEOUT_S = 10  # never hang on a firewalled network


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
    check_model(cfg, device)  # config.json's sample_size / widths, before the weights are put in
    model = build_with_weights(cfg, convert_diffusers_state_dict(_read_weights(unet_dir)), f"'{unet_dir}'")
    device = get_device(str(device))
    return model.to(device).eval(), build_diffusion(cfg).to(device), cfg
