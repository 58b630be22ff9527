"""Noise-prediction networks. They know nothing of schedules: `model(xt, t, y=None) -> output`.

UNet follows the DDPM network (Ho et al. 2020, Appendix B; the original TF code's unet.py) exactly,
so the published DDPM weights (diffusers `UNet2DModel` layout) load into it with a key mapping:
  - sinusoidal time embedding, sin then cos, frequencies exp(-ln(10^4) i / (half - 1));
  - embedding MLP Linear(C, 4C) -> SiLU -> Linear(4C, 4C); every res block applies SiLU then its own Linear;
  - GroupNorm(32, eps=1e-6); res block: norm, SiLU, conv, + time, norm, SiLU, dropout, conv; 1x1 skip conv;
  - single- or multi-head self-attention with a residual, at the listed resolutions, and in the middle;
  - downsampling: pad right/bottom by one, 3x3 conv stride 2 (TF "SAME"); upsampling: nearest x2, 3x3 conv;
  - each decoder level has num_res_blocks + 1 res blocks, each eating one skip connection.
Class conditioning (optional): a learned embedding added to the time embedding, with an extra "null"
row used for label -1 or y=None (classifier-free guidance).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, cond_channels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 [sin | cos] features, the DDPM convention (shift of 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch, as DDPM does (init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # x: (B, Cin, H, W), emb: (B, D)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, num_heads: int, groups: int, eps: float):
        super().__init__()
        if ch % num_heads:
            raise ConfigError(f"attention width {ch} is not divisible by {num_heads} heads "
                              "(check model.num_heads / model.num_head_channels)")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = _zero(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)                        # 3 x (B, HW, C)
        q, k, v = (z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, h, HW, C/h)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, HW, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding = TF "SAME" for stride 2


class Upsample(nn.Module):
    """Nearest x2 upsampling then a 3x3 conv. For inputs of at least 8x8 on the CPU the same function is
    computed without materialising the upsampled map: each of the 4 output phases (row parity a, column
    parity b) only ever sees 2x2 distinct input pixels, so it is a 2x2 conv of the low-resolution input
    with summed 3x3 taps (sub-pixel convolution): 4 instead of 9 multiply-adds per output pixel and
    channel pair. Below 8x8 the plain path is faster (bench/RESULTS.md has the timings). The parameter is still
    the 3x3 kernel, so checkpoints are unchanged; outputs agree with the plain path up to summation order."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        if x.device.type != "cpu" or min(x.shape[-2:]) < 8:  # GPUs keep cuDNN's path
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        B, _, H, W = x.shape
        C_out = self.conv.out_channels
        # out[:, (a, b, o), i, j] for i in 0..H, j in 0..W: phase (a, b) of output pixel (2(i-a)+a, 2(j-b)+b).
        out = F.conv2d(x, _phase_kernels(self.conv.weight), self.conv.bias.repeat(4), padding=1)
        out = out.unflatten(1, (2, 2, C_out))                                     # (B, 2, 2, C_out, H+1, W+1)
        if x.is_contiguous(memory_format=torch.channels_last):  # keep the caller's memory format
            y = out.new_empty(B, H, 2, W, 2, C_out).permute(0, 5, 1, 2, 3, 4)     # (B, C_out, H, 2, W, 2)
        else:
            y = out.new_empty(B, C_out, H, 2, W, 2)
        for a in (0, 1):
            for b in (0, 1):
                y[:, :, :, a, :, b] = out[:, a, b, :, a:a + H, b:b + W]
        return y.reshape(B, C_out, 2 * H, 2 * W)


def _phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel applied after nearest x2 upsampling -> (4 O, I, 2, 2) kernels applied to the
    low-resolution input padded by 1, ordered (a, b, O). Along one axis, output phase 0 sees input rows
    (i-1, i) with taps (w0, w1 + w2) and phase 1 sees rows (i, i+1) with taps (w0 + w1, w2)."""
    def split(k: torch.Tensor, dim: int) -> list[torch.Tensor]:  # the two 2-tap kernels along `dim`
        k0, k1, k2 = k.unbind(dim)
        return [torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)]
    return torch.stack([torch.stack(split(rows, 3)) for rows in split(w, 2)]).flatten(0, 2)


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks (each optionally followed by attention),
    then an optional resampler."""

    def __init__(self, res: list, attn: list, resample: Optional[nn.Module]):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions=(16,), image_size: int = 32,
                 num_heads: int = 1, num_head_channels: int = -1, dropout: float = 0.1,
                 num_classes: int = 0, norm_groups: int = 32, norm_eps: float = 1e-6,
                 out_channels: Optional[int] = None, cond_channels: int = 0):
        """Builds the whole network here, in the order data flows through it (time embedding, down levels,
        middle, up levels with skips, output), as DDPM's published model does: one screen to compare with the
        paper's network and with diffusers' UNet2DModel, which is why this function runs over 40 lines."""
        super().__init__()
        _check_unet_args(channels, channel_mult, image_size, norm_groups)
        # cond_channels: an image condition (sampling/conditioning.py) enters as extra input channels (conv_in only)
        self.in_channels, self.num_classes, self.cond_channels = in_channels, num_classes, cond_channels
        time_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # Row num_classes is the null label used for unconditional passes (CFG).
        self.class_emb = nn.Embedding(num_classes + 1, time_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels + cond_channels, channels, 3, padding=1)

        def heads(ch: int) -> int:
            return ch // num_head_channels if num_head_channels > 0 else num_heads

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_dim, dropout, norm_groups, norm_eps)

        def attn(ch: int, res: int) -> nn.Module:
            return Attention(ch, heads(ch), norm_groups, norm_eps) if res in attention_resolutions else nn.Identity()

        widths = [channels * m for m in channel_mult]
        skip_widths, ch, res = [channels], channels, image_size
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, width))
                attns.append(attn(width, res))
                ch = width
                skip_widths.append(ch)
            last = i == len(widths) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(ch)))
            if not last:
                skip_widths.append(ch)
                res //= 2

        self.mid = Level([block(ch, ch), block(ch, ch)], [Attention(ch, heads(ch), norm_groups, norm_eps)], None)

        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_widths.pop(), width))
                attns.append(attn(width, res))
                ch = width
            self.up.append(Level(blocks, attns, Upsample(ch) if i > 0 else None))
            if i > 0:
                res *= 2

        self.norm_out = nn.GroupNorm(norm_groups, ch, eps=norm_eps)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    def embed(self, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """(B,) timesteps [+ (B,) labels, -1 = none] -> (B, 4C) conditioning vector."""
        emb = self.time_mlp(timestep_embedding(t, self.channels).to(self.conv_in.weight.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, -1)
            emb = emb + self.class_emb(torch.where(y < 0, self.num_classes, y))
        elif y is not None and bool((y >= 0).any()):
            raise ValueError("class labels were given to an unconditional model (model.num_classes = 0)")
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.embed(t, y)                  # (B, 4C)
        h = self.conv_in(x)                     # (B, C, H, W)
        skips = [h]
        for level in self.down:
            for res_block, attn in zip(level.res, level.attn):
                h = attn(res_block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid.res[1](self.mid.attn[0](self.mid.res[0](h, emb)), emb)
        for level in self.up:
            for res_block, attn in zip(level.res, level.attn):
                h = attn(res_block(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_unet_args(channels: int, channel_mult, image_size: int, norm_groups: int) -> None:
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ConfigError(
            f"data.image_size={image_size} cannot be halved {len(channel_mult) - 1} times by the U-Net "
            f"(model.channel_mult has {len(channel_mult)} levels): use an image size divisible by {factor}, "
            f"or fewer levels in model.channel_mult")
    for width in [channels] + [channels * m for m in channel_mult]:
        if width % norm_groups:
            raise ConfigError(f"U-Net width {width} is not divisible by model.norm_groups={norm_groups}")


class MLPDenoiser(nn.Module):
    """Denoiser for 2-D points: sinusoidal embeddings of t and of each coordinate, concatenated,
    then a residual MLP (as in the 2-D diffusion tutorials)."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, emb_size: int = 128,
                 num_classes: int = 0):
        super().__init__()
        self.dim, self.emb_size, self.num_classes = dim, emb_size, num_classes
        self.class_emb = nn.Embedding(num_classes + 1, emb_size) if num_classes > 0 else None
        in_features = emb_size * (dim + 1 + (1 if num_classes > 0 else 0))
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Coordinates of order 1 need a larger scale than timesteps (0..T) to resolve fine structure.
        feats = [timestep_embedding(x[:, i] * 25.0, self.emb_size) for i in range(self.dim)]
        feats.append(timestep_embedding(t, self.emb_size))
        if self.class_emb is not None:
            y = torch.full_like(t, -1) if y is None else y
            feats.append(self.class_emb(torch.where(y < 0, self.num_classes, y)))
        h = F.gelu(self.inp(torch.cat(feats, dim=1)))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def build_model(cfg) -> nn.Module:
    """Network from a full Config (model section + data.image_size, and data.task for the extra input channels
    of an image-conditioned model)."""
    m = cfg.model
    if m.kind == "mlp":
        return MLPDenoiser(2, m.mlp_hidden, m.mlp_layers, m.mlp_emb_size, m.num_classes)
    if m.kind != "unet":
        raise ConfigError(f"config key 'model.kind' = {m.kind!r} is not one of: unet, mlp")
    return UNet(m.in_channels, m.channels, tuple(m.channel_mult), m.num_res_blocks,
                tuple(m.attention_resolutions), cfg.data.image_size, m.num_heads, m.num_head_channels,
                m.dropout, m.num_classes, m.norm_groups, m.norm_eps,
                cond_channels=cond_channels(cfg.data.task, m.in_channels))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
