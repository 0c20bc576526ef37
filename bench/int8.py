"""int8 U-Net against fp32 and diffusers, end to end (issue 18, Part A on the AVX2 kind).

The model needs its calibration first (`carrara quantize --model MODEL`). carrara int8, carrara fp32 and diffusers'
StableDiffusionPipeline (same exported weights) make the same 64×64 images — 20 DPM-Solver++(2M) steps, guidance
4, the same initial latents and timesteps (bench/sample.py's setup) — in interleaved runs, medians compared, at each
batch. Quality: mean |Δpixel| of int8 against fp32 on the same seeds (target ≤ 2/255). Fraction of peak as
bench/roofline.py counts it: the fp32 run's FlopCounterMode FLOPs (int8 does the same multiply-adds) over each
median time, against the fp32 square-matmul peak measured in the same process.

    python bench/int8.py [--model default] [--batches 1,16] [--runs 5] [--out bench/results/int8-avx2.json]
    python bench/int8.py --quality-only --batches 16   # Δpixel only, no timing, no diffusers
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind
from roofline import flops_of, matmul_peak
from sample import diffusers_pipeline, image_runner, interleaved_seconds

from carrara.fileio import write_json_atomic
from carrara.models.int8 import QUALITY_PROMPTS
from carrara.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--peak-sizes", default="1024,2048,4096", help="square matmul sizes timed for the fp32 peak "
                   "(the fastest counts)")
    p.add_argument("--quality-only", action="store_true", help="only the int8-vs-fp32 Δpixel")
    p.add_argument("--out", default="bench/results/int8-avx2.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = {"carrara-int8": Pipeline.load(args.model, precision="int8"),
            "carrara-fp32": Pipeline.load(args.model, precision="fp32")}
    ref = ours["carrara-fp32"]
    sd = None if args.quality_only else diffusers_pipeline(args.model)
    run = image_runner(ours, sd, list(QUALITY_PROMPTS), args.steps, args.guidance)
    names = [*ours] + ([] if args.quality_only else ["diffusers"])
    peak = None if args.quality_only else matmul_peak(torch.float32, tuple(int(n) for n in args.peak_sizes.split(",")))
    results = {}
    for n in (int(b) for b in args.batches.split(",")):
        outputs = {name: run(name, n) for name in names}  # warm-up, and the images to compare
        r = results[f"batch_{n}"] = {"mean_abs_pixel_diff_255": {
            f"{name}_vs_fp32": float(np.abs(outputs[name] - outputs["carrara-fp32"]).mean() * 255)
            for name in names if name != "carrara-fp32"}}
        if not args.quality_only:
            gflop = flops_of(lambda n=n: run("carrara-fp32", n)) / 1e9
            times = interleaved_seconds(run, names, n, args.runs)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            r.update({"seconds": times, "median_s": med, "images_per_s": {k: n / s for k, s in med.items()},
                      "speedup_vs_diffusers": {k: med["diffusers"] / med[k] for k in ours},
                      "int8_vs_fp32": med["carrara-fp32"] / med["carrara-int8"], "gflop": gflop,
                      "fraction_of_fp32_peak": {k: gflop / s / peak for k, s in med.items()}})
        print(f"batch {n}: " + ", ".join(f"{k} {v:.2f}/255" for k, v in r["mean_abs_pixel_diff_255"].items()) + (
            "" if args.quality_only else " | " + ", ".join(f"{k} {v:.2f} img/s" for k, v in r["images_per_s"].items())
            + f" | int8 {r['speedup_vs_diffusers']['carrara-int8']:.2f}× diffusers, {r['int8_vs_fp32']:.2f}× fp32"
            + " | of the fp32 peak: " + ", ".join(f"{k} {v:.0%}" for k, v in r["fraction_of_fp32_peak"].items())),
            flush=True)
    write_json_atomic(args.out, {
        "what": f"64×64 images, {args.steps} DPM-Solver++(2M) steps, guidance {args.guidance}, same latents and "
                "timesteps; int8 U-Net (models/int8.py) vs fp32 vs diffusers, medians of interleaved runs; Δpixel "
                "against carrara fp32 on the same seeds; fraction of the fp32 matmul peak by the fp32 run's FLOPs",
        "model": args.model, "model_hash": ref.model_hash, "cpu": cpu_kind(), "runs": args.runs,
        "quality_only": args.quality_only, "peak_fp32_gflops_per_s": peak, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
