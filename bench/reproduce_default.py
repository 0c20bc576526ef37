"""Does `recipes/emoji.toml` reproduce the shipped default model? The cheap part of the answer.

A full re-run takes ≈ 2 h 15 min here. This rebuilds the emoji dataset from the font, compares it with the
captions the shipped model was trained on (count and text), then trains the recipe's autoencoder for its
first 50 steps (the warm-up, whose learning rates do not depend on the run length) and compares every
logged loss with the shipped log (carrara/assets/default/training/autoencoder/metrics.jsonl). Equal losses
mean the same data, initialisation, batches and arithmetic; from there on, training is the same loop.
The diffusion stage cannot be checked this way: it starts from the full-length autoencoder.

With `--run DIR`, the whole answer instead: DIR is a finished re-run (`carrara recipe recipes/emoji.toml --out
DIR`); its diffusion run is exported as `carrara export default` would (fp16) and every tensor is compared with
the packaged model's.

    python bench/reproduce_default.py [--steps 50] [--out bench/results/reproduce_default.json]
    python bench/reproduce_default.py --run runs/emoji-repro [--out bench/results/reproduce_default_full.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from carrara.data.emoji import build_emoji
from carrara.export import export_default
from carrara.fileio import write_json_atomic
from carrara.modelfolder import PACKAGED
from carrara.recipe import apply_overrides, flatten, load_recipe_file
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder

ROOT = Path(__file__).resolve().parent.parent


def logged_losses(path: Path) -> dict:
    """A run's metrics.jsonl → {step: loss} (a resumed run may log a step twice; the last one counts)."""
    return {m["step"]: m["loss"] for m in map(json.loads, path.read_text().splitlines())}


def compare_full_run(run: Path, out: str) -> None:
    """Export a finished re-run to a temporary folder and compare it, tensor by tensor, with the packaged model."""
    shipped = PACKAGED / "default"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_default(run / "diffusion", Path(tmp) / "default", autoencoder_run=run / "autoencoder")
        for path in sorted((Path(tmp) / "default").rglob("*.safetensors")):
            name = str(path.relative_to(Path(tmp) / "default"))
            mine, theirs = load_file(path), load_file(shipped / name)
            same_keys = mine.keys() == theirs.keys()
            diff = max(((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine if k in theirs),
                       default=float("inf"))
            rows[name] = {"tensors": len(mine), "same_keys": same_keys, "max_abs_difference": diff,
                          "bitwise_equal": same_keys and all(mine[k].dtype == theirs[k].dtype
                                                             and mine[k].equal(theirs[k]) for k in mine)}
    logs = {s: logged_losses(run / s / "metrics.jsonl") for s in ("autoencoder", "diffusion")}
    shipped_logs = {s: logged_losses(shipped / "training" / s / "metrics.jsonl") for s in ("autoencoder", "diffusion")}
    result = {"what": f"{run}: a full re-run of recipes/emoji.toml, exported (fp16) and compared with the package",
              "weights": rows, "bitwise_equal": all(r["bitwise_equal"] for r in rows.values()),
              "logged_losses_equal": {s: logs[s] == shipped_logs[s] for s in logs},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(out, result)
    for name, r in rows.items():
        print(f"{name}: {r['tensors']} tensors, bitwise equal: {r['bitwise_equal']}, "
              f"max |difference| {r['max_abs_difference']:.3g}")
    print(f"logged losses equal: {result['logged_losses_equal']}\nwrote {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--run", type=Path, help="a finished `carrara recipe recipes/emoji.toml` run to compare in full")
    p.add_argument("--out")
    args = p.parse_args()
    if args.run:
        return compare_full_run(args.run, args.out or "bench/results/reproduce_default_full.json")
    args.out = args.out or "bench/results/reproduce_default.json"
    shipped = PACKAGED / "default" / "training" / "autoencoder"
    flat = flatten(load_recipe_file(ROOT / "recipes" / "emoji.toml"))
    ae_settings = {k.removeprefix("autoencoder."): v for k, v in flat.items() if k.startswith("autoencoder.")}
    logged = logged_losses(shipped / "metrics.jsonl")
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
        again = logged_losses(Path(tmp) / "ae" / "metrics.jsonl")
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
