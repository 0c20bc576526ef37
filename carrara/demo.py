"""`make demo`: a grid of generated images in demo/grid.png, and the time per image.

With a packaged default model it samples from it; without one it first trains the small shapes
model of recipes/demo.toml in demo/run (resumable: run it again to continue an interrupted demo).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from carrara.errors import CarraraError

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


def main() -> int:
    from carrara.modelfolder import PACKAGED
    from carrara.pipeline import Pipeline
    from carrara.png import save_png
    from carrara.utils.grid import image_grid

    out_dir = Path("demo")
    out_dir.mkdir(exist_ok=True)
    try:
        if (PACKAGED / "default" / "model_index.json").is_file():
            model, prompts = "default", EMOJI_PROMPTS
        else:
            from carrara.recipe import run_recipe

            recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo.toml"
            print("no packaged model in this checkout: training the small shapes model of recipes/demo.toml "
                  "(about 10 minutes on 2 cores; run again to resume)", flush=True)
            model = run_recipe(recipe, out_dir / "run", resume=True)["diffusion"]
            prompts = SHAPES_PROMPTS
        pipe = Pipeline.load(model)
        pipe(prompts[:1], steps=2)  # warm-up, so the timing below is steady-state
        t0 = time.perf_counter()
        images = pipe(prompts, steps=20, sampler="dpmpp", guidance=4.0, seed=0)
        per_image = (time.perf_counter() - t0) / len(prompts)
    except CarraraError as e:
        print(f"carrara demo: error: {e}", file=sys.stderr)
        return 2
    grid = out_dir / "grid.png"
    save_png(grid, image_grid(images, rows=4, labels=prompts, scale=2), {"prompts": prompts, "model": str(model), "steps": 20,
                                                "sampler": "dpmpp", "guidance": 4.0, "seed": 0})
    print(f"wrote {grid.resolve()}: {len(prompts)} prompts, {per_image:.2f} s per image "
          f"(batch of {len(prompts)}, 20 DPM-Solver++ steps, guidance 4)")
    for i, p in enumerate(prompts):
        print(f"  {i // 4},{i % 4}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
