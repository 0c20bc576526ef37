"""The captioned images a stage trains on, read and encoded once: each image's caption variants, their token
states and pooled embeddings (Captions), and batches balanced over concepts.

Stages (diffusion, upsampler, families) share this, so the text encoder runs once per distinct caption, not per step.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from carrara.data.load import load_dataset, preload_images
from carrara.errors import CarraraError
from carrara.text.encoder import TextEncoder, mean_pool
from carrara.train.cache import encode_texts
from carrara.train.core import TrainConfig, step_generator


def caption_list(record, field_name: str) -> list[str]:
    """The record's caption, then its distinct alternative captions from `field_name` (if it holds a list)."""
    extra = record.extra.get(field_name) if field_name else None
    out = [record.text]
    for c in extra if isinstance(extra, list) else []:
        c = c.strip() if isinstance(c, str) else ""
        if c and c not in out:
            out.append(c)
    return out


def variant_table(variants: list[list[str]], flat_index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example caption indices padded to (N, K) (padding repeats the first), and the counts (N,)."""
    width = max(len(v) for v in variants)
    table, counts, at = torch.zeros(len(variants), width, dtype=torch.long), torch.zeros(len(variants)), 0
    for i, v in enumerate(variants):
        row = flat_index[at:at + len(v)]
        at += len(v)
        table[i] = torch.tensor(row + [row[0]] * (width - len(row)))
        counts[i] = len(v)
    return table, counts


def balanced_batches(records, field_name: str, cfg: TrainConfig):
    """A batch_fn drawing examples with weight 1 / (examples sharing their `field_name` value): every value
    (e.g. an emoji's base concept, whatever its number of skin-tone variants) is seen equally often."""

    keys = [str(r.extra.get(field_name, r.text)) for r in records]
    if all(field_name not in r.extra for r in records):
        raise CarraraError(f"balance_by={field_name!r}: no record of the dataset has that field")
    count = Counter(keys)
    weights = torch.tensor([1.0 / count[k] for k in keys], dtype=torch.float64)

    def batch_fn(step: int) -> torch.Tensor:
        gen = step_generator(cfg.seed + 7, step)
        return torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)

    return batch_fn


@dataclass
class Captions:
    """Every image's caption variants, encoded once (train/cache.py), and the empty prompt."""

    states: torch.Tensor  # (U, L, D) bf16 token states of every distinct caption
    pooled: torch.Tensor  # (U, D) pooled embeddings of the same captions
    caption_of: torch.Tensor  # (N, K) indices into states: each image's caption variants (padded)
    n_variants: torch.Tensor  # (N,) how many of the K are real
    null_states: torch.Tensor  # (1, L, D) the empty prompt's states, the classifier-free null condition
    null_pooled: torch.Tensor  # (1, D)

    @classmethod
    def encode(cls, text_encoder: TextEncoder, records, variants_field: str, *, progress: bool = True,
               cache_dir: Path | None = None) -> Captions:
        variants = [caption_list(r, variants_field) for r in records]  # N lists, caption first
        states, pooled, flat_index = encode_texts(text_encoder, [c for v in variants for c in v], progress=progress,
                                                  cache_dir=cache_dir)  # (U, L, D), (U, D)
        caption_of, n_variants = variant_table(variants, flat_index)  # (N, K) indices into states, (N,)
        null_states, null_mask = text_encoder.encode([""])  # (1, L, D), (1, L): the empty prompt
        return cls(states, pooled, caption_of, n_variants, null_states.to(torch.bfloat16),
                   mean_pool(null_states, null_mask))

    def draw(self, idx: torch.Tensor, gen: torch.Generator, cond_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, D), pooled (B, D)) of one caption variant per example, each replaced by the empty prompt
        with probability `cond_dropout` (Ho & Salimans 2022), so one network learns ε(x_t, c) and ε(x_t, ∅)."""
        pick = (torch.rand(len(idx), generator=gen) * self.n_variants[idx]).long()  # one caption variant each
        drop = torch.rand(len(idx), generator=gen) < cond_dropout  # (B,)
        caption = self.caption_of[idx, pick]  # (B,)
        states = torch.where(drop[:, None, None], self.null_states, self.states[caption]).float()  # (B, L, D)
        pooled = torch.where(drop[:, None], self.null_pooled, self.pooled[caption])  # (B, D)
        return states, pooled


@dataclass
class CaptionedImages:
    """A dataset in memory: images (N, 3, H, W) uint8, their records, the loader's report, and their captions."""

    images: torch.Tensor
    records: list
    report: dict
    captions: Captions

    def first_captions(self, k: int = 8) -> list[str]:
        """The first k distinct captions in dataset order: the prompts of the training sample grids."""
        return list(dict.fromkeys(r.text for r in self.records))[:k]


def load_captioned(data: str, size: int, text_encoder: TextEncoder, variants_field: str, *,
                   progress: bool = True, cache_dir: Path | None = None) -> CaptionedImages:
    """Read every image of `data` at `size` and encode every caption variant once (kept in `cache_dir` if given)."""
    dataset = load_dataset(data, size=size)
    images, _ = preload_images(dataset, progress=progress)  # (N, 3, H, W) uint8
    captions = Captions.encode(text_encoder, dataset.records, variants_field, progress=progress, cache_dir=cache_dir)
    return CaptionedImages(images, dataset.records, dataset.report(), captions)
