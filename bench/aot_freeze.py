"""Frozen vs code-only AOTInductor packages of the U-Net, one forward pass each against eager (issue 18, Part A).

`carrara compile` writes frozen packages by default (models/compiled.py): inductor's `freezing` turns the weights into
constants, so oneDNN gets them prepacked. This bench shows why, on the machine it runs on: for each batch size it
compiles the U-Net both ways (weights frozen into the package; code only, handed the weights at load), checks each
against eager, and times one forward pass of each (interleaved rounds, medians). Packages go to a temporary folder.

    python bench/aot_freeze.py [--model default] [--batches 2,32] [--rounds 15] [--out bench/results/aot-freeze.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind

from carrara.fileio import write_json_atomic
from carrara.models.compiled import _example, _Exported, compile_unet, load_package
from carrara.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--precision", default="auto", help="the U-Net's precision (default auto: bf16 where native)")
    p.add_argument("--batches", default="2,32")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="bench/results/aot-freeze.json")
    args = p.parse_args()
    os.environ["CARRARA_COMPILED"] = "0"
    pipe = Pipeline.load(args.model, precision=args.precision)
    net = _Exported(pipe.unet.eval())
    weights = net.state_dict()
    dtype = next(pipe.unet.parameters()).dtype
    tokens = pipe.text_encoder.max_length
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = _example(pipe.unet, dtype, batch, tokens)
            runs, row = {"eager": net}, {}
            for kind in ("frozen", "code"):
                path = Path(tmp) / f"{kind}-{batch}.pt2"
                row[f"{kind}_compile_s"] = compile_unet(pipe.unet, path, batch=batch, tokens=tokens,
                                                       frozen=kind == "frozen")
                row[f"{kind}_package_mb"] = path.stat().st_size / 1e6
                runs[kind] = load_package(path, weights, frozen=kind == "frozen")
            times = {name: [] for name in runs}
            with torch.inference_mode():
                ref = net(*inputs).float()
                for name, run in runs.items():
                    out = run(*inputs)
                    out = out[0] if isinstance(out, (list, tuple)) else out
                    row[f"{name}_max_abs_diff_vs_eager"] = (out.float() - ref).abs().max().item()
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        started = time.perf_counter()
                        run(*inputs)
                        times[name].append(time.perf_counter() - started)
            med = {name: statistics.median(v) for name, v in times.items()}
            row.update({"median_ms": {k: 1000 * v for k, v in med.items()},
                        "speedup_vs_eager": {k: med["eager"] / v for k, v in med.items()}, "seconds": times})
            results[f"batch_{batch}"] = row
            print(f"batch {batch}: " + ", ".join(f"{k} {1000 * v:.1f} ms ({med['eager'] / v:.2f}×)"
                                                 for k, v in med.items())
                  + f"; packages {row['frozen_package_mb']:.0f} MB frozen, {row['code_package_mb']:.1f} MB code",
                  flush=True)
    write_json_atomic(args.out, {
        "what": "one U-Net forward pass: eager vs AOTInductor packages frozen (weights as constants) and code-only "
                "(weights handed over at load); medians of interleaved rounds",
        "model": args.model, "model_hash": pipe.model_hash, "precision": pipe.precision, "tokens": tokens,
        "rounds": args.rounds, "cpu": cpu_kind(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
