"""Memorisation check: is a generated image a near-copy of a training image?

For each generated image, the nearest training image in CLIP space (cosine distance 1 − cos of a `carrara train
clip` run's unit embeddings) and in pixel space (root-mean-square difference of the 64-px images in [0, 1], i.e. the
L2 distance divided by √(3·64·64)), as Somepalli et al. 2023 (feature space) and Carlini et al. 2023 (pixel ℓ2)
look for copies. What counts as "close" is calibrated on real near-duplicates in the training data: the emoji set
holds the skin-tone variants of one emoji (metadata field `base`, data/emoji.py), and a generated image that is as
close to a training image as a typical variant is to its nearest sibling (the median, by default) is flagged.
Data without such groups are calibrated on 2-pixel shifts of their own images instead; the report says which.
An image is flagged as a copy when it is that close in both spaces; the share in each space is reported too.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from carrara.data.folder import load_folder
from carrara.data.load import preload_images
from carrara.errors import CarraraError
from carrara.evaluate.suite import EvalSettings, generate_images
from carrara.families.pipeline import load_any
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic
from carrara.images import image_grid, to_model_range, to_pil
from carrara.models.clip import ClipScorer

PIXEL_SIDE = 64
SHIFT = 2  # pixels: the fallback near-duplicate, at the data's own resolution


def pixel_vectors(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → (N, 3·64·64) float in [0, 1], resized to 64 px (antialiased bilinear)."""
    x = images.float() / 255.0
    if x.shape[-1] != PIXEL_SIDE or x.shape[-2] != PIXEL_SIDE:
        x = F.interpolate(x, size=(PIXEL_SIDE, PIXEL_SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x.flatten(1)


def distances(a: torch.Tensor, b: torch.Tensor, space: str) -> torch.Tensor:
    """(A, B) distances: 1 − cos for unit CLIP embeddings, RMS difference for pixel vectors."""
    if space == "clip":
        return 1.0 - a @ b.T
    return torch.cdist(a, b) / a.shape[1] ** 0.5


def nearest(a: torch.Tensor, b: torch.Tensor, space: str, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a, the distance to its nearest row of b and that row's index: (A,), (A,)."""
    out_d, out_i = [], []
    for i in range(0, len(a), chunk):
        d, j = distances(a[i:i + chunk], b, space).min(dim=1)
        out_d.append(d)
        out_i.append(j)
    return torch.cat(out_d), torch.cat(out_i)


def near_duplicate_groups(records, field: str = "base") -> list[list[int]]:
    """Indices of training images that are variants of one thing (same `field`, ≥ 2 of them), e.g. skin tones."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        if field in r.extra:
            groups[str(r.extra[field])].append(i)
    return [g for g in groups.values() if len(g) >= 2]


def shift(images: torch.Tensor, pixels: int = SHIFT) -> torch.Tensor:
    """Each image moved right and down by `pixels`, its edge pixels repeated (uint8 in, uint8 out)."""
    padded = F.pad(images.float(), (pixels, 0, pixels, 0), mode="replicate")
    return padded[..., :images.shape[-2], :images.shape[-1]].round().to(torch.uint8)


@dataclass
class Calibration:
    """Distances between real near-duplicates, and the thresholds they give."""

    source: str
    pairs: int
    clip: float
    pixel: float
    quantile: float


def calibrate(features: dict[str, torch.Tensor], images: torch.Tensor, records, embed, *, field: str = "base",
              quantile: float = 0.5) -> Calibration:
    """The `quantile` of each near-duplicate's distance to its nearest sibling, in each space."""
    groups = near_duplicate_groups(records, field)
    found: dict[str, list[torch.Tensor]] = {"clip": [], "pixel": []}
    if groups:
        for g in groups:
            for space, values in found.items():
                d = distances(features[space][g], features[space][g], space)  # (|g|, |g|)
                values.append((d + torch.eye(len(g)) * 1e9).min(dim=1).values)  # nearest other variant
        source = f"{field} groups (variants of one item, e.g. skin tones): {len(groups)} groups"
    else:
        moved = shift(images)
        moved_features = {"clip": embed(moved), "pixel": pixel_vectors(moved)}
        for space, values in found.items():
            values.append(distances(features[space], moved_features[space], space).diagonal())
        source = f"{SHIFT}-pixel shifts of the training images (the data have no '{field}' groups)"
    clip, pixel = torch.cat(found["clip"]), torch.cat(found["pixel"])
    return Calibration(source, len(clip), float(clip.quantile(quantile)), float(pixel.quantile(quantile)), quantile)


def memorisation(generated: torch.Tensor, train: torch.Tensor, records, scorer: ClipScorer, *, field: str = "base",
                 quantile: float = 0.5) -> dict:
    """Nearest training image of each generated one (uint8 (G, 3, H, W) vs (N, 3, H', W')) and the copy shares."""
    if len(generated) == 0 or len(train) == 0:
        raise CarraraError("the memorisation check needs generated images and training images")
    embed = scorer.embed_images
    train_features = {"clip": embed(train), "pixel": pixel_vectors(train)}
    gen_features = {"clip": embed(generated), "pixel": pixel_vectors(generated)}
    cal = calibrate(train_features, train, records, embed, field=field, quantile=quantile)
    report: dict = {"calibration": asdict(cal), "n_generated": len(generated), "n_train": len(train),
                    "clip": scorer.name, "pixel_side": PIXEL_SIDE, "nearest": []}
    close = {}
    for space in ("clip", "pixel"):
        d, j = nearest(gen_features[space], train_features[space], space)
        close[space] = d <= getattr(cal, space)
        report[f"share_close_{space}"] = float(close[space].float().mean())
        for g, (dist, idx) in enumerate(zip(d.tolist(), j.tolist())):
            if space == "clip":
                report["nearest"].append({})
            report["nearest"][g].update({f"{space}_distance": dist, f"{space}_nearest": records[idx].file_name})
    flagged = close["clip"] & close["pixel"]
    report["share_copies"] = float(flagged.float().mean())
    report["copies"] = torch.nonzero(flagged).flatten().tolist()
    return report


def closest_pairs_figure(generated: torch.Tensor, train: torch.Tensor, records, report: dict, *, k: int = 8,
                         labels: list[str] | None = None):
    """The k generated images nearest to a training image in pixel space, each beside that image."""
    index = {r.file_name: i for i, r in enumerate(records)}
    order = sorted(range(len(report["nearest"])), key=lambda g: report["nearest"][g]["pixel_distance"])[:k]
    side = max(generated.shape[-1], train.shape[-1])
    pictures, captions = [], []
    for g in order:
        near = report["nearest"][g]
        t = index[near["pixel_nearest"]]
        for image in (generated[g], train[t]):
            pictures += to_pil(F.interpolate(to_model_range(image[None]), size=(side, side), mode="nearest"))
        captions += [f"generated {g}" + (f": {labels[g]}" if labels else ""),
                     f"train {records[t].text} rms {near['pixel_distance']:.3f} clip {near['clip_distance']:.3f}"]
    return image_grid(pictures, rows=len(order), labels=captions, scale=max(1, 128 // side))


@dataclass
class MemorisationSettings:
    """What `carrara eval memorisation` does (written into its JSON)."""

    model: str
    data: str
    clip: str
    n: int = 200
    seed: int = 0
    field: str = "base"
    quantile: float = 0.5
    steps: int = EvalSettings.steps
    sampler: str = EvalSettings.sampler
    guidance: float = EvalSettings.guidance
    allow_pickle: bool = False


def run_memorisation(settings: MemorisationSettings, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Generate n images from the data's captions, check them, write memorisation.json and closest_pairs.png."""
    if not 0.0 < settings.quantile <= 1.0:
        raise CarraraError(f"--quantile must be in (0, 1], got {settings.quantile}")
    out_dir = ensure_dir(out_dir)
    scorer = ClipScorer.load(settings.clip)
    dataset = load_folder(settings.data)
    train, texts = preload_images(dataset, progress=progress)
    rng = random.Random(settings.seed)
    prompts = [texts[rng.randrange(len(texts))] for _ in range(settings.n)]
    pipe = load_any(settings.model, allow_pickle=settings.allow_pickle)
    eval_settings = EvalSettings(model=settings.model, n=settings.n, steps=settings.steps, sampler=settings.sampler,
                                 guidance=settings.guidance, seed=settings.seed)
    generated = generate_images(pipe, prompts, eval_settings, progress)
    report = memorisation(generated, train, dataset.records, scorer, field=settings.field, quantile=settings.quantile)
    for item, prompt in zip(report["nearest"], prompts):
        item["prompt"] = prompt
    report = {"settings": asdict(settings), "model_hash": pipe.model_hash, **report}
    write_json_atomic(out_dir / "memorisation.json", report)
    save_image_atomic(out_dir / "closest_pairs.png",
                      closest_pairs_figure(generated, train, dataset.records, report, labels=prompts))
    return report


def format_report(report: dict) -> str:
    cal = report["calibration"]
    return (f"{report['n_generated']} generated vs {report['n_train']} training images: nearer than real near-"
            f"duplicates (quantile {cal['quantile']:g} of {cal['pairs']}, {cal['source']}; thresholds 1−cos {cal['clip']:.4f}, "
            f"rms {cal['pixel']:.4f}): CLIP space {report['share_close_clip']:.1%}, pixel space "
            f"{report['share_close_pixel']:.1%}, both (flagged as copies) {report['share_copies']:.1%}")
