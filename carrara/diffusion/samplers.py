"""Samplers: stateless functions with one signature, k-diffusion style.

    sample_xxx(model, x_T, schedule, timesteps, *, prediction_type=None, generator=None, callback=None,
               clip_x0=None, after_step=None, **options) -> x_0

`model(x_t, t) -> model_output` is an ε-, v- or x0-prediction (`prediction_type`, default the schedule's) with
t a (B,) tensor, long for whole timesteps (float for the fractional ones Euler's grid has); `timesteps` are the
descending model timesteps (see `default_timesteps`), and after the last one every sampler lands on clean data
(ᾱ = 1, i.e. diffusers' `set_alpha_to_one` / `final_sigmas_type="zero"`; DDIM's `final_alpha_bar` can stop short
of it, as Stable Diffusion's configs do). `generator` may be a list, one per image (diffusers' `randn_tensor`).
`callback(i, t, x_t, x0_hat)` is called once per step, before the update (x̂0 previews for the UI).
`after_step(i, abar_s, x_s) -> x_s` is called once per step, after the update, with the new state in the VP form
x_s = √ᾱ_s x0 + √(1 − ᾱ_s) ε at its noise level ᾱ_s (1 after the last step), and its result continues the chain:
inpainting puts the known region back there (pipeline.py). σ-space samplers convert to and from that form.

Notation per step: t → s (s = next timestep, −1 after the last), ᾱ_t / ᾱ_s the cumulative products,
α = √ᾱ, σ = √(1 − ᾱ), λ = log(α / σ). Coefficients are Python floats computed in float64.

The Karras-style samplers (euler, euler_a, dpmpp_karras) run in the variance-exploding form of the same process
(Karras et al. 2022, §2; k-diffusion): x_σ = x_t / α = x0 + σ ε with σ = √((1 − ᾱ)/ᾱ) (diffusers' "sigmas"), so
they start at x_T / α, show the network α x_σ (diffusers' `scale_model_input`) and end at σ = 0, where x_σ = x0.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from carrara.diffusion.consistency import TIMESTEP_SCALING, boundary_scalings, lcm_timesteps
from carrara.diffusion.objectives import ModelFn, learned_range_log_variance, split_variance, step_betas, to_x0_eps
from carrara.diffusion.schedule import NoiseSchedule, PredictionType, last_timestep, spaced_timesteps
from carrara.diffusion.settings import SAMPLER_NAMES
from carrara.errors import CarraraError

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]

# DPM-Solver++ starts where the half log-SNR λ_t ≥ −5.1 (diffusers' `lambda_min_clipped`, used with the cosine
# schedule by unCLIP/Karlo). This is the ending time T = 0.9946 that Lu et al. 2022 set for the cosine schedule
# ("T = 1 will have numerical issues"): at λ ≈ −9.9 (cosine, t = 999) x̂0 = (x_t − σ ε̂) / α multiplies any
# error of ε̂ by σ/α ≈ 2·10⁴, and the first step's h ≈ 7 carries it into the sample. For the linear schedules
# λ_T ≈ −5.06 > −5.1, so the clip removes nothing there. Euler's and Karras' grids start there too (σ_max ≤ e^{5.1}):
# from σ ≈ 2·10⁴ the first Euler step carries the same amplified error (tests/test_samplers.py, the mixture).
DPM_LAMBDA_MIN = -5.1


def _check_timesteps(schedule: NoiseSchedule, timesteps: Sequence[int] | torch.Tensor) -> list[int]:
    ts = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    if not ts or any(a <= b for a, b in itertools.pairwise(ts)) or ts[0] >= schedule.T or ts[-1] < 0:
        raise CarraraError(f"timesteps must be strictly decreasing within 0…{schedule.T - 1}, got {ts[:3]}…")
    return ts


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    """ᾱ_t as a float64 Python float; ᾱ = 1 (clean data) after the last step."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _denoise(model: ModelFn, x: torch.Tensor, t: float, alpha_bar_t: float, prediction_type: PredictionType,
             clip_x0: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One network call at timestep t → (x̂0, ε̂), with x̂0 optionally clipped to [−clip_x0, clip_x0]."""
    whole = float(t).is_integer()  # a trained timestep goes in as an integer, a fractional one (Euler's grid) as float
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long if whole else torch.float32, device=x.device)  # (B,)
    out, _ = split_variance(model(x, t_batch), x)  # a learned variance's channels are DDPM's alone
    x0, eps = to_x0_eps(out, x, alpha_bar_t, prediction_type)  # (B, C, H, W) each
    return (x0 if clip_x0 is None else x0.clamp(-clip_x0, clip_x0)), eps


def _randn(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, drawn as diffusers' `randn_tensor` draws it (same generator → same z); a list of
    generators draws image i from generator i, so an image's noise does not depend on the batch it is in."""
    if isinstance(generator, list | tuple) and len(generator) > 1:
        if len(generator) != x.shape[0]:
            raise CarraraError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
                          for g in generator])  # (B, C, H, W)
    generator = generator[0] if isinstance(generator, list | tuple) else generator
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ddpm(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                prediction_type: PredictionType | str | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, clip_x0: float | None = None,
                after_step: StepHook | None = None) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020 with σ_t² = β̃_t; respaced β when steps are skipped.

    A model with 2·C output channels has learned its variance: σ_t² = Σθ of Nichol & Dhariwal 2021 eq. 15 between
    the step's β̃_t and β_t (diffusers' DDPMScheduler `variance_type="learned_range"`), respaced steps included.
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_timesteps(schedule, timesteps)
    learned = []  # the current step's variance output v, when the model has one

    def mean_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out, v = split_variance(model(x, t), x)
        learned[:] = [v]
        return out
    x = x_T  # Algorithm 2, line 1: x_T ~ N(0, I), drawn by the caller   (B, C, H, W)
    for i, t in enumerate(ts):  # line 2: for t = T, …, 1
        s = ts[i + 1] if i + 1 < len(ts) else -1
        abar_t, abar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        # α_t, β_t of the chain actually run: 1 − β_t = ᾱ_t / ᾱ_s, which is the trained β_t when s = t − 1 and the
        # respaced β of Improved DDPM (Nichol & Dhariwal 2021, §4, `space_timesteps`) when steps are skipped.
        alpha_t = abar_t / abar_s
        beta_t, beta_tilde = step_betas(abar_t, abar_s)
        x0, eps = _denoise(mean_model, x, t, abar_t, prediction_type, clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
        z = _randn(x, generator) if s >= 0 else torch.zeros_like(x)  # line 3: z ~ N(0, I) if t > 1, else z = 0
        if clip_x0 is None:
            # line 4: x_{t−1} = 1/√α_t · (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε_θ(x_t, t)) + σ_t z
            mean = (x - beta_t / math.sqrt(1.0 - abar_t) * eps) / math.sqrt(alpha_t)
        else:
            # the same mean written as the posterior q(x_{t−1} | x_t, x0) of eq. 7, evaluated at the clipped x̂0
            mean = (math.sqrt(abar_s) * beta_t / (1.0 - abar_t)) * x0 + (
                math.sqrt(alpha_t) * (1.0 - abar_s) / (1.0 - abar_t)) * x
        sigma_t = math.sqrt(beta_tilde)  # σ_t² = β̃_t, eq. 7 ("fixed_small")
        if learned[0] is not None and s >= 0:  # σ_t² = Σθ = exp(v' log β + (1 − v') log β̃), eq. 15
            sigma_t = torch.exp(0.5 * learned_range_log_variance(learned[0], math.log(beta_t), math.log(beta_tilde)))
        x = mean + sigma_t * z
        if after_step is not None:
            x = after_step(i, abar_s, x)
    return x  # line 6: return x_0


@torch.no_grad()
def sample_ddim(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                prediction_type: PredictionType | str | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, clip_x0: float | None = None, eta: float = 0.0,
                final_alpha_bar: float = 1.0, after_step: StepHook | None = None) -> torch.Tensor:
    """DDIM, Song et al. 2021, eq. 12 with σ_t(η) of eq. 16 (η = 0: deterministic; η = 1: DDPM's variance).

    `final_alpha_bar` is ᾱ after the last step: 1 lands on clean data (diffusers' `set_alpha_to_one=True`);
    Stable Diffusion's scheduler configs say `set_alpha_to_one=False`, i.e. end at ᾱ_0, the first trained noise level.
    """
    if not 0.0 < final_alpha_bar <= 1.0:
        raise CarraraError(f"final_alpha_bar must be in (0, 1], got {final_alpha_bar}")
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_timesteps(schedule, timesteps)
    x = x_T  # (B, C, H, W)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        abar_t, abar_s = _alpha_bar(schedule, t), (_alpha_bar(schedule, s) if s >= 0 else final_alpha_bar)
        x0, eps = _denoise(model, x, t, abar_t, prediction_type, clip_x0)  # "predicted x0" and ε_θ(x_t), eq. 12
        if callback is not None:
            callback(i, t, x, x0)
        # eq. 16: σ_t(η) = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)
        sigma = eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
        # eq. 12: x_s = √ᾱ_s · x̂0 + √(1 − ᾱ_s − σ²) · ε_θ + σ z   ("direction pointing to x_t" + random noise)
        x = math.sqrt(abar_s) * x0 + math.sqrt(max(1.0 - abar_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn(x, generator)
        if after_step is not None:
            x = after_step(i, abar_s, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                    prediction_type: PredictionType | str | None = None, generator: torch.Generator | None = None,
                    callback: Callback | None = None, clip_x0: float | None = None,
                    after_step: StepHook | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 ("DPM-Solver++"): multistep 2nd order, data prediction.

    Deterministic (the generator is unused). The first step is first order (DPM-Solver++1 = DDIM) and the last
    step goes to σ = 0 with the first-order update, whose h → ∞ limit is x̂0 (diffusers' `final_sigmas_type=
    "zero"`, which implies `lower_order_final`). Use `default_timesteps("dpmpp", …)`: it starts at λ ≥ −5.1
    (DPM_LAMBDA_MIN), which the cosine schedule needs to give good samples.
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_timesteps(schedule, timesteps)
    x = x_T  # x̃_{t_0}   (B, C, H, W)
    x0_prev, h_prev = None, None  # Algorithm 2's buffer: the previous data prediction x_θ(x̃_{t_{i−1}}) and h_{i−1}
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        abar_t, abar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        x0, _ = _denoise(model, x, t, abar_t, prediction_type, clip_x0)  # data prediction x_θ(x̃_t, t)
        if callback is not None:
            callback(i, t, x, x0)
        if s < 0:  # final step to σ = 0: x̃ = (σ_s/σ_t) x̃_t − α_s (e^{−h} − 1) x̂0 → x̂0 as h → ∞
            return x0 if after_step is None else after_step(i, 1.0, x0)
        alpha_t, sigma_t = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
        alpha_s, sigma_s = math.sqrt(abar_s), math.sqrt(1.0 - abar_s)
        h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)  # h_i = λ_{t_i} − λ_{t_{i−1}}
        if x0_prev is None:
            D = x0  # first step: DPM-Solver++1 (= DDIM)
        else:
            r = h_prev / h  # r_i = h_{i−1} / h_i
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev  # D_i = (1 + 1/2r) x_θ(t_{i−1}) − x_θ(t_{i−2}) / 2r
        x = (sigma_s / sigma_t) * x - (alpha_s * math.expm1(-h)) * D  # x̃_s = (σ_s/σ_t) x̃_t − α_s (e^{−h} − 1) D
        if after_step is not None:
            x = after_step(i, abar_s, x)
        x0_prev, h_prev = x0, h
    return x


# ---- samplers in σ-space: Euler, Euler ancestral, DPM-Solver++(2M) on Karras σ (Karras et al. 2022; k-diffusion) ----

KARRAS_RHO = 7.0  # ρ of Karras et al. 2022, eq. 5 ("ρ = 7 … we use in all experiments")


def _check_times(schedule: NoiseSchedule, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
    ts = [float(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    if not ts or any(a <= b for a, b in itertools.pairwise(ts)) or ts[0] > schedule.T - 1 or ts[-1] < 0:
        raise CarraraError(f"timesteps must be strictly decreasing within 0…{schedule.T - 1}, got {ts[:3]}…")
    return ts


def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) of every trained timestep, float64 (T,), increasing in t."""
    abar = schedule.alphas_cumprod.numpy()
    return np.sqrt((1.0 - abar) / abar)


def _sigma_at(schedule: NoiseSchedule, t: float, *, log_linear: bool = False) -> float:
    """σ at a fractional timestep: linear in t between trained steps (diffusers' Euler `interpolation_type="linear"`),
    or linear in log σ (the inverse of `karras_timesteps`' σ → t map, diffusers' `_sigma_to_t`)."""
    sigmas, grid = _train_sigmas(schedule), np.arange(schedule.T)
    if log_linear:
        return float(np.exp(np.interp(t, grid, np.log(sigmas))))
    return float(np.interp(t, grid, sigmas))


def _denoise_sigma(model: ModelFn, x: torch.Tensor, sigma: float, t: float, prediction_type: PredictionType,
                   clip_x0: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """D(x_σ; σ) of Karras et al. 2022: the network sees x_t = α x_σ, α = 1/√(1 + σ²) → (x_t, x̂0)."""
    abar = 1.0 / (1.0 + sigma**2)  # σ² = (1 − ᾱ)/ᾱ
    x_t = x * math.sqrt(abar)  # diffusers' `scale_model_input`: x_σ / √(σ² + 1)   (B, C, H, W)
    return x_t, _denoise(model, x_t, t, abar, prediction_type, clip_x0)[0]


def _after_step_sigma(after_step: StepHook | None, i: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
    """`after_step` for a σ-space state: shown x_σ · α in the VP form at ᾱ = 1/(1 + σ²), its answer taken back."""
    if after_step is None:
        return x
    scale = math.sqrt(1.0 + sigma**2)  # 1/α
    return after_step(i, 1.0 / scale**2, x / scale) * scale


@torch.no_grad()
def sample_euler(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[float], *,
                 prediction_type: PredictionType | str | None = None, generator: torch.Generator | None = None,
                 callback: Callback | None = None, clip_x0: float | None = None,
                 after_step: StepHook | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ: Algorithm 2 of Karras et al. 2022 with
    γ_i = 0 and without its 2nd-order correction (k-diffusion `sample_euler`; diffusers' EulerDiscreteScheduler).

    Deterministic (the generator is unused). Timesteps may be fractional (`default_timesteps("euler", …)`: diffusers'
    "linspace" grid); σ between trained steps is interpolated linearly in t, as diffusers does.
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_times(schedule, timesteps)
    sigmas = [_sigma_at(schedule, t) for t in ts] + [0.0]  # t_0 > … > t_{N−1} > t_N = 0 in the paper's notation
    x = x_T * math.sqrt(1.0 + sigmas[0] ** 2)  # 1. x_0 = x_T / α: the VP sample in σ-space   (B, C, H, W)
    for i, t in enumerate(ts):
        x_t, x0 = _denoise_sigma(model, x, sigmas[i], t, prediction_type, clip_x0)  # 2. D_θ(x_i; t_i)
        if callback is not None:
            callback(i, t, x_t, x0)
        d = (x - x0) / sigmas[i]  # 3. Algorithm 2, line 7: d_i = (x_i − D_θ(x_i; t_i)) / t_i
        x = x + (sigmas[i + 1] - sigmas[i]) * d  # 4. line 8: x_{i+1} = x_i + (t_{i+1} − t_i) d_i
        x = _after_step_sigma(after_step, i, sigmas[i + 1], x)
    return x  # 5. σ_N = 0: x_σ = x0 (α = 1)


@torch.no_grad()
def sample_euler_ancestral(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[float], *,
                           prediction_type: PredictionType | str | None = None,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           clip_x0: float | None = None, eta: float = 1.0,
                           after_step: StepHook | None = None) -> torch.Tensor:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`; diffusers' EulerAncestralDiscreteScheduler at η = 1).

    Each step σ → σ' is split into a deterministic Euler step down to σ_down and fresh noise of std σ_up, with
    σ_down² + σ_up² = σ'² and σ_up² = η² σ'² (σ² − σ'²)/σ² the variance of DDPM's posterior q(x_s | x_t, x0) in
    σ-space (Ho et al. 2020, eq. 7): at η = 1 it is DDPM's ancestral sampling on Euler's grid. Noise is drawn
    as diffusers draws it (same generator → same sample).
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_times(schedule, timesteps)
    sigmas = [_sigma_at(schedule, t) for t in ts] + [0.0]
    x = x_T * math.sqrt(1.0 + sigmas[0] ** 2)  # 1. x_σ = x_T / α   (B, C, H, W)
    for i, t in enumerate(ts):
        x_t, x0 = _denoise_sigma(model, x, sigmas[i], t, prediction_type, clip_x0)  # 2. D_θ(x; σ)
        if callback is not None:
            callback(i, t, x_t, x0)
        s_from, s_to = sigmas[i], sigmas[i + 1]
        # 3. k-diffusion `get_ancestral_step`: σ_up = min(σ', η √(σ'² (σ² − σ'²) / σ²)), σ_down = √(σ'² − σ_up²)
        sigma_up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
        sigma_down = math.sqrt(s_to**2 - sigma_up**2)
        x = x + (sigma_down - s_from) * (x - x0) / s_from  # 4. Euler step to σ_down with d = (x − D(x; σ)) / σ
        if s_to > 0:
            x = x + sigma_up * _randn(x, generator)  # 5. x ← x + σ_up z,  z ~ N(0, I)
        x = _after_step_sigma(after_step, i, s_to, x)
    return x  # σ = 0: x_σ = x0


@torch.no_grad()
def sample_dpmpp_2m_karras(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[float],
                           *, prediction_type: PredictionType | str | None = None,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           clip_x0: float | None = None, after_step: StepHook | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on Karras σ spacing (Karras et al. 2022, eq. 5, ρ = 7): "DPM++ 2M
    Karras" of k-diffusion (`sample_dpmpp_2m`) and diffusers' DPMSolverMultistepScheduler(use_karras_sigmas=True).

    Deterministic (the generator is unused). Give it `default_timesteps("dpmpp_karras", …)`: fractional t whose σ
    (interpolated in log σ) are the Karras σ_i exactly; the network is told the nearest trained timestep, as diffusers
    does (`timesteps.round()`). In σ-space λ = −log σ and the update reads x' = (σ'/σ) x − (e^{−h} − 1) D.
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_times(schedule, timesteps)
    sigmas = [_sigma_at(schedule, t, log_linear=True) for t in ts] + [0.0]
    x = x_T * math.sqrt(1.0 + sigmas[0] ** 2)  # x_σ = x_T / α   (B, C, H, W)
    x0_prev, h_prev = None, None  # Algorithm 2's buffer: the previous data prediction and step size h_{i−1}
    for i, t in enumerate(ts):
        x_t, x0 = _denoise_sigma(model, x, sigmas[i], round(t), prediction_type, clip_x0)  # 1. x_θ(x̃_{t_i}, t_i)
        if callback is not None:
            callback(i, t, x_t, x0)
        if sigmas[i + 1] == 0:  # 2. last step, first order to σ = 0: the h → ∞ limit of the update is x̂0
            return _after_step_sigma(after_step, i, 0.0, x0)
        h = math.log(sigmas[i]) - math.log(sigmas[i + 1])  # 3. h_i = λ_{i+1} − λ_i with λ = −log σ
        if x0_prev is None:
            D = x0  # 4. first step: DPM-Solver++1 (= DDIM)
        else:
            r = h_prev / h  # 5. r_i = h_{i−1} / h_i;  D_i = (1 + 1/2r) x_θ(t_i) − x_θ(t_{i−1}) / 2r
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * D  # 6. x̃_{i+1} = (σ_{i+1}/σ_i) x̃_i − (e^{−h} − 1) D_i
        x = _after_step_sigma(after_step, i, sigmas[i + 1], x)
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def sample_lcm(model: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
               prediction_type: PredictionType | str | None = None, generator: torch.Generator | None = None,
               callback: Callback | None = None, clip_x0: float | None = None,
               timestep_scaling: float = TIMESTEP_SCALING, after_step: StepHook | None = None) -> torch.Tensor:
    """Multistep consistency sampling, Algorithm 3 of Luo et al. 2023 (LCM; Song et al. 2023, Algorithm 1), as
    diffusers' LCMScheduler: at each t the consistency function x̂0 = f_θ(x_t, t) = c_skip x_t + c_out x̂0_θ (LCM eq. 9),
    then fresh noise back to the next timestep s, x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s) z; the last step returns f_θ itself.

    `model` is a distilled student with its guidance scale built in (one network call per step; pipeline.py).
    """
    prediction_type = PredictionType.parse(prediction_type or schedule.prediction_type)
    ts = _check_timesteps(schedule, timesteps)
    x = x_T  # Algorithm 3, line 1: x_T ~ N(0, I)   (B, C, H, W)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x0_theta, _ = _denoise(model, x, t, _alpha_bar(schedule, t), prediction_type, clip_x0)
        c_skip, c_out = boundary_scalings(t, timestep_scaling)
        x0 = c_skip * x + c_out * x0_theta  # line 2 / 5: x̂0 = f_θ(x_t, w, c, t)
        if callback is not None:
            callback(i, t, x, x0)
        if s < 0:
            x = x0  # the last step: the consistency function's answer itself
        else:  # line 4: x_s = α(s) x̂0 + σ(s) z, z ~ N(0, I)
            abar_s = _alpha_bar(schedule, s)
            x = math.sqrt(abar_s) * x0 + math.sqrt(1.0 - abar_s) * _randn(x, generator)
        if after_step is not None:
            x = after_step(i, _alpha_bar(schedule, s), x)
    return x


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps:
        raise CarraraError(f"number of sampling steps must be a positive integer, got {steps!r}")


def euler_timesteps(schedule: NoiseSchedule, steps: int) -> list[float]:
    """T−1, …, 0 evenly spaced, fractional: diffusers' Euler grid (`timestep_spacing="linspace"`); T counts only the
    timesteps with λ_t ≥ DPM_LAMBDA_MIN (all of them on the linear schedules, 995 of 1000 on the cosine one)."""
    _check_steps(steps)
    return [float(t) for t in np.linspace(last_timestep(schedule, DPM_LAMBDA_MIN) - 1, 0, steps)]


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = KARRAS_RHO) -> list[float]:
    """Timesteps of Karras et al. 2022 eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ between the
    schedule's σ_0 and σ_max (its last timestep with λ ≥ DPM_LAMBDA_MIN: σ_{T−1} on the linear schedules), each mapped
    back to a fractional t by interpolating in log σ (diffusers' `_sigma_to_t`)."""
    _check_steps(steps)
    log_sigmas = np.log(_train_sigmas(schedule))  # (T,) increasing in t
    t_max = last_timestep(schedule, DPM_LAMBDA_MIN) - 1
    lo, hi = math.exp(log_sigmas[0] / rho), math.exp(log_sigmas[t_max] / rho)  # σ_min^{1/ρ}, σ_max^{1/ρ}
    sigmas = (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho  # (steps,) σ_max → σ_min
    ts = np.interp(np.log(sigmas), log_sigmas, np.arange(schedule.T, dtype=np.float64))
    return [float(t) for t in ts]


def alpha_bar_at(sampler: str, schedule: NoiseSchedule, t: float) -> float:
    """ᾱ at timestep t as `sampler` reads it: the trained value, or from σ interpolated between trained steps as the
    σ-space samplers interpolate it (linearly in t for Euler's grid, in log σ for Karras'). img2img noises its start
    to exactly this level."""
    if sampler in ("euler", "euler_a", "dpmpp_karras"):
        return 1.0 / (1.0 + _sigma_at(schedule, t, log_linear=sampler == "dpmpp_karras") ** 2)
    return _alpha_bar(schedule, int(t))


# name → sampler, in the order of settings.SAMPLER_NAMES (the names' one source).
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = dict(
    zip(SAMPLER_NAMES, (sample_ddpm, sample_ddim, sample_dpmpp_2m, sample_euler, sample_euler_ancestral,
                        sample_dpmpp_2m_karras, sample_lcm), strict=True))


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise CarraraError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@dataclass(frozen=True)
class SchedulerOptions:
    """The timestep grid and end point a diffusers scheduler_config.json sets (its keys and defaults).

    The defaults are diffusers' DDIMScheduler defaults, which are also carrara's own: the "leading" grid
    t = 0, k, 2k, … (k = T // steps) and ᾱ = 1, clean data, after the last step. Stable Diffusion's configs say
    steps_offset=1 (t = 1, 1 + k, …) and set_alpha_to_one=False: the last step ends at ᾱ_0 and that latent is
    decoded, as diffusers' DDIMScheduler does. Only DDIM reads them, as only diffusers' DDIM does.
    """

    steps_offset: int = 0
    set_alpha_to_one: bool = True
    # LCMScheduler's keys, read by the lcm sampler alone: the distillation grid's size and the boundary scalings' s
    original_inference_steps: int = 50
    timestep_scaling: float = TIMESTEP_SCALING

    def __post_init__(self):
        if not isinstance(self.steps_offset, int) or isinstance(self.steps_offset, bool) or self.steps_offset < 0:
            raise CarraraError(f"scheduler config steps_offset={self.steps_offset!r} must be an integer ≥ 0")
        if not isinstance(self.set_alpha_to_one, bool):
            raise CarraraError(f"scheduler config set_alpha_to_one={self.set_alpha_to_one!r} must be true or false")
        n, s = self.original_inference_steps, self.timestep_scaling
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CarraraError(f"scheduler config original_inference_steps={n!r} must be an integer ≥ 1")
        if not isinstance(s, int | float) or isinstance(s, bool) or not s > 0:
            raise CarraraError(f"scheduler config timestep_scaling={s!r} must be a positive number")

    @classmethod
    def from_scheduler_config(cls, config: dict) -> SchedulerOptions:
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def sampling_plan(sampler: str, schedule: NoiseSchedule, steps: int,
                  options: SchedulerOptions = SchedulerOptions()) -> tuple[list[int], dict]:
    """(timesteps, keyword options) for `SAMPLERS[sampler]`: `default_timesteps`, except that DDIM follows the
    scheduler config's grid offset and end point (ᾱ after the last step: 1, or ᾱ_0 if set_alpha_to_one is false)
    and LCM its distillation grid and boundary scalings."""
    if sampler == "lcm":
        return (lcm_timesteps(schedule.T, steps, options.original_inference_steps),
                {"timestep_scaling": float(options.timestep_scaling)})
    if sampler != "ddim":
        return default_timesteps(sampler, schedule, steps), {}
    final = 1.0 if options.set_alpha_to_one else float(schedule.alphas_cumprod[0])
    return spaced_timesteps(schedule, steps, "leading", steps_offset=options.steps_offset), {"final_alpha_bar": final}


def default_timesteps(sampler: str, schedule: NoiseSchedule, steps: int) -> list[int] | list[float]:
    """The timesteps each sampler is meant to run on.

    ddpm:  T−1, …, 0 when steps == T (Algorithm 2 as written), else Improved DDPM's evenly strided respacing
           (`space_timesteps`, = "linspace": includes T−1 and 0).
    ddim:  "leading" with steps_offset 0, i.e. t = 0, k, 2k, … (k = T // steps), the grid of Song et al.'s code
           and diffusers' default (Stable Diffusion's own configs use steps_offset = 1).
    dpmpp: "logsnr" (uniform in λ, the "logSNR" step schedule of Lu et al. 2022, DPM-Solver) over the timesteps with
           λ_t ≥ DPM_LAMBDA_MIN. Time-uniform grids ("linspace"/"trailing", diffusers' defaults) start their last
           step to σ = 0 at t ≈ 50 on the linear schedules, where it returns E[x0 | x_t] and narrows the samples
           (tests/test_samplers.py checks the spread of a Gaussian mixture; docs/decisions.md has the numbers).
    euler, euler_a: T−1, …, 0 evenly spaced and fractional (`euler_timesteps`), diffusers' Euler default "linspace".
    dpmpp_karras: Karras et al.'s σ spacing, eq. 5 with ρ = 7 (`karras_timesteps`), as diffusers' `use_karras_sigmas`.
    lcm:   evenly in index on the 50-point distillation grid 19, 39, …, 999 (diffusers' LCMScheduler defaults).
    """
    get_sampler(sampler)
    if sampler == "lcm":
        return lcm_timesteps(schedule.T, steps, SchedulerOptions.original_inference_steps)
    if sampler in ("euler", "euler_a"):
        return euler_timesteps(schedule, steps)
    if sampler == "dpmpp_karras":
        return karras_timesteps(schedule, steps)
    if sampler == "ddpm":
        return spaced_timesteps(schedule, steps, "linspace")
    if sampler == "ddim":
        return spaced_timesteps(schedule, steps, "leading")
    return spaced_timesteps(schedule, steps, "logsnr", lambda_min=DPM_LAMBDA_MIN)
