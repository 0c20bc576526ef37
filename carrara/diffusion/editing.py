"""Editing an existing image with a text-to-image model, no extra training: img2img and inpainting.

img2img is SDEdit (Meng et al. 2021, §3): noise the image's latent z0 forward to an intermediate time t0,
x_{t0} = √ᾱ_{t0} z0 + √(1 − ᾱ_{t0}) ε, and run the reverse process from t0 only. `strength` ∈ (0, 1] picks t0 as
diffusers' img2img pipelines do: of a plan of `steps` timesteps the last int(steps · strength) are run, so strength
1 is the whole plan — started from pure noise, i.e. txt2img — and a strength that runs no step returns the image's
own latent.

Inpainting is the blending of RePaint (Lugmayr et al. 2022, Algorithm 1, lines 4–6, without its resampling jumps):
after every reverse step to ᾱ_s the known region (mask 0) is replaced by the image noised to that level,
x_s ← m ⊙ x_s + (1 − m) ⊙ (√ᾱ_s z0 + √(1 − ᾱ_s) ε). ε is one draw per image for all steps (as diffusers' and
AUTOMATIC1111's inpainting with a text-to-image model do; RePaint draws afresh each step): with it the known region
follows the deterministic path of DDIM / DPM-Solver exactly, and after the last step (ᾱ = 1) it is z0 itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from carrara.diffusion.samplers import StepHook
from carrara.errors import CarraraError


def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
        raise CarraraError(f"--strength must be a number in (0, 1], got {strength!r}")


def truncate_plan(timesteps: list, strength: float) -> list:
    """The tail of a sampling plan that img2img runs: its last int(len · strength) timesteps (diffusers' rule)."""
    check_strength(strength)
    run = min(int(len(timesteps) * strength), len(timesteps))
    return timesteps[len(timesteps) - run:]


def noise_to(z0: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """q(x_t | x0) with a given ε: √ᾱ z0 + √(1 − ᾱ) ε (Ho et al. 2020, eq. 4)."""
    return alpha_bar**0.5 * z0 + (1.0 - alpha_bar) ** 0.5 * eps


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W), 1 = regenerate, → the latent grid (B, 1, H/f, W/f): a latent cell is regenerated
    if any of its f × f pixels is (max-pooling), so every kept cell lies wholly in the kept region."""
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise CarraraError(f"the mask's side {mask.shape[-1]} is not a multiple of the autoencoder's factor {factor}")
    return F.max_pool2d((mask > 0.5).float(), factor)


def blend_known(z0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor) -> StepHook:
    """The sampler's `after_step` for inpainting: the known region (mask 0) back at the state's noise level."""
    def after_step(i: int, alpha_bar: float, x: torch.Tensor) -> torch.Tensor:
        return mask * x + (1.0 - mask) * noise_to(z0, eps, alpha_bar)
    return after_step
