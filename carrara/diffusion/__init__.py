"""The diffusion core: noise schedules, objectives, samplers and guidance (no networks here)."""
from carrara.diffusion.guidance import cfg_model, classifier_guided_model
from carrara.diffusion.objectives import diffusion_loss, from_x0_eps, sample_t_and_noise, to_x0_eps
from carrara.diffusion.samplers import (
    SAMPLERS,
    default_timesteps,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from carrara.diffusion.schedule import NoiseSchedule, PredictionType, add_noise, timesteps

__all__ = [
    "SAMPLERS", "NoiseSchedule", "PredictionType", "add_noise", "cfg_model", "classifier_guided_model",
    "default_timesteps", "diffusion_loss", "from_x0_eps", "get_sampler", "sample_ddim", "sample_ddpm",
    "sample_dpmpp_2m", "sample_t_and_noise", "timesteps", "to_x0_eps",
]
