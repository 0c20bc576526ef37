"""Stage 1: train the KL-autoencoder (Rombach et al. 2022, sec. 3.1) on a dataset folder.

Loss = L1 reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I)). LDM adds a perceptual (LPIPS) and an
adversarial term; both need pretrained weights we cannot download, and on 64-px icons L1 suffices.
At the end, `scaling_factor` = 1 / std of the latents (LDM sec. 4.3.2) is stored in the config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.data.folder import load_folder
from carrara.io import ensure_dir
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import AutoencoderConfig, default_autoencoder_config
from carrara.train.cache import preload_images, to_model_range
from carrara.train.core import Trainer, TrainConfig
from carrara.utils.grid import image_grid, to_pil


@dataclass
class AutoencoderRecipe:
    """What `carrara train autoencoder` builds; saved as the run's config.json."""

    data: str = ""
    size: int = 64
    kl_weight: float = 1e-6
    model: dict = field(default_factory=lambda: default_autoencoder_config().to_diffusers_config())
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=4e-4))


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images_uint8: torch.Tensor, n: int = 512) -> float:
    """1 / std of posterior means over (up to) n images, so scaled latents have unit variance."""
    z = vae.encode(to_model_range(images_uint8[:n])).mean
    return float(1.0 / z.float().std())


def train_autoencoder(recipe: AutoencoderRecipe, out: str | Path, *, resume: bool = False,
                      progress: bool = True) -> dict:
    """Train the autoencoder; the run folder gets vae/ (EMA weights, diffusers layout) and logs."""
    out = ensure_dir(out)
    dataset = load_folder(recipe.data, size=recipe.size)
    images, _ = preload_images(dataset, progress=progress)  # (N, 3, H, W) uint8
    torch.manual_seed(recipe.train.seed)
    vae = AutoencoderKL(AutoencoderConfig.from_diffusers_config(recipe.model))
    fixed = images[torch.linspace(0, len(images) - 1, 8).long()]

    def loss_fn(model: AutoencoderKL, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = to_model_range(images[idx])  # (B, 3, H, W)
        posterior = model.encode(x)
        x_rec = model.decode(posterior.sample(generator=gen))
        rec = (x_rec.float() - x).abs().mean()
        return rec + recipe.kl_weight * posterior.kl().mean()

    @torch.no_grad()
    def sample_fn(ema: AutoencoderKL, step: int):
        rec = ema.decode(ema.encode(to_model_range(fixed)).mean).float()
        return image_grid(to_pil(torch.cat([to_model_range(fixed), rec])), rows=2)

    def export_fn(ema: AutoencoderKL) -> None:
        ema.config.scaling_factor = latent_scaling_factor(ema, images)
        ema.save_pretrained(out / "vae")

    run_config = {"stage": "autoencoder", **dataclasses.asdict(recipe)}
    trainer = Trainer(out, vae, recipe.train, n_examples=len(images), loss_fn=loss_fn, sample_fn=sample_fn,
                      export_fn=export_fn, run_config=run_config, name="autoencoder")
    result = trainer.fit(resume=resume, progress=progress)
    return {**result, "skipped": dict(dataset.skipped), "n_images": len(images)}
