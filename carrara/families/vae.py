"""Conditional VAE (Kingma & Welling 2014; conditioned on the caption as in Sohn et al. 2015).

Notation (Kingma & Welling 2014 §2–3):
  q_φ(z | x, c) = N(μ, diag σ²)   encoder; z ∈ R^z_dim
  p_θ(x | z, c) = N(x̂, s² I)      decoder with a fixed output scale s (`sigma`)
  p(z) = N(0, I)                   prior: sampling draws z ~ N(0, I) and decodes it
  −ELBO = E_q[−log p_θ(x | z, c)] + KL(q_φ(z | x, c) ‖ p(z))   (eq. 3), per dimension of x in the loss
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from carrara.families.base import Batch, randn_per_image
from carrara.families.nets import DownLadder, UpLadder, level_channels, text_projection
from carrara.images import to_model_range

TRAIN = {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 50, "sample_every": 500}  # TrainConfig fields (train.py)
COND_DROPOUT = 0.0


@dataclass
class Config:
    """The conditional VAE's shape."""

    image_size: int = 32
    base_channels: int = 32  # channels at full resolution; ×2 per level, at most ×4
    bottom: int = 4  # side of the deepest feature map
    z_dim: int = 64
    cond_dim: int = 384  # the text encoder's pooled embedding (MiniLM: 384)
    cond_width: int = 128
    sigma: float = 0.1  # the decoder's output scale s: smaller weighs reconstruction over the KL term


class ConditionalVAE(nn.Module):
    """Encoder q(z | x, c) and decoder p(x | z, c) around a flat latent z."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        ch = level_channels(config.image_size, config.bottom, config.base_channels)
        self.top = (ch[-1], config.bottom, config.bottom)
        flat = ch[-1] * config.bottom**2
        self.text = text_projection(config.cond_dim, config.cond_width)
        self.encoder = DownLadder(3, ch)
        self.to_posterior = nn.Linear(flat + config.cond_width, 2 * config.z_dim)
        self.from_latent = nn.Linear(config.z_dim + config.cond_width, flat)
        self.decoder = UpLadder(ch, 3)

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z | x, c), each (B, z_dim)."""
        h = self.encoder(x).flatten(1)  # (B, C·b·b)
        mu, logvar = self.to_posterior(torch.cat([h, self.text(cond)], 1)).chunk(2, 1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The mean x̂ of p(x | z, c), (B, 3, S, S)."""
        h = self.from_latent(torch.cat([z, self.text(cond)], 1)).view(-1, *self.top)  # (B, C, b, b)
        return self.decoder(h)


def build(config: Config) -> ConditionalVAE:
    return ConditionalVAE(config)


def initialize(model: ConditionalVAE, images: torch.Tensor, cond: torch.Tensor) -> None:
    """Nothing depends on the data."""


def prepare(model: ConditionalVAE, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) → [−1, 1]."""
    return to_model_range(images)


def negative_elbo(model: ConditionalVAE, x: torch.Tensor, cond: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """−ELBO in nats per dimension of x (Kingma & Welling 2014 eq. 10), one sample z = μ + σ ε."""
    mu, logvar = model.encode(x, cond)  # (B, z_dim) each
    z = mu + (0.5 * logvar).exp() * eps  # 1. reparameterisation, §2.4
    x_hat = model.decode(z, cond).float()  # (B, 3, S, S)
    s = model.config.sigma
    # 2. −log N(x; x̂, s²I) = ‖x − x̂‖² / 2s² + D log(s √2π)
    nll = ((x - x_hat) ** 2).flatten(1).sum(1) / (2 * s * s) + x[0].numel() * math.log(s * math.sqrt(2 * math.pi))
    kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum(1)  # 3. KL to N(0, I), App. B
    return (nll + kl).mean() / x[0].numel()


def loss(model: ConditionalVAE, batch: Batch) -> torch.Tensor:
    eps = torch.randn(len(batch.x), model.config.z_dim, generator=batch.gen).to(batch.x.device)
    return negative_elbo(model, batch.x, batch.cond, eps)


@torch.no_grad()
def sample(model: ConditionalVAE, cond: torch.Tensor, seed: int, *, temperature: float = 1.0) -> torch.Tensor:
    """z ~ N(0, T² I) (row i from seed + i), decoded to the mean image: (B, 3, S, S) in [−1, 1]."""
    z = randn_per_image((model.config.z_dim,), seed, len(cond)) * temperature  # (B, z_dim)
    return model.decode(z, cond).clamp(-1, 1)


@torch.no_grad()
def report(model: ConditionalVAE, data: torch.Tensor, cond: torch.Tensor) -> dict:
    """−ELBO per dimension on the given examples (fixed ε, seed 0)."""
    eps = torch.randn(len(data), model.config.z_dim, generator=torch.Generator().manual_seed(0))
    return {"neg_elbo_nats_per_dim": round(float(negative_elbo(model, data, cond, eps)), 5)}
