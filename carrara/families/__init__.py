"""The generative families of the lectures before diffusion, text-conditioned and judged alike.

One small module per family, each with one interface (base.py): `build`, `initialize`, `prepare`, `loss`,
`sample`, `report`. `train.py` trains any of them on the shared Trainer; `pipeline.py` samples a trained
run the way `Pipeline` does, so the evaluation code judges them with the diffusion models.

| kind   | module    | paper |
|--------|-----------|-------|
| vae    | vae.py    | Kingma & Welling 2014 (conditional: Sohn et al. 2015) |
| vqvae  | vqvae.py  | van den Oord et al. 2017 — the tokenizer for `ar` |
| ar     | ar.py     | Ramesh et al. 2021 (DALL-E 1): a transformer over VQ codes, caption as prefix |
| igpt   | igpt.py   | Chen et al. 2020 (Image GPT): a transformer over colour-quantised pixels |
| flow   | flow.py   | Dinh et al. 2017 (RealNVP), Kingma & Dhariwal 2018 (Glow) |
| gan    | gan.py    | Radford et al. 2016 (DCGAN), Miyato & Koyama 2018 (projection D), hinge loss |
"""
from __future__ import annotations

from types import ModuleType

import torch

from carrara.errors import CarraraError
from carrara.families import ar, flow, gan, igpt, vae, vqvae
from carrara.families.base import Batch, from_dict, to_dict

FAMILIES: dict[str, ModuleType] = {"vae": vae, "vqvae": vqvae, "ar": ar, "igpt": igpt, "flow": flow, "gan": gan}
KINDS = tuple(FAMILIES)

__all__ = ["FAMILIES", "KINDS", "Batch", "build", "config_for", "family", "loss", "sample"]


def family(kind: str) -> ModuleType:
    """The module of a family by name; an unknown name is one clear line."""
    if kind not in FAMILIES:
        raise CarraraError(f"unknown family {kind!r}: choose one of {', '.join(KINDS)}")
    return FAMILIES[kind]


def config_for(kind: str, values: dict | None = None):
    """The family's Config dataclass from JSON values (a run's family.json, --set overrides)."""
    try:
        return from_dict(family(kind).Config, dict(values or {}))
    except (KeyError, TypeError) as e:
        raise CarraraError(f"{kind} model config: {e.args[0] if e.args else e}") from None


def build(kind: str, config=None) -> torch.nn.Module:
    """A fresh model of the family (`config` a Config, a dict of overrides, or None for the defaults)."""
    if config is None or isinstance(config, dict):
        config = config_for(kind, config)
    return family(kind).build(config)


def loss(kind: str, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The family's training loss on one batch (a scalar)."""
    return family(kind).loss(model, batch)


def sample(kind: str, model: torch.nn.Module, cond: torch.Tensor, seed: int, **options) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1] for pooled captions cond (B, D); image i depends only on cond[i] and seed + i."""
    return family(kind).sample(model, cond, seed, **options)


def config_dict(config) -> dict:
    return to_dict(config)
