"""Negative log-likelihood in bits per dimension: the variational bound of a diffusion model, summed over all steps.

−log p(x0) ≤ L_T + Σ_{t>0} L_{t−1} + L_0 (Ho et al. 2020, eq. 5), each term in bits per dimension, one draw of
x_t per step and example: improved-diffusion's `calc_bpd_loop` (Nichol & Dhariwal 2021 report it as NLL). carrara
measures it on the latents z0 = (posterior mean) · scaling_factor of held-out images, conditioned on their captions,
with a Gaussian density at t = 0 (latents are not 8-bit pixels): bits per latent dimension, comparable between
diffusion models on the same autoencoder, not with pixel-space NLLs. A fixed-variance model is scored with σ² = β̃_t
(what it samples with), a learned-variance one with its Σθ. It costs T network calls per batch.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from carrara.diffusion.objectives import ModelFn, prior_bpd, split_variance, vlb_terms
from carrara.diffusion.schedule import NoiseSchedule, add_noise
from carrara.images import to_model_range


@torch.no_grad()
def bits_per_dim(model: ModelFn, x0: torch.Tensor, schedule: NoiseSchedule, *,
                 generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """The bound L_T + Σ_t L_t per example (B,), in bits per dimension; `model(x_t, t)` as the samplers take it."""
    total = prior_bpd(x0, schedule).double()  # L_T
    for t in tqdm(range(schedule.T - 1, -1, -1), desc="NLL", disable=not progress, leave=False):
        t_batch = torch.full((x0.shape[0],), t, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_t = add_noise(schedule, x0, noise, t_batch)  # (B, C, H, W)
        out, v = split_variance(model(x_t, t_batch), x_t)
        total += vlb_terms(out, v, x0, x_t, t_batch, schedule).double()  # L_{t−1} (L_0 at t = 0)
    return total.float()


@torch.no_grad()
def latent_nll(pipe, images_uint8: torch.Tensor, captions: list[str], *, batch_size: int = 32, seed: int = 0,
               progress: bool = True) -> torch.Tensor:
    """Bits per latent dimension (N,) of each image given its caption, for a `Pipeline` (no guidance: w = 1)."""
    out, generator = [], torch.Generator().manual_seed(seed)
    for start in range(0, len(images_uint8), batch_size):
        images = to_model_range(images_uint8[start:start + batch_size])  # (B, 3, H, W)
        z0 = pipe.vae.encode(images).mode().float() * pipe.vae.config.scaling_factor  # (B, c, h, w)
        cond = pipe.condition(captions[start:start + batch_size])

        def model(x, t, cond=cond):
            extra = cond[1] if len(cond) > 1 else None
            return pipe.unet(x.to(pipe.unet_dtype), t, cond[0], class_labels=extra).float()

        out.append(bits_per_dim(model, z0, pipe.schedule, generator=generator, progress=progress))
    return torch.cat(out)
