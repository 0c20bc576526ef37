"""VQ-VAE (van den Oord et al. 2017): the image tokenizer of the two-stage recipe (then ar.py, DALL-E 1).

Notation (van den Oord et al. 2017 §3):
  z_e(x) ∈ R^(h×w×d)   encoder output, f = image side / h
  e ∈ R^(K×d)          the codebook
  k = argmin_j ‖z_e − e_j‖₂, z_q = e_k   (eq. 1–2), one code per grid cell
  L = ‖x − D(z_q)‖² + ‖sg[z_e] − e‖² + β ‖z_e − sg[e]‖²   (eq. 3)
The decoder's gradient is copied to the encoder through the quantizer (straight-through, §3.1). With
`ema=True` the codebook term is replaced by exponential moving averages of the assigned encoder outputs
(Appendix A.1), with Laplace-smoothed counts as in Razavi et al. 2019. The tokenizer is not conditioned on
the caption: the text enters in the prior over its codes (ar.py), as in DALL-E 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carrara.errors import CarraraError
from carrara.families.base import Batch
from carrara.families.nets import DownLadder, UpLadder, level_channels
from carrara.images import to_model_range

TRAIN = {"steps": 2000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50, "sample_every": 500}  # TrainConfig fields (train.py)
COND_DROPOUT = 0.0


@dataclass
class Config:
    """The VQ-VAE's shape: the code grid is image_size / factor on a side."""

    image_size: int = 32
    factor: int = 4  # downsampling f: 32 px → 8×8 codes, 64 px → 16×16
    base_channels: int = 32
    codebook_size: int = 128  # K
    code_dim: int = 32  # d
    beta: float = 0.25  # commitment weight β (eq. 3)
    ema: bool = True  # codebook by EMA (Appendix A.1) instead of the codebook loss
    decay: float = 0.99  # γ of the EMA
    eps: float = 1e-5  # Laplace smoothing of the EMA counts


class Quantizer(nn.Module):
    """Nearest-code lookup with a straight-through gradient and (optionally) EMA codebook updates."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        codebook = torch.randn(config.codebook_size, config.code_dim) / math.sqrt(config.code_dim)
        if config.ema:
            self.register_buffer("codebook", codebook)  # moved by ema_update, not by the optimizer
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("ema_count", torch.ones(config.codebook_size))  # N_i
        self.register_buffer("ema_sum", codebook.clone())  # m_i, so e_i = m_i / N_i from the start

    def indices(self, z_e: torch.Tensor) -> torch.Tensor:
        """k = argmin_j ‖z_e − e_j‖² for rows z_e (M, d) → (M,), eq. 1."""
        e = self.codebook.float()
        dist = z_e.float().pow(2).sum(1, keepdim=True) - 2 * z_e.float() @ e.T + e.pow(2).sum(1)  # (M, K)
        return dist.argmin(1)

    @torch.no_grad()
    def ema_update(self, z_e: torch.Tensor, k: torch.Tensor) -> None:
        """Appendix A.1: N_i ← γN_i + (1−γ)n_i; m_i ← γm_i + (1−γ)Σ_{k_j=i} z_j; e_i = m_i / Ñ_i (Ñ smoothed)."""
        cfg = self.config
        onehot = F.one_hot(k, cfg.codebook_size).float()  # (M, K)
        self.ema_count.mul_(cfg.decay).add_(onehot.sum(0), alpha=1 - cfg.decay)
        self.ema_sum.mul_(cfg.decay).add_(onehot.T @ z_e.float(), alpha=1 - cfg.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + cfg.eps) / (n + cfg.codebook_size * cfg.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B, d, h, w) → (straight-through z_q (B, d, h, w), codes (B, h, w), codebook + commitment loss)."""
        B, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B·h·w, d)
        with torch.autocast(z_e.device.type, enabled=False):  # distances and sums in fp32, even under bf16
            k = self.indices(flat)  # (B·h·w,)
            if self.training and self.config.ema:
                self.ema_update(flat.detach(), k)
        e = self.codebook[k].float()  # (B·h·w, d) = z_q
        commit = self.config.beta * F.mse_loss(flat, e.detach())  # β ‖z_e − sg[e]‖²
        codebook_loss = 0.0 if self.config.ema else F.mse_loss(e, flat.detach())  # ‖sg[z_e] − e‖²
        z_q = flat + (e - flat).detach()  # straight-through: forward e, backward the identity (§3.1)
        return z_q.view(B, h, w, d).permute(0, 3, 1, 2), k.view(B, h, w), commit + codebook_loss


class VQVAE(nn.Module):
    """Encoder → quantizer → decoder."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        ch = level_channels(config.image_size, config.image_size // config.factor, config.base_channels)
        self.encoder = nn.Sequential(DownLadder(3, ch), nn.Conv2d(ch[-1], config.code_dim, 1))
        self.quantizer = Quantizer(config)
        self.decoder = nn.Sequential(nn.Conv2d(config.code_dim, ch[-1], 1), UpLadder(ch, 3))

    @property
    def grid(self) -> int:
        return self.config.image_size // self.config.factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, S, S) → (reconstruction (B, 3, S, S), codes (B, h, w), quantizer loss)."""
        z_q, codes, vq_loss = self.quantizer(self.encoder(x))
        return self.decoder(z_q), codes, vq_loss

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [−1, 1] → codes (B, h·w) in raster order."""
        z_e = self.encoder(x).float()  # (B, d, h, w)
        with torch.autocast(x.device.type, enabled=False):
            return self.quantizer.indices(z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])).view(len(x), -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h·w) → images (B, 3, S, S) in [−1, 1]."""
        z_q = self.quantizer.codebook[codes].view(len(codes), self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return self.decoder(z_q.float()).clamp(-1, 1)


def build(config: Config) -> VQVAE:
    return VQVAE(config)


@torch.no_grad()
def initialize(model: VQVAE, images: torch.Tensor, cond: torch.Tensor) -> None:
    """Codebook = K encoder outputs of the first images (a data-dependent start: fewer dead codes)."""
    z_e = model.encoder(to_model_range(images)).float()  # (n, d, h, w)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:model.config.codebook_size]
    q = model.quantizer
    q.codebook.data[:len(pick)] = flat[pick]
    q.ema_sum.copy_(q.codebook.data * q.ema_count[:, None])


def prepare(model: VQVAE, images: torch.Tensor) -> torch.Tensor:
    return to_model_range(images)


def loss(model: VQVAE, batch: Batch) -> torch.Tensor:
    """Eq. 3: reconstruction + codebook/commitment terms."""
    x_rec, _, vq_loss = model(batch.x)
    return F.mse_loss(x_rec.float(), batch.x) + vq_loss


def sample(model: VQVAE, cond: torch.Tensor, seed: int, **options) -> torch.Tensor:
    raise CarraraError("a VQ-VAE is a tokenizer, not a generator: train its prior with --kind ar --vqvae RUN")


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict:
    """Fraction of codes used and the perplexity exp(H) of their frequencies (K means all used equally)."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": codebook_size,
            "usage": round(float((counts > 0).double().mean()), 4), "perplexity": round(float(entropy.exp()), 2)}


@torch.no_grad()
def report(model: VQVAE, data: torch.Tensor, cond: torch.Tensor) -> dict:
    """Codebook usage over the given images and their reconstruction MSE."""
    codes = torch.cat([model.encode_codes(data[i:i + 256]) for i in range(0, len(data), 256)])
    rec = model.decode_codes(codes[:256])
    return {**codebook_usage(codes, model.config.codebook_size),
            "reconstruction_mse": round(float(F.mse_loss(rec, data[:256])), 5)}
