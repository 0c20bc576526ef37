"""Encode a dataset once: latents (posterior mean and std) and text states.

This is what training the parts separately buys (Rombach et al. 2022 §3: the autoencoder is trained once, the
diffusion model on its latents): the frozen autoencoder and text encoder run once per example, not once per step.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from carrara.images import to_model_range
from carrara.text.encoder import mean_pool


@torch.inference_mode()
def encode_latents(autoencoder, images_uint8: torch.Tensor, *, batch_size: int = 64,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled: (N, c, h, w) each."""
    means, stds = [], []
    autoencoder.eval()
    for i in tqdm(range(0, len(images_uint8), batch_size), desc="encoding latents", disable=not progress, leave=False):
        posterior = autoencoder.encode(to_model_range(images_uint8[i:i + batch_size]))
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.inference_mode()
def encode_texts(text_encoder, texts: list[str], *, batch_size: int = 128,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token states of each distinct caption (U, L, D) in bf16, their pooled embeddings (U, D) in fp32
    (`mean_pool`), and each example's index into them."""
    unique = sorted(set(texts))
    position = {t: i for i, t in enumerate(unique)}
    states, pooled = [], []
    for i in tqdm(range(0, len(unique), batch_size), desc="encoding captions", disable=not progress, leave=False):
        s, mask = text_encoder.encode(unique[i:i + batch_size])
        states.append(s.to(torch.bfloat16))
        pooled.append(mean_pool(s, mask))
    return torch.cat(states), torch.cat(pooled), [position[t] for t in texts]
