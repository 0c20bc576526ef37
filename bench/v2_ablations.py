"""Issue 17's ablations for the default model v2's card: what each change to v1 buys, judged by the emoji CLIP.

Arms — each a short fine-tune of the same starting model (`--init`: v1, the ε-model without the pooled embedding),
on the same data with recipes/emoji-v2.toml's diffusion settings (batch, lr, warm-up, EMA, balance, caption
variants), the same seed and `--steps` steps (default 500), differing only in what the arm names:
  eps           ε-prediction, token states only (v1 trained longer: the control for "more steps")
  eps+pooled    ε-prediction + the pooled MiniLM sentence embedding added to the time embedding (Imagen / SDXL)
  v             v-prediction (Salimans & Ho 2022; Stable Diffusion 2's fine-tune from ε), token states only
  v+pooled      both: v2's recipe, cut short
and v1 itself (0 steps). `--curve DIR` also judges the long v2 run's snapshots (DIR/STEP/ema.safetensors, the EMA
weights of every 500th checkpoint) inside `--curve-model`'s folder: steps of training against retrieval.

Judged as docs/default-model.md judges v1 (`carrara eval`, 20 DPM-Solver++ steps, guidance 4, seed 0, 95 %
bootstrap intervals): emoji-CLIP text→image retrieval top-1 and top-5 among the generated set, CLIP score and
FD_clip, on `--n` training captions and on `--n-para` hand-written paraphrases (carrara/data/emoji_paraphrases.txt).
Diversity too (the measure that showed v2's collapse, docs/results/diversity): the mean pairwise emoji-CLIP
distance 1 − cos among 8 samples (seeds 0–7) of each of the first 20 paraphrases (bench/unclip.py's
`judge_diversity`), so each change is also seen by what it does to the spread of samples.
Each arm's training resumes if interrupted and is not repeated; each evaluation is kept in OUT/eval/.

    python bench/v2_ablations.py --data runs/emoji/data --clip runs/clip-emoji --init runs/emoji/diffusion [--steps 500]
        [--arms eps,eps+pooled,v,v+pooled] [--curve /work/v2/snapshots --curve-model /work/v2/diffusion]
        [--n 300] [--n-para 100] [--out runs/v2-ablations] [--json bench/results/v2-ablations.json]
    python bench/v2_ablations.py --tiny     # seconds, on tiny data and models: checks the bench, measures nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from families import cached, check_clip, cpu_kind, load_cached, pick
from lora import finished, tiny_base, to_uint8

from carrara.errors import CarraraError
from carrara.evaluate.diversity import diversity
from carrara.evaluate.suite import EvalSettings, read_prompts, run_eval
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic, write_text_atomic
from carrara.images import image_grid
from carrara.modelfolder import resolve
from carrara.models.clip import ClipScorer
from carrara.pipeline import Pipeline
from carrara.recipe import apply_overrides, flatten, load_recipe_file
from carrara.train.checkpoint import latest_checkpoint
from carrara.train.clip import ClipRecipe, train_clip
from carrara.train.core import TrainConfig
from carrara.train.diffusion import DiffusionRecipe, train_diffusion

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "emoji-v2.toml"
PARAPHRASES = ROOT / "carrara" / "data" / "emoji_paraphrases.txt"
ARMS = {"eps": ("epsilon", False), "eps+pooled": ("epsilon", True), "v": ("v_prediction", False),
        "v+pooled": ("v_prediction", True)}
DIV_PROMPTS, DIV_K = 20, 8  # diversity: the first 20 paraphrases, 8 seeds each
FIGURE_PROMPTS = 4  # paraphrases shown in the diversity figure
MODEL_FILES = ("model_index.json", "scheduler", "vae", "text_encoder", "tokenizer")  # besides the U-Net (modelfolder.py)
TINY_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220), "yellow": (240, 200, 20),
                "black": (20, 20, 20), "purple": (140, 40, 180)}


def arm_recipe(arm: str, ctx: dict) -> DiffusionRecipe:
    """recipes/emoji-v2.toml's diffusion stage, started from --init, with the arm's objective and conditioning."""
    prediction_type, pooled = ARMS[arm]
    table = flatten(load_recipe_file(RECIPE)["diffusion"])
    if "model" in ctx["overrides"]:  # --tiny: a whole U-Net config replaces the recipe's
        table = {k: v for k, v in table.items() if not k.startswith("model.")}
    init = ctx.get("init_folder", ctx["init"])
    table.update({"prediction_type": prediction_type, "pooled": pooled, "init_unet": init,
                  "train.steps": ctx["steps"], "train.sample_every": ctx["steps"],
                  "train.checkpoint_every": min(100, ctx["steps"]), **ctx["overrides"]})
    return apply_overrides(DiffusionRecipe(data=ctx["data"], autoencoder=init, size=ctx["size"]), table)


def train_arm(arm: str, ctx: dict) -> dict:
    """One arm's run (resumed if interrupted, skipped if finished) → its folder and wall time."""
    run = ctx["out"] / arm
    done = finished(run, ctx["steps"])
    started = time.perf_counter()
    if not done:
        train_diffusion(arm_recipe(arm, ctx), run, resume=latest_checkpoint(run) is not None, progress=ctx["progress"])
    return {"model": str(run), "steps": ctx["steps"], "train_wall_s": None if done else
            round(time.perf_counter() - started, 1)}


def snapshot_model(curve_model: Path, snapshot: Path, folder: Path) -> Path:
    """A model folder whose U-Net weights are a snapshot's EMA (the rest linked from the run's model folder)."""
    if (folder / "model_index.json").exists():
        return folder
    ensure_dir(folder / "unet")
    for name in MODEL_FILES:
        if (curve_model / name).exists():
            os.symlink((curve_model / name).resolve(), folder / name)
    os.symlink((curve_model / "unet" / "config.json").resolve(), folder / "unet" / "config.json")
    os.symlink((snapshot / "ema.safetensors").resolve(), folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


def tiny_snapshot(run: Path, folder: Path) -> Path:
    """folder/STEP/ema.safetensors from a run's newest checkpoint, as the v2 run's snapshots are kept."""
    ckpt = latest_checkpoint(run)
    step_dir = ensure_dir(folder / str(int(ckpt.name.split("_")[1])))
    shutil.copyfile(ckpt / "ema.safetensors", step_dir / "ema.safetensors")
    return folder


def snapshots(curve: Path) -> list[tuple[int, Path]]:
    """DIR/STEP/ema.safetensors, by step."""
    found = sorted((int(d.name), d) for d in curve.iterdir() if d.name.isdigit() and (d / "ema.safetensors").is_file())
    if not found:
        raise CarraraError(f"--curve {curve}: no STEP/ema.safetensors snapshots in it")
    return found


def samples_per_prompt(pipe: Pipeline, prompts: list[str], k: int) -> list[list[Image.Image]]:
    """k images of each prompt at the base's size (a cascade's upsampler is not run), image j from seed j (so
    every route draws from the same seeds)."""
    return [pipe([p] * k, seed=0, size=pipe.sizes[0]) for p in prompts]


def judge_diversity(model: str, name: str, ctx: dict, *, embeds: bool = False) -> dict:
    """Diversity of `--k` samples per paraphrase (kept in OUT/eval/NAME/diversity.json for the same settings); with
    `embeds`, also the samples' CLIP embeddings (P, K, E) under "embeds" (kept beside it, diversity-embeds.pt)."""
    folder = ensure_dir(ctx["out"] / "eval" / name)
    settings = {"prompts": ctx["div_prompts"], "k": ctx["k"], "clip": str(ctx["clip"]), "model": model}
    cache, kept = folder / "diversity.json", folder / "diversity-embeds.pt"
    if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
        if not embeds:
            return json.loads(cache.read_text())
        e = load_cached(kept, settings)
        if e is not None:
            return {**json.loads(cache.read_text()), "embeds": e}
    pipe, scorer = Pipeline.load(model), ClipScorer.load(ctx["clip"])
    images = samples_per_prompt(pipe, ctx["div_prompts"], ctx["k"])
    e = scorer.embed_images(to_uint8([im for row in images for im in row])).reshape(len(images), ctx["k"], -1)
    result = {"settings": settings, **diversity(e, bootstrap=ctx["bootstrap"])}
    save_image_atomic(folder / "diversity.png", image_grid([im for row in images[:FIGURE_PROMPTS] for im in row],
                                                           rows=min(FIGURE_PROMPTS, len(images))))
    cached(kept, settings, lambda: e)
    write_json_atomic(cache, result)
    return {**result, "embeds": e} if embeds else result


def judge(model: str, name: str, ctx: dict) -> dict:
    """Captions and paraphrases, as docs/default-model.md evaluates v1 (kept in OUT/eval/NAME/)."""
    row = {}
    for what, prompts, n in (("captions", None, ctx["n"]), ("paraphrases", ctx["paraphrases"], ctx["n_para"])):
        folder = ctx["out"] / "eval" / name / what
        settings = EvalSettings(model=model, data=ctx["data"], n=n, clip=str(ctx["clip"]), prompts=prompts,
                                metrics=("fd", "clipscore", "retrieval"), bootstrap=ctx["bootstrap"])
        cached = folder / "metrics.json"
        report = json.loads(cached.read_text()) if cached.is_file() else None
        if report is None or report["settings"] != json.loads(json.dumps(dataclasses.asdict(settings))):  # as saved
            report = run_eval(settings, folder, progress=ctx["progress"])
        m = report["metrics"]
        row[what] = {"t2i_top1": pick(m, "T2I-top1"), "t2i_top5": pick(m, "T2I-top5"),
                     "clip_score": pick(m, "CLIPScore", "generated]"), "fd_clip": pick(m, "FD["), "n": n}
    d = judge_diversity(model, name, {**ctx, "div_prompts": read_prompts(ctx["paraphrases"])[:DIV_PROMPTS],
                                      "k": DIV_K})
    row["diversity"] = {"value": d["value"], "ci95": d["ci95"], "k": d["k"], "prompts": DIV_PROMPTS}
    return row


def fmt(metric: dict, scale: float = 100.0, spec: str = ".1f") -> str:
    lo, hi = metric["ci95"]
    return f"{metric['value'] * scale:{spec}} [{lo * scale:{spec}}, {hi * scale:{spec}}]"


def markdown_table(result: dict) -> str:
    """The card's ablation table: one row per arm (and snapshot), captions and paraphrases side by side."""
    head = ("| model | steps | captions top-5 % | paraphrases top-5 % | captions top-1 % | FD_clip captions "
            "| CLIP score captions | diversity |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in {**result["arms"], **result["curve"]}.items():
        c, p = r["judged"]["captions"], r["judged"]["paraphrases"]
        lines.append(f"| {name} | {r['steps']} | {fmt(c['t2i_top5'])} | {fmt(p['t2i_top5'])} | {fmt(c['t2i_top1'])} "
                     f"| {fmt(c['fd_clip'], 1, '.3f')} | {fmt(c['clip_score'], 1)} "
                     f"| {fmt(r['judged']['diversity'], 1, '.3f')} |")
    cpu = result["cpu"]
    lines += ["", (f"n = {result['n']} captions, {result['n_para']} paraphrases; judge {result['clip']}; "
                   f"{cpu['kind']} ({cpu['model']}, {cpu['threads']} threads).")]
    return "\n".join(lines)


def tiny_setup(out: Path, progress: bool) -> dict:
    """Tiny emoji-like data (16 px squares with caption variants and a `base` field), a tiny v1 and a tiny judge."""
    data = out / "data"
    if not (data / "metadata.jsonl").is_file():
        ensure_dir(data)
        lines = []
        for i, (colour, rgb) in enumerate(TINY_COLOURS.items()):
            for j, (size, side) in enumerate((("small", 8), ("big", 12))):
                im = Image.new("RGB", (16, 16), "white")
                im.paste(rgb, (8 - side // 2, 8 - side // 2, 8 + side // 2, 8 + side // 2))
                name = f"{i}{j}.png"
                im.save(data / name)
                lines.append(json.dumps({"file_name": name, "text": f"{size} {colour} square", "base": colour,
                                         "captions": [f"a {size} {colour} box", f"{size} {colour} block"]}))
        write_text_atomic(data / "metadata.jsonl", "\n".join(lines) + "\n")
    paraphrases = out / "paraphrases.txt"
    write_text_atomic(paraphrases, "".join(f"a {c} tile\n" for c in TINY_COLOURS))
    clip = out / "clip"
    recipe = ClipRecipe(data=str(data), size=16, holdout=2, shift=1,
                        model={"channels": [8, 16], "embed_dim": 16, "groups": 4},
                        train=TrainConfig(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, log_every=2,
                                          checkpoint_every=4, sample_every=4, bf16=False))
    if latest_checkpoint(clip) is None:
        train_clip(recipe, clip, progress=progress)
    overrides = {"model": json.loads((tiny_base(out / "v1") / "unet" / "config.json").read_text()), "train.batch_size": 4, "train.bf16": False,
                 "train.warmup_steps": 1, "train.log_every": 1, "sample_prompts": ["big red square"]}
    return {"data": str(data), "size": 16, "init": str(out / "v1"), "clip": clip, "paraphrases": str(paraphrases),
            "overrides": overrides}


def require_init(init: str | None) -> None:
    """The start model must be named: "default" meant v1 until v2 was packaged (this bench's and bench/unclip.py's)."""
    if not init:
        raise CarraraError("--init V1 is needed: the v1 ε-model (runs/emoji/diffusion, or a copy of its export); the "
                           "packaged default is v2 since 2026-11-30")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the 64-px emoji dataset (carrara data build emoji)")
    p.add_argument("--clip", help="the judge: a `carrara train clip` run on that data at 64 px")
    p.add_argument("--init", help="the model every arm starts from: v1, the ε-model (runs/emoji/diffusion or its "
                                   "export; the packaged default is v2 since 2026-11-30)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per arm (default 500, tiny 2)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {', '.join(ARMS)}")
    p.add_argument("--curve", help="a folder of STEP/ema.safetensors snapshots of the long run, judged too")
    p.add_argument("--curve-model", help="the long run's model folder (its config, VAE, scheduler)")
    p.add_argument("--n", type=int, help="training captions judged (default 300, tiny 8)")
    p.add_argument("--n-para", type=int, help="paraphrases judged (default 100, tiny 4)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 50, tiny 5)")
    p.add_argument("--out", help="run folder (default runs/v2-ablations, tiny runs/v2-ablations-tiny)")
    p.add_argument("--json", help="results (default bench/results/v2-ablations.json, tiny OUT/v2-ablations.json)")
    p.add_argument("--tiny", action="store_true", help="seconds on tiny data and models: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    for key, full, tiny in (("steps", 500, 2), ("n", 300, 8), ("n_para", 100, 4), ("bootstrap", 50, 5)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    arms = args.arms.split(",") if args.arms else []
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise CarraraError(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if args.steps < 1 or args.n < 2 or args.n_para < 2:
        raise CarraraError("--steps must be at least 1, --n and --n-para at least 2")
    if bool(args.curve) != bool(args.curve_model):
        raise CarraraError("--curve and --curve-model go together: the snapshots and the run's model folder")
    out = ensure_dir(args.out or ROOT / "runs" / ("v2-ablations-tiny" if args.tiny else "v2-ablations"))
    ctx = {"out": out, "steps": args.steps, "n": args.n, "n_para": args.n_para, "bootstrap": args.bootstrap,
           "progress": not args.quiet, "overrides": {}, "size": 64, "init": args.init,
           "paraphrases": str(PARAPHRASES)}
    if args.tiny:
        ctx.update(tiny_setup(out, ctx["progress"]))
    else:
        if not (args.data and args.clip):
            raise CarraraError("--data DIR and --clip RUN are needed (or --tiny)")
        require_init(args.init)
        ctx.update(data=args.data, clip=check_clip(Path(args.clip), 64))
        # a missing starting model fails here, before any training; the arms train from its folder ("default" is the
        # packaged model's name to Pipeline.load, not a folder the training stages read)
        ctx["init_folder"] = str(resolve(args.init).root)
    curve = snapshots(Path(args.curve)) if args.curve else []
    result = {"cpu": cpu_kind(), "command": " ".join(sys.argv), "steps": args.steps, "n": args.n,
              "n_para": args.n_para, "clip": str(ctx["clip"]), "init": ctx["init"], "arms": {}, "curve": {}}
    result["arms"]["v1 (start)"] = {"steps": 0, "judged": judge(ctx["init"], "v1", ctx)}
    for arm in arms:
        trained = train_arm(arm, ctx)
        result["arms"][arm] = {**trained, "judged": judge(trained["model"], arm, ctx)}
    if args.tiny and not args.curve and arms:  # the snapshot path, on the last arm's own final EMA weights
        args.curve, args.curve_model = str(tiny_snapshot(out / arms[-1], out / "snapshots")), str(out / arms[-1])
        curve = snapshots(Path(args.curve))
    for step, snap in curve:
        folder = snapshot_model(Path(args.curve_model), snap, out / "curve" / str(step))
        result["curve"][f"v2 run, step {step}"] = {"steps": step, "judged": judge(str(folder), f"curve-{step}", ctx)}
    result["table"] = markdown_table(result)
    write_json_atomic(Path(args.json) if args.json else
                      (out / "v2-ablations.json" if args.tiny else ROOT / "bench" / "results" / "v2-ablations.json"),
                      result)
    print(result["table"])
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except CarraraError as e:
        sys.exit(f"v2_ablations: error: {e}")


if __name__ == "__main__":
    main()
