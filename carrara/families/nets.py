"""Building blocks the families share: convolutional down/up stacks and the caption's projection.

One helper instead of forked copies (STYLE.md): the VAE, the VQ-VAE and the GAN's generator are the same
stride-2 convolution ladder (DCGAN, Radford et al. 2016 §3) with different heads.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def level_channels(size: int, bottom: int, base: int, cap: int = 4) -> list[int]:
    """Channels per resolution from `size` down to `bottom` (each level halves the side): base·min(2^i, cap)."""
    levels = round(math.log2(size // bottom))
    if size != bottom * 2**levels:
        raise ValueError(f"image side {size} is not {bottom} × a power of 2")
    return [base * min(2**i, cap) for i in range(levels + 1)]


def conv_block(c_in: int, c_out: int, *, groups: int = 8) -> nn.Sequential:
    """3×3 convolution, GroupNorm, SiLU: the unit every ladder is made of."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(groups, c_out), c_out), nn.SiLU())


class DownLadder(nn.Module):
    """(B, c_in, S, S) → (B, channels[-1], S / 2^(n-1), ...): a block per level, stride-2 between levels."""

    def __init__(self, c_in: int, channels: list[int]):
        super().__init__()
        layers = [conv_block(c_in, channels[0])]
        for a, b in itertools.pairwise(channels):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), conv_block(b, b)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UpLadder(nn.Module):
    """The mirror of DownLadder: (B, channels[-1], s, s) → (B, c_out, s · 2^(n-1), ...), nearest ×2 + conv."""

    def __init__(self, channels: list[int], c_out: int):
        super().__init__()
        rev = channels[::-1]
        layers = [conv_block(rev[0], rev[0])]
        for a, b in itertools.pairwise(rev):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv_block(a, b)]
        layers.append(nn.Conv2d(rev[-1], c_out, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def text_projection(cond_dim: int, width: int) -> nn.Sequential:
    """Pooled caption embedding (B, cond_dim) → (B, width), the conditioning every family adds to its input."""
    return nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
