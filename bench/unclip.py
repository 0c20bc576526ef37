"""Issue 20's acceptance: DALL-E 2's prior route against direct text conditioning, on the emoji data, at equal
training time, judged alike.

Both routes start from the same model (`--init`: v1, the ε-model; the packaged default is v2 since 2026-11-30) and
get `--minutes M` of training:
  direct  the U-Net fine-tuned on the captions as it was trained (recipes/emoji-v2.toml's diffusion settings, v1's
          ε objective and token-state conditioning: bench/v2_ablations.py's "eps" arm), for all M minutes;
  prior   DALL-E 2's route (docs/unclip.md): the diffusion prior over the emoji CLIP's image embeddings for
          PRIOR_SHARE of M (`carrara train prior`), the unCLIP decoder from the same U-Net for the rest
          (`carrara train decoder`), assembled as one folder (`carrara export unclip`).
Each stage first trains a few steps in a throwaway folder to measure its seconds per step (bench/families.py's
probe); its steps are then its budget / (seconds per step). A stage already trained is not trained again; an
interrupted one resumes with its planned steps. The start model is judged too (0 minutes).

Judged per route (bench/v2_ablations.py's `judge`: 20 DPM-Solver++ steps, w = 4, seed 0, 95 % bootstrap intervals;
the unCLIP route with its prior's recorded settings): emoji-CLIP text→image retrieval top-1/top-5 among the
generated set, CLIP score and FD_clip, on `--n` training captions and `--n-para` hand-written paraphrases; and
**diversity**, DALL-E 2's claim: the mean pairwise CLIP distance (1 − cos) among `--k` samples of each of
`--n-div` paraphrases (seeds 0…k−1), with an interval over prompts (carrara/evaluate/diversity.py). Figures:
docs/images/unclip-diversity.png (the first 4 paraphrases, k samples each, per route), and from the prior route's
folder a grid of variations of 4 data images (each picture, then 4 variations) and an interpolation strip.

    python bench/unclip.py --data runs/emoji/data --clip runs/clip-emoji --minutes 60 --init runs/emoji/diffusion
        [--n 300] [--n-para 100] [--n-div 50] [--k 8] [--out runs/unclip-bench] [--json bench/results/unclip.json]
    python bench/unclip.py --tiny     # seconds, on tiny data and models: checks the bench, measures nothing
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from families import check_clip, cpu_kind, train_config, train_in_budget
from v2_ablations import PARAPHRASES, arm_recipe, fmt, judge, judge_diversity, require_init, tiny_setup

from carrara.data.folder import load_folder
from carrara.errors import CarraraError
from carrara.evaluate.suite import read_prompts
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic
from carrara.images import image_grid
from carrara.modelfolder import resolve
from carrara.pipeline import Pipeline
from carrara.train.decoder import DecoderRecipe, train_decoder
from carrara.train.diffusion import train_diffusion
from carrara.train.prior import PriorRecipe, train_prior
from carrara.unclip import assemble_unclip

ROOT = Path(__file__).resolve().parent.parent
PRIOR_SHARE = 0.2  # of the prior route's minutes: the prior (vectors, cheap steps); the decoder gets the rest
ROUTES = {"direct": (("direct", 1.0),), "prior": (("prior", PRIOR_SHARE), ("decoder", 1 - PRIOR_SHARE))}
TINY_PRIOR = {"width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2}
CHECKPOINTS = 4  # per training run, so an interrupted one resumes


def stage_recipe(stage: str, steps: int, ctx: dict, probe: bool):
    """(recipe, train function) of one stage at `steps`."""
    tiny = ctx["tiny"]
    if stage == "direct":
        recipe = arm_recipe("eps", {**ctx, "steps": steps})
        recipe.train = train_config(recipe.train, steps, None, CHECKPOINTS, probe)
        return recipe, train_diffusion
    if stage == "prior":
        recipe = PriorRecipe(data=ctx["data"], clip=str(ctx["clip"]))
        if tiny:
            recipe.model.update(TINY_PRIOR)
            recipe.holdout, recipe.sample = 2, {"steps": 4, "sampler": "ddim", "guidance": 2.0}
            recipe.train.bf16 = False
        recipe.train = train_config(recipe.train, steps, 8 if tiny else None, CHECKPOINTS, probe)
        return recipe, train_prior
    recipe = DecoderRecipe(data=ctx["data"], clip=str(ctx["clip"]), from_model=ctx["init_folder"])
    if tiny:
        recipe.sample_images, recipe.sample = 2, {"steps": 2, "sampler": "ddim", "guidance": 2.0}
        recipe.train.bf16 = False
    recipe.train = train_config(recipe.train, steps, 4 if tiny else None, CHECKPOINTS, probe)
    return recipe, train_decoder


def train_route(route: str, ctx: dict) -> dict:
    """Every stage of a route within its share of the minutes → the model folder it samples from."""
    stages = {stage: train_in_budget(stage, ctx["minutes"] * 60 * share, ctx, stage_recipe)
              for stage, share in ROUTES[route]}
    model = ctx["out"] / "direct"
    if route == "prior":
        model = ctx["out"] / "unclip"
        if not (model / "model_index.json").is_file():
            assemble_unclip(ctx["out"] / "decoder", ctx["out"] / "prior", model)
    return {"stages": stages, "model": str(model), "steps": {s: p["steps"] for s, p in stages.items()},
            "train_wall_s": round(sum(s["train_wall_s"] for s in stages.values()), 2),
            "step_s": round(sum(s["step_s"] for s in stages.values()), 2)}


def unclip_figures(model: str, ctx: dict) -> dict[str, str]:
    """Variations of 4 data images (each row: the picture, then 4 variations) and an interpolation strip between
    the first two, from the prior route's folder."""
    pipe = Pipeline.load(model)
    records = load_folder(ctx["data"]).records
    picks = [records[i] for i in torch.linspace(0, len(records) - 1, 4).long().tolist()]
    size = pipe.sizes[-1]
    pictures = [Image.open(Path(ctx["data"]) / r.file_name).convert("RGB").resize((size, size)) for r in picks]
    cells = []
    for picture in pictures:
        kwargs, _ = pipe.unclip.manipulation_inputs("variations", [picture], 4, {}, seed=0)
        cells += [picture, *pipe([""] * 4, seed=0, **kwargs)]
    paths = {"variations": ctx["figures"] / "unclip-variations.png",
             "interpolation": ctx["figures"] / "unclip-interpolation.png"}
    save_image_atomic(paths["variations"], image_grid(cells, rows=len(pictures)))
    kwargs, _ = pipe.unclip.manipulation_inputs("interpolate", pictures[:2], 6, {}, seed=0)
    strip = pipe([""] * 6, seed=0, **kwargs)
    save_image_atomic(paths["interpolation"], image_grid([pictures[0], *strip, pictures[1]], rows=1))
    return {k: str(v) for k, v in paths.items()}


def markdown_table(result: dict) -> str:
    head = ("| route | training (min) | captions top-5 % | paraphrases top-5 % | captions top-1 % | CLIP score captions "
            "| FD_clip captions | FD_clip paraphrases | diversity (1 − cos) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in result["routes"].items():
        c, p, d = r["judged"]["captions"], r["judged"]["paraphrases"], r["diversity"]
        minutes = "0" if r.get("train_wall_s") is None else f"{r['train_wall_s'] / 60:.1f}"
        lines.append(f"| {name} | {minutes} | {fmt(c['t2i_top5'])} | {fmt(p['t2i_top5'])} | {fmt(c['t2i_top1'])} "
                     f"| {fmt(c['clip_score'], 1)} | {fmt(c['fd_clip'], 1, '.3f')} | {fmt(p['fd_clip'], 1, '.3f')} "
                     f"| {fmt(d, 1, '.3f')} |")
    cpu = result["cpu"]
    lines += ["", (f"{result['minutes']:g} min per route; n = {result['n']} captions, {result['n_para']} paraphrases; "
                   f"diversity over {result['k']} samples of {result['n_div']} paraphrases; judge {result['clip']}; "
                   f"{cpu['kind']} ({cpu['model']}, {cpu['threads']} threads).")]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the 64-px emoji dataset (carrara data build emoji)")
    p.add_argument("--clip", help="the emoji CLIP: the prior's space, the decoder's condition and the judge")
    p.add_argument("--init", help="the model both routes start from: v1, the ε-model (runs/emoji/diffusion or its "
                                   "export; the packaged default is v2 since 2026-11-30)")
    p.add_argument("--minutes", type=float, help="training minutes per route (default 60, tiny 0.02)")
    p.add_argument("--n", type=int, help="training captions judged (default 300, tiny 8)")
    p.add_argument("--n-para", type=int, help="paraphrases judged (default 100, tiny 4)")
    p.add_argument("--n-div", type=int, help="paraphrases whose samples' diversity is measured (default 50, tiny 3)")
    p.add_argument("--k", type=int, help="samples per prompt for diversity (default 8, tiny 3)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 50, tiny 5)")
    p.add_argument("--out", help="run folder (default runs/unclip-bench, tiny runs/unclip-bench-tiny)")
    p.add_argument("--json", help="results (default bench/results/unclip.json, tiny OUT/unclip.json)")
    p.add_argument("--figures", help="figure folder (default docs/images, tiny OUT/figures)")
    p.add_argument("--tiny", action="store_true", help="seconds on tiny data and models: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    for key, full, tiny in (("minutes", 60.0, 0.02), ("n", 300, 8), ("n_para", 100, 4), ("n_div", 50, 3),
                            ("k", 8, 3), ("bootstrap", 50, 5)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.minutes <= 0 or args.n < 2 or args.n_para < 2 or args.n_div < 2 or args.k < 2:
        raise CarraraError("--minutes must be > 0; --n, --n-para, --n-div and --k at least 2")
    out = ensure_dir(args.out or ROOT / "runs" / ("unclip-bench-tiny" if args.tiny else "unclip-bench"))
    ctx = {"out": out, "minutes": args.minutes, "n": args.n, "n_para": args.n_para, "k": args.k,
           "bootstrap": args.bootstrap, "progress": not args.quiet, "overrides": {}, "size": 64, "init": args.init,
           "paraphrases": str(PARAPHRASES), "tiny": args.tiny, "probe_steps": 3 if args.tiny else 6,
           "figures": ensure_dir(Path(args.figures) if args.figures else
                                 (out / "figures" if args.tiny else ROOT / "docs" / "images"))}
    if args.tiny:
        ctx.update(tiny_setup(out, ctx["progress"]))
        ctx["init_folder"] = ctx["init"]
    else:
        if not (args.data and args.clip):
            raise CarraraError("--data DIR and --clip RUN are needed (or --tiny)")
        require_init(args.init)
        ctx.update(data=args.data, clip=check_clip(Path(args.clip), 64))
        ctx["init_folder"] = str(resolve(args.init).root)  # a missing start model fails here, before training
    paraphrases = read_prompts(ctx["paraphrases"])
    if len(paraphrases) < args.n_div:
        raise CarraraError(f"--n-div {args.n_div}: {ctx['paraphrases']} has only {len(paraphrases)} prompts")
    ctx["div_prompts"] = paraphrases[:args.n_div]
    result = {"cpu": cpu_kind(), "command": " ".join(sys.argv), "minutes": args.minutes, "prior_share": PRIOR_SHARE,
              "n": args.n, "n_para": args.n_para, "n_div": args.n_div, "k": args.k, "clip": str(ctx["clip"]),
              "init": ctx["init"], "routes": {}}
    result["routes"]["start (0 min)"] = {"model": ctx["init"], "train_wall_s": None,
                                         "judged": judge(ctx["init"], "start", ctx),
                                         "diversity": judge_diversity(ctx["init_folder"], "start", ctx)}
    for route in ROUTES:
        trained = train_route(route, ctx)
        result["routes"][route] = {**trained, "judged": judge(trained["model"], route, ctx),
                                   "diversity": judge_diversity(trained["model"], route, ctx)}
    result["figures"] = unclip_figures(result["routes"]["prior"]["model"], ctx)
    rows = [Image.open(ctx["out"] / "eval" / name / "diversity.png") for name in ("start", "direct", "prior")]
    strip = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 8 * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        strip.paste(r, (0, y))
        y += r.height + 8
    save_image_atomic(ctx["figures"] / "unclip-diversity.png", strip)
    result["figures"]["diversity"] = str(ctx["figures"] / "unclip-diversity.png")
    result["table"] = markdown_table(result)
    write_json_atomic(Path(args.json) if args.json else
                      (out / "unclip.json" if args.tiny else ROOT / "bench" / "results" / "unclip.json"), result)
    print(result["table"])
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except CarraraError as e:
        sys.exit(f"unclip: error: {e}")


if __name__ == "__main__":
    main()
