"""What decides the pixels besides the model, with the defaults and the sampler names every interface reads (CLI,
server, evaluation, demo, training's sample grids): written here once. Imports no torch (the CLI's --help is fast)."""
from __future__ import annotations

from dataclasses import dataclass

from carrara.errors import CarraraError

# Algorithm 2 of Ho et al. 2020, DDIM (Song et al. 2021), DPM-Solver++(2M) (Lu et al. 2022); then the names users know
# from k-diffusion / AUTOMATIC1111 / ComfyUI: Euler, Euler ancestral, DPM++ 2M Karras (Karras et al. 2022); then
# multistep consistency sampling for distilled students (Luo et al. 2023, LCM Algorithm 3)
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp", "euler", "euler_a", "dpmpp_karras", "lcm")
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0


@dataclass
class GenerationSettings:
    """One image's recipe, recorded in every PNG: 20 DPM-Solver++ steps (Lu et al. 2022: as good as 100 DDIM steps
    here, docs/default-model.md) at classifier-free guidance w = 4 (Ho & Salimans 2022)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpmpp"
    guidance: float = 4.0
    seed: int = 0
    size: int | None = None  # image side: None = the model's largest (a cascade's upsampled side)

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise CarraraError("the prompt must be text")
        if not 1 <= self.steps <= MAX_STEPS:
            raise CarraraError(f"--steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if self.sampler not in SAMPLER_NAMES:
            raise CarraraError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if not 0.0 <= self.guidance <= MAX_GUIDANCE:
            raise CarraraError(f"--guidance must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance}")
        if not 0 <= self.seed < 2**63:
            raise CarraraError(f"--seed must be between 0 and 2^63-1, got {self.seed}")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise CarraraError(f"--size must be a positive number of pixels, got {self.size!r}")


DEFAULTS = GenerationSettings()
