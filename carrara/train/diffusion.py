"""Stage 2: train the text-conditioned noise predictor on cached latents (DDPM Algorithm 1).

Latents and text states are computed once (train/cache.py). Each step: pick a batch, sample
z ~ q(z|x) from the cached posterior, drop the caption to the empty prompt with probability
`cond_dropout` (Ho & Salimans 2022, so one network learns ε(x_t, c) and ε(x_t, ∅)), and regress
the ε (or v) target. The run folder is a model folder (modelfolder.py) holding the EMA weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.diffusion.objectives import VarianceType, diffusion_loss, sample_t_and_noise
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir
from carrara.images import image_grid
from carrara.modelfolder import resolve, write_model_folder
from carrara.models.codec import PIXELS, PixelCodec, PixelCodecConfig, codec_config, load_codec, pixel_factor
from carrara.models.config import UNetConfig, default_unet_config
from carrara.models.lora import TARGETS, save_lora
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.models.weights import load_into
from carrara.pipeline import Pipeline
from carrara.safeload import load_state_dict, weights_file
from carrara.text.encoder import TextEncoder
from carrara.train.cache import encode_latents
from carrara.train.captions import Captions, balanced_batches, load_captioned
from carrara.train.core import TrainConfig, Trainer


@dataclass
class DiffusionRecipe:
    """What `carrara train diffusion` builds; saved as the run's config.json."""

    data: str = ""
    autoencoder: str = ""  # a run (or model) folder with vae/, or "pixels[:F]": pixel space (models/codec.py)
    size: int = 64
    text_encoder: str = "minilm"
    schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    # "learned_range": the U-Net also outputs Σθ (2·C channels), trained with L_hybrid = L_simple + vlb_weight · L_vlb
    # (Nichol & Dhariwal 2021 eq. 15–16); "fixed_small": σ² = β̃_t and L_simple alone (Ho et al. 2020)
    variance: str = "fixed_small"
    vlb_weight: float = 0.001
    pooled: bool = False  # also condition on the pooled sentence embedding, added to the time embedding (Imagen)
    init_unet: str = ""  # a model folder ("default", a run) whose U-Net weights start training (fine-tuning)
    from_model: str = ""  # fine-tune this model folder: its U-Net (config, weights), autoencoder, text encoder, schedule
    lora_rank: int = 0  # > 0 (with from_model): train only LoRA adapters of this rank on the attention projections
    lora_alpha: float | None = None  # the adapters' scale is α / r; None: α = r (diffusers' training scripts)
    cond_dropout: float = 0.1
    caption_variants: str = "captions"  # metadata field with alternative captions; one is drawn per step
    balance_by: str = ""  # metadata field (e.g. "base"): draw batches so each value is equally likely
    sample_prompts: list[str] = field(default_factory=list)
    model: dict = field(default_factory=lambda: default_unet_config().to_diffusers_config())
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=64, lr=3e-4))


FINE_TUNE = TrainConfig(steps=500, batch_size=16, lr=1e-4, warmup_steps=20, log_every=10, sample_every=100,
                        checkpoint_every=100)  # a small fine-tune: ~30 images, minutes (docs/fine-tune.md)
LORA = dataclasses.replace(FINE_TUNE, lr=1e-3, weight_decay=0.0)  # only the adapters learn: a larger step


def fine_tune_recipe(data: str, model: str, *, lora_rank: int = 0, size: int | None = None) -> DiffusionRecipe:
    """The recipe of `carrara train diffusion --from MODEL`: the model's size, and a small fine-tune's settings."""
    folder = resolve(model)
    unet = UNetConfig.from_diffusers_config(folder.unet)
    vae = codec_config(folder.vae)
    native = unet.sample_size * vae.downsample_factor
    if size is not None and size != native:
        raise CarraraError(f"--size {size}: {model} makes {native}-pixel images and is fine-tuned at that size "
                           "(drop --size; your images are center-cropped and resized to it)")
    train = dataclasses.replace(LORA if lora_rank else FINE_TUNE)
    return DiffusionRecipe(data=data, from_model=model, lora_rank=lora_rank, size=native, train=train)


def adopt_model(recipe: DiffusionRecipe) -> dict:
    """Take the U-Net's config, the autoencoder, the text encoder and the schedule from `recipe.from_model` (so a
    fine-tune needs no autoencoder run); returns the model's scheduler config, which the run's folder keeps."""
    folder = resolve(recipe.from_model)
    unet = UNetConfig.from_diffusers_config(folder.unet)
    schedule = NoiseSchedule.from_diffusers_config(folder.scheduler_config)
    recipe.model = unet.to_diffusers_config()
    recipe.pooled = unet.class_embed_type == "projection"
    recipe.autoencoder = str(folder.root)  # its vae/
    recipe.text_encoder = str(folder.root) if folder.tokenizer else folder.text_encoder  # a diffusers folder's pair
    recipe.schedule, recipe.num_train_timesteps = schedule.kind.value, schedule.T
    recipe.prediction_type = schedule.prediction_type.value
    recipe.variance = VarianceType.of_model(folder.scheduler_config, unet.in_channels, unet.out_channels).value
    recipe.init_unet = recipe.from_model
    return folder.scheduler_config


def add_lora(unet: UNet, rank: int, alpha: float | None) -> UNet:
    """Wrap the attention projections (models/lora.py TARGETS) with peft's LoRA layers; only they train.

    peft's default init (A Kaiming-uniform, B = 0) makes the wrapped U-Net compute exactly what it computed before."""
    from peft import LoraConfig, inject_adapter_in_model  # here: peft imports transformers, seconds of every start

    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(TARGETS))
    unet = inject_adapter_in_model(config, unet)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    return unet


def lora_state(unet: UNet) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA-wrapped U-Net, keyed `<module>.lora_A.weight` / `.lora_B.weight` (peft's names)."""
    from peft import get_peft_model_state_dict  # see add_lora

    return get_peft_model_state_dict(unet)


@dataclass
class EncodedData:
    """What the diffusion stage trains on: latent posteriors of the images, and their captions."""

    mean: torch.Tensor  # (N, c, h, w) posterior mean of each image, unscaled
    std: torch.Tensor  # (N, c, h, w) posterior std
    scale: float  # the autoencoder's scaling_factor: the U-Net sees z · scale (Rombach et al. 2022 §4.3.2)
    captions: Captions


def make_batch(data: EncodedData, idx: torch.Tensor, gen: torch.Generator,
               cond_dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z0, states, pooled) for examples idx: Algorithm 1, line 2, and the caption with its dropout.

    z0 = (μ + σ·ε) · scale is a sample of the posterior q(z|x), scaled. Random numbers are drawn in this order
    (ε, then the captions' draws) for all of idx.
    """
    eps_z = torch.randn(data.mean[idx].shape, generator=gen)
    z0 = (data.mean[idx] + data.std[idx] * eps_z) * data.scale  # (B, c, h, w)
    return z0, *data.captions.draw(idx, gen, cond_dropout)


def init_from(unet: UNet, folder: str, *, allow_pickle: bool = False) -> None:
    """Copy a trained U-Net's weights into `unet` (same shapes). A pooled-embedding MLP the source lacks starts with
    a zero last layer, so the fine-tuned network begins as exactly the source network (Stable Diffusion 2's
    ε → v fine-tune started from a trained model the same way)."""
    source = resolve(folder).unet
    state = load_state_dict(weights_file(source, "diffusion_pytorch_model", allow_pickle=allow_pickle),
                            allow_pickle=allow_pickle)
    state = {k: v.float() for k, v in state.items()}
    own = unet.state_dict()
    new = [k for k in own if k.startswith("class_embedding.") and k not in state]
    if new:
        torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
        state.update({k: unet.state_dict()[k] for k in new})
    load_into(unet, state, f"--set init_unet={folder}")


def _variance(recipe: DiffusionRecipe) -> VarianceType:
    try:
        return VarianceType(recipe.variance)
    except ValueError:
        raise CarraraError(f"variance={recipe.variance!r}: use fixed_small or learned_range") from None


def first_stage(spec: str, size: int, *, allow_pickle: bool = False) -> tuple[torch.nn.Module, Path | None]:
    """The frozen first stage and the folder it was read from: "pixels[:F]" is the pixel codec (Imagen's route: the
    U-Net generates the image itself; no folder), anything else a run or model folder with a trained vae/."""
    factor = pixel_factor(spec)
    if factor is not None:
        if size % factor:
            raise CarraraError(f"size {size}: the pixel codec of factor {factor} needs a size divisible by {factor}")
        return PixelCodec(PixelCodecConfig(factor=factor)), None
    vae_dir = Path(spec) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise CarraraError(f"--autoencoder {spec}: no trained autoencoder there (expected vae/config.json; "
                           f"{PIXELS!r} or '{PIXELS}:F' trains in pixel space)")
    return load_codec(vae_dir, allow_pickle=allow_pickle), vae_dir  # safeload.py: pickles only if allowed


def train_diffusion(recipe: DiffusionRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                    stop_at: int | None = None, allow_pickle: bool = False) -> dict:
    """Encode the dataset once, then train the U-Net; the run folder becomes a model folder."""
    out = ensure_dir(out)
    if recipe.lora_rank and not recipe.from_model:
        raise CarraraError("a LoRA adapts a trained model: give --from MODEL (set from_model) with --lora-rank")
    if not isinstance(recipe.lora_rank, int) or recipe.lora_rank < 0:
        raise CarraraError(f"lora_rank must be a whole number ≥ 0, got {recipe.lora_rank!r}")
    source_scheduler = adopt_model(recipe) if recipe.from_model else None
    vae, vae_dir = first_stage(recipe.autoencoder, recipe.size, allow_pickle=allow_pickle)  # frozen
    if not 0.0 <= recipe.cond_dropout < 1.0:
        raise CarraraError(f"cond_dropout must be in [0, 1), got {recipe.cond_dropout}")
    learned = _variance(recipe) is VarianceType.LEARNED_RANGE
    if recipe.from_model:
        native = UNetConfig.from_diffusers_config(recipe.model).sample_size * vae.config.downsample_factor
        if recipe.size != native:
            raise CarraraError(f"size {recipe.size}: {recipe.from_model} makes {native}-pixel images; "
                               "fine-tune at that size")
    text_encoder = TextEncoder.load(recipe.text_encoder)
    loaded = load_captioned(recipe.data, recipe.size, text_encoder, recipe.caption_variants, progress=progress,
                            cache_dir=out / "cache")
    records, report, captions = loaded.records, loaded.report, loaded.captions
    mean, std = encode_latents(vae, loaded.images, progress=progress)  # (N, c, h, w) each, unscaled
    loaded.images = None  # training needs the latents only: the pixels (a shard set's included) are freed
    data = EncodedData(mean, std, vae.config.scaling_factor, captions)
    batch_fn = balanced_batches(records, recipe.balance_by, recipe.train) if recipe.balance_by else None

    config = UNetConfig.from_diffusers_config(recipe.model)
    if config.cross_attention_dim != text_encoder.dim:
        config = dataclasses.replace(config, cross_attention_dim=text_encoder.dim)
    config = dataclasses.replace(config, in_channels=mean.shape[1], out_channels=mean.shape[1] * (1 + learned),
                                 sample_size=mean.shape[-1],
                                 class_embed_type="projection" if recipe.pooled else None,
                                 projection_class_embeddings_input_dim=text_encoder.dim if recipe.pooled else None)
    recipe.model = config.to_diffusers_config()
    torch.manual_seed(recipe.train.seed)
    unet = UNet(config)
    if recipe.init_unet and not resume:
        init_from(unet, recipe.init_unet, allow_pickle=allow_pickle)
    if recipe.lora_rank:
        unet = add_lora(unet, recipe.lora_rank, recipe.lora_alpha)
    if source_scheduler is not None:
        schedule = NoiseSchedule.from_diffusers_config(source_scheduler)
    else:
        schedule = NoiseSchedule.from_config(recipe.schedule, T=recipe.num_train_timesteps,
                                             prediction_type=recipe.prediction_type)
    scheduler_config = source_scheduler or {**schedule.to_diffusers_config(),
                                            **({"variance_type": recipe.variance} if learned else {})}
    prompts = recipe.sample_prompts or loaded.first_captions()

    def loss_fn(model: UNet, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        # Random numbers are drawn for the whole batch idx, then this call's rows are kept (train/core.py).
        z0, cond, pooled_cond = make_batch(data, idx, gen, recipe.cond_dropout)  # Algorithm 1, line 2
        t, noise = sample_t_and_noise(z0, schedule, gen)  # Algorithm 1, lines 3–4
        dev = next(model.parameters()).device
        x0, t, noise = z0[rows].to(dev), t[rows].to(dev), noise[rows].to(dev)
        cond, extra = cond[rows].to(dev), pooled_cond[rows].to(dev) if recipe.pooled else None
        return diffusion_loss(lambda x, t: model(x, t, cond, class_labels=extra), x0, t, noise, schedule,
                              recipe.prediction_type, vlb_weight=recipe.vlb_weight)

    def sample_fn(ema: UNet, step: int):
        pipe = Pipeline(unet=ema, vae=vae, text_encoder=text_encoder, schedule=schedule)
        return image_grid(pipe(prompts, seed=0), rows=1)  # the default sampling settings

    own_vae = vae_dir is None or not (vae_dir / "diffusion_pytorch_model.safetensors").is_file()

    def export_fn(ema: UNet) -> None:  # the pixel codec, or a VAE read from a pickle (as safetensors), is written
        if recipe.lora_rank:  # the adapter alone: apply it with `carrara generate --model MODEL --lora FILE`
            save_lora(out / "lora.safetensors", lora_state(ema), rank=recipe.lora_rank,
                      alpha=recipe.lora_rank if recipe.lora_alpha is None else recipe.lora_alpha)
            return
        write_model_folder(out, unet=ema, vae=vae if own_vae else None, vae_dir=None if own_vae else vae_dir,
                           scheduler_config=scheduler_config, text_encoder=recipe.text_encoder)

    trainer = Trainer.for_stage("diffusion", recipe, out, unet, records=records, report=report,
                                n_examples=len(mean), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn,
                                batch_fn=batch_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    lora = {"lora": str(out / "lora.safetensors")} if recipe.lora_rank else {}
    return {**result, "n_images": len(mean), "n_captions": len(captions.states), **lora}
