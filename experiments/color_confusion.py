"""Where a shapes model's colour errors come from: for one-object captions, the expected colour against the
largest detected object's colour, and whether any detected object has the right colour.

    python experiments/color_confusion.py --model runs/shapes/diffusion [--n 200] [--guidance 4]
"""
from __future__ import annotations

import argparse
from collections import Counter

from carrara.evaluate.detector import detect
from carrara.evaluate.faithfulness import sample_prompts
from carrara.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, default=4.0)
    args = p.parse_args()
    pipe = Pipeline.load(args.model)
    prompts = sample_prompts(args.n, 1, 0)
    confusions, right_largest, right_any, none = Counter(), 0, 0, 0
    for start in range(0, args.n, 16):  # the same seeds as `carrara eval faithfulness`
        batch = prompts[start:start + 16]
        images = pipe([t for _, t in batch], steps=20, sampler="dpmpp", guidance=args.guidance, seed=start)
        for (scene, _), image in zip(batch, images):
            want, found = scene.objects[0].color, detect(image).objects
            if not found:
                none += 1
                confusions[(want, "nothing")] += 1
                continue
            right_largest += found[0].color == want
            right_any += any(o.color == want for o in found)
            if found[0].color != want:
                confusions[(want, found[0].color)] += 1
    print(f"{args.n} one-object captions, guidance {args.guidance}: largest object has the right colour "
          f"{right_largest / args.n:.1%}, some object has it {right_any / args.n:.1%}, nothing detected {none}")
    for (want, got), count in confusions.most_common(12):
        print(f"  {want:>7s} → {got:<8s} {count}")


if __name__ == "__main__":
    main()
