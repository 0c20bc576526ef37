"""Encode a dataset once: latents (posterior mean and std) and text states.

This is what training the parts separately buys (Rombach et al. 2022 §3: the autoencoder is trained once, the
diffusion model on its latents): the frozen autoencoder and text encoder run once per example, not once per step.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from carrara.fileio import atomic_path, ensure_dir
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
def encode_texts(text_encoder, texts: list[str], *, batch_size: int = 128, progress: bool = True,
                 cache_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token states of each distinct caption (U, L, D) in bf16, their pooled embeddings (U, D) in fp32
    (`mean_pool`), and each example's index into them.

    With `cache_dir` (a run folder's cache/), the result is kept in a safetensors file named by the text encoder's
    fingerprint and the captions, so a resumed run skips the minutes of encoding; an unreadable file is recomputed."""
    unique = sorted(set(texts))
    position = {t: i for i, t in enumerate(unique)}
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([text_encoder.fingerprint(), unique], sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"captions-{key[:20]}.safetensors"
        try:
            cached = load_file(str(path))
            return cached["states"], cached["pooled"], [position[t] for t in texts]
        except (FileNotFoundError, SafetensorError, OSError, KeyError):
            pass  # not cached yet, or damaged: encode again
    states, pooled = [], []
    for i in tqdm(range(0, len(unique), batch_size), desc="encoding captions", disable=not progress, leave=False):
        s, mask = text_encoder.encode(unique[i:i + batch_size])
        states.append(s.to(torch.bfloat16))
        pooled.append(mean_pool(s, mask))
    states, pooled = torch.cat(states), torch.cat(pooled)
    if path is not None:
        ensure_dir(path.parent)
        with atomic_path(path) as tmp:
            save_file({"states": states, "pooled": pooled}, str(tmp))
    return states, pooled, [position[t] for t in texts]
