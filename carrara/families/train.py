"""Train one generative family on a dataset folder with the shared Trainer (train/core.py).

The images are loaded once and turned by the family's `prepare` into what its loss reads (pixels, uint8
values, VQ codes, palette indices); the captions are encoded once (train/captions.py `Captions`) and each
step draws one caption variant per image, replaced by the empty prompt with probability `cond_dropout`.
The run folder gets what every stage's has (config.json, log.txt, metrics.jsonl, loss.png, samples/,
resumable checkpoints/) and, at every checkpoint, family.json + family.safetensors for `FamilyPipeline`.

The autoregressive prior (`ar`) trains on the codes of a finished VQ-VAE run (`vqvae=RUN`), which it copies,
so its run folder generates on its own.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from carrara.errors import CarraraError
from carrara.families import build, config_for, family
from carrara.families.base import Batch, to_dict
from carrara.families.pipeline import GUIDED, draw, load_model, save_family
from carrara.fileio import ensure_dir
from carrara.images import image_grid, to_pil
from carrara.text.encoder import TextEncoder
from carrara.train.captions import load_captioned
from carrara.train.core import TrainConfig, Trainer

REPORT_EXAMPLES = 256  # images `report` measures at each checkpoint (the first ones of the dataset)
INIT_EXAMPLES = 512  # images the data-dependent initialisation sees


@dataclass
class FamilyRecipe:
    """What `carrara train family` builds; saved as the run's config.json. None: the family's default."""

    kind: str = "vae"
    data: str = ""
    size: int = 32
    text_encoder: str = "minilm"
    vqvae: str = ""  # ar only: the trained VQ-VAE run whose codes the prior models
    cond_dropout: float | None = None
    caption_variants: str = "captions"
    sample_prompts: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # overrides of the family's Config
    train: TrainConfig | None = None

    def __post_init__(self):
        module = family(self.kind)
        if self.train is None:
            self.train = TrainConfig(**module.TRAIN)
        if self.cond_dropout is None:
            self.cond_dropout = module.COND_DROPOUT


def model_config(recipe: FamilyRecipe, cond_dim: int, vqvae_config: dict | None):
    """The family's Config: the recipe's overrides, with the data's side and the text encoder's width."""
    values = copy.deepcopy(recipe.model)
    if recipe.kind == "ar":
        values["vqvae"] = vqvae_config
        values.setdefault("gpt", {})["cond_dim"] = cond_dim
    elif recipe.kind == "igpt":
        values["image_size"] = recipe.size
        values.setdefault("gpt", {})["cond_dim"] = cond_dim
    else:
        values["image_size"] = recipe.size
        if recipe.kind != "vqvae":
            values["cond_dim"] = cond_dim
    config = config_for(recipe.kind, values)
    try:
        family(recipe.kind).build(config)  # a side the architecture cannot take fails here, in one line
    except ValueError as e:
        raise CarraraError(f"{recipe.kind}: {e}") from None
    return config


def load_tokenizer(recipe: FamilyRecipe) -> tuple[dict | None, torch.nn.Module | None]:
    """For `ar`: the VQ-VAE run's config and model, checked against the data's side."""
    if recipe.kind != "ar":
        return None, None
    if not recipe.vqvae:
        raise CarraraError("--kind ar needs a trained VQ-VAE run: --vqvae RUN (train one with --kind vqvae)")
    kind, model, meta = load_model(recipe.vqvae)
    if kind != "vqvae":
        raise CarraraError(f"--vqvae {recipe.vqvae} holds a {kind} model, not a vqvae")
    if meta["config"]["image_size"] != recipe.size:
        raise CarraraError(f"--vqvae {recipe.vqvae} was trained at {meta['config']['image_size']} px, the data is "
                           f"asked at --size {recipe.size}")
    return meta["config"], model


def check_recipe(r: FamilyRecipe) -> None:
    if not 0.0 <= r.cond_dropout < 1.0:
        raise CarraraError(f"cond_dropout must be in [0, 1), got {r.cond_dropout}")
    if not 8 <= r.size <= 256:
        raise CarraraError(f"--size must be between 8 and 256 for the families, got {r.size}")


def train_family(recipe: FamilyRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                 stop_at: int | None = None) -> dict:
    """Load and encode the data once, build (and initialise) the family's model, train it on the Trainer."""
    check_recipe(recipe)
    out = ensure_dir(out)
    module = family(recipe.kind)
    vq_config, tokenizer = load_tokenizer(recipe)
    text_encoder = TextEncoder.load(recipe.text_encoder)
    loaded = load_captioned(recipe.data, recipe.size, text_encoder, recipe.caption_variants, progress=progress,
                            cache_dir=out / "cache")
    images, records, report_data, captions = loaded.images, loaded.records, loaded.report, loaded.captions
    first_caption = captions.pooled[captions.caption_of[:, 0]]  # (N, D): each image's own caption

    config = model_config(recipe, text_encoder.dim, vq_config)
    torch.manual_seed(recipe.train.seed)
    model = build(recipe.kind, config)
    recipe.model = to_dict(model.config)  # as built: ar and igpt derive the transformer's vocabulary and length
    if tokenizer is not None:
        model.vqvae.load_state_dict(tokenizer.state_dict())
    if not resume:  # resume restores the initialised parameters and buffers from the checkpoint
        module.initialize(model, images[:INIT_EXAMPLES], first_caption[:INIT_EXAMPLES])
    data = module.prepare(model, images)  # (N, ...): what the loss reads

    def loss_fn(model: torch.nn.Module, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        _, pooled = captions.draw(idx, gen, recipe.cond_dropout)  # (B, D), the empty prompt where dropped
        dev = next(model.parameters()).device
        return module.loss(model, Batch(data[idx[rows]].to(dev), pooled[rows].to(dev), gen))

    prompts = recipe.sample_prompts or loaded.first_captions()
    prompt_cond, prompt_null = text_encoder.pooled(prompts), text_encoder.pooled([""] * len(prompts))
    guidance = 3.0 if recipe.kind in GUIDED and recipe.cond_dropout > 0 else 1.0

    def sample_fn(ema: torch.nn.Module, step: int):
        if recipe.kind == "vqvae":  # a tokenizer: show reconstructions under the originals
            real = data[:8].float()
            return image_grid(to_pil(torch.cat([real, ema.decode_codes(ema.encode_codes(real))])), rows=2)
        return image_grid(to_pil(draw(recipe.kind, ema, prompt_cond, prompt_null, 0, guidance)), rows=1)

    measured: dict = {}

    def export_fn(ema: torch.nn.Module) -> None:
        measured.update(module.report(ema, data[:REPORT_EXAMPLES], first_caption[:REPORT_EXAMPLES]))
        save_family(out, recipe.kind, ema, {
            "config": recipe.model, "text_encoder": recipe.text_encoder, "cond_dropout": recipe.cond_dropout,
            "text_encoder_fingerprint": text_encoder.fingerprint(), "image_size": recipe.size,
            "parameters": sum(p.numel() for p in ema.parameters()), "report": dict(measured)})

    trainer = Trainer.for_stage("family", recipe, out, model, records=records, report=report_data, name=recipe.kind,
                                n_examples=len(images), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    return {**result, "n_images": len(images), "report": dict(measured)}
