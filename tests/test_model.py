"""U-Net / MLP shapes, the DDPM parameter count, and clear errors for impossible configs."""
import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, load_config
from model import MLPDenoiser, UNet, Upsample, build_model, count_parameters, timestep_embedding


def test_ddpm_cifar10_network_has_35_7M_parameters():
    # Exactly the DDPM paper's CIFAR-10 network (35.7M; diffusers' UNet2DModel with the google/ddpm-cifar10-32
    # config has 35,746,307): one attention block more or less (0.26M at 256 channels) must show.
    cfg = load_config("configs/cifar10.yaml")
    assert count_parameters(build_model(cfg)) == 35_746_307


@pytest.mark.parametrize("num_classes", [0, 10])
def test_unet_shapes_cifar_and_mnist(num_classes):
    t = torch.tensor([0, 999])
    y = torch.tensor([3, -1]) if num_classes else None
    cifar = UNet(3, 32, (1, 2, 2, 2), 1, (16,), 32, num_classes=num_classes)
    assert cifar(torch.randn(2, 3, 32, 32), t, y).shape == (2, 3, 32, 32)
    mnist = UNet(1, 32, (1, 2, 2), 1, (14,), 28, num_heads=4, num_classes=num_classes)
    assert mnist(torch.randn(2, 1, 28, 28), t, y).shape == (2, 1, 28, 28)


def test_class_embedding_changes_output_and_null_label_equals_none():
    torch.manual_seed(0)
    net = UNet(1, 32, (1, 2), 1, (), 8, num_classes=3, dropout=0.0).eval()
    for p in net.parameters():  # leave the zero-initialised output layers non-zero for this check
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    out_a, out_b = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out_a, out_b)
    torch.testing.assert_close(net(x, t, torch.tensor([-1, -1])), net(x, t, None))


def test_labels_to_unconditional_model_are_an_error():
    net = UNet(1, 32, (1, 2), 1, (), 8)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([2]))


def test_image_size_the_unet_cannot_halve_is_a_config_error():
    cfg = load_config("configs/mnist.yaml", ["model.channel_mult=[1,2,2,2]"])  # 28 -> 14 -> 7 -> ?
    with pytest.raises(ConfigError, match="data.image_size=28"):
        build_model(cfg)


def test_width_not_divisible_by_groups_is_a_config_error():
    with pytest.raises(ConfigError, match="norm_groups"):
        UNet(1, 24, (1, 2), 1, (), 8, norm_groups=32)


def test_attention_heads_must_divide_width():
    with pytest.raises(ConfigError, match="heads"):
        UNet(1, 32, (1, 2), 1, (8,), 8, num_heads=3)


def test_timestep_embedding_is_sin_then_cos():
    emb = timestep_embedding(torch.tensor([0, 7]), 16)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    torch.testing.assert_close(emb[1, 0], torch.sin(torch.tensor(7.0)))  # first frequency is 1


def test_mlp_denoiser_shapes():
    net = MLPDenoiser(2, hidden=32, layers=2, emb_size=16)
    assert net(torch.randn(5, 2), torch.randint(0, 50, (5,))).shape == (5, 2)
    cond = MLPDenoiser(2, hidden=32, layers=2, emb_size=16, num_classes=4)
    assert cond(torch.randn(5, 2), torch.randint(0, 50, (5,)), torch.tensor([0, 1, 2, 3, -1])).shape == (5, 2)
    assert isinstance(build_model(load_config("configs/toy2d.yaml")), MLPDenoiser)


def test_unet_backward_reaches_every_parameter():
    net = UNet(1, 32, (1, 2), 1, (4,), 8, num_classes=2)
    net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, -1])).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def _plain_upsample(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # the definition (DDPM, diffusers)


@pytest.mark.parametrize("size", [8, 12, 5])  # 5 < 8: the interpolate fallback; 12: non-power-of-two
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_phase_path_equals_interpolate_then_conv(size, channels_last):
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(3, 6, size, size + 2)  # non-square: rows and columns are not swapped
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_(True)
    x = x.requires_grad_(True)
    y, y_ref = up(x), _plain_upsample(up, x_ref)
    assert y.shape == (3, 6, 2 * size, 2 * size + 4)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # the caller's memory format
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, up.conv.weight, up.conv.bias], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, up.conv.weight, up.conv.bias], grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_upsample_phase_path_in_bf16_stays_close_to_fp32():
    torch.manual_seed(1)
    up, x = Upsample(8), torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = up(x).float()
    ref = _plain_upsample(up, x)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
