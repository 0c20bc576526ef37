"""`make demo`: a grid of generated images in demo/grid.png, and the time per image.

With a packaged default model it samples from it; without one it first trains the small shapes
model of recipes/demo.toml in demo/run (resumable: run it again to continue an interrupted demo).
The same grid for another model (how the pictures in docs/ are made):

    python -m carrara.demo --model runs/shapes/diffusion --prompts shapes --out docs/images/shapes-grid.png
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.images import image_grid
from carrara.modelfolder import PACKAGED
from carrara.pipeline import Pipeline
from carrara.png import save_png
from carrara.recipe import run_recipe

SHAPES_PROMPTS = [
    "a large red circle on the left", "a large blue square on the right", "a large green triangle at the top",
    "a large yellow star at the bottom", "a large purple diamond in the center", "a large orange cross on the left",
    "a large pink circle at the top", "a large cyan square at the bottom", "a small red square in the center",
    "a small blue circle on the left", "a small green star on the right", "a small yellow triangle at the top",
    "a red circle to the left of a blue square", "a green star above a pink triangle",
    "a yellow diamond below an orange circle", "a purple square to the right of a cyan cross",
]
EMOJI_PROMPTS = [
    "grinning face", "cat face", "a happy kitty", "red heart", "pizza", "a pizza slice", "rocket",
    "a red sports car", "snowman", "a snowman in the snow", "sun", "tree", "woman detective: medium-dark skin tone",
    "flag: France", "dog face", "birthday cake",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carrara.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the packaged model, or train recipes/demo.toml)")
    parser.add_argument("--prompts", choices=["emoji", "shapes"],
                        help="which 16 prompts (default: emoji; shapes for the demo's own shapes model)")
    parser.add_argument("--out", default="demo/grid.png", help="where the grid goes (default: demo/grid.png)")
    args = parser.parse_args(argv)

    out_dir = Path("demo")
    try:
        if args.model:
            model, kind = args.model, "emoji"
        elif (PACKAGED / "default" / "model_index.json").is_file():
            model, kind = "default", "emoji"
        else:
            out_dir.mkdir(exist_ok=True)
            recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo.toml"
            print("no packaged model in this checkout: training the small shapes model of recipes/demo.toml "
                  "(about 10 minutes on 2 cores with AVX-512 BF16, longer on AVX2-only CPUs; run again to resume)", flush=True)
            model = run_recipe(recipe, out_dir / "run", resume=True)["model"]
            kind = "shapes"
        prompts = {"emoji": EMOJI_PROMPTS, "shapes": SHAPES_PROMPTS}[args.prompts or kind]
        pipe = Pipeline.load(model)
        pipe(prompts[:1], steps=2)  # warm-up, so the timing below is steady-state
        t0 = time.perf_counter()
        images = pipe(prompts, seed=0)  # the default settings (diffusion/settings.py)
        per_image = (time.perf_counter() - t0) / len(prompts)
    except CarraraError as e:
        print(f"carrara demo: error: {e}", file=sys.stderr)
        return 2
    grid = Path(args.out)
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, image_grid(images, rows=4, labels=prompts, scale=2), {"prompts": prompts, "model": str(model),
                                                **{k: v for k, v in asdict(DEFAULTS).items() if k != "prompt"}})
    print(f"wrote {grid.resolve()}: {len(prompts)} prompts, {per_image:.2f} s per image "
          f"(batch of {len(prompts)}, {DEFAULTS.steps} {DEFAULTS.sampler} steps, guidance {DEFAULTS.guidance:g}, "
          f"{pipe.precision} U-Net)")
    for i, p in enumerate(prompts):
        print(f"  {i // 4},{i % 4}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
