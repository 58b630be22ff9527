"""Typed config: presets load, overrides apply, bad values give one clear error naming the key."""
import dataclasses
import math
import typing

import pytest

import config
from config import Config, ConfigError, from_dict, load_config, parse_overrides, save_config, to_dict


@pytest.mark.parametrize("preset", ["cifar10", "mnist", "digits", "toy2d"])
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(f"configs/{preset}.yaml")
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_default_is_the_ddpm_cifar10_recipe():
    cfg = load_config()
    assert (cfg.data.dataset, cfg.diffusion.schedule, cfg.diffusion.num_timesteps) == ("cifar10", "linear", 1000)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_steps) == (2e-4, 128, 5000)
    assert (cfg.train.ema_decay, cfg.train.grad_clip, cfg.data.random_flip) == (0.9999, 1.0, True)


def test_overrides_are_typed():
    cfg = load_config("configs/digits.yaml", ["train.lr=1e-4", "model.channel_mult=[1,2]", "sample.steps=null",
                                              "train.amp=off", "diffusion.num_timesteps=500"])
    assert cfg.train.lr == 1e-4 and cfg.model.channel_mult == [1, 2] and cfg.sample.steps is None
    assert cfg.diffusion.num_timesteps == 500 and cfg.train.amp == "off"
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("overrides, match", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["colour=red"], "unknown config key 'colour'"),
    (["train.batch_size=abc"], "'train.batch_size' must be of type int"),
    (["train.batch_size=1.5"], "'train.batch_size' must be of type int"),
    (["data.random_flip=3"], "'data.random_flip' must be of type bool"),
    (["model.channel_mult=4"], "'model.channel_mult' must be a list"),
    (["diffusion.schedule=quadratic"], "'diffusion.schedule'"),
    (["diffusion.objective=score"], "'diffusion.objective'"),
    (["sample.sampler=euler"], "'sample.sampler'"),
    (["sample.steps=1001"], "'sample.steps' = 1001 must be between 1 and"),
    (["sample.eta=-0.5"], r"'sample.eta' must be in \[0, 1\]"),
    (["train.lr=0"], "'train.lr' must be > 0"),
    (["diffusion.beta_end=0.00001"], "beta_start < diffusion.beta_end"),
    (["model.kind=mlp"], "toy2d goes with model.kind=mlp"),
    (["train.amp=fp8"], "'train.amp'"),
    (["nokey"], "must look like section.key=value"),
])
def test_bad_config_gives_one_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/cifar10.yaml", overrides)


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match="presets in configs/: .*digits"):
        load_config("configs/nope.yaml")


def test_unknown_key_inside_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  chanels: 64\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.chanels'"):
        load_config(tmp_path / "bad.yaml")


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        from_dict({"train": 3})
    assert isinstance(from_dict({}), Config)


# ----------------------------------------------------------------------------- the rule table (issue #23)
def numeric_fields(cls=Config, prefix=""):
    """{dotted key: int or float} of every number field of the config dataclasses (Optional and lists too)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(numeric_fields(tp, f"{prefix}{name}."))
            continue
        base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        base = typing.get_args(base[0]) or base  # list[float] -> float
        if base[0] in (int, float):
            out[prefix + name] = base[0]
    return out


def test_every_number_field_has_exactly_one_rule():
    assert set(config.RANGES) == set(numeric_fields())


@pytest.mark.parametrize("key", [k for k, tp in numeric_fields().items() if tp is float])
def test_every_float_field_refuses_nan_and_inf(key):
    value = "[{}]" if key == "train.ema_profiles" else "{}"
    for bad in ("nan", ".inf", "-.inf"):
        with pytest.raises(ConfigError, match=rf"config key '{key}'.*(finite|\[nan\]|\[-?inf\])"):
            load_config("configs/digits.yaml", [f"{key}={value.format(bad)}"])


def test_every_default_and_preset_follows_the_rules():
    for preset in sorted(config.DEFAULT_CONFIG.parent.glob("*.yaml")):
        load_config(preset)  # validate() ran: the shipped values are all in range


@pytest.mark.parametrize("rule, good, bad", [
    (config.POSITIVE, [1, 1e-9], [0, -1, math.nan, math.inf, 2 ** 63]),
    (config.FRACTION, [0, 1.0, 0.5], [-0.1, 1.1, math.nan]),
    (config.BELOW_ONE, [0, 0.999], [1, 1.0, math.nan]),
    (config.FINITE, [-5.0, 0.0, 1e300], [math.nan, -math.inf]),
    (config.RANGES["seed"], [0, 2 ** 63 - 1], [-1, 2 ** 63, 10 ** 23]),
])
def test_check_number_bounds(rule, good, bad):
    for value in good:
        config.check_number("x", value, rule)
    for value in bad:
        with pytest.raises(ConfigError, match=r"^--x must be "):
            config.check_number("--x", value, rule)


def test_range_messages_name_the_key_and_the_range():
    with pytest.raises(ConfigError, match=r"^config key 'seed' must be in \[0, 2\*\*63-1\], got 9{23}$"):
        load_config("configs/digits.yaml", ["seed=" + "9" * 23])
    with pytest.raises(ConfigError, match=r"^config key 'train.lr' must be > 0 and finite, got nan$"):
        load_config("configs/digits.yaml", ["train.lr=nan"])
