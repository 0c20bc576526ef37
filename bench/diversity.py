"""Sample diversity of several models on one prompt list: does a model draw different images for different seeds?

For each model, `--k` samples (seeds 0…k−1, 20 DPM-Solver++ steps, w = 4) of every prompt, embedded by an emoji
CLIP; a prompt's diversity is the mean pairwise distance 1 − cos among its k images, reported as the mean over
prompts with a 95 % bootstrap interval over prompts (carrara/evaluate/diversity.py; bench/v2_ablations.py's
`judge_diversity`, whose cache in OUT/eval/NAME/ this shares). The default prompt list is 20 generic requests that
fit many emoji and are not captions of the data ("an animal", "a fruit", "a musical instrument":
carrara/data/emoji_generic_prompts.txt), where a model that reads only its text draws one image for every seed.

    python bench/diversity.py --models v1=default v2=runs/emoji-v2/model --clip runs/clip-emoji
        [--prompts carrara/data/emoji_generic_prompts.txt] [--k 8] [--out runs/diversity] [--json FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind
from v2_ablations import judge_diversity

from carrara.errors import CarraraError
from carrara.evaluate.suite import read_prompts
from carrara.fileio import write_json_atomic

GENERIC = Path(__file__).resolve().parent.parent / "carrara" / "data" / "emoji_generic_prompts.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="NAME=MODEL pairs (a model folder or packaged name)")
    p.add_argument("--clip", required=True, help="a `carrara train clip` run at the models' size")
    p.add_argument("--prompts", default=str(GENERIC))
    p.add_argument("--k", type=int, default=8, help="samples per prompt (seeds 0…k−1)")
    p.add_argument("--bootstrap", type=int, default=50)
    p.add_argument("--out", default="runs/diversity")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise CarraraError(f"--models takes NAME=MODEL pairs, got {args.models}")
    if args.k < 2:
        raise CarraraError(f"--k must be at least 2 (pairs of samples), got {args.k}")
    ctx = {"out": Path(args.out), "div_prompts": read_prompts(args.prompts), "k": args.k, "clip": Path(args.clip),
           "bootstrap": args.bootstrap}
    rows = {}
    for name, model in pairs:
        d = judge_diversity(model, name, ctx)
        rows[name] = {"model": model, "value": d["value"], "ci95": d["ci95"], "per_prompt": d["per_prompt"]}
        lo, hi = d["ci95"]
        print(f"{name:>12}  diversity {d['value']:.3f} [{lo:.3f}, {hi:.3f}]  ({Path(args.out) / 'eval' / name / 'diversity.png'})",
              flush=True)
    result = {"what": "mean pairwise emoji-CLIP distance 1 − cos among k samples per prompt (seeds 0…k−1), 20 "
                      "DPM-Solver++ steps, w = 4; 95 % bootstrap over prompts",
              "prompts": args.prompts, "k": args.k, "clip": args.clip, "cpu": cpu_kind(), "models": rows}
    if args.json:
        write_json_atomic(args.json, result)
    return result


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except CarraraError as e:
        sys.exit(f"bench/diversity.py: error: {e}")


if __name__ == "__main__":
    main()
