"""Noise schedules β_t / ᾱ_t, the forward process q(x_t | x_0) and inference timestep spacings.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", §2):
    β_t       betas             variance added at step t of the forward chain
    α_t       alphas            1 − β_t
    ᾱ_t       alphas_cumprod    ∏_{s≤t} α_s, so that q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)   (eq. 4)
    λ_t       log_snr / 2       log(√ᾱ_t / √(1 − ᾱ_t)), the half log-SNR of Lu et al. 2022 (DPM-Solver)

Timesteps are 0-indexed as in diffusers: index t ∈ {0, …, T−1} is the paper's t + 1.
The schedule is computed AND stored in float64; samplers read per-step coefficients as Python floats and
apply them to float32 tensors, so no precision is lost to a float32 cumprod.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from carrara.errors import CarraraError


class PredictionType(str, Enum):
    """What the network predicts: ε (Ho et al. 2020), v = α ε − σ x0 (Salimans & Ho 2022), or x0 itself."""

    EPSILON = "epsilon"
    V = "v_prediction"
    SAMPLE = "sample"

    @classmethod
    def parse(cls, value: PredictionType | str) -> PredictionType:
        """Accept an enum or its string at the API boundary ("epsilon", "v_prediction"/"v", "sample"/"x0")."""
        if isinstance(value, cls):
            return value
        aliases = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
        try:
            return cls(aliases.get(str(value), str(value)))
        except ValueError:
            raise CarraraError(f"unknown prediction type {value!r}; use epsilon, v_prediction or sample") from None


class ScheduleKind(str, Enum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"
    COSINE = "cosine"


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear β_t from β_1 = 1e-4 to β_T = 0.02 (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)  # (T,)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """β_t linear in √β (Stable Diffusion / latent diffusion, Rombach et al. 2022; diffusers 'scaled_linear')."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2  # (T,)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17 (= diffusers 'squaredcos_cap_v2')."""

    def f(t: float) -> float:  # eq. 17: ᾱ_t = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2)
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    # β_t = 1 − ᾱ_t / ᾱ_{t−1}, clipped to max_beta against the singularity of ᾱ → 0 at t = T (§3.2).
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)  # (T,)


_BETAS = {ScheduleKind.LINEAR: linear_betas, ScheduleKind.SCALED_LINEAR: scaled_linear_betas}
_DIFFUSERS_NAMES = {ScheduleKind.LINEAR: "linear", ScheduleKind.SCALED_LINEAR: "scaled_linear",
                    ScheduleKind.COSINE: "squaredcos_cap_v2"}
_DEFAULT_RANGE = {ScheduleKind.LINEAR: (1e-4, 0.02), ScheduleKind.SCALED_LINEAR: (0.00085, 0.012),
                  ScheduleKind.COSINE: (1e-4, 0.02)}


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule (Ho et al. 2020, §2); float64 buffers shared by training and sampling."""

    kind: ScheduleKind
    num_train_timesteps: int
    beta_start: float  # unused by the cosine schedule, kept for the diffusers config round trip
    beta_end: float
    prediction_type: PredictionType
    betas: torch.Tensor  # (T,) float64
    alphas: torch.Tensor  # (T,) float64, α_t = 1 − β_t
    alphas_cumprod: torch.Tensor  # (T,) float64, ᾱ_t

    @classmethod
    def from_config(cls, kind: ScheduleKind | str = "linear", T: int = 1000, beta_start: float | None = None,
                    beta_end: float | None = None, prediction_type: PredictionType | str = "epsilon",
                    cosine_s: float = 0.008) -> NoiseSchedule:
        """Build β, α, ᾱ in float64 for kind ∈ {linear, scaled_linear, cosine}."""
        try:
            kind = ScheduleKind(str(kind.value if isinstance(kind, ScheduleKind) else kind))
        except ValueError:
            raise CarraraError(f"unknown noise schedule {kind!r}; use linear, scaled_linear or cosine") from None
        if not isinstance(T, int) or T < 2:
            raise CarraraError(f"num_train_timesteps must be an integer ≥ 2, got {T!r}")
        default_start, default_end = _DEFAULT_RANGE[kind]
        beta_start = default_start if beta_start is None else float(beta_start)
        beta_end = default_end if beta_end is None else float(beta_end)
        if kind is ScheduleKind.COSINE:
            betas = cosine_betas(T, s=cosine_s)
        else:
            if not 0 < beta_start <= beta_end < 1:
                raise CarraraError(f"need 0 < beta_start ≤ beta_end < 1, got {beta_start}, {beta_end}")
            betas = _BETAS[kind](T, beta_start, beta_end)
        alphas = 1.0 - betas
        return cls(kind, T, beta_start, beta_end, PredictionType.parse(prediction_type),
                   betas, alphas, torch.cumprod(alphas, dim=0))

    def to_diffusers_config(self) -> dict:
        """The fields of a diffusers scheduler config (scheduler_config.json) that define this schedule."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": _DIFFUSERS_NAMES[self.kind],
                "beta_start": self.beta_start, "beta_end": self.beta_end,
                "prediction_type": self.prediction_type.value}

    @classmethod
    def from_diffusers_config(cls, config: dict) -> NoiseSchedule:
        """Read a diffusers scheduler config (e.g. a Stable Diffusion scheduler_config.json)."""
        names = {v: k for k, v in _DIFFUSERS_NAMES.items()}
        name = config.get("beta_schedule", "linear")
        if name not in names:
            raise CarraraError(f"unsupported beta_schedule {name!r} in scheduler config; "
                               "use linear, scaled_linear or squaredcos_cap_v2")
        if config.get("clip_sample") is True or config.get("thresholding") is True:
            raise CarraraError("scheduler configs with clip_sample or thresholding set are not supported "
                               "(carrara never clips the predicted x0; Stable Diffusion folders set both to false)")
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            raise CarraraError("scheduler configs with trained_betas or rescale_betas_zero_snr are not supported")
        return cls.from_config(names[name], int(config.get("num_train_timesteps", 1000)),
                               config.get("beta_start", 1e-4), config.get("beta_end", 0.02),
                               config.get("prediction_type", "epsilon"))

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    def lambdas(self) -> torch.Tensor:
        """Half log-SNR λ_t = log(α_t / σ_t) with α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) (Lu et al. 2022, §2)."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log(a) - torch.log1p(-a))  # (T,) float64


def _per_sample(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] (float64) and reshape to broadcast against `like`: (B,) → (B, 1, …, 1)."""
    t = torch.as_tensor(t, device=values.device).long()
    v = values[t].reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else values[t]
    return v.to(device=like.device, dtype=like.dtype)


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho et al. 2020, eq. 4)."""
    sqrt_abar = _per_sample(schedule.alphas_cumprod.sqrt(), t, x0)  # (B, 1, 1, 1)
    sqrt_one_minus_abar = _per_sample((1 - schedule.alphas_cumprod).sqrt(), t, x0)  # (B, 1, 1, 1)
    return sqrt_abar * x0 + sqrt_one_minus_abar * noise  # (B, C, H, W)


def last_timestep(schedule: NoiseSchedule, lambda_min: float | None = None) -> int:
    """Number of timesteps whose half log-SNR λ_t ≥ lambda_min (diffusers' `lambda_min_clipped`); all if None."""
    if lambda_min is None:
        return schedule.T
    return int((schedule.lambdas() >= lambda_min).sum())


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "leading", *, steps_offset: int = 0,
              lambda_min: float | None = None) -> list[int]:
    """Descending inference timesteps; leading/linspace/trailing as diffusers' DDPM/DDIM `set_timesteps`.

    leading:  0, k, 2k, … (k = T // steps) + steps_offset — DDIM's own grid (Song et al. 2021); diffusers' default
    linspace: round(linspace(0, T−1, steps))              — Improved DDPM's `space_timesteps` (Nichol & Dhariwal)
    trailing: round(arange(T, 0, −T/steps)) − 1           — starts at the last timestep (Lin et al. 2023, Table 2)
    logsnr:   uniform in λ (Lu et al. 2022, "logSNR" steps; diffusers' `use_lu_lambdas`): steps + 1 points λ_{T−1}…λ_0,
              the λ_0 end dropped (the sampler's last step lands on clean data), each rounded to the nearest timestep
    `lambda_min` first drops the high-noise end where λ_t < lambda_min, then spaces what is left (T := that count).
    """
    T = last_timestep(schedule, lambda_min)
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise CarraraError(f"number of sampling steps must be between 1 and {T}, got {steps!r}")
    if spacing == "leading":
        ts = np.arange(0, steps) * (T // steps) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    elif spacing == "logsnr":
        lam = schedule.lambdas()[:T].numpy()  # (T,) decreasing in t
        targets = np.linspace(lam[0], lam[-1], steps + 1)[1:]  # (steps,) from low to high noise
        ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)  # nearest timestep, ascending
        i = np.arange(steps)
        ts = np.maximum.accumulate(ts - i) + i  # make distinct: a tie moves up by one timestep …
        ts = np.minimum(ts, T - steps + i)  # … but never past T − 1 (both sequences strictly increase)
    else:
        raise CarraraError(f"unknown timestep spacing {spacing!r}; use leading, linspace, trailing or logsnr")
    ts = [int(t) for t in ts][::-1] if spacing == "logsnr" else sorted({int(t) for t in ts}, reverse=True)
    if ts[0] >= schedule.T or ts[-1] < 0:
        raise CarraraError(f"timesteps {ts[0]}…{ts[-1]} fall outside 0…{schedule.T - 1}; lower steps_offset")
    return ts
