"""Train carrara's evaluation CLIP (models/clip.py) on a captioned dataset folder.

Symmetric InfoNCE with a learned temperature (Radford et al. 2021). The MiniLM sentence embedding of every
distinct caption is computed once; only the projection and the image CNN train. Captions are split into
train and held-out sets by distinct caption, so the held-out retrieval numbers are zero-shot: neither the
images nor the captions were seen. The run folder holds clip/ (EMA weights), retrieval.json and the usual logs.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from carrara.data.load import load_dataset, preload_images
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.images import to_model_range
from carrara.models.clip import ClipConfig, ClipModel, clip_loss, clip_score, retrieval
from carrara.text.encoder import TextEncoder, mean_pool
from carrara.train.core import TrainConfig, Trainer


@dataclass
class ClipRecipe:
    """What `carrara train clip` builds; saved as the run's config.json."""

    data: str = ""
    size: int = 64
    holdout: int = 300  # distinct captions kept out of training (at most 20 % of them)
    shift: int = 4  # random translation in pixels (edge-padded) as augmentation; 0 turns it off
    model: dict = field(default_factory=lambda: {**dataclasses.asdict(ClipConfig()), "stem_stride": 0})  # 0: by size
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=128, lr=1e-3,
                                                                   warmup_steps=100, ema_decay=0.99))


def split_by_caption(texts: list[str], holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of training and held-out examples; a caption's examples all fall on one side."""
    unique = sorted(set(texts))
    n_out = min(holdout, len(unique) // 5)
    if n_out < 2:
        raise CarraraError(f"the dataset has {len(unique)} distinct captions; CLIP needs at least 10")
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {unique[i] for i in perm[:n_out]}
    is_held = torch.tensor([t in held for t in texts])
    return torch.nonzero(~is_held).squeeze(1), torch.nonzero(is_held).squeeze(1)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image (B, C, H, W) by up to ±max_shift pixels, padding with its edge pixels."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def train_clip(recipe: ClipRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
               stop_at: int | None = None) -> dict:
    """Train the CLIP; returns (and writes to retrieval.json) held-out retrieval and CLIP scores."""
    if recipe.train.grad_accum != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CarraraError("train clip runs in one process without grad_accum: its contrastive loss compares every "
                           "image with every caption of the batch, so splitting the batch would change the loss")
    out = ensure_dir(out)
    dataset = load_dataset(recipe.data, size=recipe.size)
    images, texts = preload_images(dataset, progress=progress)  # (N, 3, H, W) uint8
    text_encoder = TextEncoder.load("minilm")
    unique = sorted(set(texts))
    with torch.inference_mode():
        sent = torch.cat([mean_pool(*text_encoder.encode(unique[i:i + 256]), normalize=False)
                          for i in range(0, len(unique), 256)]).float()  # (U, 384)
    caption_of = torch.tensor([{t: i for i, t in enumerate(unique)}[t] for t in texts])  # (N,)
    train_idx, held_idx = split_by_caption(texts, recipe.holdout, recipe.train.seed)

    config = ClipConfig.from_dict({"stem_stride": 0, **recipe.model, "image_size": recipe.size, "text_dim": sent.shape[1]})
    recipe.model = dataclasses.asdict(config)
    torch.manual_seed(recipe.train.seed)
    model = ClipModel(config)

    def loss_fn(m: ClipModel, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        ex = train_idx[idx]  # dataset indices of this batch (all of it: rows is the whole batch, checked above)
        dev = next(m.parameters()).device
        x = random_shift(to_model_range(images[ex]), recipe.shift, gen).to(dev)
        cap = caption_of[ex]
        return clip_loss(m.encode_image(x), m.encode_text(sent[cap].to(dev)), m.temperature_scale(),
                         same_text=(cap[:, None] == cap[None, :]).to(dev))

    def evaluate(m: ClipModel) -> dict:
        dev = next(m.parameters()).device
        with torch.inference_mode():
            img = torch.cat([m.encode_image(to_model_range(images[held_idx[i:i + 256]]).to(dev)).cpu()
                             for i in range(0, len(held_idx), 256)])  # (H, E)
            held_texts = [texts[i] for i in held_idx.tolist()]
            txt = m.encode_text(sent[caption_of[held_idx]].to(dev)).cpu()
            pos = {t: i for i, t in enumerate(unique)}
            result = retrieval(img, held_texts, lambda ts: m.encode_text(sent[[pos[t] for t in ts]].to(dev)).cpu())
            result["clip_score_matched"] = float(clip_score(img, txt).mean())
            result["clip_score_shuffled"] = float(clip_score(img, txt.roll(1, 0)).mean())
        return {**result, "n_pairs": len(held_idx), "n_captions": len(set(held_texts))}

    def sample_fn(ema: ClipModel, step: int):
        """Log held-out retrieval; the picture is the similarity matrix of 32 held-out pairs."""
        from PIL import Image

        metrics = evaluate(ema)
        trainer.log(f"step {step}: held-out retrieval {metrics}")
        sel = held_idx[:32]
        with torch.inference_mode():
            dev = next(ema.parameters()).device
            sim = (ema.encode_image(to_model_range(images[sel]).to(dev)) @ ema.encode_text(sent[caption_of[sel]].to(dev)).T).cpu()
        pixels = ((sim.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels, mode="L").resize((256, 256), Image.NEAREST)

    def export_fn(ema: ClipModel) -> None:
        ema.save_pretrained(out / "clip")

    trainer = Trainer.for_stage("clip", recipe, out, model, records=dataset.records, report=dataset.report(),
                                n_examples=len(train_idx), loss_fn=loss_fn, sample_fn=sample_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    metrics = evaluate(trainer.ema.model)
    write_json_atomic(out / "retrieval.json", {"held_out": metrics, "train_pairs": len(train_idx)})
    return {**result, "held_out": metrics}
