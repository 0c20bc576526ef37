"""Issue 21, items 4 and 5: Improved DDPM's and "Diffusion Models Beat GANs"' findings, reproduced on `shapes`.

Every model is the shapes recipe's latent U-Net (recipes/shapes.toml: v-prediction, scaled-linear schedule, fixed
σ² = β̃_t) on one KL autoencoder at 64 px, trained on the same `shapes` images (5,000, seed 0, half of them two-object
scenes) for the same number of steps: `base`'s steps, which a probe sets to what fits in `--minutes` (the families
bench's rule, bench/families.py). Each variant changes one thing:
  base     the recipe as it is;
  learned  learned variance Σθ, `variance = "learned_range"`, trained with L_hybrid, λ = 0.001 (Nichol & Dhariwal
           2021, eq. 15–16);
  cosine   the cosine schedule (ibid. §3.2) instead of the scaled-linear one;
  adagn    AdaGN, `resnet_time_scale_shift = "scale_shift"` (Dhariwal & Nichol 2021, §3.1).
The noise-aware classifier (`carrara train classifier`, on the same autoencoder's latents, `--classifier-minutes`)
guides `base`. FD is the suite's Fréchet distance in the features of a `carrara train clip` run (`--clip RUN`, or
one trained here) against 1,000 held-out real images (seed 1), of images for the first `--n-fd` held-out captions;
faithfulness is `evaluate_faithfulness` on `--n` one-object captions (image i from seed i); NLL is `latent_nll`'s
bound in bits per latent dimension of the first `--n-nll` held-out images given their captions.

Experiments (`--only`):
  variance    learned Σθ vs the base model sampled with fixed σ² = β_t and with fixed σ² = β̃_t (the two fixed
              choices of Ho et al. share one network; β_t is read as Σθ at v = +1, eq. 15), DDPM ancestral sampling
              at each of `--steps` respaced steps, without guidance (w = 1, as the paper measures): FD, faithfulness;
              and the NLL of each;
  schedule    cosine vs scaled-linear at the default sampler, steps and guidance: FD, faithfulness, NLL;
  guidance    classifier guidance (scales `--cg-scales`, on the unconditional model, the empty prompt, w = 1; or with
              `--cg-on conditional` on the caption at w = 1) vs classifier-free guidance (w in `--cfg-scales`), at the
              default sampler and steps: faithfulness (precision-like) against FD and a diversity (recall-like: the
              mean pairwise CLIP distance 1 − cos among the images of one prompt, 8 prompts × 8 seeds, as
              issue 20's diversity: carrara/evaluate/diversity.py);
              both curves on one plot (`--plot`);
  adagn       AdaGN on vs off at the default sampler, steps and guidance: FD, faithfulness;
  two-object  the two-object numbers (both objects drawn, relation right, everything right) of every model trained
              for the chosen experiments, at the default sampler and its 20 steps; and of the base on the caption
              (w = 4) with the classifier's relation head as guidance at each scale of `--two-object-cg` (each
              image toward its own caption's relations, each object's by its colour: item 5's lever).
Before starting, the bench prints its plan: each training run with its budget, each evaluation with its network
calls and the seconds they take at the speed measured on this machine, and the estimated total. A trained run is
not trained again and an interrupted one resumes; a finished evaluation is kept in out/eval/ for the same settings.
The results go to one JSON (bench/results/guided-<cpu kind>.json), written again after each experiment.

    python bench/guided.py [--minutes 15] [--only variance,schedule] [--autoencoder RUN] [--clip RUN] [--plan]
    python bench/guided.py --table bench/results/guided-avx512_bf16.json  # the markdown tables, from a result
    python bench/guided.py --tiny          # seconds per model on tiny data: checks the bench, measures nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import (
    FAITHFULNESS,
    bench_scale,
    build_data,
    check_clip,
    chosen,
    cpu_kind,
    seconds_per_step,
    stage_recipe,
    step_seconds,
    train_in_budget,
)

from carrara.data import shapes
from carrara.data.load import load_dataset, preload_images
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.evaluate.diversity import pairwise_distances
from carrara.evaluate.faithfulness import (
    ClassifierGuided,
    caption_classes,
    detector_ceiling,
    evaluate_faithfulness,
    sample_prompts,
)
from carrara.evaluate.fid import feature_stats, frechet_distance
from carrara.evaluate.nll import latent_nll
from carrara.evaluate.suite import EvalSettings, generate_images
from carrara.families.pipeline import load_any
from carrara.fileio import atomic_path, ensure_dir, write_json_atomic
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.classifier import ClassifierConfig, NoiseAwareClassifier
from carrara.models.clip import ClipScorer
from carrara.models.config import AutoencoderConfig, UNetConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.recipe import apply_overrides, load_recipe_file
from carrara.train.classifier import HEADS, ClassifierRecipe, train_classifier
from carrara.train.diffusion import train_diffusion

ROOT = Path(__file__).resolve().parent.parent
SHAPES_RECIPE = ROOT / "recipes" / "shapes.toml"
VARIANTS = {  # model → its change to the shapes recipe's diffusion stage (dotted recipe fields)
    "base": {},
    "learned": {"variance": "learned_range"},
    "cosine": {"schedule": "cosine"},
    "adagn": {"model.resnet_time_scale_shift": "scale_shift"},
}
EXPERIMENTS = {  # experiment → the models it trains
    "variance": ("base", "learned"),
    "schedule": ("base", "cosine"),
    "guidance": ("base",),
    "adagn": ("base", "adagn"),
    "two-object": ("base",),
}
VARIANCES = {"learned Σθ": ("learned", "model"), "fixed β_t": ("base", "beta"), "fixed β̃_t": ("base", "model")}
VARIANCE_GUIDANCE = 1.0  # Improved DDPM compares variances without guidance
TWO_OBJECT = ("both objects", "relation", "all", "color", "shape", "size", "count")
DIVERSITY_PROMPTS, DIVERSITY_SEEDS = 8, 8
EVAL_BATCH = 16
RUN_OVERHEAD_S = 60  # per training run: its probe, caching latents and captions, checkpoints (the plan's estimate)


@dataclass
class Scale:
    """How big the bench is (the fields families.py's helpers read, and this bench's own)."""

    size: int
    n_train: int
    n_heldout: int
    n: int  # faithfulness captions per point
    n_fd: int  # generated images per FD
    n_nll: int  # held-out images the NLL is measured on
    probe_steps: int
    minutes: float  # per diffusion run (base's budget; the variants train as many steps)
    clip_minutes: float
    ae_minutes: float
    classifier_minutes: float
    checkpoints: int
    steps: tuple[int, ...] = (25, 50, 100, 250)  # the variance experiment's DDPM steps
    sample_steps: int = DEFAULTS.steps  # the other experiments' steps of the default sampler
    diversity: tuple[int, int] = (DIVERSITY_PROMPTS, DIVERSITY_SEEDS)
    models: dict = field(default_factory=dict)  # stage → model overrides
    batch: dict = field(default_factory=dict)  # stage → batch size override
    overrides: dict = field(default_factory=dict)  # stage → other recipe fields (dotted keys)


FULL = Scale(size=64, n_train=5000, n_heldout=1000, n=100, n_fd=200, n_nll=32, probe_steps=6, minutes=15,
             clip_minutes=5, ae_minutes=15, classifier_minutes=5, checkpoints=4)
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": [2, 4],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
TINY = Scale(size=32, n_train=24, n_heldout=12, n=4, n_fd=6, n_nll=2, probe_steps=3, minutes=0.01, clip_minutes=0.01,
             ae_minutes=0.01, classifier_minutes=0.01, checkpoints=1, steps=(2, 3), sample_steps=2, diversity=(2, 3),
             models={
                 "autoencoder": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8,
                                 "down_block_types": ["DownEncoderBlock2D"] * 2,
                                 "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4},
                 "diffusion": TINY_UNET,
                 "classifier": {"block_out_channels": [16, 32], "norm_num_groups": 8, "head_channels": 8},
                 "clip": {"channels": [8, 16], "embed_dim": 16, "groups": 4},
             }, batch=dict.fromkeys(("autoencoder", "diffusion", "classifier", "clip"), 4),
             overrides={"diffusion": {"num_train_timesteps": 50, "sample_prompts": ["a large red circle on the left"]}})


@contextmanager
def sampled_variance(pipe, variance: str):
    """σ² of the DDPM steps and of the bound: the model's own ("model": β̃_t, or Σθ if learned), or fixed β_t
    ("beta"): a fixed-variance U-Net's output with v = +1 appended is read as Σθ = β_t (eq. 15 at v' = 1)."""
    handle = None
    if variance == "beta":
        handle = pipe.unet.register_forward_hook(lambda module, args, out: torch.cat([out, torch.ones_like(out)], 1))
    try:
        yield pipe
    finally:
        if handle is not None:
            handle.remove()


# ---- the plan: training runs and evaluation points, with their estimated cost ----


@dataclass(frozen=True)
class Point:
    """One evaluation: `kind` "quality" (FD + one-object faithfulness [+ diversity]), "nll" or "two-object"."""

    kind: str
    model: str
    variance: str = "model"
    sampler: str = DEFAULTS.sampler
    steps: int = DEFAULTS.steps
    guidance: float = DEFAULTS.guidance
    cg_scale: float | None = None  # classifier guidance's s (None: none)
    diversity: bool = False

    @property
    def key(self) -> str:
        if self.kind == "nll":
            return f"nll-{self.model}-{self.variance}"
        parts = [self.kind, self.model, self.variance, self.sampler, str(self.steps), f"w{self.guidance:g}"]
        parts += [f"cg{self.cg_scale:g}"] if self.cg_scale is not None else []
        return "-".join(parts + (["div"] if self.diversity else []))


def default_point(scale: Scale, kind: str, model: str, **settings) -> Point:
    """A point at the default sampler and guidance, with the bench's steps of it (20; fewer when tiny)."""
    return Point(kind, model, steps=scale.sample_steps, **settings)


def experiment_points(name: str, scale: Scale, models: list[str], cg_scales, cfg_scales,
                      two_object_cg=()) -> list[Point]:
    """The evaluations of one experiment (a point shared by two experiments is measured once)."""
    if name == "variance":
        quality = [Point("quality", m, v, "ddpm", s, VARIANCE_GUIDANCE) for s in scale.steps
                   for m, v in VARIANCES.values()]
        return quality + [Point("nll", m, v) for m, v in VARIANCES.values()]
    if name == "schedule":
        return [default_point(scale, kind, m) for m in ("base", "cosine") for kind in ("quality", "nll")]
    if name == "adagn":
        return [default_point(scale, "quality", m) for m in ("base", "adagn")]
    if name == "guidance":
        return ([default_point(scale, "quality", "base", guidance=1.0, cg_scale=s, diversity=True) for s in cg_scales]
                + [default_point(scale, "quality", "base", guidance=w, diversity=True) for w in cfg_scales])
    return ([default_point(scale, "two-object", m) for m in models]
            + [default_point(scale, "two-object", "base", cg_scale=s) for s in two_object_cg])


def needs_classifier(experiments: list[str], two_object_cg) -> bool:
    return "guidance" in experiments or ("two-object" in experiments and bool(two_object_cg))


def point_calls(p: Point, scale: Scale, T: int) -> dict[str, int]:
    """Network calls per image summed over the point's images: U-Net, classifier gradient, decoder."""
    if p.kind == "nll":
        return {"unet": scale.n_nll * T, "classifier": 0, "decode": 0}
    images = scale.n if p.kind == "two-object" else scale.n + scale.n_fd
    images += scale.diversity[0] * scale.diversity[1] if p.diversity else 0
    per_image = p.steps * (1 if p.guidance == 1.0 else 2)
    return {"unet": images * per_image, "classifier": images * p.steps * bool(p.cg_scale), "decode": images}


def median_seconds(fn, rounds: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def measure_costs(ctx: dict) -> dict[str, float]:
    """Seconds per image of one U-Net call, one decode and one classifier gradient at the evaluation's batch, on
    randomly initialised networks of the bench's shapes (trained weights cost the same): the plan's speeds."""
    ae = AutoencoderConfig.from_diffusers_config(stage_recipe("autoencoder", 1, ctx, probe=True)[0].model)
    side, c = ctx["scale"].size // 2 ** (len(ae.block_out_channels) - 1), ae.latent_channels
    config = UNetConfig.from_diffusers_config(stage_recipe("diffusion", 1, ctx, probe=True)[0].model)
    config = dataclasses.replace(config, in_channels=c, out_channels=c, sample_size=side, cross_attention_dim=384)
    unet, vae = UNet2DConditionModel(config).eval(), AutoencoderKL(ae).eval()
    z, t, states = torch.randn(EVAL_BATCH, c, side, side), torch.full((EVAL_BATCH,), 500), torch.randn(EVAL_BATCH, 12,
                                                                                                          384)
    model = {**ClassifierRecipe().model, **ctx["scale"].models.get("classifier", {})}
    classifier = NoiseAwareClassifier(ClassifierConfig(**{**model, "in_channels": c, "sample_size": side,
                                                          "heads": dict(HEADS), "relations": list(shapes.RELATIONS)}))
    wanted = [classifier.scene_classes([{"shape": "star", "color": "red", "size": "large", "position": "left"}],
                                       None)] * EVAL_BATCH

    def log_prob(x, t):
        return classifier.log_prob_each(x, t, wanted)

    def gradient():
        with torch.enable_grad():
            x = z.clone().requires_grad_(True)
            torch.autograd.grad(log_prob(x, t).sum(), x)

    return {name: median_seconds(fn) / EVAL_BATCH for name, fn in (
        ("unet", lambda: unet(z, t, states)), ("decode", lambda: vae.decode(z)), ("classifier", gradient))}


def training_runs(args, scale: Scale, models: list[str], experiments: list[str]) -> list[tuple[str, float]]:
    """(run, budget in minutes) in training order; a given run costs nothing."""
    runs = [] if args.autoencoder else [("autoencoder", scale.ae_minutes)]
    runs += [] if args.clip else [("clip", scale.clip_minutes)]
    runs += [(f"diffusion {m}", scale.minutes) for m in models]
    classifier = needs_classifier(experiments, two_object_scales(args))
    return runs + ([("classifier", scale.classifier_minutes)] if classifier else [])


def plan_text(runs: list[tuple[str, float]], points: dict[str, list[Point]], scale: Scale, costs: dict, T: int,
              cpu: dict) -> tuple[str, float]:
    """The plan as printed before starting, and its estimated total in seconds."""
    lines = [(f"plan on {cpu['kind']} ({cpu['model']}, {cpu['threads']} threads); measured speeds per image: U-Net "
              f"call {1e3 * costs['unet']:.2f} ms, decode {1e3 * costs['decode']:.2f} ms, classifier gradient "
              f"{1e3 * costs['classifier']:.2f} ms")]
    train_s = 0.0
    for name, minutes in runs:
        train_s += 60 * minutes + RUN_OVERHEAD_S
        lines.append(f"  train {name:22s} {minutes:7.2f} min")
    eval_s = 0.0
    for experiment, ps in points.items():
        calls = [point_calls(p, scale, T) for p in ps]
        seconds = sum(costs[k] * c[k] for c in calls for k in c)
        eval_s += seconds
        lines.append(f"  eval  {experiment:22s} {seconds / 60:7.2f} min  ({len(ps)} points, "
                     f"{sum(c['unet'] for c in calls):,} U-Net image-calls)")
    total = train_s + eval_s
    lines.append(f"  total ≈ {total / 3600:.2f} h: training {train_s / 3600:.2f} h (with ~{RUN_OVERHEAD_S} s per run "
                 f"of probes and caching), evaluation {eval_s / 3600:.2f} h; finished runs and points are skipped")
    return "\n".join(lines), total


# ---- training ----


def train_variant(name: str, steps: int, ctx: dict) -> dict:
    """A variant of the base at the base's steps (once: budget.json marks it done; an interrupted one resumes)."""
    if name == "base":
        return ctx["base"]
    run = ctx["out"] / f"diffusion-{name}"
    done = run / "budget.json"
    if done.is_file():
        plan = json.loads(done.read_text())
        if plan["steps"] != steps:
            raise CarraraError(f"{run} was trained for {plan['steps']} steps, the base for {steps}: give the same "
                               "--minutes, or another --out")
        return plan
    recipe, _ = diffusion_recipe(steps, ctx, VARIANTS[name])
    if ctx["progress"]:
        print(f"diffusion-{name}: {steps} steps (the base's)", file=sys.stderr)
    started = time.perf_counter()
    train_diffusion(recipe, run, resume=(run / "checkpoints").is_dir(), progress=ctx["progress"])
    plan = {"steps": steps, "train_wall_s": round(time.perf_counter() - started, 2), "step_s": round(step_seconds(run), 2)}
    write_json_atomic(done, plan)
    return plan


def diffusion_recipe(steps: int, ctx: dict, changes: dict):
    """families.py's diffusion stage (the shapes recipe at the bench's scale) with one variant's changes."""
    recipe, train = stage_recipe("diffusion", steps, ctx, probe=False)
    return apply_overrides(recipe, changes), train


def train_guide(ctx: dict) -> dict:
    """The noise-aware classifier on the autoencoder's latents, with the base's schedule, for as many steps as a
    probe says fit in --classifier-minutes (once: budget.json marks it done; an interrupted run resumes)."""
    scale, run = ctx["scale"], ctx["out"] / "classifier"
    budget = round(scale.classifier_minutes * 60, 2)

    def recipe(steps: int, data: Path) -> ClassifierRecipe:
        r = ClassifierRecipe(data=str(data), autoencoder=str(ctx["out"] / "autoencoder"), size=scale.size,
                             schedule=ctx["base_recipe"].schedule,
                             num_train_timesteps=ctx["base_recipe"].num_train_timesteps,
                             holdout=min(200, scale.n_train // 5))
        r.model = {**r.model, **scale.models.get("classifier", {})}
        r.train = dataclasses.replace(r.train, steps=steps, batch_size=scale.batch.get("classifier", r.train.batch_size),
                                      checkpoint_every=max(1, steps // scale.checkpoints), log_every=1)
        return r

    if (run / "plan.json").is_file():
        plan = json.loads((run / "plan.json").read_text())
        if plan["budget_s"] != budget:
            raise CarraraError(f"{run} was planned for {plan['budget_s'] / 60:g} min, not {budget / 60:g}: give the "
                               "same --classifier-minutes, or another --out")
        if (run / "budget.json").is_file():
            return json.loads((run / "budget.json").read_text())
    else:
        probe = ctx["out"] / "probes" / "classifier"
        shutil.rmtree(probe, ignore_errors=True)
        train_classifier(recipe(scale.probe_steps, ctx["probe_data"]), probe, progress=False)
        per_step = seconds_per_step(probe)
        shutil.rmtree(probe)
        plan = {"budget_s": budget, "seconds_per_step": round(per_step, 5), "steps": max(2, int(budget / per_step))}
        write_json_atomic(ensure_dir(run) / "plan.json", plan)
    if ctx["progress"]:
        print(f"classifier: {plan['steps']} steps", file=sys.stderr)
    started = time.perf_counter()
    result = train_classifier(recipe(plan["steps"], ctx["data"]), run, resume=(run / "checkpoints").is_dir(),
                              progress=ctx["progress"])
    accuracy = {str(t): {k: None if math.isnan(v) else round(v, 4) for k, v in a.items()}
                for t, a in result["accuracy"].items()}  # NaN: no held-out image has that head's label
    plan.update(train_wall_s=round(time.perf_counter() - started, 2), heldout_accuracy_by_t=accuracy)
    write_json_atomic(run / "budget.json", plan)
    return plan


# ---- evaluation ----


def model_pipe(name: str, ctx: dict):
    """The trained model `name`, loaded once."""
    if name not in ctx["pipes"]:
        ctx["pipes"][name] = load_any(ctx["out"] / ("diffusion" if name == "base" else f"diffusion-{name}"))
    return ctx["pipes"][name]


def faithfulness_numbers(report: dict) -> dict:
    attributes = report["attributes"]
    return {"faithfulness": {a: v["accuracy"] for a, v in attributes.items()},
            "faithfulness_ci95": {a: v["ci95"] for a, v in attributes.items()}}


def quality_row(p: Point, pipe, ctx: dict) -> dict:
    """FD of `--n-fd` images for held-out captions, one-object faithfulness, and (if asked) the diversity."""
    scale, progress = ctx["scale"], ctx["progress"]
    fn = pipe if p.cg_scale is None else ClassifierGuided(pipe, ctx["classifier"], p.cg_scale, ctx["classes"],
                                                          conditional=ctx["cg_on"] == "conditional")
    faith = evaluate_faithfulness(fn, n=scale.n, objects=1, steps=p.steps, sampler=p.sampler, guidance=p.guidance,
                                  batch_size=EVAL_BATCH, progress=progress)
    settings = EvalSettings(model=p.model, steps=p.steps, sampler=p.sampler, guidance=p.guidance,
                            batch_size=EVAL_BATCH)
    fake = ctx["scorer"].embed_images(generate_images(fn, ctx["fd_prompts"], settings, progress))
    row = {"fd": frechet_distance(*feature_stats(ctx["real_emb"]), *feature_stats(fake.numpy().astype(np.float64))),
           "n_gen": len(fake), **faithfulness_numbers(faith)}
    if p.diversity:
        P, K = scale.diversity
        prompts = [text for text in ctx["diversity_prompts"] for _ in range(K)]  # K seeds per prompt
        images = generate_images(fn, prompts, dataclasses.replace(settings, seed=10_000), progress)
        row["diversity"] = float(pairwise_distances(ctx["scorer"].embed_images(images).reshape(P, K, -1)).mean())
    return row


def evaluate_point(p: Point, ctx: dict) -> dict:
    """One point's numbers (cached in out/eval/KEY.json for the same settings)."""
    scale = ctx["scale"]
    settings = json.loads(json.dumps({**dataclasses.asdict(p), "n": scale.n, "n_fd": scale.n_fd,
                                      "n_nll": scale.n_nll, "diversity_grid": scale.diversity,
                                      "clip": str(ctx["clip"]), "trained_steps": ctx["base"]["steps"],
                                      **({"cg_on": ctx["cg_on"], "classifier_steps": ctx["classifier_steps"]}
                                         if p.cg_scale is not None else {}),
                                      # two objects are guided toward both objects' relations (before 2026-12-01:
                                      # the first object's only)
                                      **({"relations": "both"} if p.cg_scale is not None and p.kind == "two-object"
                                         else {})}))
    cache = ctx["out"] / "eval" / f"{p.key}.json"
    if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
        return json.loads(cache.read_text())
    pipe, started = model_pipe(p.model, ctx), time.perf_counter()
    with sampled_variance(pipe, p.variance):
        if p.kind == "nll":
            images, texts = ctx["nll_data"]
            bpd = latent_nll(pipe, images, texts, seed=0, progress=ctx["progress"])
            row = {"nll_bits_per_dim": float(bpd.mean()), "n": len(bpd)}
        elif p.kind == "two-object":
            fn = pipe if p.cg_scale is None else ClassifierGuided(pipe, ctx["classifier"], p.cg_scale,
                                                                  ctx["classes"], conditional=True)
            row = faithfulness_numbers(evaluate_faithfulness(fn, n=scale.n, objects=2, steps=p.steps,
                                                             sampler=p.sampler, guidance=p.guidance,
                                                             batch_size=EVAL_BATCH, progress=ctx["progress"]))
        else:
            row = quality_row(p, pipe, ctx)
    row = {"settings": settings, **row, "seconds": round(time.perf_counter() - started, 2)}
    write_json_atomic(ensure_dir(cache.parent) / cache.name, row)
    return row


def quality(row: dict) -> dict:
    return {k: row[k] for k in ("fd", "faithfulness", "faithfulness_ci95", "diversity", "seconds") if k in row}


def experiment_result(name: str, rows: dict[str, dict], ctx: dict) -> dict:
    """One experiment's section of the JSON, from its points' rows."""
    scale = ctx["scale"]
    if name == "variance":
        runs = {label: {str(s): quality(rows[Point("quality", m, v, "ddpm", s, VARIANCE_GUIDANCE).key])
                        for s in scale.steps} for label, (m, v) in VARIANCES.items()}
        return {"sampler": "ddpm", "guidance": VARIANCE_GUIDANCE, "steps": list(scale.steps), "runs": runs,
                "nll_bits_per_dim": {label: rows[Point("nll", m, v).key]["nll_bits_per_dim"]
                                     for label, (m, v) in VARIANCES.items()}}
    row = lambda kind, model, **settings: rows[default_point(scale, kind, model, **settings).key]
    if name == "schedule":
        return {label: {**quality(row("quality", m)), "nll_bits_per_dim": row("nll", m)["nll_bits_per_dim"]}
                for label, m in (("scaled_linear", "base"), ("cosine", "cosine"))}
    if name == "adagn":
        return {"off": quality(row("quality", "base")), "on": quality(row("quality", "adagn"))}
    if name == "guidance":
        return {"on": ctx["cg_on"], "steps": scale.sample_steps,
                "classifier": [{"scale": s, **quality(row("quality", "base", guidance=1.0, cg_scale=s, diversity=True))}
                               for s in ctx["cg_scales"]],
                "classifier_free": [{"w": w, **quality(row("quality", "base", guidance=w, diversity=True))}
                                    for w in ctx["cfg_scales"]]}
    keys = ("faithfulness", "faithfulness_ci95", "seconds")
    return ({m: {k: row("two-object", m)[k] for k in keys} for m in ctx["models"]}
            | {f"base + relation guidance s={s:g}": {k: row("two-object", "base", cg_scale=s)[k] for k in keys}
               for s in ctx["two_object_cg"]})


def plot_tradeoff(result: dict, path: Path) -> None:
    """Faithfulness (precision-like) against FD and against diversity (recall-like), both guidance sweeps."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, label, scale_key, style in (("classifier", "classifier guidance, s", "scale", "o-"),
                                         ("classifier_free", "classifier-free guidance, w", "w", "s--")):
        points = result[key]
        faith = [100 * q["faithfulness"]["all"] for q in points]
        for ax, x_key in zip(axes, ("fd", "diversity")):
            xs = [q[x_key] for q in points]
            ax.plot(xs, faith, style, label=label)
            for x, y, q in zip(xs, faith, points):
                ax.annotate(f"{q[scale_key]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].set_xlabel("FD (lower is better)")
    axes[1].set_xlabel("diversity (recall-like): distance between images of one prompt")
    for ax in axes:
        ax.set_ylabel("faithfulness, all attributes right (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"shapes: classifier vs classifier-free guidance (classifier on the {result['on']} model)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---- the tables for docs/guided-diffusion.md ----


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_tables(result: dict) -> str:
    """One table per experiment that ran, and a line naming the settings."""
    parts, ex = [], result["experiments"]
    one = ("color", "position", "size", "shape", "all")
    if "variance" in ex:
        v = ex["variance"]
        head = "| σ² | " + " | ".join(f"FD @{s}" for s in v["steps"]) + " | " + " | ".join(
            f"all @{s}" for s in v["steps"]) + " | NLL bits/dim |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for label, runs in v["runs"].items():
            lines.append(f"| {label} | " + " | ".join(f"{runs[str(s)]['fd']:.4g}" for s in v["steps"]) + " | "
                         + " | ".join(pct(runs[str(s)]["faithfulness"]["all"]) for s in v["steps"])
                         + f" | {v['nll_bits_per_dim'][label]:.4f} |")
        parts.append(f"Variance (DDPM, w = {v['guidance']:g}; faithfulness 'all' on one-object captions):\n\n"
                     + "\n".join(lines))
    for name, title, rows in (("schedule", "Schedule", ("scaled_linear", "cosine")), ("adagn", "AdaGN", ("off", "on"))):
        if name in ex:
            nll = name == "schedule"
            head = f"| {title} | FD | " + " | ".join(one) + (" | NLL bits/dim |" if nll else " |")
            lines = [head, "|" + "---|" * (head.count("|") - 1)]
            for label in rows:
                r = ex[name][label]
                lines.append(f"| {label} | {r['fd']:.4g} | " + " | ".join(pct(r["faithfulness"][a]) for a in one)
                             + (f" | {r['nll_bits_per_dim']:.4f} |" if nll else " |"))
            parts.append(f"{title} (default sampler):\n\n" + "\n".join(lines))
    if "guidance" in ex:
        g = ex["guidance"]
        head = "| guidance | scale | FD | faithfulness (all) | diversity |"
        lines = [head, "|---|---|---|---|---|"]
        for key, label, s in (("classifier", f"classifier ({g['on']})", "scale"), ("classifier_free",
                                                                                   "classifier-free", "w")):
            lines += [f"| {label} | {q[s]:g} | {q['fd']:.4g} | {pct(q['faithfulness']['all'])} | {q['diversity']:.4f} |"
                      for q in g[key]]
        parts.append("Guidance (default sampler and steps):\n\n" + "\n".join(lines))
    if "two-object" in ex:
        head = "| model | " + " | ".join(TWO_OBJECT) + " |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for model, r in ex["two-object"].items():
            lines.append(f"| {model} | " + " | ".join(pct(r["faithfulness"][a]) for a in TWO_OBJECT) + " |")
        ceiling = result["reference"]["detector_ceiling_two_objects"]
        lines.append("| *renderer (ceiling)* | " + " | ".join(pct(ceiling[a]) for a in TWO_OBJECT) + " |")
        parts.append(f"Two objects ({result['sample_steps']} {DEFAULTS.sampler} steps, w = {DEFAULTS.guidance:g}):\n\n"
                     + "\n".join(lines))
    cpu = result["cpu"]
    parts.append(f"`shapes` at {result['size']} px; every model {result['trained_steps']} training steps (the base's "
                 f"{result['minutes']:g} CPU-minutes; {cpu['kind']}: {cpu['model']}, {cpu['threads']} threads); "
                 f"faithfulness on n={result['n']} captions, FD by {result['feature_network']} of n_gen="
                 f"{result['n_fd']} against {result['n_heldout']} held-out images, NLL on {result['n_nll']} held-out "
                 "images in bits per latent dimension.")
    return "\n\n".join(parts)


def table_of(path: str) -> str:
    """The markdown tables of a result JSON written by this bench (--table)."""
    try:
        return markdown_tables(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CarraraError(f"--table {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except (KeyError, TypeError, AttributeError):
        raise CarraraError(f"--table {path}: not a result of bench/guided.py (or of an older version of it)") from None


# ---- the run ----


def numbers(text: str | None, kind=float) -> tuple | None:
    """A comma list of numbers ("25,50"), checked."""
    if text is None:
        return None
    try:
        values = tuple(kind(s) for s in text.split(","))
    except ValueError:
        raise CarraraError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise CarraraError(f"expected non-negative numbers, got {text!r}")
    return values


def two_object_scales(args: argparse.Namespace) -> tuple:
    """--two-object-cg's scales; none for an empty string."""
    return numbers(args.two_object_cg) if args.two_object_cg else ()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, help=f"budget of the base diffusion run; the variants train as many "
                                                  f"steps (default {FULL.minutes:g}; tiny {TINY.minutes})")
    p.add_argument("--n", type=int, help=f"faithfulness captions per point (default {FULL.n})")
    p.add_argument("--n-fd", type=int, help=f"generated images per FD (default {FULL.n_fd})")
    p.add_argument("--n-nll", type=int, help=f"held-out images per NLL (default {FULL.n_nll})")
    p.add_argument("--steps", help="the variance experiment's DDPM steps (default "
                                   + ",".join(map(str, FULL.steps)) + ")")
    p.add_argument("--cg-scales", default="0,1,2,4,8", help="classifier guidance scales s (default 0,1,2,4,8)")
    p.add_argument("--cfg-scales", default="1,2,3,4,6,8", help="classifier-free guidance w (default 1,2,3,4,6,8)")
    p.add_argument("--two-object-cg", default="2,4", help="relation-guidance scales s of the two-object experiment, "
                   "on the caption at w = 4 (default 2,4; '' for none)")
    p.add_argument("--cg-on", choices=("unconditional", "conditional"), default="unconditional",
                   help="classifier guidance on the empty prompt, or on the caption at w = 1")
    p.add_argument("--autoencoder", help="a trained autoencoder run to use (default: train one)")
    p.add_argument("--ae-minutes", type=float, help=f"budget of that run (default {FULL.ae_minutes:g})")
    p.add_argument("--clip", help="a `carrara train clip` run on shapes at 64 px for FD (default: train one)")
    p.add_argument("--clip-minutes", type=float, help=f"budget of that CLIP run (default {FULL.clip_minutes:g})")
    p.add_argument("--classifier-minutes", type=float, help=f"budget of the noise-aware classifier (default "
                                                             f"{FULL.classifier_minutes:g})")
    p.add_argument("--only", help="comma list of experiments (default all: " + ",".join(EXPERIMENTS) + ")")
    p.add_argument("--out", help="run folder (default runs/guided, tiny runs/guided-tiny)")
    p.add_argument("--json", help="results (default bench/results/guided-<cpu kind>.json, tiny OUT/guided.json)")
    p.add_argument("--plot", help="the guidance trade-off (default docs/images/guided-tradeoff.png, tiny "
                                  "OUT/guided-tradeoff.png)")
    p.add_argument("--plan", action="store_true", help="print the plan and its estimated time, then stop")
    p.add_argument("--table", help="print the markdown tables of this result JSON, then stop")
    p.add_argument("--tiny", action="store_true", help="seconds per model on 24 tiny images: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def bench_settings(args: argparse.Namespace) -> Scale:
    """The bench's size: families.py's checks of --n, --n-fd, --minutes, --clip-minutes, then this bench's own."""
    scale = bench_scale(args, FULL, TINY)
    given = {"n_nll": args.n_nll, "ae_minutes": args.ae_minutes, "classifier_minutes": args.classifier_minutes,
             "steps": numbers(args.steps, int)}
    scale = dataclasses.replace(scale, **{k: v for k, v in given.items() if v is not None})
    if scale.n_nll < 1 or scale.ae_minutes <= 0 or scale.classifier_minutes <= 0 or 0 in scale.steps:
        raise CarraraError("--n-nll must be at least 1, --ae-minutes and --classifier-minutes positive, --steps ≥ 1")
    if scale.n_fd > scale.n_heldout or scale.n_nll > scale.n_heldout:
        raise CarraraError(f"--n-fd and --n-nll can be at most the {scale.n_heldout} held-out images")
    return scale


def check_autoencoder(run: str, out: Path) -> Path:
    """A given autoencoder run, checked before anything starts: it must hold vae/, and out/ no other one."""
    source, link = Path(run).resolve(), out / "autoencoder"
    if not (source / "vae" / "config.json").is_file():
        raise CarraraError(f"--autoencoder {run}: no trained autoencoder there (expected vae/config.json)")
    if (link.exists() or link.is_symlink()) and link.resolve() != source:
        raise CarraraError(f"{link} already holds another autoencoder: use another --out")
    return source


def use_autoencoder(source: Path, out: Path) -> None:
    """The given autoencoder run becomes out/autoencoder (a link), where the recipes look for it."""
    link = out / "autoencoder"
    if not link.is_symlink():
        link.symlink_to(source, target_is_directory=True)


def prepare_eval(ctx: dict) -> None:
    """The judge's features of the held-out images, the captions each point draws, and their classifier classes."""
    scale = ctx["scale"]
    dataset = load_dataset(str(ctx["heldout"]), size=scale.size)
    images, texts = preload_images(dataset, progress=False)
    scorer = ctx["scorer"] = ClipScorer.load(ctx["clip"])
    ctx["real_emb"] = scorer.embed_images(images).numpy().astype(np.float64)
    ctx["fd_prompts"], ctx["nll_data"] = texts[:scale.n_fd], (images[:scale.n_nll], texts[:scale.n_nll])
    diversity = sample_prompts(scale.diversity[0], 1, seed=1)
    ctx["diversity_prompts"] = [text for _, text in diversity]
    guide = ctx.get("classifier")
    if guide is not None:  # each caption's classes, for the points the classifier guides
        records = {text: guide.scene_classes(r.extra["objects"], r.extra.get("relation"))
                   for r, text in zip(dataset.records, texts)}
        ctx["classes"] = records | caption_classes(guide, sample_prompts(scale.n, 1, 0) + sample_prompts(scale.n, 2, 0)
                                                   + diversity)


def run(args: argparse.Namespace) -> dict | None:
    if args.table:
        print(table_of(args.table))
        return None
    scale = bench_settings(args)
    experiments = chosen(args.only, EXPERIMENTS, "experiment")
    models = [m for m in VARIANTS if any(m in EXPERIMENTS[e] for e in experiments)]
    out = Path(args.out or ("runs/guided-tiny" if args.tiny else "runs/guided"))
    shapes_recipe = load_recipe_file(SHAPES_RECIPE)
    shapes_recipe["diffusion"].update(scale.overrides.get("diffusion", {}))  # tiny: a shorter chain, one-prompt grids
    ctx = {"scale": scale, "out": out, "progress": not args.quiet, "shapes_recipe": shapes_recipe, "pipes": {},
           "data": out / "data", "probe_data": out / "probe-data", "heldout": out / "heldout", "models": models,
           "cg_on": args.cg_on, "cg_scales": numbers(args.cg_scales), "cfg_scales": numbers(args.cfg_scales),
           "two_object_cg": two_object_scales(args)}
    if min(ctx["cfg_scales"]) < 1:
        raise CarraraError("--cfg-scales: w is at least 1 (1 = the conditional model alone)")
    ctx["base_recipe"] = diffusion_recipe(1, ctx, {})[0]
    T = ctx["base_recipe"].num_train_timesteps
    points = {e: experiment_points(e, scale, models, ctx["cg_scales"], ctx["cfg_scales"], ctx["two_object_cg"])
              for e in experiments}
    clip = check_clip(Path(args.clip), scale.size) if args.clip else None
    autoencoder = check_autoencoder(args.autoencoder, out) if args.autoencoder else None
    cpu = cpu_kind()
    costs = measure_costs(ctx)
    text, estimate = plan_text(training_runs(args, scale, models, experiments), points, scale, costs, T, cpu)
    print(text, flush=True)
    if args.plan:
        return None

    started = time.perf_counter()
    build_data(ensure_dir(out), scale, ctx["progress"])
    budgets = {}
    if autoencoder is not None:
        use_autoencoder(autoencoder, out)
    else:
        budgets["autoencoder"] = train_in_budget("autoencoder", scale.ae_minutes * 60, ctx)
    if clip is None:
        budgets["clip"] = train_in_budget("clip", scale.clip_minutes * 60, ctx)
    ctx["clip"] = clip or out / "clip"
    ctx["base"] = budgets["base"] = train_in_budget("diffusion", scale.minutes * 60, ctx)
    for m in models:
        budgets[m] = train_variant(m, ctx["base"]["steps"], ctx)
    if needs_classifier(experiments, ctx["two_object_cg"]):
        budgets["classifier"] = train_guide(ctx)
        ctx["classifier_steps"] = budgets["classifier"]["steps"]
        ctx["classifier"] = NoiseAwareClassifier.from_pretrained(out / "classifier")
    prepare_eval(ctx)

    json_path = args.json or (out / "guided.json" if args.tiny else f"bench/results/guided-{cpu['kind']}.json")
    plot_path = Path(args.plot or (out / "guided-tradeoff.png" if args.tiny else "docs/images/guided-tradeoff.png"))
    ceiling = {k: detector_ceiling(scale.n, k, 0, size=scale.size)["attributes"] for k in (1, 2)}
    result = {
        "what": "Improved DDPM and guided diffusion, reproduced on shapes (issue 21, items 4 and 5)",
        "cpu": cpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
        "size": scale.size, "minutes": scale.minutes, "trained_steps": ctx["base"]["steps"], "n": scale.n,
        "n_fd": scale.n_fd, "n_nll": scale.n_nll, "n_train": scale.n_train, "n_heldout": scale.n_heldout,
        "num_train_timesteps": T, "sampler": DEFAULTS.sampler, "sample_steps": scale.sample_steps,
        "guidance": DEFAULTS.guidance, "feature_network": ctx["scorer"].name, "clip": str(ctx["clip"]),
        "autoencoder": str((out / "autoencoder").resolve()), "training": budgets,
        "reference": {"detector_ceiling_one_object": {a: ceiling[1][a]["accuracy"] for a in FAITHFULNESS},
                      "detector_ceiling_two_objects": {a: v["accuracy"] for a, v in ceiling[2].items()}},
        "plan": {"estimate_s": round(estimate, 1), "seconds_per_image": costs}, "experiments": {},
    }
    for e in experiments:
        rows = {p.key: evaluate_point(p, ctx) for p in points[e]}
        result["experiments"][e] = experiment_result(e, rows, ctx)
        if e == "guidance":
            plot_tradeoff(result["experiments"][e], plot_path)
            result["experiments"][e]["plot"] = str(plot_path)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        write_json_atomic(json_path, result)
    print(markdown_tables(result))
    print(f"wrote {json_path}", file=sys.stderr)
    return result


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except CarraraError as e:
        print(f"carrara: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
