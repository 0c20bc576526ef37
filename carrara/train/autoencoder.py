"""Stage 1: train the KL-autoencoder (Rombach et al. 2022, sec. 3.1) on a dataset folder.

Loss = reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I)). LDM uses L1 plus a perceptual (LPIPS) and an
adversarial term; both need pretrained weights we cannot download. Without them, L1 alone fails on sparse
images: its per-pixel median sides with the background and leaves shapes gray, while MSE learns their colors
(docs/decisions.md, 2026-11-24, has the measurement). So the default is MSE; `reconstruction="l1"` remains.
At the end, `scaling_factor` = 1 / std of the latents (LDM sec. 4.3.2) is stored in the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.data.load import load_dataset, preload_images
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir
from carrara.images import image_grid, to_model_range, to_pil
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import AutoencoderConfig, default_autoencoder_config
from carrara.train.core import TrainConfig, Trainer


@dataclass
class AutoencoderRecipe:
    """What `carrara train autoencoder` builds; saved as the run's config.json."""

    data: str = ""
    size: int = 64
    kl_weight: float = 1e-6
    reconstruction: str = "mse"  # "mse" or "l1"
    initial_logvar: float = -8.0  # posterior log σ² at step 0 (see narrow_initial_posterior); None: as initialized
    model: dict = field(default_factory=lambda: default_autoencoder_config().to_diffusers_config())
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=4e-4))


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images_uint8: torch.Tensor, n: int = 512) -> float:
    """1 / std of posterior means over (up to) n images, so scaled latents have unit variance."""
    z = vae.encode(to_model_range(images_uint8[:n])).mean
    return float(1.0 / z.float().std())


@torch.no_grad()
def narrow_initial_posterior(vae: AutoencoderKL, logvar: float | None) -> None:
    """Start q(z|x) with σ ≈ exp(logvar / 2) by zeroing the last layer's log σ² weights and setting its bias.

    With the default init log σ² ≈ 0, the sampled latent is mostly noise (σ ≈ 1 against |μ| < 1), and at
    kl_weight = 1e-6 the encoder needs thousands of steps to shrink σ and early reconstructions lose their colors
    (docs/decisions.md, 2026-11-24). A narrow start makes the first steps train a
    near-deterministic autoencoder; the KL term still pulls log σ² up towards 0 as training goes on.
    """
    if logvar is None:
        return
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    c = vae.config.latent_channels
    last.weight[c:].zero_()
    last.bias[c:].fill_(logvar)


def train_autoencoder(recipe: AutoencoderRecipe, out: str | Path, *, resume: bool = False,
                      progress: bool = True, stop_at: int | None = None) -> dict:
    """Train the autoencoder; the run folder gets vae/ (EMA weights, diffusers layout) and logs."""
    out = ensure_dir(out)
    if recipe.reconstruction not in ("mse", "l1"):
        raise CarraraError(f"reconstruction must be 'mse' or 'l1', got {recipe.reconstruction!r}")
    dataset = load_dataset(recipe.data, size=recipe.size)
    images, _ = preload_images(dataset, progress=progress)  # (N, 3, H, W) uint8
    torch.manual_seed(recipe.train.seed)
    vae = AutoencoderKL(AutoencoderConfig.from_diffusers_config(recipe.model))
    narrow_initial_posterior(vae, recipe.initial_logvar)
    fixed = images[torch.linspace(0, len(images) - 1, 8).long()]

    def loss_fn(model: AutoencoderKL, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        device = next(model.parameters()).device
        x = to_model_range(images[idx[rows]]).to(device)  # (b, 3, H, W): this call's rows of the batch
        posterior = model.encode(x)
        # z = μ + σ ε (posterior.sample), with ε drawn for the whole batch so every rank gets its rows' numbers.
        eps = torch.randn((len(idx), *posterior.mean.shape[1:]), generator=gen, dtype=posterior.mean.dtype)[rows]
        x_rec = model.decode(posterior.mean + posterior.std * eps.to(device))
        err = x_rec.float() - x
        rec = err.pow(2).mean() if recipe.reconstruction == "mse" else err.abs().mean()
        return rec + recipe.kl_weight * posterior.kl().mean()

    @torch.no_grad()
    def sample_fn(ema: AutoencoderKL, step: int):
        rec = ema.decode(ema.encode(to_model_range(fixed)).mean).float()
        return image_grid(to_pil(torch.cat([to_model_range(fixed), rec])), rows=2)

    def export_fn(ema: AutoencoderKL) -> None:
        ema.config.scaling_factor = latent_scaling_factor(ema, images)
        ema.save_pretrained(out / "vae")

    trainer = Trainer.for_stage("autoencoder", recipe, out, vae, records=dataset.records, report=dataset.report(),
                                n_examples=len(images), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    return {**result, "n_images": len(images)}
