"""Train the unCLIP diffusion prior (models/prior.py) on a captioned dataset, with a frozen `carrara train clip` run.

DALL-E 2 §2.2: t ~ U{1…T}, x_t = q(x_t | z_i) on the cosine schedule, and the loss is ‖f_θ(x_t, t, y) − z_i‖²
(the network predicts the clean embedding, objectives.py's "sample" target); the text (its token states and its CLIP
embedding) is dropped 10 % of the time for classifier-free guidance. The CLIP embeddings of every image and every
caption variant are computed once and kept in the run's cache/ (keyed by the CLIP's and the text encoder's
fingerprints and the data), so a resumed run starts at once. Captions are split into training and held-out sets by
distinct caption as the CLIP's own training splits them; the check (prior.py's `prior_check`) runs on held-out ones.
The run folder holds prior/ (EMA weights + config.json naming the CLIP), check.json and the usual logs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carrara.data.folder import fingerprint
from carrara.data.load import load_dataset, preload_images
from carrara.diffusion.objectives import diffusion_loss, sample_t_and_noise
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.fileio import atomic_path, ensure_dir, write_json_atomic
from carrara.images import image_grid, to_model_range, to_pil
from carrara.models.clip import ClipScorer
from carrara.models.prior import DiffusionPriorNetwork, PriorConfig
from carrara.prior import PriorSettings, encode_captions, pick_embeddings, prior_check, trim
from carrara.train.captions import caption_list, variant_table
from carrara.train.clip import split_by_caption
from carrara.train.core import TrainConfig, Trainer

SHEET_PROMPTS = 8  # held-out captions in the training's picture


@dataclass
class PriorRecipe:
    """What `carrara train prior` builds; saved as the run's config.json."""

    data: str = ""
    clip: str = ""  # the `carrara train clip` run whose embedding space the prior models
    captions_field: str = "captions"  # a metadata field listing caption variants (emoji); '' = the caption alone
    holdout: int = 300  # distinct captions kept out of training for the check (at most 20 % of them)
    cond_dropout: float = 0.1  # DALL-E 2: the text is dropped 10 % of the time (classifier-free guidance)
    schedule: str = "cosine"  # DALL-E 2's prior uses the cosine schedule (Nichol & Dhariwal 2021)
    num_train_timesteps: int = 1000
    model: dict = field(default_factory=lambda: dataclasses.asdict(PriorConfig()))
    sample: dict = field(default_factory=lambda: dataclasses.asdict(PriorSettings()))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=256, lr=3e-4,
                                                                   warmup_steps=100, ema_decay=0.999,
                                                                   sample_every=1000, checkpoint_every=500))


@dataclass
class Embedded:
    """A dataset in CLIP space: what the prior trains on."""

    image_embed: torch.Tensor  # (N, E) unit image embeddings
    states: torch.Tensor  # (U, L, D) bf16 token states of every distinct caption (padding trimmed)
    mask: torch.Tensor  # (U, L) bool
    text_embed: torch.Tensor  # (U, E) unit CLIP text embeddings
    captions: list[str]  # the U distinct captions, sorted
    caption_of: torch.Tensor  # (N, K) each image's caption variants, indices into the U (padded)
    n_variants: torch.Tensor  # (N,)


def embed_dataset(scorer: ClipScorer, records, images: torch.Tensor, variants_field: str, cache_dir: Path, *,
                  progress: bool = True) -> Embedded:
    """CLIP-embed every image and caption variant once; cached in `cache_dir` by fingerprint, recomputed if damaged."""
    variants = [caption_list(r, variants_field) for r in records]
    unique = sorted({c for v in variants for c in v})
    position = {c: i for i, c in enumerate(unique)}
    caption_of, n_variants = variant_table(variants, [position[c] for v in variants for c in v])
    key = hashlib.sha256(json.dumps([scorer.fingerprint(), scorer.text_encoder.fingerprint(), fingerprint(records),
                                     list(images.shape), unique], sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir) / f"prior-{key[:20]}.safetensors"
    try:
        t = load_file(str(path))
        return Embedded(t["image_embed"], t["states"], t["mask"].bool(), t["text_embed"], unique, caption_of,
                        n_variants)
    except (FileNotFoundError, SafetensorError, OSError, KeyError):
        pass  # not cached yet, or damaged: embed again
    if progress:
        print(f"prior: CLIP-embedding {len(images)} images and {len(unique)} captions (cached in {path.parent})")
    image_embed = scorer.embed_images(images)  # (N, E)
    states, mask, text_embed = encode_captions(scorer, unique)  # (U, L, D), (U, L), (U, E)
    states, mask = trim(states, mask)
    ensure_dir(path.parent)
    with atomic_path(path) as tmp:
        save_file({"image_embed": image_embed.contiguous(), "states": states.contiguous(),
                   "mask": mask.to(torch.uint8).contiguous(), "text_embed": text_embed.contiguous()}, str(tmp))
    return Embedded(image_embed, states, mask, text_embed, unique, caption_of, n_variants)


def held_out_queries(emb: Embedded, texts: list[str], held_idx: torch.Tensor, limit: int = 256):
    """(caption indices (M,), one true image per caption (M,), hits (M, N)) for the distinct held-out captions."""
    position = {c: i for i, c in enumerate(emb.captions)}
    first: dict[str, int] = {}
    for i in held_idx.tolist():
        first.setdefault(texts[i], i)
    chosen = sorted(first)[:limit]
    owner = torch.tensor([position[t] for t in texts])  # (N,) each image's main caption
    caps = torch.tensor([position[c] for c in chosen])  # (M,)
    return caps, torch.tensor([first[c] for c in chosen]), owner[None, :] == caps[:, None]


def train_prior(recipe: PriorRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                stop_at: int | None = None) -> dict:
    """Train the prior; returns (and writes to check.json) the held-out check of its samples."""
    if not recipe.clip:
        raise CarraraError("train prior needs --clip CLIP_RUN (a finished `carrara train clip` run)")
    if not 0.0 <= recipe.cond_dropout < 1.0:
        raise CarraraError(f"cond_dropout must be in [0, 1), got {recipe.cond_dropout}")
    recipe.sample = dataclasses.asdict(PriorSettings.parse(recipe.sample, where="train prior"))  # with defaults filled
    out = ensure_dir(out)
    scorer = ClipScorer.load(recipe.clip)
    dataset = load_dataset(recipe.data, size=scorer.model.config.image_size)
    images, texts = preload_images(dataset, progress=progress)  # (N, 3, S, S) uint8
    emb = embed_dataset(scorer, dataset.records, images, recipe.captions_field, out / "cache", progress=progress)
    train_idx, held_idx = split_by_caption(texts, recipe.holdout, recipe.train.seed)
    config = PriorConfig.from_dict({**recipe.model, "embed_dim": emb.image_embed.shape[1],
                                    "text_dim": emb.states.shape[2]})
    if emb.states.shape[1] > config.max_text_len:
        raise CarraraError(f"captions have up to {emb.states.shape[1]} tokens; set model.max_text_len at least that")
    recipe.model = dataclasses.asdict(config)
    schedule = NoiseSchedule.from_config(recipe.schedule, recipe.num_train_timesteps, prediction_type="sample")
    scale = config.embed_dim ** 0.5  # DALLE2-pytorch's image_embed_scale
    torch.manual_seed(recipe.train.seed)
    model = DiffusionPriorNetwork(config)

    def loss_fn(m: DiffusionPriorNetwork, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        ex = train_idx[idx]  # (B,) dataset indices; every draw is made for the whole batch, then [rows] kept
        variant = (torch.rand(len(ex), generator=gen) * emb.n_variants[ex]).long()  # a caption variant per image
        cap = emb.caption_of[ex, variant]  # (B,)
        x0 = emb.image_embed[ex] * scale  # (B, E): z_i, scaled
        t, noise = sample_t_and_noise(x0, schedule, gen)  # Algorithm 1, lines 3–4
        keep = (torch.rand(len(ex), generator=gen) >= recipe.cond_dropout).float()  # (B,) 0 = text dropped
        dev = next(m.parameters()).device
        cap, x0, t, noise, keep = cap[rows], x0[rows].to(dev), t[rows].to(dev), noise[rows].to(dev), keep[rows].to(dev)
        cond = (emb.states[cap].to(dev), emb.mask[cap].to(dev), emb.text_embed[cap].to(dev), keep)
        return diffusion_loss(lambda x, tt: m(x, tt, cond), x0, t, noise, schedule, "sample")  # ‖f_θ − z_i‖²

    queries = held_out_queries(emb, texts, held_idx)

    def sample_queries(m: DiffusionPriorNetwork, caps: torch.Tensor) -> torch.Tensor:
        cond = (emb.states[caps].float(), emb.mask[caps], emb.text_embed[caps], torch.ones(len(caps)))
        return pick_embeddings(m, schedule, cond, seed=recipe.train.seed, **recipe.sample)  # (M, E), as the route

    def evaluate(m: DiffusionPriorNetwork) -> dict:
        caps, true_idx, hits = queries
        sampled = sample_queries(m, caps)
        return {**prior_check(sampled, emb.image_embed[true_idx], emb.image_embed, hits,
                              text_embed=emb.text_embed[caps]), "sample": recipe.sample, "split": "held-out captions"}

    def sample_fn(ema: DiffusionPriorNetwork, step: int):
        """Log the check; the picture: per held-out caption, its image, then the 3 images nearest the prior's sample."""
        trainer.log(f"step {step}: held-out check {json.dumps(evaluate(ema))}")
        caps, true_idx, _ = (q[:SHEET_PROMPTS] for q in queries)
        nearest = (sample_queries(ema, caps) @ emb.image_embed.T).topk(3, dim=1).indices  # (M, 3)
        order = torch.cat([true_idx[:, None], nearest], dim=1).reshape(-1)  # (M · 4,)
        labels = [s for c in caps.tolist() for s in (emb.captions[c], "prior's nearest", "", "")]
        scale_up = max(1, 64 // images.shape[-1])
        return image_grid(to_pil(to_model_range(images[order])), rows=len(caps), labels=labels, scale=scale_up)

    def export_fn(ema: DiffusionPriorNetwork) -> None:
        ema.save_pretrained(out / "prior", extra={
            "clip": str(Path(recipe.clip).resolve()), "clip_fingerprint": scorer.fingerprint(),
            "schedule": recipe.schedule, "num_train_timesteps": recipe.num_train_timesteps,
            "prediction_type": "sample", "embed_scale": scale, "sample": recipe.sample})

    trainer = Trainer.for_stage("prior", recipe, out, model, records=dataset.records, report=dataset.report(),
                                n_examples=len(train_idx), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    check = evaluate(trainer.ema.model)
    write_json_atomic(out / "check.json", {"held_out": check, "train_pairs": len(train_idx),
                                           "clip": str(recipe.clip)})
    return {**result, "check": check}
