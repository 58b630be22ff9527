"""Typed configuration: dataclass sections, YAML presets in configs/, dotted CLI overrides.

    cfg = load_config("configs/cifar10.yaml", ["train.lr=1e-4", "model.channels=64"])
    cfg_dict = to_dict(cfg)            # plain dict, saved inside every checkpoint
    cfg = from_dict(cfg_dict)          # exact round trip

Unknown keys and wrong types are errors that name the key; `validate` checks values.
The defaults are the DDPM paper's CIFAR-10 recipe (Ho et al. 2020, Appendix B).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "cifar10.yaml"

TASKS = ("generate", "superres", "colorize")  # what a model makes: samples, or images from a condition image
DATASETS = ("cifar10", "mnist", "fashion_mnist", "folder", "digits", "toy2d")
GREY_DATASETS = ("mnist", "fashion_mnist", "digits")
TOY_DISTRIBUTIONS = ("gaussian", "heart", "moons", "swissroll", "8gaussians")
SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")
VAR_TYPES = ("fixed_small", "fixed_large")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
AMP_MODES = ("auto", "off", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read `amp: off` as False."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

# Scientific notation without a dot (1e-4) is a float, as users expect.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line N: what' from a YAML error (the line only when YAML knows it)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}: {what}" if mark is not None else what


SIGMA_REL_MAX = math.sqrt(1 / 12)  # a power-function EMA's longest length (gamma = 0: a flat average of the run)


class UserError(Exception):
    """Every error a user can cause: a bad flag, config, data file, checkpoint or folder. Its message is one line
    that names the cause and the fix; each script catches UserError once, prints it and exits 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' exit code for user errors: a bad flag is one line `error: ...` and exit 1
    (argparse's own error() prints a usage block and exits 2)."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (python {self.prog} --help lists the flags)", file=sys.stderr)
        sys.exit(1)


class ConfigError(UserError, ValueError):
    """A bad configuration: the message names the key and how to fix it."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str = "data"                 # where torchvision datasets / image folders live
    split: str = "train"               # which split to train on: train | test (e.g. MNIST's t10k files)
    holdout: int = 0                   # > 0: this many images of that split (a fixed seeded draw) are never
                                       # trained on and become the held-out set (editing / super-res benches)
    image_size: int = 32
    task: str = "generate"             # generate | superres | colorize: the last two condition on an image made
                                       # from each target (sampling/conditioning.py): its low-res or grey version
    sr_factor: int = 4                 # superres: low-res side = image_size / sr_factor
    channels: int = 0                  # folder only: 0 = auto (1 when every image is grey, else 3), 1 or 3
    random_flip: bool = True           # horizontal flips (CIFAR-10); never for digits
    num_workers: int = 2
    download: bool = True              # torchvision datasets: download when missing (needs network)
    toy_distribution: str = "gaussian"  # toy2d only
    toy_num_points: int = 8000          # toy2d only: size of the sampled training set


@dataclass
class ModelConfig:
    kind: str = "unet"                 # unet | mlp
    in_channels: int = 3
    channels: int = 128                # base width; level i has channels * channel_mult[i]
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 1
    num_head_channels: int = -1        # > 0 overrides num_heads: heads = channels // num_head_channels
    dropout: float = 0.1
    num_classes: int = 0               # 0 = unconditional; > 0 adds a class embedding + null label
    norm_groups: int = 32
    norm_eps: float = 1e-6             # GroupNorm eps (DDPM/TF: 1e-6; PyTorch's default is 1e-5)
    mlp_hidden: int = 128              # mlp only
    mlp_layers: int = 3                # mlp only
    mlp_emb_size: int = 128            # mlp only


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    objective: str = "eps"
    loss_weighting: str = "none"       # none | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0
    var_type: str = "fixed_small"      # DDPM posterior variance: beta-tilde (small) or beta (large)
    timestep_spacing: str = "leading"  # DDIM/DPM-Solver sub-sequence


@dataclass
class TrainConfig:
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_steps: int = 800_000
    warmup_steps: int = 5000
    # Warm-up as a share of the run (issue #25): min(warmup_steps, ceil(warmup_fraction * max_steps)) steps, so a
    # short run is not spent below its learning rate and warmup_steps is the cap; null = warmup_steps as is.
    warmup_fraction: Optional[float] = None
    lr_schedule: str = "constant"      # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0          # cosine floor, as a fraction of lr
    grad_clip: float = 1.0             # <= 0 disables clipping
    grad_accum: int = 1
    ema_decay: float = 0.9999
    ema_warmup: bool = True            # decay ramps up as min(decay, (1+n)/(10+n))
    # Post-hoc EMA (EDM2, sampling/posthoc.py): relative lengths sigma_rel of the power-function EMA profiles to
    # track, e.g. [0.05, 0.1]; [] = off. Snapshots of them go to checkpoints/<run>/ema/ every
    # ema_snapshot_every steps; sample.py / evaluate.py --ema-length then rebuild any length from them.
    ema_profiles: list[float] = field(default_factory=list)
    ema_snapshot_every: int = 1000
    amp: str = "auto"                  # auto | off | bf16 | fp16 (fp16 needs CUDA); auto: bf16 where it is fast
    channels_last: Optional[bool] = None  # None (null) = auto: on for CUDA, off on CPU
    compile: bool = False
    cond_drop_prob: float = 0.1        # class-conditional models: label dropout for CFG
    max_nonfinite: int = 10            # stop after this many non-finite losses in a row (>= 1)
    log_every: int = 100
    sample_every: int = 5000
    ckpt_every: int = 5000
    keep_last: int = 3
    num_sample_images: int = 64        # grid size for the periodic samples; 0 = no sample grids
    sample_steps: int = 50             # DDIM steps for the periodic samples
    # CPU intra-op threads; 0 or null = torch's default (OMP_NUM_THREADS when set, else the cores).
    # Bitwise-exact resume assumes the same count: it is stored in checkpoints, a resume warns if it differs.
    cpu_threads: Optional[int] = None


@dataclass
class SampleConfig:
    sampler: str = "ddim"
    steps: Optional[int] = 50          # None = all T steps (required for ddpm)
    eta: float = 0.0
    num_samples: int = 64
    batch_size: int = 64
    guidance_scale: float = 1.0
    clip_x0: bool = True               # clamp predicted x0 to [-1, 1]; off for 2-D data


@dataclass
class Config:
    run_name: str = "cifar10"
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ----------------------------------------------------------------------------- type checking
def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` (int -> float only), or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_type(key, value, next(a for a in args if a is not type(None)))
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
        check_value(key.split("[")[0], float(value.replace(".", "")))  # `lr=nan` (YAML's .nan): not finite
    # bool is a subclass of int: reject True where an int is expected and vice versa.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(d: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build a dataclass from a (possibly partial) nested dict; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' "
                          f"(valid keys in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    d[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['train.lr=1e-4', 'model.channel_mult=[1,2]'] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)}): fix its "
                              f"syntax, e.g. model.channel_mult=[1,2] or quote a string: key='a: b'") from None
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML preset (default configs/cifar10.yaml), apply dotted overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        presets = sorted(p.stem for p in DEFAULT_CONFIG.parent.glob("*.yaml"))
        raise ConfigError(f"config file '{path}' not found (presets in configs/: {', '.join(presets)})")
    return config_with_overrides(_read_yaml_file(path), overrides)


def config_with_overrides(d: dict, overrides: Optional[list[str]] = None) -> Config:
    """A config dict (a preset's, or the one stored in a checkpoint) with dotted overrides applied, validated."""
    return validate(from_dict(_merge(to_dict(from_dict(d)), parse_overrides(overrides or []))))


def _read_yaml_file(path: Path) -> dict:
    """The mapping in a YAML file; unreadable text or bad syntax is a ConfigError naming file and line."""
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML ({_yaml_problem(err)}): fix the syntax "
                          f"there (compare with configs/digits.yaml)") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file '{path}': {err.strerror or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, model:, train:, ...), "
                          f"got {type(raw).__name__}")
    return raw


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# ----------------------------------------------------------------------------- value checks
INT64_MAX = 2 ** 63 - 1  # torch and numpy take 64-bit integers: a larger seed or count overflows there
# The allowed values of every numeric field, (low, high, bounds): '[' / ']' allow the bound itself, '(' / ')'
# do not, None is no bound. Every float must also be finite and every int at most INT64_MAX. A list field's
# rule is each entry's. Rules between fields (beta_start < beta_end, steps <= T, ...) follow in validate.
POSITIVE, NON_NEGATIVE, FINITE = (0, None, "()"), (0, None, "[)"), (None, None, "()")
FRACTION, BELOW_ONE, OPEN_UNIT = (0, 1, "[]"), (0, 1, "[)"), (0, 1, "()")
RANGES = {
    "seed": (0, INT64_MAX, "[]"),
    **dict.fromkeys(["data.image_size", "data.sr_factor", "data.toy_num_points", "model.in_channels",
                     "model.channels", "model.num_res_blocks", "model.attention_resolutions",
                     "model.num_heads", "model.norm_groups", "model.norm_eps", "model.mlp_hidden", "model.mlp_layers",
                     "model.mlp_emb_size", "diffusion.num_timesteps", "diffusion.min_snr_gamma", "train.batch_size",
                     "train.lr", "train.max_steps", "train.grad_accum", "train.ema_snapshot_every",
                     "train.max_nonfinite", "train.log_every", "train.sample_every", "train.ckpt_every",
                     "train.keep_last", "train.sample_steps", "sample.steps", "sample.num_samples",
                     "sample.batch_size"], POSITIVE),
    **dict.fromkeys(["data.holdout", "data.channels", "data.num_workers", "model.num_classes", "train.weight_decay",
                     "train.warmup_steps", "train.num_sample_images", "train.cpu_threads"], NON_NEGATIVE),
    "model.num_head_channels": (-1, None, "[)"), "model.channel_mult": (1, None, "[)"),  # -1: model.num_heads
    **dict.fromkeys(["model.dropout", "train.adam_beta1", "train.adam_beta2", "train.ema_decay"], BELOW_ONE),
    **dict.fromkeys(["train.min_lr_ratio", "train.warmup_fraction", "train.cond_drop_prob", "sample.eta"], FRACTION),
    **dict.fromkeys(["diffusion.beta_start", "diffusion.beta_end"], OPEN_UNIT),
    "train.ema_profiles": (0, SIGMA_REL_MAX, "()"),
    **dict.fromkeys(["train.grad_clip", "sample.guidance_scale"], FINITE),  # grad_clip <= 0: no clipping
}


def _bound_text(value: float) -> str:
    return "2**63-1" if value == INT64_MAX else f"{value:g}"


def check_number(name: str, value, rule: tuple) -> None:
    """The one range check of numbers (config keys, flags, library arguments); `name` is how the user set the
    value (config key 'train.lr', --eta). None (an unset optional value) passes."""
    if value is None:
        return
    low, high, bounds = rule
    number = float(value) if isinstance(value, float) else value
    ok = (math.isfinite(number) if isinstance(number, float) else number <= INT64_MAX) and (
        low is None or (number >= low if bounds[0] == "[" else number > low)) and (
        high is None or (number <= high if bounds[1] == "]" else number < high))
    if ok:
        return
    if low is not None and high is not None:
        allowed = f"in {bounds[0]}{_bound_text(low)}, {_bound_text(high)}{bounds[1]}"
    elif low is not None:
        allowed = f"{'>=' if bounds[0] == '[' else '>'} {low:g}"
    else:
        allowed = ""
    if isinstance(number, float):
        allowed += " and finite" if allowed else "finite"
    elif high is None and number > INT64_MAX:
        allowed += " and at most 2**63-1 (a 64-bit integer)"
    raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_value(key: str, value, name: Optional[str] = None) -> None:
    """`value` by the rule of config key `key` (RANGES); `name` is the flag that set it, e.g. --eta."""
    check_number(name or f"config key '{key}'", value, RANGES[key])


def check_choice(name: str, value: str, choices: tuple) -> None:
    """One rule for every named choice (config keys, flags, library arguments): `name` is how the user set it."""
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def plain_name(label: str, name, names: str, example: str = "digits_2") -> str:
    """`name` if it is a plain name (letters, digits, '.', '_', '-'; not '.' or '..'), else a ConfigError:
    every name that becomes a path (run_name, evaluate.py --run-name, a data set's name in a cache file) is
    checked here, so none can point outside its folder. `names`: what it names, for the message."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise ConfigError(f"{label} = {name!r} is not a plain name (it names {names}): use only letters, digits, "
                          f"'.', '_' and '-', e.g. {example}")
    return name


def _check_run_name(name: str) -> None:
    # run_name becomes checkpoints/<run_name>/ and results/*/<run_name>/: a path would write (and with
    # --overwrite delete) outside them.
    plain_name("config key 'run_name'", name, "the folders checkpoints/<run_name>/ and results/*/<run_name>/",
               "run_name=digits_2")


def _check_unet_levels(cfg: Config) -> None:
    """channel_mult not empty; attention_resolutions must name levels the U-Net has (it matches them exactly)."""
    m, size = cfg.model, cfg.data.image_size
    if not m.channel_mult:
        raise ConfigError("config key 'model.channel_mult' must not be empty")
    if m.kind != "unet":
        return
    levels = [size // 2 ** i for i in range(len(m.channel_mult))]  # model.UNet halves after each level
    unknown = [r for r in m.attention_resolutions if r not in levels]
    if unknown:
        raise ConfigError(f"config key 'model.attention_resolutions' = {m.attention_resolutions}: {unknown[0]} is "
                          f"not a resolution of this U-Net; with data.image_size={size} and "
                          f"{len(m.channel_mult)} levels in model.channel_mult the valid values are "
                          f"{', '.join(map(str, levels))} (or [] for attention in the middle block only)")


def _check_choices(cfg: Config) -> None:
    data, model, dcfg, train, sample = cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.sample
    check_choice("value of config key 'data.dataset'", data.dataset, DATASETS)
    check_choice("value of config key 'data.split'", data.split, ("train", "test"))
    check_choice("value of config key 'data.task'", data.task, TASKS)
    check_choice("value of config key 'data.toy_distribution'", data.toy_distribution, TOY_DISTRIBUTIONS)
    check_choice("value of config key 'model.kind'", model.kind, ("unet", "mlp"))
    check_choice("value of config key 'diffusion.schedule'", dcfg.schedule, SCHEDULES)
    check_choice("value of config key 'diffusion.objective'", dcfg.objective, OBJECTIVES)
    check_choice("value of config key 'diffusion.loss_weighting'", dcfg.loss_weighting, LOSS_WEIGHTINGS)
    check_choice("value of config key 'diffusion.var_type'", dcfg.var_type, VAR_TYPES)
    check_choice("value of config key 'diffusion.timestep_spacing'", dcfg.timestep_spacing, SPACINGS)
    check_choice("value of config key 'sample.sampler'", sample.sampler, SAMPLERS)
    check_choice("value of config key 'train.amp'", train.amp, AMP_MODES)
    check_choice("value of config key 'train.lr_schedule'", train.lr_schedule, LR_SCHEDULES)


def _check_numbers(cfg: Config) -> None:
    """Every numeric field against its rule in RANGES (types were checked on load)."""
    for key, rule in RANGES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        for entry in value if isinstance(value, list) else [value]:
            check_number(f"config key '{key}'", entry, rule)


def _check_ranges(cfg: Config) -> None:
    dcfg, train, sample = cfg.diffusion, cfg.train, cfg.sample
    if not 0 < dcfg.beta_start < dcfg.beta_end < 1:
        raise ConfigError(f"need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
                          f"got {dcfg.beta_start} and {dcfg.beta_end}")
    if cfg.data.channels not in (0, 1, 3):
        raise ConfigError(f"config key 'data.channels' = {cfg.data.channels} must be 0 (auto: 1 for a folder of "
                          "grey images, else 3), 1 or 3")
    for key, steps in [("sample.steps", sample.steps), ("train.sample_steps", train.sample_steps)]:
        if steps is not None and not 1 <= steps <= dcfg.num_timesteps:
            raise ConfigError(f"config key '{key}' = {steps} must be between 1 and "
                              f"diffusion.num_timesteps = {dcfg.num_timesteps}")


def _check_task(cfg: Config) -> None:
    """Image conditioning (data.task) needs images of a kind the task can be made from."""
    data, task = cfg.data, cfg.data.task
    if task == "generate":
        return
    if data.dataset == "toy2d":
        raise ConfigError(f"data.task={task} conditions on images; toy2d data are 2-D points: set data.task=generate")
    if task == "colorize" and (cfg.model.in_channels != 3 or data.dataset in GREY_DATASETS):
        raise ConfigError(f"data.task=colorize makes RGB images from grey ones, but model.in_channels="
                          f"{cfg.model.in_channels}, data.dataset={data.dataset}: use RGB data with "
                          "model.in_channels=3, or "
                          "data.task=superres / generate")
    if task == "superres" and (data.sr_factor < 2 or data.image_size % data.sr_factor):
        raise ConfigError(f"data.sr_factor={data.sr_factor} must be >= 2 and divide data.image_size="
                          f"{data.image_size} (the low-res side is image_size / sr_factor): e.g. data.sr_factor="
                          f"{next((f for f in (4, 2, 3, 5, 7) if data.image_size % f == 0), 2)}")


def _check_ema_profiles(profiles: list[float]) -> None:
    for value in profiles:
        if not 0 < value < SIGMA_REL_MAX:
            raise ConfigError(f"config key 'train.ema_profiles' = {profiles}: {value} is not a power-function EMA "
                              f"length; each sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), e.g. [0.05,0.1] (EDM2)")
    if len(set(profiles)) != len(profiles):
        raise ConfigError(f"config key 'train.ema_profiles' = {profiles} lists a length twice: list each once")


def validate(cfg: Config) -> Config:
    """Check values (types were checked on load). Raises ConfigError naming the key."""
    _check_choices(cfg)
    _check_ema_profiles(cfg.train.ema_profiles)  # its own message first: the EDM2 lengths
    _check_numbers(cfg)
    _check_ranges(cfg)
    _check_run_name(cfg.run_name)
    _check_unet_levels(cfg)
    if cfg.data.holdout and cfg.data.dataset == "toy2d":
        raise ConfigError("data.holdout is for image data sets; toy2d draws its own held-out points: "
                          "set data.holdout=0")
    _check_task(cfg)
    if (cfg.data.dataset == "toy2d") != (cfg.model.kind == "mlp"):
        raise ConfigError("data.dataset=toy2d goes with model.kind=mlp (and images with model.kind=unet); "
                          f"got data.dataset={cfg.data.dataset!r}, model.kind={cfg.model.kind!r}")
    return cfg


def cond_channels(task: str, in_channels: int) -> int:
    """Extra U-Net input channels of a task: superres the image's own channels, colorize one grey channel."""
    return {"generate": 0, "superres": in_channels, "colorize": 1}[task]
