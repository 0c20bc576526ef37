"""Stage 3 of the cascade: train the text-conditioned diffusion upsampler (carrara/upsampler.py).

Each step (DDPM Algorithm 1 on the high-resolution image, given the low-resolution one):
  1. crop: a random `crop`-pixel window of each high-resolution image, aligned to the factor f (super-resolution
     models train on crops and, being convolutional, run on whole images: SR3, Saharia et al. 2021 §4; Imagen §2.5);
  2. y = its f×f box-downsampled image — or, with `degrade = "autoencoder:…"` from step `degrade_from` on, that
     image's round trip through the base model's autoencoder (computed once for whole images, then cropped alike),
     which is what a latent base hands the stage — corrupted to y_s ~ q(y_s | y) at a random level
     s ~ U{0, …, aug_max − 1} (noise-conditioning augmentation, Ho et al. 2021 §4.2);
  3. x_0 = (space-to-depth of the crop − that of bicubic ×f of y without the noise) / k, the residual at unit variance
     (carrara/upsampler.py; k is measured on the data once, like a latent scale factor);
     t, ε; regress the v (or ε) target of U-Net(cat[x_t, y_s], t, text, s).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.diffusion.objectives import diffusion_loss, sample_t_and_noise
from carrara.diffusion.schedule import NoiseSchedule, add_noise
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir
from carrara.images import image_grid, to_model_range, to_pil
from carrara.models.config import UNetConfig
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.text.encoder import TextEncoder
from carrara.train.captions import balanced_batches, load_captioned
from carrara.train.core import TrainConfig, Trainer
from carrara.train.diffusion import first_stage
from carrara.upsampler import (
    Upsampler,
    UpsamplerSettings,
    autoencoder_round_trip,
    bicubic,
    downsample,
    residual_std,
    residual_target,
    upsampler_inputs,
)


def default_upsampler_config(factor: int = 2) -> dict:
    """A 14.7M-parameter U-Net at the low resolution: no attention above 8×8 (conv only where the pixels are),
    cross-attention to the text at the lowest level; ~5.5 GFLOP per pass for a 64 → 128 image. Its deepest level
    has 192 channels, not 256: the cascade then fits the 100 MB package and adds less time than the base
    (docs/decisions.md, 2026-11-30)."""
    return UNetConfig(
        in_channels=3 * factor**2 + 3, out_channels=3 * factor**2, block_out_channels=(32, 64, 128, 192),
        down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3,
        layers_per_block=2, attention_head_dim=(1, 2, 4, 8), cross_attention_dim=384, use_linear_projection=True,
        class_embed_type="timestep").to_diffusers_config()


@dataclass
class UpsamplerRecipe:
    """What `carrara train upsampler` builds; saved as the run's config.json."""

    data: str = ""
    size: int = 128  # the high-resolution side; the stage is conditioned on size / factor
    factor: int = 2
    crop: int = 64  # training window on the high-resolution image (0: whole images)
    text_encoder: str = "minilm"
    schedule: str = "cosine"
    prediction_type: str = "v_prediction"
    aug_max: int = 350  # training augmentation levels s ∈ {0, …, aug_max − 1} of T
    residual_scale: float = 0.0  # k of x_0 = (x − bicubic(y)) / k; 0: the data's residual std, measured at the start
    degrade: str = ""  # "": y is the clean small image; "autoencoder:FOLDER": its round trip through that autoencoder
    degrade_from: int = 0  # the training step the degradation starts at (before it the stage learns clean ×f)
    init_unet: str = ""  # an upsampler folder whose U-Net starts training (fine-tuning)
    cond_dropout: float = 0.1
    caption_variants: str = "captions"
    balance_by: str = ""
    sampling: UpsamplerSettings = field(default_factory=UpsamplerSettings)
    model: dict = field(default_factory=default_upsampler_config)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=32, lr=2e-4))


def random_crops(images: torch.Tensor, crop: int, factor: int, gen: torch.Generator,
                 small: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One window of side `crop` per image (B, 3, crop, crop), its corner on the factor grid so the crop's
    downsampled image is the downsampled image's crop; and the same window of `small` (B, C, H/f, W/f), if given."""
    B, _, H, W = images.shape
    if crop == 0 or crop == H == W:
        return images, small
    corner_y = (torch.randint(0, (H - crop) // factor + 1, (B,), generator=gen) * factor).tolist()
    corner_x = (torch.randint(0, (W - crop) // factor + 1, (B,), generator=gen) * factor).tolist()
    hi = torch.stack([im[:, y:y + crop, x:x + crop] for im, y, x in zip(images, corner_y, corner_x)])
    if small is None:
        return hi, None
    c = crop // factor
    return hi, torch.stack([im[:, y // factor:y // factor + c, x // factor:x // factor + c]
                            for im, y, x in zip(small, corner_y, corner_x)])


def degraded_lowres(recipe: UpsamplerRecipe, images: torch.Tensor, progress: bool) -> torch.Tensor | None:
    """The small images the stage is conditioned on after `degrade_from`, float16 (N, 3, H/f, W/f), or None (clean).
    Whole images go through the autoencoder (its receptive field sees their borders as the base's decoder does)."""
    if not recipe.degrade:
        return None
    codec, folder = first_stage(recipe.degrade.partition(":")[2], recipe.size // recipe.factor)
    if folder is None:
        raise CarraraError(f"upsampler: degrade {recipe.degrade!r} names the pixel codec; its round trip is lossless")
    codec.eval()
    small = torch.cat([downsample(to_model_range(images[i:i + 256]), recipe.factor) for i in range(0, len(images), 256)])
    return autoencoder_round_trip(codec, small, progress=progress)


def check_recipe(r: UpsamplerRecipe) -> None:
    if r.factor < 2 or r.size % r.factor or (r.crop and (r.crop % r.factor or not r.factor <= r.crop <= r.size)):
        raise CarraraError(f"upsampler: size {r.size} and crop {r.crop} must be multiples of factor {r.factor} ≥ 2, "
                           f"with crop ≤ size")
    if r.residual_scale < 0:
        raise CarraraError(f"upsampler: residual_scale must be ≥ 0 (0: measured on the data), got {r.residual_scale}")
    kind, _, folder = r.degrade.partition(":")
    if r.degrade and (kind != "autoencoder" or not folder):
        raise CarraraError(f"upsampler: degrade must be empty or 'autoencoder:FOLDER' (the base's autoencoder or its "
                           f"model folder), got {r.degrade!r}")
    if r.degrade_from < 0:
        raise CarraraError(f"upsampler: degrade_from must be ≥ 0, got {r.degrade_from}")
    if not 0 < r.aug_max <= 1000:
        raise CarraraError(f"upsampler: aug_max must be in [1, 1000] (the schedule's T), got {r.aug_max}")


def train_upsampler(recipe: UpsamplerRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                    stop_at: int | None = None) -> dict:
    """Load the high-resolution images once, then train the stage; the run folder becomes an upsampler folder."""
    check_recipe(recipe)
    out = ensure_dir(out)
    text_encoder = TextEncoder.load(recipe.text_encoder)
    loaded = load_captioned(recipe.data, recipe.size, text_encoder, recipe.caption_variants, progress=progress,
                            cache_dir=out / "cache")
    images, records, report, captions = loaded.images, loaded.records, loaded.report, loaded.captions  # (N, 3, H, W)
    batch_fn = balanced_batches(records, recipe.balance_by, recipe.train) if recipe.balance_by else None
    f = recipe.factor
    degraded = degraded_lowres(recipe, images, progress)  # (N, 3, H/f, W/f) float16, or None

    config = UNetConfig.from_diffusers_config(recipe.model)
    config = dataclasses.replace(config, in_channels=3 * f * f + 3, out_channels=3 * f * f,
                                 sample_size=recipe.size // f, cross_attention_dim=text_encoder.dim,
                                 class_embed_type="timestep", projection_class_embeddings_input_dim=None)
    recipe.model = config.to_diffusers_config()
    torch.manual_seed(recipe.train.seed)
    unet = UNet(config)
    if recipe.init_unet and not resume:
        init = Upsampler.load(recipe.init_unet)
        if init.unet.config != config:
            raise CarraraError(f"upsampler: init_unet {recipe.init_unet} has another architecture than this recipe's")
        unet.load_state_dict(init.unet.state_dict())
    schedule = NoiseSchedule.from_config(recipe.schedule, prediction_type=recipe.prediction_type)
    if not recipe.residual_scale:  # deterministic (all images, whole), so a resumed run measures the same k
        recipe.residual_scale = round(residual_std(images, f), 4)

    def loss_fn(model: UNet, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        # Random numbers are drawn for the whole batch idx, then this call's rows are kept (train/core.py).
        use = degraded is not None and trainer.current_step >= recipe.degrade_from
        hi, small = random_crops(images[idx], recipe.crop, f, gen, degraded[idx] if use else None)  # step 1
        hi = to_model_range(hi)  # (B, 3, c, c)
        cond, _ = captions.draw(idx, gen, recipe.cond_dropout)  # (B, L, D)
        level = torch.randint(0, recipe.aug_max, (len(idx),), generator=gen)  # step 2: s
        lowres = downsample(hi, f) if small is None else small.float()
        lowres_aug = add_noise(schedule, lowres, torch.randn(lowres.shape, generator=gen), level)  # y_s
        x0 = residual_target(hi, lowres, f, recipe.residual_scale)  # (B, 3f², c/f, c/f), step 3
        t, noise = sample_t_and_noise(x0, schedule, gen)  # Algorithm 1, lines 3–4
        dev = next(model.parameters()).device
        y, c, s = lowres_aug[rows].to(dev), cond[rows].to(dev), level[rows].to(dev)
        return diffusion_loss(lambda x, t: upsampler_inputs(model, x, t, y, c, s), x0[rows].to(dev),
                              t[rows].to(dev), noise[rows].to(dev), schedule, recipe.prediction_type)

    show = torch.linspace(0, len(images) - 1, 6).long()  # fixed images for the sample grids
    real = to_model_range(images[show])  # (6, 3, H, W)
    show_states = text_encoder.encode([r.text for r in (records[i] for i in show.tolist())])[0]
    null_states = text_encoder.encode([""])[0]

    def stage(ema: UNet) -> Upsampler:
        return Upsampler(unet=ema, schedule=schedule, factor=f, settings=recipe.sampling,
                         residual_scale=recipe.residual_scale, degrade=recipe.degrade.partition(":")[0])

    def sample_fn(ema: UNet, step: int):
        """Rows: the low-resolution input enlarged (nearest), bicubic ×f, the stage's output, the real image; the
        input is the degraded one once the degradation has started."""
        lowres = downsample(real, f) if degraded is None or step <= recipe.degrade_from else degraded[show].float()
        up = stage(ema)(lowres, show_states, null_states, seed=0)
        nearest = torch.nn.functional.interpolate(lowres, scale_factor=f, mode="nearest")
        return image_grid(to_pil(torch.cat([nearest, bicubic(lowres, f), up, real])), rows=4)

    def export_fn(ema: UNet) -> None:
        stage(ema).save(out, text_encoder=recipe.text_encoder)

    trainer = Trainer.for_stage("upsampler", recipe, out, unet, records=records, report=report,
                                n_examples=len(images), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn,
                                batch_fn=batch_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    return {**result, "n_images": len(images)}
