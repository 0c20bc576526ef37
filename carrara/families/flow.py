"""A conditional Glow: affine coupling (RealNVP, Dinh et al. 2017), actnorm and invertible 1×1 convolutions
(Glow, Kingma & Dhariwal 2018), multi-scale with squeeze and split, conditioned on the caption.

Notation (Glow Table 1; RealNVP §3):
  x        image, dequantized: y = (x_uint8 + u) / 256 − ½, u ~ U[0, 1)   (RealNVP §4.1)
  f        the flow, y → (z_1, …, z_L), invertible; log|det ∂f/∂y| summed over its layers
  log p(y) = Σ_l log N(z_l; μ_l, σ_l) + log|det ∂f/∂y|                       (change of variables, RealNVP eq. 3)
  NLL of x in bits/dim = (−log p(y) + D log 256) / (D ln 2)                  (the exact, discrete NLL bound)
Per level: squeeze (C, H, W) → (4C, H/2, W/2); K × [actnorm → 1×1 conv → affine coupling]; split off half
the channels as z_l with a prior p(z_l | rest, caption) (Glow §3; RealNVP §3.6). The caption's pooled
embedding enters every coupling network and every prior as extra channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carrara.families.base import Batch, image_generators
from carrara.families.nets import text_projection

TRAIN = {"steps": 2000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 100, "sample_every": 500, "bf16": False}  # TrainConfig fields (train.py)
COND_DROPOUT = 0.0


@dataclass
class Config:
    """The flow's shape: `levels` squeezes, `steps` flow steps per level."""

    image_size: int = 32
    levels: int = 3  # L
    steps: int = 4  # K
    hidden: int = 64  # width of each coupling network
    cond_dim: int = 384
    cond_channels: int = 16  # the caption as channels beside every coupling's and prior's input
    temperature: float = 0.7  # sampling: z = μ + T σ ε (Glow §5 samples at T = 0.7)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2): each 2×2 patch into channels (RealNVP §3.6)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * H, 2 * W)


def zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3×3 convolution starting at zero, so each coupling and prior starts as the identity / N(0, I)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """Σ log N(z; μ, e^{2 logs}) over all but the batch dimension: (B,)."""
    return (-0.5 * (math.log(2 * math.pi) + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))).flatten(1).sum(1)


class ActNorm(nn.Module):
    """y = (x + b) · e^s per channel, initialised from data to zero mean, unit variance (Glow §3.1)."""

    def __init__(self, c: int):
        super().__init__()
        self.loc, self.logs = nn.Parameter(torch.zeros(1, c, 1, 1)), nn.Parameter(torch.zeros(1, c, 1, 1))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
        self.logs.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x + self.loc) * self.logs.exp(), self.logs.sum() * x.shape[2] * x.shape[3]  # log-det h·w·Σ s

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.loc


class InvConv(nn.Module):
    """y = W x at every pixel, W a C×C matrix started at a random rotation (Glow §3.2)."""

    def __init__(self, c: int, seed: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(c, c, generator=torch.Generator().manual_seed(seed)))[0]
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.linalg.slogdet(self.weight.double())[1].float() * x.shape[2] * x.shape[3]  # h·w·log|det W|
        return F.conv2d(x, self.weight[:, :, None, None]), logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(y, torch.linalg.inv(self.weight.double()).float()[:, :, None, None])


class Coupling(nn.Module):
    """Affine coupling (RealNVP eq. 7): y_a = x_a, y_b = (x_b + t) ⊙ σ(r + 2), (t, r) = NN(x_a, caption)."""

    def __init__(self, c: int, hidden: int, cond_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c // 2 + cond_channels, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(), zero_conv(hidden, c))

    def shift_scale(self, x_a: torch.Tensor, cond_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(torch.cat([x_a, cond_map], 1))
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)  # Glow's scale σ(r + 2): near 1 at the start, bounded

    def forward(self, x: torch.Tensor, cond_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x.chunk(2, 1)
        t, s = self.shift_scale(x_a, cond_map)
        return torch.cat([x_a, (x_b + t) * s], 1), s.log().flatten(1).sum(1)  # log-det Σ log s

    def reverse(self, y: torch.Tensor, cond_map: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y.chunk(2, 1)
        t, s = self.shift_scale(y_a, cond_map)
        return torch.cat([y_a, y_b / s - t], 1)


class Level(nn.Module):
    """K flow steps at one resolution, then the prior of the half that is split off (none at the top)."""

    def __init__(self, c: int, config: Config, level: int, top: bool):
        super().__init__()
        cc = config.cond_channels
        self.norms = nn.ModuleList(ActNorm(c) for _ in range(config.steps))
        self.convs = nn.ModuleList(InvConv(c, seed=100 * level + k) for k in range(config.steps))
        self.couplings = nn.ModuleList(Coupling(c, config.hidden, cc) for _ in range(config.steps))
        self.prior = zero_conv(cc, 2 * c) if top else zero_conv(c // 2 + cc, c)  # → (μ, log σ) of z

    def flow(self, x: torch.Tensor, cond_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(len(x), device=x.device)
        for norm, conv, coupling in zip(self.norms, self.convs, self.couplings):
            for layer in (norm, conv):
                x, ld = layer(x)
                logdet = logdet + ld
            x, ld = coupling(x, cond_map)
            logdet = logdet + ld
        return x, logdet

    def unflow(self, y: torch.Tensor, cond_map: torch.Tensor) -> torch.Tensor:
        for norm, conv, coupling in zip(reversed(self.norms), reversed(self.convs), reversed(self.couplings)):
            y = norm.reverse(conv.reverse(coupling.reverse(y, cond_map)))
        return y


class Glow(nn.Module):
    """y (B, 3, S, S) ↔ [z_1, …, z_L] with log-det, conditioned on the pooled caption (B, D)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.text = text_projection(config.cond_dim, config.cond_channels)
        channels, c = [], 3
        for level in range(config.levels):
            c *= 4
            channels.append(c)
            c //= 2
        self.levels = nn.ModuleList(Level(c, config, i, top=i == config.levels - 1) for i, c in enumerate(channels))

    def cond_map(self, cond: torch.Tensor, side: int) -> torch.Tensor:
        return self.text(cond)[:, :, None, None].expand(-1, -1, side, side)  # (B, cc, side, side)

    def encode(self, y: torch.Tensor, cond: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """f(y): the z_l (finest first), log|det ∂f/∂y| (B,) and Σ_l log p(z_l | …) (B,)."""
        zs, logdet, log_pz = [], torch.zeros(len(y), device=y.device), torch.zeros(len(y), device=y.device)
        h = y
        for i, level in enumerate(self.levels):
            h = squeeze(h)  # 1. (B, 4C, H/2, W/2)
            cm = self.cond_map(cond, h.shape[-1])
            h, ld = level.flow(h, cm)  # 2. K × [actnorm, 1×1 conv, coupling]
            logdet = logdet + ld
            if i == len(self.levels) - 1:
                z, stats = h, level.prior(cm)  # 3. top: p(z_L | caption)
            else:
                h, z = h.chunk(2, 1)  # 3. split: p(z_l | h_l, caption)
                stats = level.prior(torch.cat([h, cm], 1))
            mean, logs = stats[:, 0::2], stats[:, 1::2]
            log_pz = log_pz + gaussian_log_density(z, mean, logs)
            zs.append(z)
        return zs, logdet, log_pz

    def decode(self, zs: list[torch.Tensor] | None, cond: torch.Tensor, *, eps: list[torch.Tensor] | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """f⁻¹: from the z_l (finest first), or from standard normal ε_l with z_l = μ_l + T σ_l ε_l."""
        h = None
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            side = self.config.image_size >> (i + 1)
            cm = self.cond_map(cond, side)
            stats = level.prior(cm if h is None else torch.cat([h, cm], 1))
            mean, logs = stats[:, 0::2], stats[:, 1::2]
            z = zs[i] if zs is not None else mean + temperature * logs.exp() * eps[i]
            h = level.unflow(z if h is None else torch.cat([h, z], 1), cm)
            h = unsqueeze(h)
        return h

    def shapes(self) -> list[tuple[int, int, int]]:
        """The shape (C, H, W) of each z_l, finest first."""
        out, c, side = [], 3, self.config.image_size
        for i in range(self.config.levels):
            c, side = c * 4, side // 2
            top = i == self.config.levels - 1
            out.append((c if top else c // 2, side, side))
            c //= 1 if top else 2
        return out


def dequantize(x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """y = (x + u) / 256 − ½ with u ~ U[0, 1): a density over [−½, ½)^D whose mass in each bin is p(x)."""
    return (x_uint8 + torch.rand(x_uint8.shape, generator=gen).to(x_uint8.device)) / 256 - 0.5


def bits_per_dim(model: Glow, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """(−log p(y) + D log 256) / (D ln 2), the mean over the batch."""
    _, logdet, log_pz = model.encode(y, cond)
    D = y[0].numel()
    return ((-(log_pz + logdet) + D * math.log(256)) / (D * math.log(2))).mean()


def build(config: Config) -> Glow:
    return Glow(config)


@torch.no_grad()
def initialize(model: Glow, images: torch.Tensor, cond: torch.Tensor) -> None:
    """Actnorm from data (Glow §3.1): each layer's output has zero mean and unit variance on these images."""
    h = dequantize(images.float(), torch.Generator().manual_seed(0))
    for i, level in enumerate(model.levels):
        h = squeeze(h)
        cm = model.cond_map(cond, h.shape[-1])
        for norm, conv, coupling in zip(level.norms, level.convs, level.couplings):
            norm.initialize(h)
            h = coupling(conv(norm(h)[0])[0], cm)[0]
        if i < len(model.levels) - 1:
            h = h.chunk(2, 1)[0]


def prepare(model: Glow, images: torch.Tensor) -> torch.Tensor:
    """uint8 values as floats: the flow dequantizes them afresh every step."""
    return images.float()


def loss(model: Glow, batch: Batch) -> torch.Tensor:
    """The exact NLL in bits/dim of the dequantized batch: what a flow minimises, and what it reports."""
    return bits_per_dim(model, dequantize(batch.x, batch.gen), batch.cond)


@torch.no_grad()
def sample(model: Glow, cond: torch.Tensor, seed: int, *, temperature: float | None = None) -> torch.Tensor:
    """ε_l ~ N(0, I) per image (seed + i), z_l = μ_l + T σ_l ε_l, x = f⁻¹(z): (B, 3, S, S) in [−1, 1]."""
    T = model.config.temperature if temperature is None else temperature
    gens = image_generators(seed, len(cond))
    eps = [torch.stack([torch.randn(shape, generator=g) for g in gens]) for shape in model.shapes()]
    return (2 * model.decode(None, cond, eps=eps, temperature=T)).clamp(-1, 1)  # y ∈ [−½, ½) → [−1, 1]


@torch.no_grad()
def report(model: Glow, data: torch.Tensor, cond: torch.Tensor) -> dict:
    """Bits/dim on the given images (one dequantization, seed 0)."""
    y = dequantize(data, torch.Generator().manual_seed(0))
    return {"bits_per_dim": round(float(bits_per_dim(model, y, cond)), 4)}
