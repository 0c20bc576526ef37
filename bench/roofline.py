"""How close sampling and training come to this CPU's matmul peak.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention: 2 per
multiply-add) counted over one real run; times are medians of separate runs without the counter. The peak is
measured in the same process: the fastest of square matmuls n = 1024, 2048, 4096, in bf16 and fp32, all threads. Target (issue 6):
sampling at batch 16 reaches ≥ 40 % of the bf16 peak.

    python bench/roofline.py [--model default] [--runs 5] [--out bench/results/roofline.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from carrara.diffusion.objectives import diffusion_loss, sample_t_and_noise
from carrara.diffusion.schedule import NoiseSchedule
from carrara.fileio import write_json_atomic
from carrara.modelfolder import resolve
from carrara.models.config import UNetConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.pipeline import Pipeline
from carrara.train.core import TrainConfig, Trainer


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), runs: int = 10) -> float:
    """GFLOP/s of the fastest square matmul size (median of runs each): the machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = max(best, 2 * n**3 / median_seconds(lambda: a @ b, runs) / 1e9)  # noqa: B023
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="bench/results/roofline.json")
    args = p.parse_args()
    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    rows = {}
    for precision in ("bf16", "fp32"):
        pipe = Pipeline.load(args.model, precision=precision)
        prompts = [f"emoji number {i}" for i in range(args.batch)]
        def run(pipe=pipe, prompts=prompts):
            return pipe(prompts, steps=20, sampler="dpmpp", guidance=4.0, seed=0, output="tensor")

        flops, seconds = flops_of(run), median_seconds(run, args.runs)
        rows[f"sampling_{precision}"] = {"gflop": flops / 1e9, "seconds": seconds, "gflops_per_s": flops / seconds / 1e9}

    config = json.loads((resolve(args.model).unet / "config.json").read_text())
    B, schedule = args.train_batch, NoiseSchedule.from_config("scaled_linear", T=1000)
    latents = torch.randn(B, config["in_channels"], config["sample_size"], config["sample_size"])
    states = torch.randn(B, 64, config["cross_attention_dim"])

    def loss_fn(model, idx, gen, rows):
        t, noise = sample_t_and_noise(latents, schedule, gen)
        return diffusion_loss(lambda x, t: model(x, t, states), latents, t, noise, schedule, "epsilon")

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tmp, UNet2DConditionModel(UNetConfig.from_diffusers_config(config)),
                          TrainConfig(steps=10**6, batch_size=B, lr=1e-4, warmup_steps=1), n_examples=B,
                          loss_fn=loss_fn)
        flops, seconds = flops_of(lambda: trainer.step(0)), median_seconds(lambda: trainer.step(1), args.runs)
    rows["training_step"] = {"gflop": flops / 1e9, "seconds": seconds, "gflops_per_s": flops / seconds / 1e9,
                             "autocast": str(trainer.dtype)}
    for row in rows.values():
        row["share_of_bf16_peak"] = row["gflops_per_s"] / peak["bf16"]
        row["share_of_fp32_peak"] = row["gflops_per_s"] / peak["fp32"]
    write_json_atomic(args.out, {
        "what": f"achieved GFLOP/s (FlopCounterMode FLOPs / median wall time): sampling {args.batch} images "
                f"(20 dpmpp steps, guidance 4) and one training step at batch {args.train_batch}, against "
                "square-matmul peaks measured in the same run",
        "model": args.model, "peak_gflops_per_s": peak, "rows": rows, "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    })
    print(f"matmul peak: bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s")
    for name, row in rows.items():
        print(f"{name}: {row['gflop']:.1f} GFLOP in {row['seconds']:.2f} s = {row['gflops_per_s']:.0f} GFLOP/s "
              f"({row['share_of_bf16_peak']:.0%} of bf16 peak, {row['share_of_fp32_peak']:.0%} of fp32 peak)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
