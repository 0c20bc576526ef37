"""Training objective of DDPM (Algorithm 1) and the one converter between ε-, x0- and v-prediction.

Notation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"):
    α_t = √ᾱ_t,  σ_t = √(1 − ᾱ_t),  x_t = α_t x0 + σ_t ε
    v   = α_t ε − σ_t x0,   so   x0 = α_t x_t − σ_t v   and   ε = σ_t x_t + α_t v
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from carrara.diffusion.schedule import NoiseSchedule, PredictionType, add_noise

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _alpha_sigma(alpha_bar_t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor | float, ...]:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t), computed in float64, broadcast to `like` ((B,) → (B, 1, 1, 1))."""
    if not torch.is_tensor(alpha_bar_t):
        return float(alpha_bar_t) ** 0.5, (1.0 - float(alpha_bar_t)) ** 0.5
    a = alpha_bar_t.double()
    a = a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim == 1 and like.ndim > 1 else a
    return a.sqrt().to(like.device, like.dtype), (1 - a).sqrt().to(like.device, like.dtype)


def to_x0_eps(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor | float,
              prediction_type: PredictionType | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn an ε-, v- or x0-prediction into (x̂0, ε̂) (Ho et al. 2020 eq. 15; Salimans & Ho 2022)."""
    prediction_type = PredictionType.parse(prediction_type)
    alpha, sigma = _alpha_sigma(alpha_bar_t, x_t)
    if prediction_type is PredictionType.EPSILON:
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha  # eq. 15 of Ho et al.: x0 = (x_t − √(1−ᾱ) ε) / √ᾱ
    elif prediction_type is PredictionType.V:
        x0 = alpha * x_t - sigma * model_output  # x0 = α x_t − σ v
        eps = sigma * x_t + alpha * model_output  # ε = σ x_t + α v
    else:
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor | float,
                prediction_type: PredictionType | str) -> torch.Tensor:
    """The network target for (x0, ε): ε itself, v = α ε − σ x0 (Salimans & Ho 2022), or x0."""
    prediction_type = PredictionType.parse(prediction_type)
    if prediction_type is PredictionType.EPSILON:
        return eps
    if prediction_type is PredictionType.SAMPLE:
        return x0
    alpha, sigma = _alpha_sigma(alpha_bar_t, x0)
    return alpha * eps - sigma * x0


def sample_t_and_noise(x0: torch.Tensor, schedule: NoiseSchedule,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 3–4: t ~ Uniform({1, …, T}) (0-indexed here) and ε ~ N(0, I)."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)  # (B,) long
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
    return t, noise


def diffusion_loss(model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   schedule: NoiseSchedule, prediction_type: PredictionType | str | None = None) -> torch.Tensor:
    """The simplified objective L_simple of Ho et al. 2020 (Algorithm 1, eq. 14), with an ε, v or x0 target."""
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    # Algorithm 1, line 2: x0 ~ q(x0) is the batch the caller drew; lines 3–4 gave t and ε (sample_t_and_noise).
    x_t = add_noise(schedule, x0, noise, t)  # line 5, inner argument: √ᾱ_t x0 + √(1 − ᾱ_t) ε   (B, C, H, W)
    alpha_bar_t = schedule.alphas_cumprod[t.to(schedule.alphas_cumprod.device)]  # (B,) float64
    target = from_x0_eps(x0, noise, alpha_bar_t, prediction_type)  # ε (line 5), or v / x0 for the other objectives
    prediction = model_fn(x_t, t)  # ε_θ(x_t, t) (or v_θ, x0_θ)
    return F.mse_loss(prediction.float(), target.float())  # line 5: ‖target − prediction‖², averaged over all dims
