"""Does `recipes/emoji.toml` reproduce the shipped default model? The cheap part of the answer.

A full re-run takes ≈ 2 h 15 min here. This rebuilds the emoji dataset from the font, compares it with the
captions the shipped model was trained on (count and text), then trains the recipe's autoencoder for its
first 50 steps (the warm-up, whose learning rates do not depend on the run length) and compares every
logged loss with the shipped log (carrara/assets/default/training/autoencoder/metrics.jsonl). Equal losses
mean the same data, initialisation, batches and arithmetic; from there on, training is the same loop.
The diffusion stage cannot be checked this way: it starts from the full-length autoencoder.

    python bench/reproduce_default.py [--steps 50] [--out bench/results/reproduce_default.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from carrara.data.emoji import build_emoji
from carrara.io import write_json_atomic
from carrara.modelfolder import PACKAGED
from carrara.recipe import apply_overrides, flatten, load_recipe_file
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="bench/results/reproduce_default.json")
    args = p.parse_args()
    shipped = PACKAGED / "default" / "training" / "autoencoder"
    flat = flatten(load_recipe_file(ROOT / "recipes" / "emoji.toml"))
    ae_settings = {k.removeprefix("autoencoder."): v for k, v in flat.items() if k.startswith("autoencoder.")}
    logged = {m["step"]: m["loss"] for m in map(json.loads, (shipped / "metrics.jsonl").read_text().splitlines())}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = Path(tmp) / "data"
        build_emoji(data, size=flat.get("data.size", 64), progress=False)
        n_images = sum(1 for _ in (data / "metadata.jsonl").open())
        recipe = apply_overrides(AutoencoderRecipe(data=str(data), size=flat.get("data.size", 64)), ae_settings)
        shipped_config = json.loads((shipped / "config.json").read_text())
        train_now = json.loads(json.dumps(vars(recipe.train)))
        same_settings = all(train_now.get(k) == v for k, v in shipped_config["train"].items())
        train_autoencoder(recipe, Path(tmp) / "ae", progress=False, stop_at=args.steps)
        again = {m["step"]: m["loss"] for m in
                 map(json.loads, (Path(tmp) / "ae" / "metrics.jsonl").read_text().splitlines())}
        seconds = time.perf_counter() - t0
    compared = {s: (logged[s], again[s]) for s in sorted(again) if s in logged}
    worst = max(abs(a - b) / abs(a) for a, b in compared.values())
    result = {"what": f"emoji data rebuilt, recipes/emoji.toml's autoencoder trained {args.steps} steps; "
                      "logged losses vs the shipped model's log",
              "images": n_images, "same_recipe_settings_as_shipped": same_settings,
              "losses": {str(s): {"shipped": a, "again": b} for s, (a, b) in compared.items()},
              "max_relative_difference": worst, "identical": worst == 0.0, "seconds": seconds,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(args.out, result)
    print(f"{n_images} images; recipe settings as shipped: {same_settings}; {len(compared)} logged losses, "
          f"max relative difference {worst:.2e} ({'identical' if worst == 0 else 'different'}); {seconds:.0f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
