"""Train the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, §4.1) on `shapes` latents.

Latents come from a trained autoencoder, scaled as the U-Net sees them, and are noised with the diffusion schedule:
x_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε with t ~ U{0, …, T − 1} (guided-diffusion's classifier_train.py), so the classifier
knows y from any x_t the sampler visits. Labels are `shapes`' ground truth (metadata.jsonl): shape, colour, size and
position of one-object images, and for two-object images the relation of each object (by its colour) to the other.
The last `holdout` images are not trained on; the run reports accuracy on them at a few noise levels.
The run folder holds classifier/ (config.json, weights, scheduler_config.json): `carrara generate --classifier RUN`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from carrara.data import shapes
from carrara.data.load import load_dataset, preload_images
from carrara.diffusion.schedule import NoiseSchedule, add_noise
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.models.classifier import (
    BY_COLOR,
    PAIR_SHAPE,
    RELATION,
    RELATION_BY,
    ClassifierConfig,
    NoiseAwareClassifier,
)
from carrara.train.cache import encode_latents
from carrara.train.core import TrainConfig, Trainer
from carrara.train.diffusion import first_stage

IGNORE = -100  # a label the example does not have (F.cross_entropy's ignore_index)
HEADS = {"shape": list(shapes.SHAPES), "color": list(shapes.COLORS), "size": list(shapes.SIZES),
         "position": list(shapes.POSITIONS)}


def default_classifier_model() -> dict:
    """~1.5M parameters on 16×16×4 latents: 16² → 8² → 4², attention pooling over the 4² grid."""
    return dataclasses.asdict(ClassifierConfig(block_out_channels=(64, 128, 128), heads=dict(HEADS)))


@dataclass
class ClassifierRecipe:
    """What `carrara train classifier` builds; saved as the run's config.json."""

    data: str = ""
    autoencoder: str = ""
    size: int = 64
    schedule: str = "scaled_linear"  # the diffusion model's: guidance checks that they agree
    num_train_timesteps: int = 1000
    relation: bool = True  # also learn the two-object relation head
    pair_shapes: bool = True  # and the head of a pair's shapes (each colour's object's shape)
    holdout: int = 200  # the last images, kept out of training for the accuracy report (at most a fifth of the data)
    model: dict = field(default_factory=default_classifier_model)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, batch_size=64, lr=3e-4,
                                                                   sample_every=10**9))


def shape_labels(records: list, relation: bool, pair_shapes: bool = False) -> dict[str, torch.Tensor]:
    """Per head, each image's class index (N,), IGNORE where it has none; the relation's and the pair shapes'
    (N, n_colors)."""
    colors = HEADS[RELATION_BY]
    labels = {name: torch.full((len(records),), IGNORE) for name in HEADS}
    if relation:
        labels[RELATION] = torch.full((len(records), len(colors)), IGNORE)
    if pair_shapes:
        labels[PAIR_SHAPE] = torch.full((len(records), len(colors)), IGNORE)
    for i, record in enumerate(records):
        objects = record.extra.get("objects")
        if not isinstance(objects, list) or not objects:
            raise CarraraError(f"{record.file_name}: no `objects` in its metadata: the classifier trains on `shapes` "
                               "data (carrara data build shapes --out DIR)")
        if len(objects) == 1:
            for name, classes in HEADS.items():
                labels[name][i] = classes.index(objects[0][name])
        elif relation and record.extra.get("relation") in shapes.INVERSE:
            a, b = objects[0], objects[1]
            rel = record.extra["relation"]
            labels[RELATION][i, colors.index(a["color"])] = shapes.RELATIONS.index(rel)
            labels[RELATION][i, colors.index(b["color"])] = shapes.RELATIONS.index(shapes.INVERSE[rel])
        if len(objects) == 2 and pair_shapes and objects[0]["color"] != objects[1]["color"]:
            for o in objects:
                labels[PAIR_SHAPE][i, colors.index(o["color"])] = HEADS["shape"].index(o["shape"])
    return labels


def classifier_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over heads of the mean cross-entropy over the examples that have that label (0 for a head with none)."""
    total = torch.zeros((), device=next(iter(logits.values())).device)
    for name, y in labels.items():
        scores = logits[name].flatten(0, 1) if name in BY_COLOR else logits[name]  # (B·n_colors, K) or (B, K)
        y = y.flatten()
        if (y != IGNORE).any():
            total = total + F.cross_entropy(scores.float(), y, ignore_index=IGNORE)
    return total


@torch.no_grad()
def accuracy(model: NoiseAwareClassifier, z0: torch.Tensor, labels: dict[str, torch.Tensor], t: int,
             schedule: NoiseSchedule, seed: int = 0) -> dict[str, float]:
    """Share of labelled examples each head gets right at noise level t (NaN for a head without labels)."""
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    logits = model.eval()(add_noise(schedule, z0, noise, t), torch.full((len(z0),), t))
    out = {}
    for name, y in labels.items():
        scores = logits[name].flatten(0, 1) if name in BY_COLOR else logits[name]
        y, keep = y.flatten(), y.flatten() != IGNORE
        out[name] = float((scores.argmax(-1)[keep] == y[keep]).float().mean()) if keep.any() else float("nan")
    return out


def train_classifier(recipe: ClassifierRecipe, out: str | Path, *, resume: bool = False,
                     progress: bool = True, stop_at: int | None = None) -> dict:
    """Encode the images once, then train the classifier on noisy latents; writes out/classifier/."""
    out = ensure_dir(out)
    schedule = NoiseSchedule.from_config(recipe.schedule, T=recipe.num_train_timesteps)
    vae, _ = first_stage(recipe.autoencoder, recipe.size)  # a trained autoencoder, or "pixels[:F]" (Imagen's route)
    dataset = load_dataset(recipe.data, size=recipe.size)
    labels = shape_labels(dataset.records, recipe.relation, recipe.pair_shapes)
    images, _ = preload_images(dataset, progress=progress)  # (N, 3, H, W) uint8
    mean, std = encode_latents(vae, images, progress=progress)  # (N, c, h, w) each, unscaled
    scale = vae.config.scaling_factor
    holdout = min(recipe.holdout, len(mean) // 5)
    n_train = len(mean) - holdout
    if n_train < 1:
        raise CarraraError(f"{recipe.data}: too few images to train a classifier")

    config = ClassifierConfig(**{**recipe.model, "in_channels": mean.shape[1], "sample_size": mean.shape[-1],
                                 "heads": dict(HEADS), "relations": list(shapes.RELATIONS) if recipe.relation else [],
                                 "pair_shapes": recipe.pair_shapes})
    recipe.model = dataclasses.asdict(config)
    torch.manual_seed(recipe.train.seed)
    model = NoiseAwareClassifier(config)

    def loss_fn(model: NoiseAwareClassifier, idx: torch.Tensor, gen: torch.Generator, rows: slice) -> torch.Tensor:
        # Random numbers are drawn for the whole batch idx, then this call's rows are kept (train/core.py).
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale  # z0 ~ q(z|x), scaled
        t = torch.randint(0, schedule.T, (len(idx),), generator=gen)  # t ~ U{0, …, T − 1}
        x_t = add_noise(schedule, z0, torch.randn(z0.shape, generator=gen), t)  # (B, c, h, w)
        dev = next(model.parameters()).device
        logits = model(x_t[rows].to(dev), t[rows].to(dev))
        return classifier_loss(logits, {k: v[idx][rows].to(dev) for k, v in labels.items()})

    def export_fn(ema: NoiseAwareClassifier) -> None:
        ema.save_pretrained(out / "classifier")
        write_json_atomic(out / "classifier" / "scheduler_config.json", schedule.to_diffusers_config())

    trainer = Trainer.for_stage("classifier", recipe, out, model, records=dataset.records, report=dataset.report(),
                                n_examples=n_train, loss_fn=loss_fn, export_fn=export_fn)
    result = trainer.fit(resume=resume, progress=progress, stop_at=stop_at)
    held = {}
    if holdout:
        z0 = mean[n_train:] * scale  # the posterior means of the held-out images
        rest = {k: v[n_train:] for k, v in labels.items()}
        held = {t: accuracy(trainer.ema.model, z0, rest, t, schedule) for t in (0, schedule.T // 4, schedule.T // 2,
                                                                                3 * schedule.T // 4)}
        trainer.log(f"held-out accuracy ({holdout} images) by t: {json.dumps(held)}")
    return {**result, "n_images": len(mean), "accuracy": held, "holdout": holdout}
