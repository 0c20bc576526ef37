"""Sampling speed: carrara's Pipeline vs diffusers' StableDiffusionPipeline on the same exported weights.

Both make 64×64 images with 20 DPM-Solver++(2M) steps at guidance 4 from the same initial latents on the
same timesteps (carrara's logSNR grid is handed to diffusers' DPMSolverMultistepScheduler), so they do the
same arithmetic; the runs are interleaved (carrara, diffusers, carrara, …) in one process and the medians
compared. Also timed: carrara in fp32, to separate the bf16 lever from the rest. The images must match:
the mean |Δpixel| between carrara (fp32) and diffusers is reported and must stay ≤ 1/255; carrara's default
(bf16 U-Net weights where the CPU has native bf16; else the int8 U-Net where the model has a calibration, as the
packaged default does) is reported against diffusers too (tolerance 2/255).

A cascade model is timed at its base's side (64 px): diffusers' pipeline has no upsampler. `--compiled` adds
carrara with the U-Net packages `carrara compile` made for this machine (loaded at once), beside eager.

    python bench/sample.py [--model default] [--batches 1,16] [--runs 5] [--compiled] [--out bench/results/sample.json]
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind

from carrara.diffusion.samplers import default_timesteps
from carrara.export import export_diffusers
from carrara.fileio import write_json_atomic
from carrara.pipeline import Pipeline

PROMPTS = ["cat face", "a red sports car", "pizza", "a snowman in the snow", "red heart", "rocket",
           "a happy kitty", "flag of France", "a slice of watermelon", "a yellow star", "a dog face", "a tree",
           "a blue whale", "an emoji of a smiling face", "a cup of coffee", "a soccer ball"]


def initial_latents(pipe: Pipeline, n: int, seed: int) -> torch.Tensor:
    """carrara's x_T: image i from its own generator seeded seed + i."""
    return torch.cat([torch.randn(1, *pipe.latent_shape(), generator=torch.Generator().manual_seed(seed + i))
                      for i in range(n)])  # (n, c, h, w)


def diffusers_pipeline(model: str):
    """diffusers' StableDiffusionPipeline with DPMSolverMultistepScheduler on `model`'s exported weights."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        export_diffusers(model, f"{tmp}/sd")
        sd = diffusers.StableDiffusionPipeline.from_pretrained(f"{tmp}/sd", local_files_only=True)
    sd.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    return sd


def image_runner(ours: dict[str, Pipeline], sd, prompts: list[str], steps: int,
                 guidance: float) -> Callable[[str, int], np.ndarray]:
    """run(name, n): n images of the prompts by carrara pipeline `name` or by "diffusers" `sd`, the same arithmetic
    (carrara fp32's x_T and DPM-Solver++ timesteps for both), as (n, H, W, 3) in [0, 1]."""
    ref = ours["carrara-fp32"]
    timesteps = default_timesteps("dpmpp", ref.schedule, steps)

    def run(name: str, n: int) -> np.ndarray:
        batch = (prompts * n)[:n]
        if name == "diffusers":
            if ref.unet.config.class_embed_type == "projection":  # v2 also takes the pooled text embedding
                pooled = torch.cat([ref.condition([""] * n)[1], ref.condition(batch)[1]])  # (2n, D): ∅ then c
                sd.unet.forward = functools.partial(type(sd.unet).forward, sd.unet, class_labels=pooled)
            with torch.inference_mode():
                return sd(batch, timesteps=timesteps, guidance_scale=guidance,
                          latents=initial_latents(ref, n, 0), output_type="np").images  # (n, H, W, 3) in [0, 1]
        images = ours[name](batch, steps=steps, sampler="dpmpp", guidance=guidance, seed=0, output="tensor",
                            size=ours[name].sizes[0])  # (n, 3, H, W) in [-1, 1]
        return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()

    return run


def interleaved_seconds(run: Callable[[str, int], object], names: list[str], n: int,
                        runs: int) -> dict[str, list[float]]:
    """Seconds of `runs` rounds of run(name, n), the names interleaved in each round."""
    times = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            t0 = time.perf_counter()
            run(name, n)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--compiled", action="store_true", help="also time carrara with its `carrara compile` packages")
    p.add_argument("--out", default="bench/results/sample.json")
    args = p.parse_args()
    import diffusers
    # eager unless asked: a compiled package loads after 800 passes, part-way through the timing (models/compiled.py)
    os.environ["CARRARA_COMPILED"] = "0"

    ours = {"carrara": Pipeline.load(args.model), "carrara-fp32": Pipeline.load(args.model, precision="fp32")}
    if args.compiled:
        os.environ["CARRARA_COMPILED"] = "1"
        ours["carrara-compiled"] = Pipeline.load(args.model)
        os.environ["CARRARA_COMPILED"] = "0"
        if ours["carrara-compiled"].compiled is None:
            raise SystemExit(f"error: no compiled U-Net for {args.model} on this machine: run `carrara compile` first")
    ref = ours["carrara-fp32"]
    run = image_runner(ours, diffusers_pipeline(args.model), PROMPTS, args.steps, args.guidance)
    names = [*ours, "diffusers"]
    results = {}
    for n in (int(b) for b in args.batches.split(",")):
        outputs = {name: run(name, n) for name in names}  # warm-up, and the images to compare
        times = interleaved_seconds(run, names, n, args.runs)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        results[f"batch_{n}"] = {
            "seconds": times, "median_s": med,
            "images_per_s": {name: n / s for name, s in med.items()},
            "speedup_vs_diffusers": {name: med["diffusers"] / med[name] for name in ours},
            "mean_abs_pixel_diff_vs_diffusers_255": {
                name: float(np.abs(outputs[name] - outputs["diffusers"]).mean() * 255) for name in ours},
        }
        r = results[f"batch_{n}"]
        print(f"batch {n}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in r["images_per_s"].items())
              + " | speed-up " + ", ".join(f"{k} {v:.2f}×" for k, v in r["speedup_vs_diffusers"].items())
              + " | mean |Δpixel| vs diffusers " + ", ".join(
                  f"{k} {v:.2f}/255" for k, v in r["mean_abs_pixel_diff_vs_diffusers_255"].items()), flush=True)
    write_json_atomic(args.out, {
        "what": f"64×64 images, {args.steps} DPM-Solver++(2M) steps, guidance {args.guidance}, same latents and "
                "timesteps; medians of interleaved runs in one process",
        "model": args.model, "model_hash": ref.model_hash, "precision": ours["carrara"].precision,
        "runs": args.runs, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "compiled": args.compiled, "cpu_kind": cpu_kind(),
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
