"""Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Both wrap a network into the `model(x_t, t) -> model_output` every sampler takes. A network with a learned variance
(2·C output channels) is guided on its mean output; its variance output is the conditional one, as diffusers'
DeepFloyd IF pipelines keep it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from carrara.diffusion.objectives import (
    ModelFn,
    from_x0_eps,
    learned_range_log_variance,
    split_variance,
    step_betas,
    to_x0_eps,
)
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
        (out_uncond, _), (out_cond, v) = split_variance(out_uncond, x), split_variance(out_cond, x)
        mixed = out_uncond + w * (out_cond - out_uncond)
        return mixed if v is None else torch.cat([mixed, v], dim=1)  # (B, 2C, H, W): the conditional Σθ

    return guided


LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_gradient(classifier_log_prob_fn: LogProbFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∇_{x_t} log p_φ(y | x_t) (B, C, H, W), also when called inside torch.inference_mode / no_grad (samplers)."""
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)  # a normal tensor, even if x is an inference tensor
        log_prob = classifier_log_prob_fn(x_in, torch.as_tensor(t).clone())  # (B,)
        return torch.autograd.grad(log_prob.sum(), x_in)[0]


def classifier_guided_model(model: ModelFn, classifier_log_prob_fn: LogProbFn, scale: float,
                            schedule: NoiseSchedule, *, ddpm_timesteps: Sequence[int] | None = None) -> ModelFn:
    """Classifier guidance, Dhariwal & Nichol 2021: the model output moved by s ∇_{x_t} log p_φ(y | x_t).

    `classifier_log_prob_fn(x_t, t)` returns log p_φ(y | x_t) per sample, shape (B,), for the wanted labels y of a
    noise-aware classifier. The model's output (ε, v or x0, per `schedule.prediction_type`) is converted to ε,
    shifted, and converted back, so every sampler can use the result:
    - Algorithm 2 (DDIM, and any sampler): ε̂ = ε_θ(x_t) − √(1 − ᾱ_t) s ∇ log p_φ(y | x_t);
    - Algorithm 1 (DDPM ancestral), given `ddpm_timesteps`, the plan sample_ddpm runs: the step t → s has mean
      μ + s Σ ∇ log p_φ, with Σ the step's variance (β̃ of the respaced chain, or the learned Σθ). As sample_ddpm's
      mean is (x_t − β/√(1 − ᾱ_t) ε̂)/√α, this is ε̂ = ε_θ − √α √(1 − ᾱ_t)/β · s Σ ∇ log p_φ.
    """
    prediction_type = schedule.prediction_type
    ts = None if ddpm_timesteps is None else [int(t) for t in ddpm_timesteps]
    next_of = None if ts is None else dict(zip(ts, [*ts[1:], -1]))  # t → s of each DDPM step

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        grad = classifier_gradient(classifier_log_prob_fn, x, t)  # ∇_{x_t} log p_φ(y | x_t)   (B, C, H, W)
        t_index = torch.as_tensor(t).long().reshape(-1).expand(x.shape[0]).cpu()  # (B,)
        alpha_bar_t = schedule.alphas_cumprod[t_index]  # (B,) float64
        out, v = split_variance(model(x, t), x)
        _, eps = to_x0_eps(out, x, alpha_bar_t, prediction_type)
        if next_of is None:  # Algorithm 2: ε̂ = ε_θ(x_t) − √(1 − ᾱ_t) s ∇ log p_φ(y | x_t)
            shift = (1 - alpha_bar_t).sqrt().reshape(-1, *([1] * (x.ndim - 1))).to(x) * scale * grad
        else:  # Algorithm 1: the mean moves by s Σ ∇ log p_φ(y | x_t)
            shift = _ddpm_eps_shift(schedule, int(t_index[0]), next_of[int(t_index[0])], v) * scale * grad
        eps = eps - shift
        x0, _ = to_x0_eps(eps, x, alpha_bar_t, PredictionType.EPSILON)  # x̂0 from ε̂ (Ho et al. eq. 15)
        out = from_x0_eps(x0, eps, alpha_bar_t, prediction_type)
        return out if v is None else torch.cat([out, v], dim=1)

    return guided


def _ddpm_eps_shift(schedule: NoiseSchedule, t: int, s: int, v: torch.Tensor | None) -> torch.Tensor | float:
    """√α √(1 − ᾱ_t)/β · Σ of the DDPM step t → s: the factor that turns Algorithm 1's mean shift into ε̂'s."""
    abar_t, abar_s = float(schedule.alphas_cumprod[t]), (float(schedule.alphas_cumprod[s]) if s >= 0 else 1.0)
    beta, beta_tilde = step_betas(abar_t, abar_s)
    if s < 0:  # the last step adds no noise; Σ → 0 and so does Algorithm 1's shift
        return 0.0
    sigma2 = beta_tilde if v is None else torch.exp(learned_range_log_variance(v, math.log(beta), math.log(beta_tilde)))
    return math.sqrt(abar_t / abar_s) * math.sqrt(1 - abar_t) / beta * sigma2


@dataclass
class ClassifierGuidance:
    """Classifier guidance for the pipeline: log p_φ(y | x_t) of the wanted labels and the scale s; Algorithm 1 with
    the DDPM sampler, Algorithm 2 with every other one."""

    log_prob: LogProbFn
    scale: float

    def wrap(self, model: ModelFn, schedule: NoiseSchedule, sampler: str, timesteps: Sequence) -> ModelFn:
        return classifier_guided_model(model, self.log_prob, self.scale, schedule,
                                       ddpm_timesteps=timesteps if sampler == "ddpm" else None)
