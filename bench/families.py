"""Issue 22's table: the generative families of the lectures and carrara's latent diffusion, on `shapes`, at equal
CPU-minutes of training, judged by the same evaluation code.

Entrants, all at 32 px on the same `shapes` images (5,000, seed 0), all conditioned on the caption:
  vae, vqvae+ar (the VQ-VAE tokenizer, 8×8 codes, and its DALL-E-1 prior), igpt (a 16×16 grid of 16 palette
  colours, its default, enlarged to 32 px), flow, gan (carrara/families/, their default shapes and settings), and
  diffusion: recipes/shapes.toml's KL-autoencoder (f = 4: 8×8×4 latents at 32 px) and its v-prediction U-Net.
Each entrant gets `--minutes M` of training. A two-stage entrant (vqvae+ar, diffusion) spends a quarter of it on
its first stage (the tokenizer / the autoencoder) and three quarters on the second (close to the shapes recipe's
own split, 12.9 : 42.1 min). Each stage first trains a few steps in a throwaway folder, on 512 images, to measure
its seconds per step (the median over the probe's steps after the first); its step count is then budget / (seconds
per step), and the real run's steps, its wall time (with data loading, caption encoding and checkpoints) and the
time of its steps alone are recorded. A stage already trained in `--out` is not trained again; an interrupted one
resumes with its planned step count; an entrant's numbers are kept in out/eval/NAME/ for the same settings.

Judged per entrant (one-object captions; image i of every set from seed i):
  faithfulness (color, position, size, shape, all): `evaluate_faithfulness`, n = `--n`, with the detector's
    ceiling on the renderer's own images at the same size beside it;
  FD, KID and CLIP score against held-out real images (1,000, seed 1) with the features of a `carrara train clip`
    run (`--clip RUN`, or one trained here for `--clip-minutes`): `run_eval`, n_gen = `--n-fd`;
  NLL in bits per dimension of the 32×32×3 image where the family defines one, on the held-out images: flow
    exact (dequantized 8-bit pixels); VAE an upper bound (−ELBO of its Gaussian decoder, bins of width 2/256);
    vqvae+ar and igpt the cross-entropy of their tokens (VQ codes, palette-quantised pixels) summed per image
    and divided by its 3,072 dimensions — a likelihood of the tokens, not of the pixels;
  diversity (recall-like; mode collapse shows as a value far below the renderer's): the mean pairwise CLIP distance
    1 − cos among 8 seeds of each of 8 one-object captions (carrara/evaluate/diversity.py, issue 20's measure),
    beside the renderer's own: the same captions drawn 8 times with new position jitter, the only thing that varies
    among real images of one fully specified caption;
  sampling seconds per image (median of 3 batches of 16, after one warm-up batch), trained parameters (the GAN's
    discriminator, the VAE's and the autoencoder's encoders included; the frozen text encoder excluded);
  and a grid of the same 8 prompts, one labelled row per entrant.

    python bench/families.py --minutes 20 [--n 200] [--n-fd 1000] [--clip RUN | --clip-minutes 5] [--out runs/families]
    python bench/families.py --tiny        # seconds per model on tiny data: checks the bench, measures nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from carrara.data import shapes
from carrara.data.folder import to_tensor
from carrara.data.load import load_dataset, preload_images
from carrara.data.shapes import build_shapes
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.evaluate.diversity import diversity
from carrara.evaluate.faithfulness import detector_ceiling, evaluate_faithfulness
from carrara.evaluate.faithfulness import sample_prompts as caption_scenes
from carrara.evaluate.suite import EvalSettings, generate_images, run_eval
from carrara.families import family
from carrara.families.pipeline import load_any
from carrara.families.train import FamilyRecipe, train_family
from carrara.fileio import atomic_path, ensure_dir, save_image_atomic, write_json_atomic
from carrara.models.clip import ClipScorer
from carrara.recipe import apply_overrides, flatten, load_recipe_file
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
from carrara.train.clip import ClipRecipe, train_clip
from carrara.train.core import TrainConfig
from carrara.train.diffusion import DiffusionRecipe, train_diffusion

ROOT = Path(__file__).resolve().parent.parent
SHAPES_RECIPE = ROOT / "recipes" / "shapes.toml"
FIRST_STAGE_SHARE = 0.25  # of a two-stage entrant's minutes: the tokenizer's / the autoencoder's
ENTRANTS = {  # entrant → its stages in training order, with each stage's share of the budget
    "vae": (("vae", 1.0),),
    "vqvae+ar": (("vqvae", FIRST_STAGE_SHARE), ("ar", 1 - FIRST_STAGE_SHARE)),
    "igpt": (("igpt", 1.0),),
    "flow": (("flow", 1.0),),
    "gan": (("gan", 1.0),),
    "diffusion": (("autoencoder", FIRST_STAGE_SHARE), ("diffusion", 1 - FIRST_STAGE_SHARE)),
}
NLL_KIND = {
    "vae": "upper bound: -ELBO (Gaussian decoder, bins of width 2/256)",
    "vqvae+ar": "cross-entropy of the VQ codes per image dimension (a likelihood of the tokens, not the pixels)",
    "igpt": "cross-entropy of the palette-quantised pixels per image dimension (of the tokens, not the pixels)",
    "flow": "exact (dequantized 8-bit pixels)",
}
FAITHFULNESS = ("color", "position", "size", "shape", "all")
SAMPLING_ROUNDS = 3
NLL_EXAMPLES = 500  # held-out images the NLL is measured on
PROBE_IMAGES = 512  # images a probe trains on
DIVERSITY_SEED = 2  # the draw of the diversity's one-object captions (faithfulness draws with seed 0)


@dataclass
class Scale:
    """How big the bench is: the data, the evaluation's sample counts, and model overrides (tiny only)."""

    size: int
    n_train: int
    n_heldout: int
    n: int  # faithfulness captions
    n_fd: int  # generated images for FD, KID and CLIP score
    bootstrap: int
    probe_steps: int
    minutes: float
    clip_minutes: float
    checkpoints: int  # per training run
    sampling_batch: int  # images per timed sampling call
    diversity: tuple[int, int] = (8, 8)  # one-object captions × seeds per caption
    models: dict = field(default_factory=dict)  # stage → model overrides
    batch: dict = field(default_factory=dict)  # stage → batch size override


FULL = Scale(size=32, n_train=5000, n_heldout=1000, n=200, n_fd=1000, bootstrap=50, probe_steps=6, minutes=20,
             clip_minutes=5, checkpoints=4, sampling_batch=16)
TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 32}
TINY_VQ = {"base_channels": 8, "codebook_size": 16, "code_dim": 8}
TINY = Scale(size=16, n_train=24, n_heldout=12, n=8, n_fd=8, bootstrap=5, probe_steps=3, minutes=0.01,
             clip_minutes=0.01, checkpoints=1, sampling_batch=4, diversity=(2, 3), models={
                 "vae": {"base_channels": 8, "z_dim": 8, "cond_width": 16},
                 "vqvae": TINY_VQ,
                 "ar": {"gpt": TINY_GPT},
                 "igpt": {"grid": 8, "palette_size": 8, "gpt": TINY_GPT},
                 "flow": {"levels": 2, "steps": 2, "hidden": 16, "cond_channels": 4},
                 "gan": {"base_channels": 8, "z_dim": 8, "cond_width": 16},
                 "autoencoder": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8,
                                 "down_block_types": ["DownEncoderBlock2D"] * 2,
                                 "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4},
                 "diffusion": {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                               "attention_head_dim": [2, 4],
                               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
                 "clip": {"channels": [8, 16], "embed_dim": 16, "groups": 4},
             }, batch={stage: 8 for stage in ("vae", "vqvae", "ar", "igpt", "flow", "gan", "autoencoder", "diffusion",
                                              "clip")})


ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "CARRARA_BF16")


def cpu_kind() -> dict:
    """The CPU kind every figure is measured on, from lscpu's flags (docs: the fleet is mixed)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text()
    lines = text.splitlines()
    flags = set(next((s.split(":", 1)[1] for s in lines if s.lower().startswith("flags")), "").split())
    model = next((s.split(":", 1)[1].strip() for s in lines if s.lower().startswith("model name")), "")
    kind = ("avx512_bf16" if flags & {"avx512_bf16", "amx_bf16"} else "avx2-only" if "avx2" in flags else "other")
    # the kind is the CPU's; these variables make it run another kind's code paths (docs/performance.md), so a JSON
    # measured under them says so rather than passing for the CPU's own numbers
    caps = {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}
    return {"kind": kind, "model": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "bf16_training": TrainConfig().use_bf16(), "machine": platform.machine(), **({"isa_caps": caps} if caps else {})}


def load_cached(path: Path, key: dict) -> torch.Tensor | None:
    """The tensor a bench saved at `path` (`cached`) for the same `key`, or None."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved["images"]
    return None


def cached(path: Path, key: dict, make) -> torch.Tensor:
    """The tensor saved at `path` for the same `key` (images, embeddings), or make() saved there atomically for the
    next run."""
    value = load_cached(path, key)
    if value is None:
        value = make()
        with atomic_path(path) as tmp:
            torch.save({"key": key, "images": value}, tmp)
    return value


def check_clip(run: Path, size: int) -> Path:
    """A `carrara train clip` run at the bench's image size, checked before any training starts."""
    folder = run / "clip" if (run / "clip").is_dir() else run
    try:
        trained_size = json.loads((folder / "config.json").read_text())["image_size"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CarraraError(f"--clip {run}: not a CLIP run (no readable clip/config.json); train one with "
                           "`carrara train clip`, or leave --clip out and the bench trains one") from None
    if trained_size != size:
        raise CarraraError(f"--clip {run} was trained at {trained_size} px; the bench compares {size} px images")
    return run


def sample_prompts() -> list[str]:
    """The shapes recipe's 8 sample prompts: the grid's columns."""
    return list(load_recipe_file(SHAPES_RECIPE)["diffusion"]["sample_prompts"])


def build_data(out: Path, scale: Scale, progress: bool) -> tuple[Path, Path, Path]:
    """Training images (seed 0), held-out real images (seed 1), and the probes' images (PROBE_IMAGES, seed 0: a
    step costs the same on fewer images, and their captions encode faster), built once."""
    folders = []
    for name, n, seed in (("data", scale.n_train, 0), ("heldout", scale.n_heldout, 1),
                          ("probe-data", min(scale.n_train, PROBE_IMAGES), 0)):
        folder = out / name
        if not (folder / "metadata.jsonl").is_file():
            build_shapes(folder, n=n, size=scale.size, seed=seed, progress=progress, overwrite=True)
        folders.append(folder)
    return folders[0], folders[1], folders[2]


def train_config(base: TrainConfig, steps: int, batch: int | None, checkpoints: int, probe: bool) -> TrainConfig:
    """The recipe's optimisation at `steps`: warm-up at most a fifth of the run, one sample grid at the end,
    `checkpoints` checkpoints (so an interrupted run resumes); a probe logs every step and saves at its end only,
    so no checkpoint falls inside a timed step."""
    return dataclasses.replace(base, steps=steps, batch_size=batch or base.batch_size,
                               warmup_steps=min(base.warmup_steps, steps // 5), log_every=1 if probe else 10,
                               sample_every=steps, checkpoint_every=steps if probe else max(1, steps // checkpoints),
                               keep_checkpoints=1)


def stage_recipe(stage: str, steps: int, ctx: dict, probe: bool):
    """(recipe, train function) of one stage at `steps`, with the shapes recipe's settings where it has them."""
    scale, data, out = ctx["scale"], str(ctx["probe_data" if probe else "data"]), ctx["out"]
    model, batch = dict(scale.models.get(stage, {})), scale.batch.get(stage)
    table = ctx["shapes_recipe"]
    if stage in ("autoencoder", "diffusion"):
        if stage == "autoencoder":
            recipe = apply_overrides(AutoencoderRecipe(data=data, size=scale.size), flatten(table["autoencoder"]))
        else:
            recipe = apply_overrides(DiffusionRecipe(data=data, autoencoder=str(out / "autoencoder"), size=scale.size),
                                     flatten(table["diffusion"]))
        recipe.model = {**recipe.model, **model}
        recipe.train = train_config(recipe.train, steps, batch, scale.checkpoints, probe)
        return recipe, train_autoencoder if stage == "autoencoder" else train_diffusion
    if stage == "clip":
        recipe = ClipRecipe(data=data, size=scale.size)
        recipe.model = {**recipe.model, **model}
        recipe.holdout = min(recipe.holdout, scale.n_train // 10)
        recipe.train = train_config(recipe.train, steps, batch, scale.checkpoints, probe)
        return recipe, train_clip
    recipe = FamilyRecipe(kind=stage, data=data, size=scale.size, sample_prompts=ctx["prompts"], model=model,
                          vqvae=str(out / "vqvae") if stage == "ar" else "")
    recipe.train = train_config(TrainConfig(**family(stage).TRAIN), steps, batch, scale.checkpoints, probe)
    return recipe, train_family


def seconds_per_step(run: Path) -> float:
    """Median seconds of the logged steps after the first (which pays for the first call's warm-up)."""
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    config = json.loads((run / "config.json").read_text())
    times = [config["train"]["batch_size"] / m["samples_per_s"] for m in rows if m["step"] >= 1]
    if not times:
        raise CarraraError(f"the probe in {run} logged no step after the first: raise Scale.probe_steps")
    return statistics.median(times)


def step_seconds(run: Path) -> float:
    """The seconds the run's logged steps took (metrics.jsonl: each line's samples/s over the steps since the last)."""
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    batch, last, total = json.loads((run / "config.json").read_text())["train"]["batch_size"], -1, 0.0
    for m in rows:
        total += (m["step"] - last) * batch / m["samples_per_s"]
        last = m["step"]
    return total


def train_in_budget(stage: str, seconds: float, ctx: dict, recipe_fn=None) -> dict:
    """Probe the stage's seconds per step, then train it for as many steps as fit in `seconds` (once: a stage with
    budget.json is done; one with plan.json was interrupted and resumes with the planned steps). `recipe_fn`: the
    bench's own (stage, steps, ctx, probe) → (recipe, train function), default this bench's `stage_recipe`;
    the probe's steps are ctx["probe_steps"], else ctx["scale"].probe_steps."""
    recipe_fn = recipe_fn or stage_recipe
    probe_steps = ctx["probe_steps"] if "probe_steps" in ctx else ctx["scale"].probe_steps
    run = ctx["out"] / stage
    if (run / "plan.json").is_file():
        plan = json.loads((run / "plan.json").read_text())
        if plan["budget_s"] != round(seconds, 2):
            raise CarraraError(f"{run} was planned for {plan['budget_s'] / 60:g} min, not {seconds / 60:g}: "
                               "give the same --minutes, or another --out")
        if (run / "budget.json").is_file():
            return plan
    else:
        probe = ctx["out"] / "probes" / stage
        shutil.rmtree(probe, ignore_errors=True)
        recipe, train = recipe_fn(stage, probe_steps, ctx, probe=True)
        started = time.perf_counter()
        train(recipe, probe, progress=False)
        budget, per_step = round(seconds, 2), round(seconds_per_step(probe), 5)
        plan = {"budget_s": budget, "seconds_per_step": per_step, "steps": max(2, int(budget / per_step)),
                "probe_steps": probe_steps,
                "probe_wall_s": round(time.perf_counter() - started, 2), "train_wall_s": 0.0}
        shutil.rmtree(probe)
        ensure_dir(run)
        write_json_atomic(run / "plan.json", plan)
    recipe, train = recipe_fn(stage, plan["steps"], ctx, probe=False)
    if ctx["progress"]:
        print(f"{stage}: {plan['steps']} steps at {plan['seconds_per_step']:.3f} s/step "
              f"(budget {plan['budget_s'] / 60:.1f} min)", file=sys.stderr)
    started = time.perf_counter()
    train(recipe, run, resume=(run / "checkpoints").is_dir(), progress=ctx["progress"])
    plan["train_wall_s"] = round(plan["train_wall_s"] + time.perf_counter() - started, 2)  # summed over resumes
    plan["step_s"] = round(step_seconds(run), 2)  # the steps alone, without loading, checkpoints and grids
    write_json_atomic(run / "plan.json", plan)
    write_json_atomic(run / "budget.json", plan)
    return plan


def train_entrant(name: str, ctx: dict) -> dict:
    """Every stage of an entrant within its share of the minutes; the folder its samples come from."""
    stages = {stage: train_in_budget(stage, ctx["minutes"] * 60 * share, ctx) for stage, share in ENTRANTS[name]}
    return {"stages": stages, "model": str(ctx["out"] / ENTRANTS[name][-1][0]),
            "steps": sum(s["steps"] for s in stages.values()),
            "train_wall_s": round(sum(s["train_wall_s"] for s in stages.values()), 2),
            "step_s": round(sum(s["step_s"] for s in stages.values()), 2)}


def trained_parameters(pipe) -> int:
    """Every trained parameter: a family's whole model (family.json), or the U-Net plus the autoencoder."""
    if hasattr(pipe, "meta"):
        return int(pipe.meta["parameters"])
    return sum(p.numel() for m in (pipe.unet, pipe.vae) for p in m.parameters())


def nll_bits_per_dim(name: str, pipe, heldout: Path, size: int) -> float | None:
    """The held-out NLL in bits per image dimension from the family's own `report` (see NLL_KIND), or None."""
    if name not in NLL_KIND:
        return None
    kind, model = pipe.kind, pipe.model
    module = family(kind)
    images, texts = preload_images(load_dataset(str(heldout), size=size), progress=False)
    images, texts = images[:NLL_EXAMPLES], texts[:NLL_EXAMPLES]
    cond = torch.cat([pipe.text_encoder.pooled(texts[i:i + 64]) for i in range(0, len(texts), 64)])  # (N, D)
    with torch.no_grad():
        report = module.report(model, module.prepare(model, images), cond)
    dims = 3 * size * size
    if kind == "flow":
        return report["bits_per_dim"]
    if kind == "vae":  # −log P(bin) ≈ −log p(x) − log(2/256) per dimension, x in [−1, 1]
        return (report["neg_elbo_nats_per_dim"] + math.log(128)) / math.log(2)
    tokens = model.config.gpt.seq_len  # codes or palette pixels per image
    per_token = report["nll_nats_per_code"] if kind == "ar" else report["nll_nats_per_pixel"]
    return per_token * tokens / dims / math.log(2)


def sampling_seconds(pipe, prompts: list[str], guidance: float, batch_size: int) -> float:
    """Median over SAMPLING_ROUNDS batches of the seconds per image, after one warm-up batch."""
    batch = (prompts * batch_size)[:batch_size]
    pipe(batch, guidance=guidance, seed=0)
    times = []
    for r in range(SAMPLING_ROUNDS):
        started = time.perf_counter()
        pipe(batch, guidance=guidance, seed=1000 * (r + 1))
        times.append((time.perf_counter() - started) / len(batch))
    return statistics.median(times)


def pick(metrics: dict, prefix: str, suffix: str = "") -> dict:
    """The one metric of run_eval's report whose name starts with `prefix` (and ends with `suffix`)."""
    found = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix)]
    if len(found) != 1:
        raise CarraraError(f"expected one {prefix}…{suffix} metric in the evaluation, found {len(found)}")
    return found[0]


def evaluate_entrant(name: str, trained: dict, ctx: dict) -> dict:
    """Every number of the table for one entrant (cached in out/eval/NAME/bench.json for the same settings)."""
    scale, out, guidance = ctx["scale"], ctx["out"], ctx["guidance"]
    settings = {"n": scale.n, "n_fd": scale.n_fd, "guidance": guidance, "clip": str(ctx["clip"]),
                "steps": trained["steps"]}
    cache = out / "eval" / name / "bench.json"
    if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
        row = json.loads(cache.read_text())
        if "diversity" not in row:  # a row measured before the column existed gets it alone
            row.update(entrant_diversity(load_any(trained["model"]), ctx))
            write_json_atomic(cache, row)
        return row
    model_dir, progress = trained["model"], ctx["progress"]
    pipe = load_any(model_dir)
    faith = evaluate_faithfulness(pipe, n=scale.n, objects=1, guidance=guidance, progress=progress)
    report = run_eval(EvalSettings(model=model_dir, data=str(ctx["heldout"]), n=scale.n_fd,
                                   metrics=("fd", "kid", "clipscore"), clip=str(ctx["clip"]), guidance=guidance,
                                   batch_size=16, bootstrap=scale.bootstrap,
                                   kid_subset_size=min(1000, scale.n_fd)), out / "eval" / name, progress=progress)
    m = report["metrics"]
    fd, kid, score = pick(m, "FD["), pick(m, "KID["), pick(m, "CLIPScore[", ", generated]")
    images = pipe(ctx["prompts"], guidance=guidance, seed=0)  # the grid's row; also the sampler's warm-up
    row = {
        "settings": settings,
        "faithfulness": {a: faith["attributes"][a]["accuracy"] for a in FAITHFULNESS},
        "faithfulness_ci95": {a: faith["attributes"][a]["ci95"] for a in FAITHFULNESS},
        "fd": fd["value"], "fd_ci95": fd["ci95"], "kid": kid["value"], "kid_std": kid["std_over_subsets"],
        "clip_score": score["value"], "clip_score_ci95": score["ci95"],
        "clip_score_real": pick(m, "CLIPScore[", ", real]")["value"],
        "feature_network": fd["extractor"], "n_gen": fd["n_gen"], "n_real": fd["n_real"],
        "nll_bits_per_dim": nll_bits_per_dim(name, pipe, ctx["heldout"], scale.size),
        "nll_kind": NLL_KIND.get(name),
        "sampling_s_per_image": sampling_seconds(pipe, ctx["prompts"], guidance, scale.sampling_batch),
        "parameters": trained_parameters(pipe),
        **entrant_diversity(pipe, ctx),
    }
    save_image_atomic(out / "eval" / name / "row.png", image_row(images))
    write_json_atomic(cache, row)
    return row


def diversity_captions(scale: Scale) -> list:
    """The diversity's one-object (scene, caption) pairs."""
    return caption_scenes(scale.diversity[0], objects=1, seed=DIVERSITY_SEED)


def entrant_diversity(pipe, ctx: dict) -> dict:
    """{diversity, diversity_ci95}: `Scale.diversity`'s seeds of each caption (seeds 10,000 on), embedded by the
    bench's CLIP; the interval is over captions."""
    scale = ctx["scale"]
    k = scale.diversity[1]
    prompts = [text for _, text in diversity_captions(scale) for _ in range(k)]
    settings = EvalSettings(model="", guidance=ctx["guidance"], steps=DEFAULTS.steps, sampler=DEFAULTS.sampler,
                            batch_size=16, seed=10_000)
    return clip_diversity(generate_images(pipe, prompts, settings, progress=False), ctx)


def renderer_diversity(ctx: dict) -> dict:
    """The same measure on the renderer's images: each caption drawn k times with new position jitter."""
    scale = ctx["scale"]
    k, rng = scale.diversity[1], random.Random(DIVERSITY_SEED)
    images = []
    for scene, _ in diversity_captions(scale):
        o = scene.objects[0]
        for _ in range(k):
            moved = shapes.Scene((shapes.place(rng, o.shape, o.color, o.size, o.position),))
            images.append(to_tensor(shapes.render(moved, scale.size)))
    return clip_diversity(torch.stack(images), ctx)


def clip_diversity(images: torch.Tensor, ctx: dict) -> dict:
    """{diversity, diversity_ci95} of uint8 images (captions × seeds, in that order) in the bench's CLIP (loaded
    once per run)."""
    scale = ctx["scale"]
    if "scorer" not in ctx:
        ctx["scorer"] = ClipScorer.load(ctx["clip"])
    embeds = ctx["scorer"].embed_images(images)
    d = diversity(embeds.reshape(-1, scale.diversity[1], embeds.shape[-1]), bootstrap=scale.bootstrap)
    return {"diversity": d["value"], "diversity_ci95": d["ci95"]}


def image_row(images: list[Image.Image]) -> Image.Image:
    """The grid's images side by side (the row is cached with the entrant's numbers)."""
    w, h = images[0].size
    row = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        row.paste(im, (i * w, 0))
    return row


def families_grid(rows: dict[str, Image.Image], prompts: list[str], cell: int = 96) -> Image.Image:
    """One labelled row per entrant, one column per prompt (headed by it), images enlarged to `cell` pixels."""
    font, label_w, head_h, pad = ImageFont.load_default(), 90, 44, 2
    n = len(prompts)
    grid = Image.new("RGB", (label_w + n * (cell + pad), head_h + len(rows) * (cell + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, prompt in enumerate(prompts):
        words, lines = prompt.split(), [""]
        for word in words:  # wrap to the cell's width, at most 3 lines
            fits = len(lines[-1]) + len(word) < cell // 6
            lines[-1:] = [f"{lines[-1]} {word}".strip()] if fits else [lines[-1], word]
        draw.multiline_text((label_w + j * (cell + pad), 2), "\n".join(lines[:3]), fill=(0, 0, 0), font=font)
    for i, (name, row) in enumerate(rows.items()):
        y = head_h + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill=(0, 0, 0), font=font)
        side = row.height
        for j in range(n):
            im = row.crop((j * side, 0, (j + 1) * side, side)).resize((cell, cell), Image.NEAREST)
            grid.paste(im, (label_w + j * (cell + pad), y))
    return grid


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(result: dict) -> str:
    """The table for docs/families.md: one row per entrant, and the detector's ceiling."""
    head = ("| model | params | steps | train min | color | position | size | shape | all | FD | KID | CLIP score "
            "| diversity | NLL bits/dim | s/image |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in result["entrants"].items():
        f = r["faithfulness"]
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['train_wall_s'] / 60:.1f} | "
                     + " | ".join(f"{100 * f[a]:.1f}%" for a in FAITHFULNESS)
                     + f" | {r['fd']:.4g} | {r['kid']:.3g} | {r['clip_score']:.1f} | {r['diversity']:.3f} | "
                     f"{fmt(r['nll_bits_per_dim'], '.3f')} | {r['sampling_s_per_image']:.4f} |")
    ceiling = result["reference"]["detector_ceiling"]
    lines.append("| *renderer (ceiling)* | | | | " + " | ".join(f"{100 * ceiling[a]:.1f}%" for a in FAITHFULNESS)
                 + f" | | | {result['reference']['clip_score_real']:.1f} | "
                 f"{result['reference']['renderer_diversity']['diversity']:.3f} | | |")
    cpu = result["cpu"]
    lines.append("")
    lines.append(f"`shapes` at {result['size']} px, {result['minutes']:g} CPU-minutes of training per model "
                 f"({cpu['kind']}: {cpu['model']}, {cpu['threads']} threads); faithfulness on n={result['n']} "
                 f"one-object captions; FD/KID/CLIP score by {result['feature_network']}, n_gen={result['n_fd']} "
                 f"against {result['n_heldout']} held-out images; guidance {result['guidance']:g}. NLL: "
                 + "; ".join(f"{k} {v}" for k, v in NLL_KIND.items()) + ".")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, help=f"training budget per model (default {FULL.minutes}; tiny "
                                                  f"{TINY.minutes})")
    p.add_argument("--n", type=int, help=f"faithfulness captions (default {FULL.n})")
    p.add_argument("--n-fd", type=int, help=f"generated images for FD/KID/CLIP score (default {FULL.n_fd})")
    p.add_argument("--clip", help="a `carrara train clip` run on shapes at the same size (default: train one)")
    p.add_argument("--clip-minutes", type=float, help=f"budget of that CLIP run (default {FULL.clip_minutes})")
    p.add_argument("--guidance", type=float, default=DEFAULTS.guidance,
                   help="classifier-free guidance for diffusion, ar and igpt (the others ignore it)")
    p.add_argument("--only", help="comma list of entrants (default all: " + ",".join(ENTRANTS) + ")")
    p.add_argument("--out", help="run folder (default runs/families, tiny runs/families-tiny)")
    p.add_argument("--json", help="results (default bench/results/families.json, tiny families-tiny.json)")
    p.add_argument("--grid", help="the grid (default docs/images/families-grid.png, tiny OUT/families-grid.png)")
    p.add_argument("--tiny", action="store_true", help="seconds per model on 24 tiny images: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def bench_scale(args: argparse.Namespace, full, tiny):
    """The bench's size: FULL or TINY with --n, --n-fd, --minutes, --clip-minutes applied, checked."""
    given = {"n": args.n, "n_fd": args.n_fd, "minutes": args.minutes, "clip_minutes": args.clip_minutes}
    scale = dataclasses.replace(tiny if args.tiny else full, **{k: v for k, v in given.items() if v is not None})
    if scale.minutes <= 0 or scale.clip_minutes <= 0 or scale.n < 1 or scale.n_fd < 2:
        raise CarraraError("--minutes and --clip-minutes must be positive, --n at least 1 and --n-fd at least 2")
    return scale


def chosen(only: str | None, known, what: str) -> list[str]:
    """--only's comma list (default every one of `known`), each checked."""
    names = only.split(",") if only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CarraraError(f"--only: unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return names


def run(args: argparse.Namespace) -> dict:
    scale = bench_scale(args, FULL, TINY)
    names = chosen(args.only, ENTRANTS, "entrant")
    started, out = time.perf_counter(), ensure_dir(args.out or ("runs/families-tiny" if args.tiny else "runs/families"))
    progress = not args.quiet
    clip = check_clip(Path(args.clip), scale.size) if args.clip else None
    data, heldout, probe_data = build_data(out, scale, progress)
    ctx = {"scale": scale, "out": out, "data": data, "heldout": heldout, "probe_data": probe_data, "progress": progress,
           "minutes": scale.minutes, "guidance": args.guidance, "prompts": sample_prompts(),
           "shapes_recipe": load_recipe_file(SHAPES_RECIPE)}
    clip_budget = None
    if clip is not None:
        ctx["clip"] = clip
    else:
        clip_budget = train_in_budget("clip", scale.clip_minutes * 60, ctx)
        ctx["clip"] = out / "clip"
    entrants, rows = {}, {}
    for name in names:
        trained = train_entrant(name, ctx)
        entrants[name] = {**{k: trained[k] for k in ("steps", "train_wall_s", "step_s", "stages")},
                          **evaluate_entrant(name, trained, ctx)}
        rows[name] = Image.open(out / "eval" / name / "row.png").convert("RGB")
    first = next(iter(entrants.values()))
    ceiling = detector_ceiling(scale.n, 1, 0, size=scale.size)["attributes"]
    result = {
        "what": "generative families vs carrara's latent diffusion on shapes at equal CPU-minutes (issue 22)",
        "cpu": cpu_kind(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
        "size": scale.size, "minutes": scale.minutes, "first_stage_share": FIRST_STAGE_SHARE, "n": scale.n,
        "n_fd": scale.n_fd, "sampling_batch": scale.sampling_batch, "n_train": scale.n_train,
        "n_heldout": scale.n_heldout, "guidance": args.guidance,
        "feature_network": first["feature_network"], "clip": str(ctx["clip"]), "clip_training": clip_budget,
        "nll_kind": NLL_KIND, "reference": {"detector_ceiling": {a: ceiling[a]["accuracy"] for a in FAITHFULNESS},
                                            "clip_score_real": first["clip_score_real"],
                                            "renderer_diversity": renderer_diversity(ctx)},
        "diversity": {"captions": scale.diversity[0], "seeds": scale.diversity[1], "caption_seed": DIVERSITY_SEED},
        "entrants": entrants, "wall_s": round(time.perf_counter() - started, 1),
    }
    json_path = args.json or f"bench/results/families{'-tiny' if args.tiny else ''}.json"
    write_json_atomic(json_path, result)
    grid_path = args.grid or (out / "families-grid.png" if args.tiny else "docs/images/families-grid.png")
    save_image_atomic(grid_path, families_grid(rows, ctx["prompts"]))
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
