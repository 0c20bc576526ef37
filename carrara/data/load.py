"""One entry point to every dataset form, and the whole dataset in memory (what training and evaluation read).

A spec is a folder (images + metadata.jsonl or sidecar .txt captions, data/folder.py) or WebDataset tar shards
named by a pattern ending in .tar, e.g. 'shards/{000000..000099}.tar' (data/shards.py).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from carrara.data.folder import load_folder
from carrara.data.shards import load_shards
from carrara.errors import CarraraError


def load_dataset(spec: str, size: int | None = None):
    """A folder, or tar shards named by a pattern ending in .tar; images resized to `size` if given."""
    if str(spec).endswith(".tar"):
        return load_shards(spec, size=size)
    return load_folder(spec, size=size)


def preload_images(dataset, *, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """All images as one uint8 tensor (N, 3, H, W) and their captions; sizes must agree.

    `dataset` is what `load_dataset` returns: anything with `records` and `image_uint8(i)`.
    """
    images, texts = [], []
    for i in tqdm(range(len(dataset)), desc="loading images", disable=not progress, leave=False):
        images.append(dataset.image_uint8(i))
        texts.append(dataset.records[i].text)
    if not images:
        raise CarraraError("the dataset holds no usable images")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise CarraraError(f"images have different sizes {sorted(shapes)[:3]}; pass --size to resize them")
    return torch.stack(images), texts
