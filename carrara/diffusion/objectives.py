"""Training objectives of DDPM (Algorithm 1) and Improved DDPM (the hybrid loss), the variational bound, and the
one converter between ε-, x0- and v-prediction.

Notation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"):
    α_t = √ᾱ_t,  σ_t = √(1 − ᾱ_t),  x_t = α_t x0 + σ_t ε
    v   = α_t ε − σ_t x0,   so   x0 = α_t x_t − σ_t v   and   ε = σ_t x_t + α_t v
Learned variance (Nichol & Dhariwal 2021, §3.1): a network with out_channels = 2·C returns [mean output; v] and the
reverse step t → s has log Σθ = v' log β_t + (1 − v') log β̃_t with v' = (v + 1)/2 (eq. 15), where
β_t = 1 − ᾱ_t/ᾱ_s and β̃_t = β_t (1 − ᾱ_s)/(1 − ᾱ_t) (eq. 7; on respaced steps, the respaced chain's β).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F

from carrara.diffusion.schedule import NoiseSchedule, PredictionType, add_noise
from carrara.errors import CarraraError

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
                   schedule: NoiseSchedule, prediction_type: PredictionType | str | None = None, *,
                   vlb_weight: float = 0.001) -> torch.Tensor:
    """The simplified objective L_simple of Ho et al. 2020 (Algorithm 1, eq. 14), with an ε, v or x0 target; for a
    network that also outputs the variance (2·C channels), Improved DDPM's L_hybrid = L_simple + λ L_vlb (eq. 16).

    L_vlb = Σ_t L_t is estimated by T · L_t at the drawn t, in bits per dimension, so λ T L_t is improved-diffusion's
    "vb" term × T/1000 at λ = 0.001 (its RESCALED_MSE loss). L_vlb sees the mean output detached (eq. 16's
    stop-gradient): it trains Σθ only, and L_simple alone trains the mean.
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    # Algorithm 1, line 2: x0 ~ q(x0) is the batch the caller drew; lines 3–4 gave t and ε (sample_t_and_noise).
    x_t = add_noise(schedule, x0, noise, t)  # line 5, inner argument: √ᾱ_t x0 + √(1 − ᾱ_t) ε   (B, C, H, W)
    alpha_bar_t = schedule.alphas_cumprod[t.to(schedule.alphas_cumprod.device)]  # (B,) float64
    target = from_x0_eps(x0, noise, alpha_bar_t, prediction_type)  # ε (line 5), or v / x0 for the other objectives
    prediction, v = split_variance(model_fn(x_t, t), x_t)  # ε_θ(x_t, t) (or v_θ, x0_θ) [and Σθ's v]
    loss = F.mse_loss(prediction.float(), target.float())  # line 5: ‖target − prediction‖², averaged over all dims
    if v is None:
        return loss
    vlb = vlb_terms(prediction.detach(), v, x0, x_t, t, schedule, prediction_type)  # (B,) bits/dim, mean frozen
    return loss + vlb_weight * schedule.T * vlb.mean()  # eq. 16


# ---- Improved DDPM: learned variance and the variational bound (Nichol & Dhariwal 2021; improved-diffusion) ----


class VarianceType(str, Enum):
    """Σθ of the reverse step (diffusers' `variance_type` names): fixed σ² = β̃_t (Ho et al. 2020 §3.2), or
    learned between β̃_t and β_t (Nichol & Dhariwal 2021 eq. 15; improved-diffusion `ModelVarType.LEARNED_RANGE`)."""

    FIXED_SMALL = "fixed_small"
    LEARNED_RANGE = "learned_range"

    @classmethod
    def of_model(cls, scheduler_config: dict, in_channels: int, out_channels: int) -> VarianceType:
        """A model folder's variance: learned_range iff the U-Net outputs 2 × its input channels, which its scheduler
        config's `variance_type` must then say (diffusers' DDPMScheduler reads it); otherwise the fixed β̃_t."""
        name = scheduler_config.get("variance_type")
        learned = out_channels == 2 * in_channels
        if learned != (name == cls.LEARNED_RANGE.value) and (learned or name in ("learned", "learned_range")):
            raise CarraraError(f"scheduler config variance_type={name!r} does not fit a U-Net with {in_channels} "
                               f"input and {out_channels} output channels (carrara's learned variance is "
                               f"variance_type='learned_range' with 2 × {in_channels} output channels)")
        return cls.LEARNED_RANGE if learned else cls.FIXED_SMALL


def split_variance(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean output, v) of a network with 2·C output channels for C-channel x (learned variance), else (output, None).

    Samplers other than DDPM use the mean output alone (improved-diffusion's DDIM does the same)."""
    C = x.shape[1]
    if output.shape[1] == 2 * C:
        return output[:, :C], output[:, C:]  # (B, C, H, W) each
    return output, None


def learned_range_log_variance(v: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """log Σθ = v' log β_t + (1 − v') log β̃_t with v' = (v + 1)/2: eq. 15 of Nichol & Dhariwal 2021."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def step_betas(alpha_bar_t: float, alpha_bar_s: float) -> tuple[float, float]:
    """(β, β̃) of the reverse step t → s: β = 1 − ᾱ_t/ᾱ_s, β̃ = β (1 − ᾱ_s)/(1 − ᾱ_t) (eq. 7; respaced if s < t − 1)."""
    beta = 1.0 - alpha_bar_t / alpha_bar_s
    return beta, beta * (1.0 - alpha_bar_s) / (1.0 - alpha_bar_t)


def log_variance_bounds(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(log β_t, log β̃_t) for every trained t, float64 (T,); β̃_0 = 0 is replaced by β̃_1 (improved-diffusion's
    `posterior_log_variance_clipped`), the variance the decoder term L_0 uses."""
    abar = schedule.alphas_cumprod
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta_tilde = schedule.betas * (1 - abar_prev) / (1 - abar)
    return schedule.betas.log(), torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, e^log_var) per element, in nats: the decoder term L_0 on continuous latents."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """−log of the Gaussian's mass on x's bin of width 2/255 in [−1, 1] (edges open), per element in nats: Ho et al.
    2020 eq. 13 for 8-bit pixels (improved-diffusion `discretized_gaussian_log_likelihood`, exact erf here)."""
    inv_std = torch.exp(-0.5 * log_var)
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # the standard normal CDF
    cdf_plus, cdf_min = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    mass = torch.where(x < -0.999, cdf_plus, torch.where(x > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
    return -torch.log(mass.clamp(min=1e-12))


def vlb_terms(mean_output: torch.Tensor, v: torch.Tensor | None, x0: torch.Tensor, x_t: torch.Tensor,
              t: torch.Tensor, schedule: NoiseSchedule, prediction_type: PredictionType | str | None = None, *,
              discretized: bool = False) -> torch.Tensor:
    """L_t of the variational bound per example, in bits per dimension (improved-diffusion `_vb_terms_bpd`):
    KL(q(x_{t−1} | x_t, x0) ‖ pθ(x_{t−1} | x_t)) for t > 0 (Ho et al. eq. 5), and at t = 0 the decoder NLL
    −log pθ(x0 | x_1): a Gaussian density on latents, or the 8-bit discretized one of pixels if `discretized`.

    `mean_output` is the network's ε/v/x0 output, `v` its variance output (None: fixed Σ = β̃_t); t (B,) long."""
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    abar = schedule.alphas_cumprod.to(x0.device)
    t = t.to(x0.device).long()
    shape = (-1, *([1] * (x0.ndim - 1)))
    abar_t = abar[t]  # (B,) float64
    abar_s = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar_t))  # ᾱ_{t−1}, 1 before t = 0
    log_beta, log_beta_tilde = (b.to(x0.device)[t].reshape(shape) for b in log_variance_bounds(schedule))
    # posterior q(x_{t−1} | x_t, x0) = N(c0 x0 + ct x_t, β̃_t): eq. 6–7 of Ho et al.
    c0 = (abar_s.sqrt() * (1 - abar_t / abar_s) / (1 - abar_t)).reshape(shape)
    ct = ((abar_t / abar_s).sqrt() * (1 - abar_s) / (1 - abar_t)).reshape(shape)
    x0_hat, _ = to_x0_eps(mean_output.double(), x_t.double(), abar_t, prediction_type)
    true_mean, model_mean = c0 * x0.double() + ct * x_t.double(), c0 * x0_hat + ct * x_t.double()
    log_var = log_beta_tilde if v is None else learned_range_log_variance(v.double(), log_beta, log_beta_tilde)
    log_var = log_var.expand_as(model_mean)
    kl = normal_kl(true_mean, log_beta_tilde, model_mean, log_var).flatten(1).mean(1)  # (B,) nats/dim
    decoder = (discretized_gaussian_nll if discretized else gaussian_nll)(x0.double(), model_mean, log_var)
    nll = decoder.flatten(1).mean(1)  # (B,)
    return (torch.where(t == 0, nll, kl) / math.log(2.0)).float()  # bits/dim


def prior_bpd(x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) ‖ N(0, I)) per example in bits/dim: the bound's term no parameter changes."""
    abar_T = schedule.alphas_cumprod[-1].item()
    kl = normal_kl(math.sqrt(abar_T) * x0.double(), torch.tensor(math.log(1 - abar_T)), 0.0, torch.tensor(0.0))
    return (kl.flatten(1).mean(1) / math.log(2.0)).float()
