"""Sliced Wasserstein distance over Laplacian-pyramid patches: image statistics per scale, the finest included.

Karras et al. 2018 ("Progressive Growing of GANs", §5 and Appendix D) judge a generator scale by scale: each image
is split into a Laplacian pyramid (5×5 binomial filter, as OpenCV's pyrDown/pyrUp: the finest level holds only the
detail between 128 and 64 px), 128 random 7×7 neighbourhoods per image and level become 147-dim descriptors, each
set's descriptors are normalised per colour channel (its own mean and std over all its descriptors), and the two
sets are compared by the sliced Wasserstein distance — the mean over random unit directions of the 1-D
Wasserstein-1 distance between the projected samples (4 repeats × 128 directions), reported ×10³.

A feature network trained on text (the 128-px CLIP of bench/cascade.py) may not care whether an outline is sharp;
the finest level's SWD does by construction. The sampling of neighbourhoods and directions is seeded, so a value is
reproducible; with equal sets it is exactly 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carrara.errors import CarraraError

BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
KERNEL = torch.outer(BINOMIAL, BINOMIAL) / 256.0  # 5×5, sums to 1
NEIGHBOURHOOD, PER_IMAGE, REPEATS, DIRECTIONS, SMALLEST = 7, 128, 4, 128, 16


def _blur(x: torch.Tensor, gain: float) -> torch.Tensor:
    """Depthwise 5×5 binomial filter, edges mirrored without repeating the edge pixel (scipy's mode="mirror")."""
    c = x.shape[1]
    k = (KERNEL * gain).to(x.dtype).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C, H/2, W/2): blur, keep every other pixel (OpenCV's pyrDown)."""
    return _blur(x, 1.0)[..., ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C, 2H, 2W): zeros between the pixels, then the blur with gain 4 (OpenCV's pyrUp)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return _blur(up, 4.0)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[detail at H, detail at H/2, …, the blurred image at H/2^(levels−1)]; `reconstruct` inverts it exactly."""
    pyramid = [x.float()]
    for _ in range(levels - 1):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def reconstruct(pyramid: list[torch.Tensor]) -> torch.Tensor:
    x = pyramid[-1]
    for level in pyramid[-2::-1]:
        x = pyr_up(x) + level
    return x


def neighbourhoods(level: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """(N, per_image, C·7·7): random 7×7 neighbourhoods of each image, wholly inside it."""
    n, _, h, w = level.shape
    r = NEIGHBOURHOOD // 2
    ys = torch.randint(r, h - r, (n, per_image), generator=generator)
    xs = torch.randint(r, w - r, (n, per_image), generator=generator)
    offsets = torch.arange(-r, r + 1)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, NEIGHBOURHOOD, NEIGHBOURHOOD)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, NEIGHBOURHOOD, NEIGHBOURHOOD)
    img = torch.arange(n)[:, None, None, None].expand_as(rows)
    patches = level.permute(0, 2, 3, 1)[img, rows, cols]  # (N, P, 7, 7, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(n, per_image, -1)


def descriptors(images: torch.Tensor, *, smallest: int = SMALLEST, per_image: int = PER_IMAGE,
                seed: int = 0) -> dict[int, np.ndarray]:
    """{resolution: (N, per_image, 3·7·7) float32} for uint8 images (N, 3, H, W), H = W a power of two ≥ smallest;
    the same seed draws the same neighbourhoods for sets of equal shape."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise CarraraError(f"SWD takes square RGB images (N, 3, H, H), got {tuple(images.shape)}")
    side = images.shape[-1]
    if side < smallest or side & (side - 1) or smallest < NEIGHBOURHOOD:
        raise CarraraError(f"SWD needs a power-of-two side ≥ {max(smallest, NEIGHBOURHOOD)}, got {side}")
    levels = int(np.log2(side // smallest)) + 1
    g = torch.Generator().manual_seed(seed)
    return {side >> i: neighbourhoods(level, per_image, g).numpy()
            for i, level in enumerate(laplacian_pyramid(images.float(), levels))}


def normalise(desc: np.ndarray) -> np.ndarray:
    """(M, C·7·7) → per colour channel zero mean and unit std over the whole set, as Karras et al. do."""
    d = desc.reshape(len(desc), 3, -1).astype(np.float64)
    d = (d - d.mean(axis=(0, 2), keepdims=True)) / d.std(axis=(0, 2), keepdims=True).clip(1e-12)
    return d.reshape(len(desc), -1)


def directions(dim: int, count: int, seed: int) -> np.ndarray:
    """(dim, count) random unit vectors."""
    d = np.random.default_rng(seed).standard_normal((dim, count))
    return d / np.linalg.norm(d, axis=0, keepdims=True)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, dirs: np.ndarray, chunk: int = DIRECTIONS) -> float:
    """Mean over the columns of `dirs` of the Wasserstein-1 distance between a·dir and b·dir (equal sample counts:
    the mean absolute difference of the sorted projections). Projected `chunk` directions at a time: all 3,789
    128-px emoji × 128 neighbourhoods at once took 16 GB and were killed (2026-12-01)."""
    if a.shape != b.shape:
        raise CarraraError(f"SWD compares sets of equal size, got {a.shape} and {b.shape}")
    total = 0.0
    for i in range(0, dirs.shape[1], chunk):
        d = dirs[:, i:i + chunk]
        total += float(np.abs(np.sort(a @ d, axis=0) - np.sort(b @ d, axis=0)).sum(dtype=np.float64))
    return total / (len(a) * dirs.shape[1])


def swd(fake: np.ndarray, real: np.ndarray, *, seed: int = 0) -> float:
    """SWD ×10³ of two descriptor sets of one level, (N, P, D) each (images × neighbourhoods): each normalised
    on its own, REPEATS × DIRECTIONS directions from `seed`."""
    a, b = (normalise(x.reshape(-1, x.shape[-1])).astype(np.float32) for x in (fake, real))  # float32: 2× faster
    dirs = directions(a.shape[1], REPEATS * DIRECTIONS, seed).astype(np.float32)
    return 1e3 * sliced_wasserstein(a, b, dirs)
