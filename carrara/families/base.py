"""What every family shares: the batch a loss sees, per-image seeds, and dataclass configs ↔ JSON.

The interface of a family module (see __init__.py):
  Config                         a dataclass: the model's shape, saved in the run's family.json
  TRAIN, COND_DROPOUT            its default TrainConfig fields and caption dropout (train.py)
  build(config) -> model
  initialize(model, images, cond) data-dependent initialisation before step 0 (actnorm, codebook, palette)
  prepare(model, images) -> data what the loss reads per example, computed once (pixels, VQ codes, palette ids)
  loss(model, batch) -> scalar
  sample(model, cond, seed, ...) -> (B, 3, H, W) in [−1, 1]; image i depends only on cond[i] and seed + i
  report(model, data, cond) -> dict  what it measures besides the loss (codebook usage, bits/dim, NLL)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One training batch: `x` as the family's prepare() made it, the pooled caption, the step's generator."""

    x: torch.Tensor  # (B, ...) pixels in [−1, 1], uint8 values, or token ids
    cond: torch.Tensor  # (B, D) pooled caption embedding (the empty prompt's where dropped)
    gen: torch.Generator  # the step's generator (train/core.py: a pure function of seed and step)


def image_generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per image, seeded seed + i, as Pipeline does: any image can be made again alone."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def randn_per_image(shape: tuple[int, ...], seed: int, n: int) -> torch.Tensor:
    """(n, *shape) standard normal, row i drawn from seed + i."""
    return torch.stack([torch.randn(shape, generator=g) for g in image_generators(seed, n)])


def to_dict(config) -> dict:
    """A dataclass config as JSON-able values (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls, values: dict):
    """A dataclass config from JSON values: unknown keys refused by name, lists back to tuples where declared."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise KeyError(f"{cls.__name__} has no field {unknown[0]!r} (fields: {', '.join(names)})")
    defaults = cls()
    out = {}
    for key, value in values.items():
        default = getattr(defaults, key)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)  # nested configs (ar.py: the GPT's and the VQ-VAE's)
        out[key] = value
    return cls(**out)
