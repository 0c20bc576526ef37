"""Sample diversity of several models on one prompt list: does a model draw different images for different seeds?

For each model, `--k` samples (seeds 0…k−1, 20 DPM-Solver++ steps, w = 4) of every prompt, embedded by an emoji
CLIP; a prompt's diversity is the mean pairwise distance 1 − cos among its k images, reported as the mean over
prompts with a 95 % bootstrap interval over prompts (carrara/evaluate/diversity.py; bench/v2_ablations.py's
`judge_diversity`, whose cache in OUT/eval/NAME/ this shares). The default prompt list is 20 generic requests that
fit many emoji and are not captions of the data ("an animal", "a fruit", "a musical instrument":
carrara/data/emoji_generic_prompts.txt), where a model that reads only its text draws one image for every seed.

Diversity alone would reward noise. With `--groups FILE` (default carrara/data/emoji_generic_heldout.tsv: requests
worded unlike any caption, each with the CLDR subgroups that answer it) and `--data DIR` (the emoji data the
nearest real image is looked up in), the prompts are that file's and each model also gets its **group precision**:
the share of samples whose nearest real emoji in CLIP space is of an accepted subgroup (evaluate/diversity.py,
`group_precision`), beside chance (the accepted subgroups' share of the data).

    python bench/diversity.py --models v1=default v2=runs/emoji-v2/model --clip runs/clip-emoji
        [--prompts carrara/data/emoji_generic_prompts.txt | --groups [FILE] --data runs/emoji/data]
        [--k 8] [--out runs/diversity] [--json FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from families import cached, cpu_kind
from v2_ablations import judge_diversity

from carrara.data.emoji_groups import load_subgroups
from carrara.data.folder import load_folder
from carrara.data.load import preload_images
from carrara.errors import CarraraError
from carrara.evaluate.diversity import group_precision
from carrara.evaluate.suite import read_prompts
from carrara.fileio import write_json_atomic
from carrara.models.clip import ClipScorer

GENERIC = Path(__file__).resolve().parent.parent / "carrara" / "data" / "emoji_generic_prompts.txt"
HELDOUT = GENERIC.with_name("emoji_generic_heldout.tsv")


def read_groups(path: str | Path) -> tuple[list[str], list[set[str]]]:
    """The requests of a groups file and each one's accepted subgroups ("request<TAB>subgroup,subgroup")."""
    prompts, accepted = [], []
    for line in read_prompts(path):
        request, tab, groups = line.partition("\t")
        if not tab or not request.strip() or not groups.strip():
            raise CarraraError(f"--groups {path}: {line[:60]!r} is not 'request<TAB>subgroup,subgroup'")
        prompts.append(request.strip())
        accepted.append({g.strip() for g in groups.split(",") if g.strip()})
    return prompts, accepted


def real_embeddings(data: str, clip: str, out: Path) -> tuple[torch.Tensor, list[str]]:
    """The CLIP embeddings (N, E) of DATA's images and each one's CLDR subgroup ('' if none), kept in OUT."""
    dataset = load_folder(data)
    emoji = [r.extra.get("emoji") for r in dataset.records]
    if not all(emoji):
        raise CarraraError(f"--data {data}: its records name no emoji (metadata 'emoji'): build it with "
                           "`carrara data build emoji`")
    subgroups = load_subgroups()
    groups = [subgroups.get(e, "") for e in emoji]
    key = {"data": str(Path(data).resolve()), "files": [r.file_name for r in dataset.records], "clip": str(clip)}
    out.mkdir(parents=True, exist_ok=True)
    return cached(out / "real-embeds.pt", key,
                  lambda: ClipScorer.load(clip).embed_images(preload_images(dataset)[0])), groups


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="NAME=MODEL pairs (a model folder or packaged name)")
    p.add_argument("--clip", required=True, help="a `carrara train clip` run at the models' size")
    p.add_argument("--prompts", default=str(GENERIC))
    p.add_argument("--groups", nargs="?", const=str(HELDOUT), default=None,
                   help=f"requests with their accepted subgroups (default {HELDOUT.name}): adds group precision")
    p.add_argument("--data", help="with --groups: the emoji data folder the nearest real image is looked up in")
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
    if args.groups and not args.data:
        raise CarraraError("--groups needs --data: the emoji data folder whose nearest image names a sample's kind")
    prompts, accepted = read_groups(args.groups) if args.groups else (read_prompts(args.prompts), None)
    real = real_embeddings(args.data, args.clip, Path(args.out)) if args.groups else None
    ctx = {"out": Path(args.out), "div_prompts": prompts, "k": args.k, "clip": Path(args.clip),
           "bootstrap": args.bootstrap}
    rows = {}
    for name, model in pairs:
        d = judge_diversity(model, name, ctx, embeds=bool(args.groups))
        rows[name] = {"model": model, "value": d["value"], "ci95": d["ci95"], "per_prompt": d["per_prompt"]}
        lo, hi = d["ci95"]
        line = f"{name:>12}  diversity {d['value']:.3f} [{lo:.3f}, {hi:.3f}]"
        if real is not None:
            g = group_precision(d["embeds"], *real, accepted, bootstrap=args.bootstrap)
            rows[name]["group_precision"] = g
            line += f"  group precision {g['value']:.1%} [{g['ci95'][0]:.1%}, {g['ci95'][1]:.1%}] (chance {g['chance']:.1%})"
        print(f"{line}  ({Path(args.out) / 'eval' / name / 'diversity.png'})", flush=True)
    result = {"what": "mean pairwise emoji-CLIP distance 1 − cos among k samples per prompt (seeds 0…k−1), 20 "
                      "DPM-Solver++ steps, w = 4; 95 % bootstrap over prompts"
                      + ("; group precision: share of samples whose nearest real emoji (CLIP cosine) is of an "
                         "accepted CLDR subgroup" if args.groups else ""),
              "prompts": args.groups or args.prompts, "k": args.k, "clip": args.clip, "data": args.data,
              "cpu": cpu_kind(), "models": rows}
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
