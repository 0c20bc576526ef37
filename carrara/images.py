"""Images between their three forms — float tensors in [−1, 1] (the models'), uint8 tensors (disk and caches), PIL —
and image grids. The one place the [−1, 1] ↔ uint8 convention is written."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from carrara.errors import CarraraError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(…, H, W) float in [−1, 1] → uint8 in [0, 255], rounded to nearest (values outside are clipped)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (…, H, W) → float32 in [−1, 1], the models' range."""
    return images.float() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] → list of RGB PIL images (round to nearest, no dithering)."""
    return [Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB") for im in to_uint8(images)]  # (H, W, 3) each


def open_picture(path: str | Path, what: str = "image") -> Image.Image:
    """A picture file fully decoded, or one CarraraError line naming what is wrong with it."""
    try:
        with Image.open(path) as im:
            im.load()  # decode every pixel now: a truncated file fails here, not halfway through generating
            return im.copy()
    except FileNotFoundError:
        raise CarraraError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise CarraraError(f"{what} {path} is a folder, not an image") from None
    except Image.DecompressionBombError:
        raise CarraraError(f"{what} {path}: the image is too large to read (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise CarraraError(f"{what} {path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise CarraraError(f"{what} {path}: damaged or unreadable image ({e})") from None


def square(image: Image.Image, side: int, *, mask: bool = False) -> Image.Image:
    """A user's picture as the models take it: transparency over white (as the emoji data are drawn), centre-cropped
    to a square and resized to side × side (Lanczos; a mask: grey levels, nearest neighbour, so it stays sharp)."""
    if mask:
        image = image.convert("L")
    elif image.mode != "RGB":
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
        image = image.convert("RGB")
    w, h = image.size
    crop = min(w, h)
    image = image.crop(((w - crop) // 2, (h - crop) // 2, (w - crop) // 2 + crop, (h - crop) // 2 + crop))
    resample = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
    return image if image.size == (side, side) else image.resize((side, side), resample)


def from_pil(images: list[Image.Image], side: int, *, mask: bool = False) -> torch.Tensor:
    """PIL images → (B, 3, side, side) float in [−1, 1], or masks → (B, 1, side, side) of 0/1 (white = 1), via `square`."""
    arrays = [torch.from_numpy(np.array(square(im, side, mask=mask))) for im in images]  # (H, W[, 3]) uint8 each
    if mask:
        return torch.stack([(a >= 128).float() for a in arrays]).unsqueeze(1)  # (B, 1, H, W)
    return to_model_range(torch.stack(arrays).permute(0, 3, 1, 2))  # (B, 3, H, W)


def image_grid(images: list[Image.Image], *, rows: int | None = None, pad: int = 2,
               background: tuple[int, int, int] = (255, 255, 255), labels: list[str] | None = None,
               scale: int = 1) -> Image.Image:
    """Tile equally sized images row by row into one image with `pad` pixels between them.

    labels: a caption under each image (wrapped to its width, PIL's built-in font); scale: nearest-neighbour
    enlargement of each image first, so 64-pixel images and their captions stay readable.
    """
    if scale != 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    n = len(images)
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    w, h = images[0].size
    font, line_h, wrapped = None, 0, []
    if labels is not None:
        font = ImageFont.load_default()
        line_h = 12
        wrapped = [textwrap.wrap(text, width=max(4, w // 6))[:3] for text in labels]
    label_h = line_h * max((len(lines) for lines in wrapped), default=0) + (4 if labels else 0)
    cell_h = h + label_h
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (cell_h + pad)
        grid.paste(im, (x, y))
        for k, line in enumerate(wrapped[i] if i < len(wrapped) else []):
            draw.text((x + 2, y + h + 2 + k * line_h), line, fill=(40, 40, 40), font=font)
    return grid
