"""The 'auto' speed settings resolve to what is fast and safe on each device."""
import pytest
import torch

import utils
from config import load_config
from utils import resolve_amp, resolve_channels_last

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "off")])
def test_auto_amp_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(utils, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_amp("auto", CPU) == expected
    assert resolve_amp("off", CPU) == "off" and resolve_amp("bf16", CPU) == "bf16"  # explicit modes win


@pytest.mark.parametrize("bf16_gpu, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_amp_on_cuda_prefers_bf16_then_fp16(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_amp("auto", CUDA) == expected


def test_auto_amp_elsewhere_is_off():
    assert resolve_amp("auto", torch.device("meta")) == "off"


def test_channels_last_auto_is_cuda_only_and_explicit_values_win():
    assert resolve_channels_last(None, CUDA) and not resolve_channels_last(None, CPU)
    assert resolve_channels_last(True, CPU) and not resolve_channels_last(False, CUDA)


def test_presets_use_the_auto_speed_settings():
    for name in ("cifar10", "mnist", "digits"):
        train = load_config(f"configs/{name}.yaml").train
        assert (train.amp, train.channels_last) == ("auto", None), name
    assert load_config("configs/toy2d.yaml").train.amp == "off"  # a 2-D MLP: fp32
