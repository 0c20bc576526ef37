"""Consistency models on a discrete diffusion schedule: the parametrisation, the skip-step solver grid and the
sampling grid of Latent Consistency Models (Luo et al. 2023, "Latent Consistency Models", LCM; after Song et al.
2023, "Consistency Models", CM).

Notation (LCM §4.1–4.3, 0-indexed timesteps as in schedule.py):
    f_θ(x, w, c, t) = c_skip(t) x + c_out(t) x̂0_θ(x, w, c, t)        the consistency function, LCM eq. 9
    c_skip(t) = σ_d² / ((s t)² + σ_d²),  c_out(t) = s t / √((s t)² + σ_d²)    σ_d = 0.5 (CM), s = timestep_scaling
    so c_skip(0) = 1 and c_out(0) = 0: f_θ(x, ·, ·, 0) = x, the boundary condition (CM eq. 4) at the first step.
    k   the skipping interval (LCM §4.3): the solver jumps t_{n+k} → t_n, on the grid t = k−1, 2k−1, …, T−1
        of N = T // k points (LCM's k = 20: 50 points on a 1000-step schedule; diffusers' `DDIMSolver`).
"""
from __future__ import annotations

import numpy as np
import torch

from carrara.errors import CarraraError

SIGMA_DATA = 0.5  # σ_d of Song et al. 2023 (and LCM's code)
TIMESTEP_SCALING = 10.0  # s: c_skip ≈ 0 already at t = 1 (diffusers' LCMScheduler `timestep_scaling`)
SKIP = 20  # LCM's skipping interval k (§5.2 "k = 20"): 50 solver points on T = 1000
STUDENT_STEPS = 4  # a student's default number of sampling steps (LCM §5: "2–4 steps")


def boundary_scalings(t: torch.Tensor | float, timestep_scaling: float = TIMESTEP_SCALING,
                      sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(c_skip(t), c_out(t)) of the consistency function (LCM eq. 9; diffusers' LCMScheduler
    `get_scalings_for_boundary_condition_discrete`): c_skip(0) = 1, c_out(0) = 0."""
    st = t * timestep_scaling
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2) ** 0.5


def solver_timesteps(T: int, skip: int = SKIP) -> list[int]:
    """The skip-step solver grid, ascending: t = k−1, 2k−1, …, N·k − 1 with N = T // k (LCM §4.3; diffusers'
    `DDIMSolver.ddim_timesteps` and LCMScheduler's `lcm_origin_timesteps`)."""
    if not isinstance(skip, int) or isinstance(skip, bool) or not 1 <= skip <= T:
        raise CarraraError(f"skip k={skip!r} must be a whole number between 1 and {T} (LCM: 20)")
    return [int(t) for t in np.arange(1, T // skip + 1) * skip - 1]


def lcm_timesteps(T: int, steps: int, original_steps: int) -> list[int]:
    """The descending timesteps of multistep consistency sampling: `steps` points evenly spaced in index on the
    distillation grid of `original_steps` points (diffusers' LCMScheduler.set_timesteps; LCM Algorithm 3)."""
    if not isinstance(original_steps, int) or not 1 <= original_steps <= T:
        raise CarraraError(f"original_inference_steps={original_steps!r} must be between 1 and {T}")
    if not isinstance(steps, int) or not 1 <= steps <= original_steps:
        raise CarraraError(f"a consistency model samples in 1 to {original_steps} steps (its distillation grid), "
                           f"got {steps!r}")
    k = T // original_steps
    grid = [int(t) for t in np.arange(original_steps, 0, -1) * k - 1]  # N = original_steps points, N·k − 1 first
    index = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return [grid[i] for i in index]
