"""Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Both wrap a network into the `model(x_t, t) -> model_output` every sampler takes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from carrara.diffusion.objectives import ModelFn, from_x0_eps, to_x0_eps
from carrara.diffusion.schedule import NoiseSchedule, PredictionType

Condition = torch.Tensor | tuple[torch.Tensor, ...]  # text states (B, L, D), or (states, pooled (B, P), …)
ConditionalModel = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def _pair(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """[uncond; cond] along the batch, an unconditional batch of 1 broadcast to the conditional one: (2B, …)."""
    return torch.cat([uncond.expand_as(cond) if uncond.shape[0] == 1 else uncond, cond])


def cfg_model(model: ConditionalModel, cond: Condition, uncond: Condition, w: float) -> ModelFn:
    """Classifier-free guidance, Ho & Salimans 2022 eq. 6, in diffusers' convention: out = uncond + w (cond − uncond).

    `model(x, t, condition)`; a condition is the text states, or a tuple of tensors (states, pooled embedding), each
    batch-first; `uncond` is the empty prompt's (or the negative prompt's) condition, batch B or 1.
    w = 1 is the plain conditional model and skips the unconditional pass; the paper's w is this w − 1.
    Works in ε, v or x0 form alike, since the combination is linear.
    """
    if w == 1.0:
        return lambda x, t: model(x, t, cond)
    both = _pair(uncond, cond) if torch.is_tensor(cond) else tuple(map(_pair, uncond, cond))  # (2B, …)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # (B,)
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)  # 2 × (B, C, H, W)
        return out_uncond + w * (out_cond - out_uncond)

    return guided


LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_guided_model(model: ModelFn, classifier_log_prob_fn: LogProbFn, scale: float,
                            schedule: NoiseSchedule) -> ModelFn:
    """Classifier guidance, Dhariwal & Nichol 2021, Algorithm 2: ε̂ = ε_θ(x_t) − √(1 − ᾱ_t) s ∇_{x_t} log p_φ(y|x_t).

    `classifier_log_prob_fn(x_t, t)` returns log p_φ(y | x_t) per sample, shape (B,), for the wanted labels y of a
    noise-aware classifier. The model's output (ε, v or x0, per `schedule.prediction_type`) is converted to ε,
    shifted, and converted back, so any sampler can use the result (the ε form of Algorithm 2; with DDPM it
    approximates Algorithm 1's mean shift s Σ ∇ log p_φ).
    """
    prediction_type = schedule.prediction_type

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(classifier_log_prob_fn(x_in, t).sum(), x_in)[0]  # ∇_{x_t} log p_φ(y|x_t)
        alpha_bar_t = schedule.alphas_cumprod[torch.as_tensor(t).long().cpu()]  # (B,) float64
        sigma_t = (1 - alpha_bar_t).sqrt().reshape(-1, *([1] * (x.ndim - 1))).to(x)  # √(1 − ᾱ_t)   (B, 1, 1, 1)
        _, eps = to_x0_eps(model(x, t), x, alpha_bar_t, prediction_type)
        eps = eps - sigma_t * scale * grad  # Algorithm 2: ε̂ = ε_θ(x_t) − √(1 − ᾱ_t) s ∇ log p_φ(y | x_t)
        x0, _ = to_x0_eps(eps, x, alpha_bar_t, PredictionType.EPSILON)  # x̂0 from ε̂ (Ho et al. eq. 15)
        return from_x0_eps(x0, eps, alpha_bar_t, prediction_type)

    return guided
