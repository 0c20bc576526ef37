"""Tensors ↔ PIL images, and image grids."""
from __future__ import annotations

import math

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] → list of RGB PIL images (round to nearest, no dithering)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB") for im in x]


def image_grid(images: list[Image.Image], *, rows: int | None = None, pad: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile equally sized images row by row into one image with `pad` pixels between them."""
    n = len(images)
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
