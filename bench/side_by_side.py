"""One row per model, the same prompts and seeds: how docs/ shows what a new model draws that an old one did not.

    python bench/side_by_side.py --models default /work/v2/diffusion --out docs/images/v1-vs-v2.png
        [--prompts "pizza" "rocket" …] [--steps 20] [--guidance 4] [--seed 0] [--scale 2]

The default prompts are issue 17's: the plain names and paraphrases v1 drew as blobs at seed 0.
"""
from __future__ import annotations

import argparse

from carrara.fileio import check_writable
from carrara.images import image_grid
from carrara.pipeline import Pipeline
from carrara.png import save_png

ISSUE_17 = ["pizza", "rocket", "crescent moon", "soccer ball", "strawberry", "penguin", "rainbow", "birthday cake",
            "a slice of pizza", "a football", "a cheeseburger", "a spooky ghost"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="model folders (or 'default'), one row each")
    p.add_argument("--prompts", nargs="+", default=ISSUE_17, help="one column each (default: issue 17's failures)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0, help="column i uses seed + i, in every row")
    p.add_argument("--scale", type=int, default=2, help="pixel enlargement of the figure (default 2)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    check_writable(args.out, "--out")
    images = []
    for model in args.models:
        images += Pipeline.load(model)(args.prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
    grid = image_grid(images, rows=len(args.models), scale=args.scale)
    save_png(args.out, grid, {"models": args.models, "prompts": args.prompts, "steps": args.steps,
                              "guidance": args.guidance, "seed": args.seed})
    print(f"wrote {args.out}: rows {', '.join(args.models)}")


if __name__ == "__main__":
    main()
