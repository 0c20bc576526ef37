"""`carrara generate`: prompt → PNG whose metadata says how to make it again."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from carrara.errors import CarraraError

DEFAULTS = {"steps": 20, "sampler": "dpmpp", "guidance": 4.0, "negative_prompt": "", "seed": 0, "precision": "auto"}


def _settings(args: argparse.Namespace) -> tuple[dict, str]:
    """Merge --from metadata, then explicit flags, then defaults; returns (settings, model path)."""
    from carrara.png import read_png_metadata

    base = dict(DEFAULTS)
    model = "default"
    if args.from_png:
        meta = read_png_metadata(args.from_png)
        base.update({k: meta[k] for k in ("prompt", "steps", "sampler", "guidance", "negative_prompt", "seed", "n")
                     if k in meta})
        base["precision"] = meta.get("precision", "fp32")  # PNGs from before the precision option were fp32
        model = meta.get("model", model)
    flags = {"prompt": args.prompt, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
             "negative_prompt": args.negative, "seed": args.seed, "precision": getattr(args, "precision", None)}
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.n != 1 or "n" not in base:
        base["n"] = args.n
    if args.model is not None:
        model = args.model
    if not base.get("prompt", "").strip():
        raise CarraraError('give a prompt, e.g. carrara generate "a red circle" (or --from image.png)')
    return base, model


def generate_command(args: argparse.Namespace) -> int:
    from carrara.pipeline import GenerationSettings, Pipeline
    from carrara.png import save_png
    from carrara.utils.grid import image_grid

    s, model = _settings(args)
    GenerationSettings(s["prompt"], s["negative_prompt"], s["steps"], s["sampler"], s["guidance"], s["seed"]).validate()
    out = Path(args.out or "carrara.png")
    if out.suffix.lower() != ".png":
        raise CarraraError(f"-o {out}: the output must be a .png file (metadata lives in PNG text chunks)")
    if not out.parent.resolve().is_dir():
        raise CarraraError(f"-o {out}: folder {out.parent} does not exist")
    t0 = time.perf_counter()
    pipe = Pipeline.load(model, allow_pickle=getattr(args, "allow_pickle", False), precision=s["precision"])
    t1 = time.perf_counter()
    images = pipe([s["prompt"]] * s["n"], steps=s["steps"], sampler=s["sampler"], guidance=s["guidance"],
                  negative_prompt=s["negative_prompt"], seed=s["seed"])
    t2 = time.perf_counter()
    if args.from_png:
        from carrara.png import read_png_metadata

        recorded = read_png_metadata(args.from_png).get("model_hash")
        if recorded and recorded != pipe.model_hash:
            print(f"carrara: warning: {args.from_png} was made by model {recorded}, this is {pipe.model_hash}",
                  file=sys.stderr)
    image = images[0] if len(images) == 1 else image_grid(images)
    model_ref = model if model == "default" else str(Path(model).resolve())
    metadata = {**s, "precision": pipe.precision, "model": model_ref, "model_hash": pipe.model_hash}
    save_png(out, image, metadata)
    print(f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, load {t1 - t0:.2f} s, "
          f"generate {t2 - t1:.2f} s)")
    return 0
