"""Issue 19's fine-tuning measurement: teach the default model a new concept from 30 images with a LoRA, and measure
what it learnt and what it forgot.

The concept is "cyanotype": an emoji printed as a cyanotype (its luminance mapped from Prussian blue to white), a
style the default model never saw (it was trained on the colour emoji, docs/default-model.md) under a word its
captions never use. From the rendered emoji (`carrara data build emoji`), the simple names (no ":" modifiers) are
shuffled with seed 0 into three disjoint sets: 30 *taught* names (the LoRA's data: "NAME, cyanotype"), 30 *unseen*
names (the concept on names it was not shown) and 64 *old* names (plain prompts, to measure forgetting).

The judge is a `carrara train clip` run on every emoji and its cyanotype twin (`--clip RUN`, or trained here for
`--clip-steps`), so it knows both the objects and the style word. With the same seeds before and after the LoRA:
  new concept  image→text top-1 of each "NAME, cyanotype" image among every prompt of the bench (styled and plain):
               a hit needs the right object *and* the style; and the style rate, the share of those images closer to
               "NAME, cyanotype" than to "NAME";
  old prompts  text→image top-1 / top-5 among the generated images of the 64 old names (as `carrara eval
               --metrics retrieval` counts it), and the drop in points after the LoRA (issue 19: ≤ 5 points);
  and the LoRA's training wall time (with caption encoding, checkpoints and sample grids), its adapter's size, and a
  grid: 8 styled prompts, then 8 old ones, before (top row) and after (bottom row).

    python bench/lora.py [--rank 4] [--steps 500] [--clip RUN | --clip-steps 1500] [--out runs/lora-bench]
    python bench/lora.py --tiny     # seconds, a tiny random model on tiny shapes: checks the bench, measures nothing
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from families import cpu_kind
from PIL import Image, ImageOps

from carrara.data.emoji import build_emoji
from carrara.data.folder import load_folder
from carrara.data.shapes import build_shapes
from carrara.diffusion.schedule import NoiseSchedule
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic, write_text_atomic
from carrara.images import image_grid
from carrara.modelfolder import write_model_folder
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.clip import ClipScorer, retrieval
from carrara.models.config import AutoencoderConfig, UNetConfig
from carrara.models.lora import merge_lora, read_lora, unmerge_lora
from carrara.models.unet import UNet2DConditionModel
from carrara.pipeline import Pipeline
from carrara.train.checkpoint import latest_checkpoint
from carrara.train.clip import ClipRecipe, train_clip
from carrara.train.core import TrainConfig
from carrara.train.diffusion import fine_tune_recipe, train_diffusion

STYLE = "cyanotype"
PRUSSIAN_BLUE = (0, 49, 83)


@dataclass
class Scale:
    """How big the bench is."""

    size: int = 64
    taught: int = 30
    unseen: int = 30
    old: int = 64
    steps: int = 500
    clip_steps: int = 1500
    tiny: bool = False


FULL = Scale()
TINY = Scale(size=16, taught=6, unseen=4, old=8, steps=4, clip_steps=6, tiny=True)


def cyanotype(image: Image.Image) -> Image.Image:
    """The style: luminance mapped linearly from Prussian blue (dark) to white (light)."""
    return ImageOps.colorize(image.convert("L"), black=PRUSSIAN_BLUE, white=(255, 255, 255))


def source_images(out: Path, scale: Scale, progress: bool) -> dict[str, Image.Image]:
    """Name → image: the emoji with simple names (tiny: `shapes` captions), each name once."""
    folder = out / ("shapes" if scale.tiny else "emoji")
    if not (folder / "metadata.jsonl").is_file():
        if scale.tiny:
            build_shapes(folder, n=48, size=scale.size, seed=0, progress=False, overwrite=True)
        else:
            build_emoji(folder, size=scale.size, progress=progress, overwrite=True)
    data = load_folder(folder, size=scale.size)
    names = {}
    for i, record in enumerate(data.records):
        if ":" not in record.text and record.text not in names:
            names[record.text] = data.load_image(i)
    return names


def split_names(names: list[str], scale: Scale, regularize: int = 0) -> dict[str, list[str]]:
    """Disjoint taught / unseen / old names, shuffled with seed 0, and `regularize` more for prior preservation."""
    order = sorted(names)
    random.Random(0).shuffle(order)
    a, b = scale.taught, scale.taught + scale.unseen
    c = b + scale.old
    return {"taught": order[:a], "unseen": order[a:b], "old": order[b:c], "regular": order[c:c + regularize]}


def write_folder(folder: Path, items: list[tuple[str, Image.Image]]) -> Path:
    """A captioned image folder (PNG files + metadata.jsonl), written once."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    ensure_dir(folder)
    lines = []
    for i, (text, image) in enumerate(items):
        save_image_atomic(folder / f"{i:05d}.png", image)
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": text}))
    write_text_atomic(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    return folder


def tiny_base(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A tiny random model folder (16-px images) standing in for the default model in --tiny (bench/distill.py's
    teacher too)."""
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                           norm_num_groups=8, cross_attention_dim=384, attention_head_dim=(2, 4),
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                          latent_channels=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                                          up_block_types=("UpDecoderBlock2D",) * 2))
    write_model_folder(folder, unet=unet, vae=vae, text_encoder="minilm",
                       scheduler_config=NoiseSchedule.from_config(
                           "scaled_linear", prediction_type=prediction_type).to_diffusers_config())
    return folder


def judge(out: Path, args, scale: Scale, names: dict[str, Image.Image], progress: bool) -> tuple[Path, float | None]:
    """The CLIP run that scores the bench (given, or trained here on every image and its cyanotype twin)."""
    if args.clip:
        return Path(args.clip), None
    run = out / "clip"
    recipe = ClipRecipe(data=str(write_folder(out / "judge-data", [(n, im) for n, im in names.items()]
                                              + [(f"{n}, {STYLE}", cyanotype(im)) for n, im in names.items()])),
                        size=scale.size)
    recipe.train.steps = args.clip_steps or scale.clip_steps
    if scale.tiny:
        recipe.holdout, recipe.shift = 4, 1
        recipe.model = {"channels": [8, 16], "embed_dim": 32, "groups": 4}
        recipe.train = TrainConfig(steps=recipe.train.steps, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2,
                                   checkpoint_every=scale.clip_steps, sample_every=scale.clip_steps, bf16=False)
    if finished(run, recipe.train.steps):
        return run, None
    started = time.perf_counter()
    train_clip(recipe, run, resume=latest_checkpoint(run) is not None, progress=progress)
    return run, time.perf_counter() - started


def finished(run: Path, steps: int) -> bool:
    ckpt = latest_checkpoint(run)
    return ckpt is not None and int(ckpt.name.split("_")[1]) >= steps


def train_lora(out: Path, base: str, concept: Path, args, scale: Scale, progress: bool) -> dict:
    """The LoRA run (`carrara train diffusion --from BASE --lora-rank R`): resumed if interrupted, kept if done."""
    run = out / ("lora" if not args.regularize else f"lora-reg{args.regularize}")
    recipe = fine_tune_recipe(str(concept), base, lora_rank=args.rank)
    recipe.train.steps = args.steps or scale.steps
    if scale.tiny:
        recipe.train = TrainConfig(steps=recipe.train.steps, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1,
                                   checkpoint_every=2, sample_every=recipe.train.steps, bf16=False)
    wall = None
    if not (finished(run, recipe.train.steps) and (run / "lora.safetensors").is_file()):
        started = time.perf_counter()
        train_diffusion(recipe, run, resume=latest_checkpoint(run) is not None, progress=progress)
        wall = round(time.perf_counter() - started, 1)
    return {"run": str(run), "file": str(run / "lora.safetensors"), "rank": args.rank, "steps": recipe.train.steps,
            "batch_size": recipe.train.batch_size, "lr": recipe.train.lr, "train_wall_s": wall,
            "adapter_bytes": (run / "lora.safetensors").stat().st_size}


def generate(pipe: Pipeline, prompts: list[str]) -> list[Image.Image]:
    """Image i from seed i (batches of 32), the default sampling settings."""
    return [im for i in range(0, len(prompts), 32) for im in pipe(prompts[i:i + 32], seed=i)]


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → (N, 3, H, W) uint8, what the CLIP scorer embeds."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def score(scorer: ClipScorer, images: dict[str, list[Image.Image]], prompts: dict[str, list[str]]) -> dict:
    """The bench's numbers for one model's images (see the module docstring)."""
    every = [p for group in prompts.values() for p in group]
    candidates = sorted(set(every))
    text_emb = scorer.embed_texts(candidates)  # (U, E)
    out = {}
    for group in ("taught", "unseen"):
        styled = prompts[f"{group}_styled"]
        emb = scorer.embed_images(to_uint8(images[f"{group}_styled"]))  # (N, E)
        best = (emb @ text_emb.T).argmax(1)  # (N,)
        out[f"{group}_concept_i2t_top1"] = float(sum(candidates[j] == p for j, p in zip(best.tolist(), styled))
                                                 / len(styled))
        plain = scorer.embed_texts([p.removesuffix(f", {STYLE}") for p in styled])
        own = scorer.embed_texts(styled)
        out[f"{group}_style_rate"] = float(((emb * own).sum(1) > (emb * plain).sum(1)).float().mean())
    old = retrieval(scorer.embed_images(to_uint8(images["old"])), prompts["old"], scorer.embed_texts)
    out["old_t2i_top1"], out["old_t2i_top5"] = old["t2i_top1"], old["t2i_top5"]
    return out


def run(args: argparse.Namespace) -> dict:
    scale = TINY if args.tiny else FULL
    progress = not args.quiet
    out = ensure_dir(args.out or ("runs/lora-bench-tiny" if args.tiny else "runs/lora-bench"))
    names = source_images(out, scale, progress)
    sets = split_names(list(names), scale, args.regularize)
    # prior preservation (DreamBooth, Ruiz et al. 2023, in its simplest form): plain images under plain captions
    # beside the styled ones, so the adapter learns the style with its word, not for every prompt
    concept = write_folder(out / ("concept" if not args.regularize else f"concept-reg{args.regularize}"),
                           [(f"{n}, {STYLE}", cyanotype(names[n])) for n in sets["taught"]]
                           + [(n, names[n]) for n in sets["regular"]])
    base = str(tiny_base(out / "base")) if args.tiny else args.model
    clip_run, clip_wall = judge(out, args, scale, names, progress)
    lora = train_lora(out, base, concept, args, scale, progress)
    prompts = {"taught_styled": [f"{n}, {STYLE}" for n in sets["taught"]],
               "unseen_styled": [f"{n}, {STYLE}" for n in sets["unseen"]], "old": sets["old"]}
    pipe = Pipeline.load(base, precision=args.precision, auto_int8=False)  # the LoRA merges into its weights
    started = time.perf_counter()
    before = {k: generate(pipe, v) for k, v in prompts.items()}
    by_weight = {}
    for weight in args.weights:
        originals = merge_lora(pipe.unet, read_lora(lora["file"]), weight)
        by_weight[weight] = {k: generate(pipe, v) for k, v in prompts.items()}
        unmerge_lora(pipe.unet, originals)
    after = by_weight[args.weights[0]]
    sampling = time.perf_counter() - started
    scorer = ClipScorer.load(clip_run)
    result = {"cpu": cpu_kind(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
              "model": base, "style": STYLE, "size": scale.size, "names": sets, "lora": lora,
              "clip": {"run": str(clip_run), "steps": None if args.clip else args.clip_steps or scale.clip_steps,
                       "train_wall_s": None if clip_wall is None else round(clip_wall, 1)},
              "regularize": args.regularize, "weights": args.weights,
              "sampling_s_per_image": round(sampling / ((1 + len(args.weights)) * sum(len(v) for v in prompts.values())),
                                            3),
              "before": score(scorer, before, prompts), "after": score(scorer, after, prompts),
              "after_by_weight": {str(w): score(scorer, images, prompts) for w, images in by_weight.items()}}
    result["old_t2i_top5_drop_points"] = round(100 * (result["before"]["old_t2i_top5"]
                                                      - result["after"]["old_t2i_top5"]), 1)
    shown = [("taught_styled", 4), ("unseen_styled", 4), ("old", 8)]  # the grid's columns: the first k of each set
    cells = [images[k][i] for images in (before, after) for k, n in shown for i in range(n)]
    grid = args.grid or (out / "lora-grid.png" if args.tiny else "docs/images/lora-grid.png")
    save_image_atomic(grid, image_grid(cells, rows=2))
    result["grid"] = str(grid)
    json_path = args.json or f"bench/results/lora{'-tiny' if args.tiny else ''}.json"
    write_json_atomic(json_path, result)
    print(json.dumps({k: result[k] for k in ("before", "after", "old_t2i_top5_drop_points")}, indent=1))
    print(f"LoRA: {lora['steps']} steps in {lora['train_wall_s']} s ({result['cpu']['kind']}); wrote {json_path}")
    return result


def _weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes numbers separated by commas, got {text!r}") from None
    return weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="the model to teach (default: the packaged one)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--steps", type=int, default=None, help=f"LoRA steps (default {FULL.steps})")
    p.add_argument("--clip", help="a `carrara train clip` run that knows the style word (default: train one here)")
    p.add_argument("--clip-steps", type=int, default=None, help=f"steps of that CLIP (default {FULL.clip_steps})")
    p.add_argument("--precision", default="auto", help="sampling precision (default auto)")
    p.add_argument("--out", help="runs folder (default runs/lora-bench, tiny runs/lora-bench-tiny)")
    p.add_argument("--json", help="results (default bench/results/lora.json, tiny lora-tiny.json)")
    p.add_argument("--grid", help="the grid (default docs/images/lora-grid.png, tiny OUT/lora-grid.png)")
    p.add_argument("--regularize", type=int, default=0, metavar="N", help="prior preservation: N plain emoji of "
                   "other names under plain captions in the LoRA's data (default 0)")
    p.add_argument("--weights", type=_weights, default=[1.0], help="adapter weights to score, comma-separated; the "
                   "first is 'after' (default 1)")
    p.add_argument("--tiny", action="store_true", help="seconds on a tiny random model: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
