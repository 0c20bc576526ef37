"""Image GPT (Chen et al. 2020): a transformer over colour-quantised pixels in raster order, caption as prefix.

iGPT clusters RGB values with k-means into a 9-bit palette (512 colours) and models images at 32×32 or
lower as sequences of palette indices (§3.1–3.2). Here the palette is k-means over the training pixels
(`palette_size` colours; `shapes` has a few colours and their anti-aliased edges), the grid `grid`×`grid`
(16 or 32), and the transformer is ar.py's GPT with the caption as prefix. Samples are enlarged to
`image_size` by nearest neighbour so every family is judged at the same size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from carrara.families.ar import GPT, GPTConfig, model_tokens
from carrara.families.ar import loss as next_token_loss
from carrara.images import to_model_range

loss = next_token_loss  # Image GPT's objective is the VQ prior's: next-token cross-entropy, on palette indices

TRAIN = {"steps": 2000, "batch_size": 32, "lr": 5e-4, "warmup_steps": 50, "sample_every": 500}  # TrainConfig fields (train.py)
COND_DROPOUT = 0.1


@dataclass
class Config:
    """The pixel grid, the palette and the transformer."""

    image_size: int = 32  # the data's side; samples are enlarged to it
    grid: int = 16  # pixels per side the transformer models (16 or 32)
    palette_size: int = 16  # k-means colours (iGPT: 512)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    temperature: float = 1.0
    top_k: int = 0


class ImageGPT(nn.Module):
    """The palette (K, 3) in [−1, 1] and the transformer over palette indices."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.register_buffer("palette", torch.zeros(config.palette_size, 3))
        self.gpt = GPT(config.gpt)

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [−1, 1] → palette indices (B, g·g): area-downsample, then nearest colour."""
        g = self.config.grid
        x = F.adaptive_avg_pool2d(images.float(), g) if images.shape[-1] != g else images.float()
        pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)  # (B·g·g, 3)
        return torch.cdist(pixels, self.palette).argmin(1).view(len(images), g * g)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, g·g) → images (B, 3, S, S), each pixel its palette colour, enlarged to image_size."""
        g = self.config.grid
        x = self.palette[indices].view(len(indices), g, g, 3).permute(0, 3, 1, 2)  # (B, 3, g, g)
        return F.interpolate(x, size=self.config.image_size, mode="nearest")


def kmeans(points: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on rows of `points` (M, 3), started by k-means++ (Arthur & Vassilvitskii 2007: each new
    centre drawn with probability ∝ squared distance to the nearest one, so rare colours get a centre); (k, 3)."""
    gen = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(len(points), (1,), generator=gen)]  # (1, 3)
    for _ in range(k - 1):
        d2 = torch.cdist(points, centres).min(1).values ** 2  # (M,)
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # fewer distinct colours than k: repeat one
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=gen)]])
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)  # (M,)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).float()
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres


def build(config: Config) -> ImageGPT:
    """The transformer's vocabulary is the palette, its sequence the g·g grid (set here)."""
    gpt = dataclasses.replace(config.gpt, vocab_size=config.palette_size, seq_len=config.grid**2)
    return ImageGPT(dataclasses.replace(config, gpt=gpt))


@torch.no_grad()
def initialize(model: ImageGPT, images: torch.Tensor, cond: torch.Tensor) -> None:
    """The palette: k-means over (up to 200 000) downsampled training pixels (iGPT §3.2)."""
    x = F.adaptive_avg_pool2d(to_model_range(images), model.config.grid)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)
    pixels = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))[:200_000]]
    model.palette.copy_(kmeans(pixels, model.config.palette_size))


@torch.no_grad()
def prepare(model: ImageGPT, images: torch.Tensor) -> torch.Tensor:
    """Every image's palette indices (N, g·g), raster order."""
    return torch.cat([model.quantize(to_model_range(images[i:i + 256])) for i in range(0, len(images), 256)])


def sample(model: ImageGPT, cond: torch.Tensor, seed: int, **options) -> torch.Tensor:
    """Pixels one at a time (g² transformer steps), as palette colours: (B, 3, S, S) in [−1, 1]."""
    return model.dequantize(model_tokens(model, cond, seed, **options))


@torch.no_grad()
def report(model: ImageGPT, data: torch.Tensor, cond: torch.Tensor) -> dict:
    """NLL of the quantised images in nats per pixel."""
    return {"nll_nats_per_pixel": round(float(model.gpt.next_token_loss(cond, data)), 5)}
