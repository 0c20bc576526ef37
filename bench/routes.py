"""Issue 17, item 3: the two intermediate products of the lectures' framework on `shapes`, at equal CPU-minutes.

Both routes make 64-px images of the same `shapes` scenes (5,000, seed 0) from the same captions:
  latent  Stable Diffusion's route, recipes/shapes.toml: a KL autoencoder (f = 4, 16×16×4 latents) and a
          v-prediction U-Net on its latents;
  imagen  Imagen's route, recipes/shapes-imagen.toml: a v-prediction U-Net on 32×32×3 pixels (the pixel codec,
          carrara/models/codec.py; the scenes rendered at 32 px) and the text-conditioned diffusion upsampler
          32 → 64 (carrara/upsampler.py), assembled as a cascade, so `Pipeline.load` runs base → upsampler.
Each route gets `--minutes M` of training. It spends SECOND_STAGE_SHARE (a quarter) on the stage that turns its
intermediate product into the 64-px image — the autoencoder, the upsampler — and three quarters on the
text-conditioned generator — the latent U-Net, the pixel base (bench/families.py's split, close to the shapes
recipe's own 12.9 : 42.1 min). Each stage first trains a few steps in a throwaway folder, on 512 images, to measure
its seconds per step (the median after the first step); its steps are then budget / (seconds per step), and the
real run's steps, wall time and the time of its steps alone are recorded. A trained stage is not trained again, an
interrupted one resumes with its planned steps, and a route's numbers are kept in out/eval/ROUTE/ for the same
settings.

Judged per route, at 64 px (one-object captions; image i of every set from seed i; the sampling defaults of
diffusion/settings.py for the generator, the upsampler's own recorded settings for the second stage):
  faithfulness (color, position, size, shape, all): `evaluate_faithfulness`, n = `--n`, beside the detector's
    ceiling on the renderer's own 64-px images;
  FD, KID and CLIP score against 1,000 held-out real 64-px images (seed 1) with the features of a `carrara train
    clip` run at 64 px (`--clip RUN`, or one trained here for `--clip-minutes`): `run_eval`, n_gen = `--n-fd`;
  seconds per image at batch 16 and for one image (median of 3 calls after a warm-up), the imagen route's base
    alone beside; the parameters of every trained network (autoencoder + U-Net; base U-Net + upsampler U-Net);
  a grid of the same 8 prompts and seeds: latent 64 px, the imagen base's 32 px (enlarged), imagen 64 px.

    python bench/routes.py --minutes 60 [--n 200] [--n-fd 1000] [--clip RUN | --clip-minutes 5] [--out runs/routes]
    python bench/routes.py --tiny        # seconds per stage on tiny data: checks the bench, measures nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from families import (
    FAITHFULNESS,
    bench_scale,
    check_clip,
    chosen,
    cpu_kind,
    families_grid,
    image_row,
    pick,
    seconds_per_step,
    step_seconds,
    train_config,
)

from carrara.data.shapes import build_shapes
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.evaluate.faithfulness import detector_ceiling, evaluate_faithfulness
from carrara.evaluate.suite import EvalSettings, run_eval
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic
from carrara.models.codec import PixelCodec
from carrara.pipeline import Pipeline
from carrara.recipe import apply_overrides, flatten, load_recipe_file
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
from carrara.train.clip import ClipRecipe, train_clip
from carrara.train.diffusion import DiffusionRecipe, train_diffusion
from carrara.train.upsampler import UpsamplerRecipe, train_upsampler
from carrara.upsampler import assemble_cascade

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"latent": ROOT / "recipes" / "shapes.toml", "imagen": ROOT / "recipes" / "shapes-imagen.toml"}
SECOND_STAGE_SHARE = 0.25  # of a route's minutes: the autoencoder's / the upsampler's
ROUTES = {  # route → its stages in training order, with each stage's share of the budget
    "latent": (("autoencoder", SECOND_STAGE_SHARE), ("diffusion", 1 - SECOND_STAGE_SHARE)),
    "imagen": (("base", 1 - SECOND_STAGE_SHARE), ("upsampler", SECOND_STAGE_SHARE)),
}
PROBE_IMAGES = 512  # images a probe trains on


@dataclass
class Scale:
    """How big the bench is: the data, the evaluation's sample counts, and recipe overrides (tiny only)."""

    size: int  # the routes' output side; the imagen base works at size / 2
    n_train: int
    n_heldout: int
    n: int  # faithfulness captions
    n_fd: int  # generated images for FD, KID and CLIP score
    bootstrap: int
    probe_steps: int
    minutes: float
    clip_minutes: float
    checkpoints: int  # per training run
    sampling_batch: int  # images per timed batch call
    steps: int = DEFAULTS.steps  # the generator's sampling steps (the upsampler's are its own)
    timing_rounds: int = 3  # timed calls per measurement, after one warm-up call
    models: dict = field(default_factory=dict)  # stage → model overrides
    batch: dict = field(default_factory=dict)  # stage → batch size override
    overrides: dict = field(default_factory=dict)  # stage → other recipe fields (dotted keys)


FULL = Scale(size=64, n_train=5000, n_heldout=1000, n=200, n_fd=1000, bootstrap=50, probe_steps=6, minutes=60,
             clip_minutes=5, checkpoints=4, sampling_batch=16)
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": [2, 4],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
TINY_GRID = {"sample_prompts": ["a large red circle on the left"]}  # one-prompt training grids
TINY = Scale(size=32, n_train=24, n_heldout=12, n=4, n_fd=8, bootstrap=5, probe_steps=3, minutes=0.01,
             clip_minutes=0.01, checkpoints=1, sampling_batch=4, steps=2, timing_rounds=1, models={
                 "autoencoder": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8,
                                 "down_block_types": ["DownEncoderBlock2D"] * 2,
                                 "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4},
                 "diffusion": TINY_UNET, "base": TINY_UNET,
                 "upsampler": {**TINY_UNET, "class_embed_type": "timestep"},
                 "clip": {"channels": [8, 16], "embed_dim": 16, "groups": 4},
             }, batch=dict.fromkeys(("autoencoder", "diffusion", "base", "upsampler", "clip"), 4),
             overrides={"upsampler": {"crop": 16, "sampling.steps": 2}, "diffusion": TINY_GRID, "base": TINY_GRID})


def sample_prompts() -> list[str]:
    """The shapes recipe's 8 sample prompts: the grid's columns (the imagen recipe has the same)."""
    return list(load_recipe_file(RECIPES["latent"])["diffusion"]["sample_prompts"])


def build_data(out: Path, scale: Scale, progress: bool) -> dict[str, Path]:
    """The training scenes (seed 0) at the output side and at the base's half side, held-out real images (seed 1)
    at the output side, and the probes' first PROBE_IMAGES scenes at both sides; each built once."""
    half = scale.size // 2
    probe = min(scale.n_train, PROBE_IMAGES)
    specs = {"data": (scale.n_train, scale.size, 0), "data_half": (scale.n_train, half, 0),
             "heldout": (scale.n_heldout, scale.size, 1), "probe": (probe, scale.size, 0),
             "probe_half": (probe, half, 0)}
    folders = {}
    for name, (n, size, seed) in specs.items():
        folder = out / f"{name.split('_')[0]}{size}"
        if not (folder / "metadata.jsonl").is_file():
            build_shapes(folder, n=n, size=size, seed=seed, progress=progress, overwrite=True)
        folders[name] = folder
    return folders


def stage_recipe(route: str, stage: str, steps: int, ctx: dict, probe: bool):
    """(recipe, train function) of one stage at `steps`, with its route's recipe file's settings."""
    scale, data, out = ctx["scale"], ctx["data"], ctx["out"]
    full, half = str(data["probe" if probe else "data"]), str(data["probe_half" if probe else "data_half"])
    table = ctx["recipes"].get(route, {})
    if stage == "autoencoder":
        recipe, train = AutoencoderRecipe(data=full, size=scale.size), train_autoencoder
        apply_overrides(recipe, flatten(table["autoencoder"]))
    elif stage == "diffusion":
        recipe, train = DiffusionRecipe(data=full, size=scale.size, autoencoder=str(out / route / "autoencoder")), \
            train_diffusion
        apply_overrides(recipe, flatten(table["diffusion"]))
    elif stage == "base":
        recipe, train = DiffusionRecipe(data=half, size=scale.size // 2), train_diffusion
        apply_overrides(recipe, flatten(table["diffusion"]))  # autoencoder = "pixels"
    elif stage == "upsampler":
        recipe, train = UpsamplerRecipe(data=full), train_upsampler
        apply_overrides(recipe, flatten(table["upsampler"]))
        recipe.size = scale.size
    else:
        recipe, train = ClipRecipe(data=full, size=scale.size), train_clip
        recipe.holdout = min(recipe.holdout, scale.n_train // 10)
    apply_overrides(recipe, scale.overrides.get(stage, {}))
    recipe.model = {**recipe.model, **scale.models.get(stage, {})}
    recipe.train = train_config(recipe.train, steps, scale.batch.get(stage), scale.checkpoints, probe)
    return recipe, train


def train_in_budget(route: str, stage: str, seconds: float, ctx: dict) -> dict:
    """Probe the stage's seconds per step, then train it for as many steps as fit in `seconds` (once: a stage with
    budget.json is done; one with plan.json was interrupted and resumes with the planned steps)."""
    run = ctx["out"] / route / stage
    if (run / "plan.json").is_file():
        plan = json.loads((run / "plan.json").read_text())
        if plan["budget_s"] != round(seconds, 2):
            raise CarraraError(f"{run} was planned for {plan['budget_s'] / 60:g} min, not {seconds / 60:g}: "
                               "give the same --minutes, or another --out")
        if (run / "budget.json").is_file():
            return plan
    else:
        probe = ctx["out"] / "probes" / route / stage
        shutil.rmtree(probe, ignore_errors=True)
        recipe, train = stage_recipe(route, stage, ctx["scale"].probe_steps, ctx, probe=True)
        started = time.perf_counter()
        train(recipe, probe, progress=False)
        budget, per_step = round(seconds, 2), round(seconds_per_step(probe), 5)
        plan = {"budget_s": budget, "seconds_per_step": per_step, "steps": max(2, int(budget / per_step)),
                "probe_steps": ctx["scale"].probe_steps,
                "probe_wall_s": round(time.perf_counter() - started, 2), "train_wall_s": 0.0}
        shutil.rmtree(probe)
        ensure_dir(run)
        write_json_atomic(run / "plan.json", plan)
    recipe, train = stage_recipe(route, stage, plan["steps"], ctx, probe=False)
    if ctx["progress"]:
        print(f"{route}/{stage}: {plan['steps']} steps at {plan['seconds_per_step']:.3f} s/step "
              f"(budget {plan['budget_s'] / 60:.1f} min)", file=sys.stderr)
    started = time.perf_counter()
    train(recipe, run, resume=(run / "checkpoints").is_dir(), progress=ctx["progress"])
    plan["train_wall_s"] = round(plan["train_wall_s"] + time.perf_counter() - started, 2)  # summed over resumes
    plan["step_s"] = round(step_seconds(run), 2)  # the steps alone, without loading, checkpoints and grids
    write_json_atomic(run / "plan.json", plan)
    write_json_atomic(run / "budget.json", plan)
    return plan


def train_route(route: str, ctx: dict) -> dict:
    """Every stage of a route within its share of the minutes; the model folder its images come from."""
    stages = {stage: train_in_budget(route, stage, ctx["minutes"] * 60 * share, ctx) for stage, share in ROUTES[route]}
    model = ctx["out"] / route / "diffusion"
    if route == "imagen":  # the cascade, assembled again from the finished stages every time (as `carrara recipe`)
        model = ctx["out"] / route / "model"
        shutil.rmtree(model, ignore_errors=True)
        assemble_cascade(ctx["out"] / route / "base", ctx["out"] / route / "upsampler", model)
    return {"stages": stages, "model": str(model), "steps": sum(s["steps"] for s in stages.values()),
            "train_wall_s": round(sum(s["train_wall_s"] for s in stages.values()), 2),
            "step_s": round(sum(s["step_s"] for s in stages.values()), 2)}


def intermediate_product(pipe: Pipeline) -> str:
    """What the generator makes and what turns it into the image: a latent and its decoder, or a small image (in
    the space-to-depth layout when the codec's factor is > 1) and the upsampler."""
    c, h, w = pipe.latent_shape()
    if not isinstance(pipe.vae, PixelCodec):
        return f"latent {h}×{w}×{c} → KL decoder"
    f = pipe.vae.config.factor
    image = f"image {h * f}×{w * f}×3" + (f" (as {h}×{w}×{c})" if f > 1 else "")
    return image + (f" → upsampler ×{pipe.upsampler.factor}" if pipe.upsampler else "")


def trained_parameters(pipe: Pipeline) -> dict[str, int]:
    """Every trained network's parameters by part (the pixel codec has none; the frozen text encoder is left out)."""
    parts = {"unet": pipe.unet, "vae": pipe.vae, **({"upsampler": pipe.upsampler.unet} if pipe.upsampler else {})}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}


def seconds_per_image(pipe: Pipeline, prompts: list[str], batch_size: int, rounds: int, **settings) -> float:
    """Median over `rounds` calls of `batch_size` prompts of the seconds per image, after one warm-up call."""
    batch = (prompts * batch_size)[:batch_size]
    pipe(batch, seed=0, **settings)
    times = []
    for r in range(rounds):
        started = time.perf_counter()
        pipe(batch, seed=1000 * (r + 1), **settings)
        times.append((time.perf_counter() - started) / len(batch))
    return statistics.median(times)


def timings(pipe: Pipeline, prompts: list[str], scale: Scale, guidance: float) -> dict[str, float]:
    """Seconds per image at the output side (batch and one image) and, for a cascade, of its base alone."""
    out = {}
    for side in pipe.sizes:
        stage = "" if side == pipe.sizes[-1] else "base_"
        for key, batch in (("batch", scale.sampling_batch), ("one", 1)):
            out[f"{stage}s_per_image_{key}"] = seconds_per_image(pipe, prompts, batch, scale.timing_rounds,
                                                                 guidance=guidance, steps=scale.steps, size=side)
    return out


def evaluate_route(route: str, trained: dict, ctx: dict) -> dict:
    """Every number of the table for one route (cached in out/eval/ROUTE/bench.json for the same settings)."""
    scale, out, guidance = ctx["scale"], ctx["out"], ctx["guidance"]
    settings = {"n": scale.n, "n_fd": scale.n_fd, "guidance": guidance, "clip": str(ctx["clip"]),
                "steps": trained["steps"], "sampling_batch": scale.sampling_batch, "sampling_steps": scale.steps}
    cache = out / "eval" / route / "bench.json"
    if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
        return json.loads(cache.read_text())
    model_dir, progress = trained["model"], ctx["progress"]
    pipe = Pipeline.load(model_dir)
    if pipe.sizes[-1] != scale.size:
        raise CarraraError(f"{model_dir} makes {pipe.sizes[-1]}-px images, the bench compares {scale.size} px")
    faith = evaluate_faithfulness(pipe, n=scale.n, objects=1, steps=scale.steps, guidance=guidance, progress=progress)
    report = run_eval(EvalSettings(model=model_dir, data=str(ctx["data"]["heldout"]), n=scale.n_fd,
                                   metrics=("fd", "kid", "clipscore"), clip=str(ctx["clip"]), guidance=guidance,
                                   steps=scale.steps, batch_size=16, bootstrap=scale.bootstrap,
                                   kid_subset_size=min(1000, scale.n_fd)), out / "eval" / route, progress=progress)
    m = report["metrics"]
    fd, kid, score = pick(m, "FD["), pick(m, "KID["), pick(m, "CLIPScore[", ", generated]")
    rows = {side: pipe(ctx["prompts"], guidance=guidance, steps=scale.steps, seed=0, size=side) for side in pipe.sizes}
    parameters = trained_parameters(pipe)
    row = {
        "settings": settings, "intermediate_product": intermediate_product(pipe), "sizes": list(pipe.sizes),
        "upsampler_sampling": dataclasses.asdict(pipe.upsampler.settings) if pipe.upsampler else None,
        "faithfulness": {a: faith["attributes"][a]["accuracy"] for a in FAITHFULNESS},
        "faithfulness_ci95": {a: faith["attributes"][a]["ci95"] for a in FAITHFULNESS},
        "fd": fd["value"], "fd_ci95": fd["ci95"], "kid": kid["value"], "kid_std": kid["std_over_subsets"],
        "clip_score": score["value"], "clip_score_ci95": score["ci95"],
        "clip_score_real": pick(m, "CLIPScore[", ", real]")["value"],
        "feature_network": fd["extractor"], "n_gen": fd["n_gen"], "n_real": fd["n_real"],
        **timings(pipe, ctx["prompts"], scale, guidance),
        "parameters": sum(parameters.values()), "parameters_by_part": parameters,
    }
    for side, images in rows.items():
        save_image_atomic(out / "eval" / route / f"row{side}.png", image_row(images))
    write_json_atomic(cache, row)
    return row


def grid_rows(out: Path, results: dict[str, dict]) -> dict[str, Image.Image]:
    """The figure's rows: each route at its output side, and the imagen base's small image before the upsampler."""
    rows = {}
    for route, r in results.items():
        for side in r["sizes"]:
            rows[f"{route} {side}px"] = Image.open(out / "eval" / route / f"row{side}.png").convert("RGB")
    return rows


def markdown_table(result: dict) -> str:
    """The table for docs/routes.md: one row per route, and the detector's ceiling."""
    head = ("| route | intermediate product | params | steps | train min | color | position | size | shape | all "
            "| FD | KID | CLIP score | s/image (batch) | s/image (one) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in result["routes"].items():
        f = r["faithfulness"]
        steps = " + ".join(str(s["steps"]) for s in r["stages"].values())
        lines.append(f"| {name} | {r['intermediate_product']} | {r['parameters'] / 1e6:.2f}M | {steps} | "
                     f"{r['train_wall_s'] / 60:.1f} | " + " | ".join(f"{100 * f[a]:.1f}%" for a in FAITHFULNESS)
                     + f" | {r['fd']:.4g} | {r['kid']:.3g} | {r['clip_score']:.1f} | "
                     f"{r['s_per_image_batch']:.4f} | {r['s_per_image_one']:.4f} |")
    ceiling = result["reference"]["detector_ceiling"]
    lines.append("| *renderer (ceiling)* | | | | | " + " | ".join(f"{100 * ceiling[a]:.1f}%" for a in FAITHFULNESS)
                 + f" | | | {result['reference']['clip_score_real']:.1f} | | |")
    cpu = result["cpu"]
    lines.append("")
    lines.append(f"`shapes` at {result['size']} px, {result['minutes']:g} CPU-minutes of training per route "
                 f"({100 * (1 - SECOND_STAGE_SHARE):.0f} % generator, {100 * SECOND_STAGE_SHARE:.0f} % autoencoder / "
                 f"upsampler; {cpu['kind']}: {cpu['model']}, {cpu['threads']} threads); faithfulness on "
                 f"n={result['n']} one-object captions; FD/KID/CLIP score by {result['feature_network']}, "
                 f"n_gen={result['n_fd']} against {result['n_heldout']} held-out images; guidance "
                 f"{result['guidance']:g}; s/image at batch {result['sampling_batch']} and for one image.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, help=f"training budget per route (default {FULL.minutes:g}; tiny "
                                                  f"{TINY.minutes})")
    p.add_argument("--n", type=int, help=f"faithfulness captions (default {FULL.n})")
    p.add_argument("--n-fd", type=int, help=f"generated images for FD/KID/CLIP score (default {FULL.n_fd})")
    p.add_argument("--clip", help="a `carrara train clip` run on shapes at 64 px (default: train one)")
    p.add_argument("--clip-minutes", type=float, help=f"budget of that CLIP run (default {FULL.clip_minutes:g})")
    p.add_argument("--guidance", type=float, default=DEFAULTS.guidance, help="classifier-free guidance of the "
                   "generator (the upsampler samples with its own recorded settings)")
    p.add_argument("--only", help="comma list of routes (default all: " + ",".join(ROUTES) + ")")
    p.add_argument("--out", help="run folder (default runs/routes, tiny runs/routes-tiny)")
    p.add_argument("--json", help="results (default bench/results/routes.json, tiny routes-tiny.json)")
    p.add_argument("--grid", help="the figure (default docs/images/routes-grid.png, tiny OUT/routes-grid.png)")
    p.add_argument("--tiny", action="store_true", help="seconds per stage on 24 tiny images: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    scale = bench_scale(args, FULL, TINY)
    names = chosen(args.only, ROUTES, "route")
    started, out = time.perf_counter(), ensure_dir(args.out or ("runs/routes-tiny" if args.tiny else "runs/routes"))
    progress = not args.quiet
    clip = check_clip(Path(args.clip), scale.size) if args.clip else None
    ctx = {"scale": scale, "out": out, "data": build_data(out, scale, progress), "progress": progress,
           "minutes": scale.minutes, "guidance": args.guidance, "prompts": sample_prompts(),
           "recipes": {route: load_recipe_file(path) for route, path in RECIPES.items()}}
    clip_budget = None
    if clip is not None:
        ctx["clip"] = clip
    else:
        clip_budget = train_in_budget("eval", "clip", scale.clip_minutes * 60, ctx)
        ctx["clip"] = out / "eval" / "clip"
    routes = {}
    for name in names:
        trained = train_route(name, ctx)
        routes[name] = {**{k: trained[k] for k in ("steps", "train_wall_s", "step_s", "stages")},
                        **evaluate_route(name, trained, ctx)}
    first = next(iter(routes.values()))
    ceiling = detector_ceiling(scale.n, 1, 0, size=scale.size)["attributes"]
    result = {
        "what": "the intermediate product, a latent (Stable Diffusion) or a small image (Imagen), on shapes at "
                "equal CPU-minutes (issue 17, item 3)",
        "cpu": cpu_kind(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
        "size": scale.size, "minutes": scale.minutes, "second_stage_share": SECOND_STAGE_SHARE, "n": scale.n,
        "n_fd": scale.n_fd, "sampling_batch": scale.sampling_batch, "n_train": scale.n_train,
        "n_heldout": scale.n_heldout, "guidance": args.guidance, "sampling": {"steps": scale.steps,
                                                                              "sampler": DEFAULTS.sampler},
        "feature_network": first["feature_network"], "clip": str(ctx["clip"]), "clip_training": clip_budget,
        "reference": {"detector_ceiling": {a: ceiling[a]["accuracy"] for a in FAITHFULNESS},
                      "clip_score_real": first["clip_score_real"]},
        "routes": routes, "wall_s": round(time.perf_counter() - started, 1),
    }
    json_path = args.json or f"bench/results/routes{'-tiny' if args.tiny else ''}.json"
    write_json_atomic(json_path, result)
    grid_path = args.grid or (out / "routes-grid.png" if args.tiny else "docs/images/routes-grid.png")
    save_image_atomic(grid_path, families_grid(grid_rows(out, routes), ctx["prompts"]))
    print(markdown_table(result))
    print(f"wrote {json_path} and {grid_path}", file=sys.stderr)
    return result


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except CarraraError as e:
        print(f"carrara: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
