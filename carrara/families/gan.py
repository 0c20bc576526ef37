"""A conditional DCGAN (Radford et al. 2016) with a projection discriminator (Miyato & Koyama 2018),
spectral normalisation (Miyato et al. 2018) and the hinge loss (Lim & Ye 2017; used by SAGAN and BigGAN).

Notation:
  G(z, c)   generator: z ~ N(0, I) and the pooled caption c → image
  D(x, c) = ψ(φ(x)) + ⟨V c, φ(x)⟩   projection discriminator (Miyato & Koyama 2018 eq. 3)
  L_D = E[max(0, 1 − D(x, c))] + E[max(0, 1 + D(G(z, c), c))]   hinge loss for D
  L_G = −E[D(G(z, c), c)]                                         hinge loss for G
One Trainer step updates both players at once (simultaneous gradient descent): the loss is L_D + L_G, where
L_D sees G's images detached and L_G reaches D with D's parameters frozen, so each player's gradient is its
own loss's alone. The sum is therefore not a measure of progress; `report` gives both parts.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from carrara.families.base import Batch, randn_per_image
from carrara.families.nets import level_channels, text_projection
from carrara.images import to_model_range

# TrainConfig fields (train.py). Adam with β1 = 0, β2 = 0.9, no weight decay, no clipping that couples the players:
# SNGAN's and BigGAN's optimiser. With the trainer's defaults (β1 = 0.9, weight decay 0.01, clip 1.0 over both
# players) the generator collapsed on `shapes` to one dot per colour (docs/families.md).
TRAIN = {"steps": 3000, "batch_size": 64, "lr": 2e-4, "warmup_steps": 0, "ema_decay": 0.999, "sample_every": 500,
         "beta1": 0.0, "beta2": 0.9, "weight_decay": 0.0, "grad_clip": 100.0}
COND_DROPOUT = 0.0


@dataclass
class Config:
    """Both players' shapes."""

    image_size: int = 32
    z_dim: int = 64
    base_channels: int = 32  # the widest layers have 4 × this
    bottom: int = 4
    cond_dim: int = 384
    cond_width: int = 128


class Generator(nn.Module):
    """DCGAN's generator: project [z, caption] to (C, 4, 4), then ×2 upsampling blocks with BatchNorm + ReLU, tanh."""

    def __init__(self, config: Config):
        super().__init__()
        ch = level_channels(config.image_size, config.bottom, config.base_channels)[::-1]  # widest first
        self.top = (ch[0], config.bottom, config.bottom)
        self.text = text_projection(config.cond_dim, config.cond_width)
        self.project = nn.Linear(config.z_dim + config.cond_width, ch[0] * config.bottom**2)
        layers = [nn.BatchNorm2d(ch[0]), nn.ReLU()]
        for a, b in itertools.pairwise(ch):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.Conv2d(ch[-1], 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.text(cond)], 1)).view(-1, *self.top)  # (B, C, 4, 4)
        return self.net(h)  # (B, 3, S, S) in (−1, 1)


class Discriminator(nn.Module):
    """Strided convolutions with spectral norm and LeakyReLU (no normalisation), then the projection head."""

    def __init__(self, config: Config):
        super().__init__()
        ch = level_channels(config.image_size, config.bottom, config.base_channels)
        layers = [spectral_norm(nn.Conv2d(3, ch[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for a, b in itertools.pairwise(ch):
            layers += [spectral_norm(nn.Conv2d(a, b, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.psi = spectral_norm(nn.Linear(ch[-1], 1))
        self.embed = spectral_norm(nn.Linear(config.cond_dim, ch[-1], bias=False))  # V

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        phi = self.net(x).sum((2, 3))  # (B, C): sum-pooled features φ(x)
        return self.psi(phi).squeeze(1) + (self.embed(cond) * phi).sum(1)  # (B,): eq. 3


class GAN(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.G, self.D = Generator(config), Discriminator(config)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Operations inside record no gradient for `module`'s parameters (they still pass gradients through)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def build(config: Config) -> GAN:
    return GAN(config)


def initialize(model: GAN, images: torch.Tensor, cond: torch.Tensor) -> None:
    """Nothing depends on the data."""


def prepare(model: GAN, images: torch.Tensor) -> torch.Tensor:
    return to_model_range(images)


def losses(model: GAN, x: torch.Tensor, cond: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_G) of the hinge loss on real images x and G(z, cond)."""
    fake = model.G(z, cond)  # (B, 3, S, S)
    loss_d = F.relu(1 - model.D(x, cond)).mean() + F.relu(1 + model.D(fake.detach(), cond)).mean()
    with frozen(model.D):
        loss_g = -model.D(fake, cond).mean()
    return loss_d.float(), loss_g.float()


def loss(model: GAN, batch: Batch) -> torch.Tensor:
    z = torch.randn(len(batch.x), model.config.z_dim, generator=batch.gen).to(batch.x.device)
    loss_d, loss_g = losses(model, batch.x, batch.cond, z)
    return loss_d + loss_g


@torch.no_grad()
def sample(model: GAN, cond: torch.Tensor, seed: int, *, temperature: float = 1.0) -> torch.Tensor:
    """G(z, c) with z ~ N(0, T² I), row i from seed + i; BatchNorm in eval mode, so images do not depend
    on their batch: (B, 3, S, S) in [−1, 1]."""
    was = model.training
    model.eval()
    z = randn_per_image((model.config.z_dim,), seed, len(cond)) * temperature
    images = model.G(z, cond)
    model.train(was)
    return images


@torch.no_grad()
def report(model: GAN, data: torch.Tensor, cond: torch.Tensor) -> dict:
    """Both players' hinge losses on the given images (z from seed 0), and the spread of G's images for one
    caption: a spread near 0 is mode collapse."""
    was = model.training
    model.eval()
    z = torch.randn(len(data), model.config.z_dim, generator=torch.Generator().manual_seed(0))
    loss_d, loss_g = losses(model, data, cond, z)
    same = model.G(z[:16], cond[:1].expand(min(16, len(z)), -1))  # 16 images of one caption
    model.train(was)
    return {"loss_d": round(float(loss_d), 4), "loss_g": round(float(loss_g), 4),
            "within_caption_std": round(float(same.std(0).mean()), 4)}
