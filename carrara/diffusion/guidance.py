"""Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Both wrap a network into the `model(x_t, t) -> model_output` every sampler takes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from carrara.diffusion.objectives import ModelFn, from_x0_eps, to_x0_eps
from carrara.diffusion.schedule import NoiseSchedule, PredictionType

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_model(model: ConditionalModel, cond_states: torch.Tensor, uncond_states: torch.Tensor,
              w: float) -> ModelFn:
    """Classifier-free guidance, Ho & Salimans 2022 eq. 6, in diffusers' convention: out = uncond + w (cond − uncond).

    `model(x, t, states)`; `uncond_states` are the empty prompt's (or the negative prompt's) text states, batch B or 1.
    w = 1 is the plain conditional model and skips the unconditional pass; the paper's w is this w − 1.
    Works in ε, v or x0 form alike, since the combination is linear.
    """
    if w == 1.0:
        return lambda x, t: model(x, t, cond_states)
    uncond_states = uncond_states.expand_as(cond_states) if uncond_states.shape[0] == 1 else uncond_states
    states = torch.cat([uncond_states, cond_states])  # (2B, L, D)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # (B,)
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), states).chunk(2)  # 2 × (B, C, H, W)
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
