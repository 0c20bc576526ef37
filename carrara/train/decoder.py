"""Train the unCLIP decoder (models/unclip.py) on a captioned dataset, with a frozen `carrara train clip` run.

DALL-E 2 §2.1: the decoder is a diffusion model conditioned on the CLIP image embedding z_i of the image it
denoises (projected into the time embedding and into four context tokens) and on the caption; "we enable
classifier-free guidance by randomly setting the CLIP embeddings to zero 10% of the time, and randomly dropping the
text caption 50% of the time during training". The loss is the noise predictor's own (DDPM Algorithm 1) on cached
latents, as in train/diffusion.py, whose batch drawing it shares.

It starts from a model folder (default: the packaged model): that model's U-Net weights (its text cross-attention
already trained; the new z_i path into the time embedding starts at zero), its autoencoder, text encoder and
schedule. The CLIP embeddings of the images are the prior stage's cache (train/prior.py `embed_dataset`, in the run's
cache/). The run folder is an unCLIP model folder without a prior (carrara/unclip.py): decoder/, model_index.json.
Its picture shows, per data image, the image and three variations decoded from its z_i; check.json holds their
CLIP cosine to the image against the cosine to a random data image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.diffusion.objectives import diffusion_loss, sample_t_and_noise
from carrara.diffusion.samplers import SchedulerOptions
from carrara.diffusion.schedule import NoiseSchedule
from carrara.diffusion.settings import DEFAULTS, GenerationSettings
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.images import image_grid, to_model_range, to_pil
from carrara.modelfolder import resolve, write_model_folder
from carrara.models.clip import ClipScorer
from carrara.models.codec import load_codec
from carrara.models.config import UNetConfig
from carrara.models.unclip import IMAGE_TOKENS, ImageTokens, ImageTokensConfig, UnclipDecoder
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.models.weights import load_into, load_weights
from carrara.pipeline import Pipeline
from carrara.text.encoder import TextEncoder
from carrara.train.cache import encode_latents
from carrara.train.captions import load_captioned
from carrara.train.core import TrainConfig, Trainer
from carrara.train.diffusion import EncodedData, make_batch
from carrara.train.prior import embed_dataset
from carrara.unclip import Unclip, write_index

VARIATIONS = 3  # variations per data image in the picture and the check
SAMPLE_KINDS = {"steps": int, "sampler": str, "guidance": (int, float)}  # recipe.sample's keys and types


@dataclass
class DecoderRecipe:
    """What `carrara train decoder` builds; saved as the run's config.json."""

    data: str = ""
    clip: str = ""  # the `carrara train clip` run whose image embeddings condition the decoder
    from_model: str = "default"  # the model folder it starts from: U-Net, autoencoder, text encoder, schedule
    init_weights: bool = True  # False: the model's shape with fresh weights
    image_tokens: int = 4  # K extra context tokens (DALL-E 2: four)
    image_dropout: float = 0.1  # DALL-E 2: z_i set to zero 10 % of the time …
    text_dropout: float = 0.5  # … and the caption dropped 50 % of the time
    caption_variants: str = "captions"  # metadata field with alternative captions; one is drawn per step
    sample_images: int = 4  # data images whose variations the picture and the check show
    sample: dict = field(default_factory=lambda: {"steps": DEFAULTS.steps, "sampler": DEFAULTS.sampler,
                                                  "guidance": DEFAULTS.guidance})
    model: dict = field(default_factory=dict)  # the U-Net's config, filled in from from_model
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=64, lr=1e-4,
                                                                   warmup_steps=100, sample_every=500,
                                                                   checkpoint_every=250))


def start_from(unet: UNet, folder: Path, *, allow_pickle: bool = False) -> None:
    """Copy a trained U-Net's weights into the decoder's; its class embedding (z_i's MLP) starts with a zero last
    layer, so z_i enters the time embedding from nothing (a pooled-text MLP of the source is not carried over)."""
    state = {k: v.float() for k, v in load_weights(folder, allow_pickle=allow_pickle).items()
             if not k.startswith("class_embedding.")}
    torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
    torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
    state.update({k: v for k, v in unet.state_dict().items() if k.startswith("class_embedding.")})
    load_into(unet, state, str(folder))


def variation_check(variations: torch.Tensor, own: torch.Tensor, pool: torch.Tensor) -> dict:
    """CLIP cosine of variations (M, E) to their source images' embeddings (M, E), against a random pool image."""
    return {"n": len(variations), "cos_own": float((variations * own).sum(-1).mean()),
            "cos_random": float((variations @ pool.T).mean())}


def _check_settings(recipe: DecoderRecipe) -> None:
    """The sample grid's and the trainer's settings, refused before any data is read (not at the first grid)."""
    if not recipe.sample_images >= 1:
        raise CarraraError(f"sample_images must be at least 1, got {recipe.sample_images}")
    for key, value in recipe.sample.items():
        kind = SAMPLE_KINDS.get(key)
        if kind is None or not isinstance(value, kind) or isinstance(value, bool):
            raise CarraraError(f"sample.{key}={value!r}: the decoder's sample settings are steps (a whole number), "
                               "sampler (a name) and guidance (a number)")
    GenerationSettings(**recipe.sample).validate()
    recipe.train.check()


def train_decoder(recipe: DecoderRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                  stop_at: int | None = None, allow_pickle: bool = False) -> dict:
    """Train the decoder; the run folder becomes an unCLIP folder (no prior), check.json the variations' check."""
    if not recipe.clip:
        raise CarraraError("train decoder needs --clip CLIP_RUN (a finished `carrara train clip` run)")
    for name in ("image_dropout", "text_dropout"):
        if not 0.0 <= getattr(recipe, name) < 1.0:
            raise CarraraError(f"{name} must be in [0, 1), got {getattr(recipe, name)}")
    _check_settings(recipe)
    out = ensure_dir(out)
    folder = resolve(recipe.from_model)
    if folder.tokenizer:
        raise CarraraError(f"--from {recipe.from_model}: the decoder starts from a carrara model (built-in text "
                           "encoder), not a folder with its own text_encoder/")
    scorer = ClipScorer.load(recipe.clip)
    vae = load_codec(folder.vae, allow_pickle=allow_pickle)
    text_encoder = TextEncoder.load(folder.text_encoder)
    schedule = NoiseSchedule.from_diffusers_config(folder.scheduler_config)
    source = UNetConfig.from_diffusers_config(folder.unet)
    if source.time_cond_proj_dim or source.class_embed_type == "timestep":  # its sampling would fail after training
        what = "a distilled student (start from its teacher)" if source.time_cond_proj_dim else "an upsampler stage"
        raise CarraraError(f"--from {recipe.from_model} is {what}: the decoder starts from a text-to-image model")
    embed_dim = scorer.model.config.embed_dim
    config = dataclasses.replace(source, class_embed_type="projection", projection_class_embeddings_input_dim=embed_dim)
    recipe.model = config.to_diffusers_config()
    token_config = ImageTokensConfig(embed_dim, config.cross_attention_dim, recipe.image_tokens)  # checked now
    size = config.sample_size * vae.config.downsample_factor

    loaded = load_captioned(recipe.data, size, text_encoder, recipe.caption_variants, progress=progress,
                            cache_dir=out / "cache")
    emb = embed_dataset(scorer, loaded.records, loaded.images, recipe.caption_variants, out / "cache",
                        progress=progress)  # the prior stage's cache: z_i of every image
    image_embed = emb.image_embed  # (N, E) unit vectors
    mean, std = encode_latents(vae, loaded.images, progress=progress)  # (N, c, h, w) each, unscaled
    data = EncodedData(mean, std, vae.config.scaling_factor, loaded.captions)
    shown = torch.linspace(0, len(mean) - 1, min(recipe.sample_images, len(mean))).round().long().unique()  # (S,)
    originals = loaded.images[shown]
    loaded.images = None  # training needs the latents only

    torch.manual_seed(recipe.train.seed)
    unet = UNet(config)
    if recipe.init_weights and not resume:
        start_from(unet, folder.unet, allow_pickle=allow_pickle)
    tokens = ImageTokens(token_config)
    decoder = UnclipDecoder(unet, tokens)

    def loss_fn(m: UnclipDecoder, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        # Random numbers are drawn for the whole batch idx, then this call's rows are kept (train/core.py).
        z0, states, _ = make_batch(data, idx, gen, recipe.text_dropout)  # Algorithm 1, line 2; caption → "" 50 %
        keep = (torch.rand(len(idx), generator=gen) >= recipe.image_dropout).float()  # (B,) 0: z_i → 0
        z_i = image_embed[idx] * keep[:, None]  # (B, E)
        t, noise = sample_t_and_noise(z0, schedule, gen)  # Algorithm 1, lines 3–4
        dev = next(m.parameters()).device
        x0, t, noise = z0[rows].to(dev), t[rows].to(dev), noise[rows].to(dev)
        states, z_i = states[rows].to(dev), z_i[rows].to(dev)
        return diffusion_loss(lambda x, tt: m(x, tt, states, z_i), x0, t, noise, schedule)

    def variations(ema: UnclipDecoder) -> torch.Tensor:
        """VARIATIONS images (S · VARIATIONS, 3, H, W) per shown data image, decoded from its z_i and the empty text."""
        pipe = Pipeline(unet=ema.unet, vae=vae, text_encoder=text_encoder, schedule=schedule,
                        scheduler_options=SchedulerOptions.from_scheduler_config(folder.scheduler_config),
                        unclip=Unclip(ema.image_tokens, scorer))
        z = image_embed[shown].repeat_interleave(VARIATIONS, dim=0)  # (S · V, E)
        return pipe([""] * len(z), image_embeds=z, seed=recipe.train.seed, output="tensor", **recipe.sample)

    def check(images: torch.Tensor) -> dict:
        with torch.inference_mode():
            embedded = scorer.model.encode_image(images)  # (S · V, E)
        return variation_check(embedded, image_embed[shown].repeat_interleave(VARIATIONS, dim=0), image_embed)

    def sample_fn(ema: UnclipDecoder, step: int):
        """Log the check; the picture: per shown data image, the image and its variations."""
        images = variations(ema)
        trainer.log(f"step {step}: variations' CLIP check {check(images)}")
        tiles = torch.cat([to_model_range(originals)[:, None], images.view(len(shown), VARIATIONS, *images.shape[1:])],
                          dim=1).flatten(0, 1)  # (S · (1 + V), 3, H, W)
        labels = [s for _ in shown for s in ("data image", "its variations", "", "")]
        return image_grid(to_pil(tiles), rows=len(shown), labels=labels, scale=max(1, 64 // size))

    def export_fn(ema: UnclipDecoder) -> None:
        write_model_folder(out / "decoder", unet=ema.unet, vae_dir=folder.vae, scheduler_config=folder.scheduler_config,
                           text_encoder=folder.text_encoder)
        ema.image_tokens.save_pretrained(out / "decoder" / IMAGE_TOKENS)
        write_index(out, clip=str(Path(recipe.clip).resolve()), clip_fingerprint=scorer.fingerprint(),
                    extra={"from_model": recipe.from_model})

    trainer = Trainer.for_stage("decoder", recipe, out, decoder, records=loaded.records, report=loaded.report,
                                n_examples=len(mean), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    result["variations"] = check(variations(trainer.ema.model))
    write_json_atomic(out / "check.json", {"variations": result["variations"], "sample": recipe.sample,
                                           "images": shown.tolist(), "clip": str(recipe.clip)})
    return result
