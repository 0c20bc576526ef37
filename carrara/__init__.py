"""carrara: a readable text-to-image diffusion system (text encoder → latent diffusion → decoder)."""

__version__ = "0.1.0"
