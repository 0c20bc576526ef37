"""Sample diversity: how different are the images a model draws for one prompt?

DALL-E 2 (Ramesh et al. 2022, §5.1 and Figure 9) argues that the prior route keeps quality and raises diversity
against direct text conditioning, since the decoder sees an image embedding sampled anew each time instead of the
same text. Issue 20 measures it as the mean pairwise CLIP distance among K samples of one prompt: for the K unit
image embeddings of a prompt, the mean of 1 − cos over its K(K − 1)/2 pairs; then the mean over prompts, with a
bootstrap interval over prompts (the prompts are the sample; the K images are the measurement).
"""
from __future__ import annotations

import numpy as np
import torch

from carrara.errors import CarraraError
from carrara.evaluate.suite import bootstrap_interval


def pairwise_distances(embeds: torch.Tensor) -> np.ndarray:
    """(P, K, E) embeddings, K ≥ 2 per prompt → (P,) each prompt's mean cosine distance over its pairs (the
    embeddings are normalised again in float64, so float32 unit vectors give scipy's `pdist(…, "cosine")`)."""
    if embeds.ndim != 3 or embeds.shape[1] < 2:
        raise CarraraError(f"diversity needs (prompts, K ≥ 2 samples, dim) embeddings, got {tuple(embeds.shape)}")
    e = torch.nn.functional.normalize(embeds.double(), dim=-1)
    K = e.shape[1]
    cos = e @ e.transpose(1, 2)  # (P, K, K)
    off_diagonal = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)  # the K(K − 1) ordered pairs
    return (1.0 - off_diagonal / (K * (K - 1))).numpy()


def diversity(embeds: torch.Tensor, *, bootstrap: int = 50, seed: int = 0) -> dict:
    """{value, ci95, per_prompt, k}: the mean over prompts of `pairwise_distances`, with its 95 % interval."""
    per_prompt = pairwise_distances(embeds)
    return {"value": float(per_prompt.mean()), "ci95": bootstrap_interval(np.mean, per_prompt, n=bootstrap, seed=seed),
            "per_prompt": [round(float(d), 6) for d in per_prompt], "k": int(embeds.shape[1])}


def group_precision(embeds: torch.Tensor, real_embeds: torch.Tensor, real_groups: list[str],
                    accepted: list[set[str]], *, bootstrap: int = 50, seed: int = 0) -> dict:
    """Does a generic request get images of its kind? For (P, K, E) sample embeddings, each sample's nearest real
    image (N, E) by cosine, and the share of the K whose group (`real_groups[i]`, e.g. its CLDR subgroup) is one
    `accepted[p]` lists; the mean over prompts with its interval, beside chance: the share of real images in the
    accepted groups. Diversity alone would reward noise; this is its precision-like partner (a request answered
    with emoji of the right kind, whichever)."""
    if embeds.ndim != 3 or len(accepted) != embeds.shape[0] or len(real_groups) != real_embeds.shape[0]:
        raise CarraraError(f"group precision needs (P, K, E) samples with P accepted sets and one group per real "
                           f"image, got {tuple(embeds.shape)}, {len(accepted)} sets, {len(real_groups)} groups")
    e = torch.nn.functional.normalize(embeds.double(), dim=-1)
    r = torch.nn.functional.normalize(real_embeds.double(), dim=-1)
    nearest = (e @ r.T).argmax(-1)  # (P, K)
    hits = np.array([[real_groups[j] in accepted[p] for j in row] for p, row in enumerate(nearest.tolist())])
    per_prompt = hits.mean(1)
    chance = np.array([np.mean([g in a for g in real_groups]) for a in accepted])
    return {"value": float(per_prompt.mean()), "ci95": bootstrap_interval(np.mean, per_prompt, n=bootstrap, seed=seed),
            "per_prompt": [round(float(x), 4) for x in per_prompt], "chance": float(chance.mean()),
            "k": int(embeds.shape[1])}
