"""One U-Net forward pass under each speed lever, at the batch sizes sampling uses (2 = one image with guidance,
32 = sixteen), interleaved rounds in one process, medians. docs/performance.md records what was kept.

Levers: fp32 (reference), bf16 autocast, bf16 weights (what Pipeline(precision="bf16") does), bf16 weights in
channels_last memory format, and with --compile torch.compile (inductor, freezing) of the bf16-weight model,
whose compile time is reported separately. Every lever's output is compared with fp32 (max |Δε|).

    python bench/levers.py [--model default] [--rounds 7] [--compile [--dynamic]] [--out bench/results/levers.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from carrara.fileio import write_json_atomic
from carrara.modelfolder import resolve
from carrara.models.unet import UNet2DConditionModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", default="2,32")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    p.add_argument("--dynamic", action="store_true", help="compile once for all batch sizes (dynamic=True)")
    p.add_argument("--out", default="bench/results/levers.json")
    args = p.parse_args()
    fp32 = UNet2DConditionModel.from_pretrained(resolve(args.model).unet).float().eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16_cl = copy.deepcopy(bf16).to(memory_format=torch.channels_last)

    def autocast(x, t, s, pooled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32(x, t, s, class_labels=pooled)

    levers = {
        "fp32": (lambda x, t, s, pooled: fp32(x, t, s, class_labels=pooled), torch.float32, False),
        "bf16 autocast": (autocast, torch.float32, False),
        "bf16 weights": (lambda x, t, s, pooled: bf16(x, t, s, class_labels=pooled), torch.bfloat16, False),
        "bf16 weights + channels_last": (lambda x, t, s, pooled: bf16_cl(x, t, s, class_labels=pooled),
                                         torch.bfloat16, True),
    }
    compile_seconds = {}
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become constants: prepacked for oneDNN, folded
        compiled = torch.compile(bf16, dynamic=True if args.dynamic else None)
        levers["bf16 weights + torch.compile"] = (lambda x, t, s, pooled: compiled(x, t, s, class_labels=pooled),
                                                  torch.bfloat16, False)
    results = {}
    c = fp32.config
    for B in (int(b) for b in args.batches.split(",")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, c.in_channels, c.sample_size, c.sample_size, generator=g)  # (B, 4, 16, 16)
        t = torch.full((B,), 500)
        s = torch.randn(B, 64, c.cross_attention_dim, generator=g)  # (B, L, D)
        # a U-Net conditioned on the pooled text embedding (v2) takes it as class labels: (B, P)
        pooled = (torch.randn(B, c.projection_class_embeddings_input_dim, generator=g)
                  if c.class_embed_type == "projection" else None)
        inputs = {}
        for name, (_, dtype, channels_last) in levers.items():
            xi = x.to(dtype)
            inputs[name] = (xi.contiguous(memory_format=torch.channels_last) if channels_last else xi, t, s.to(dtype),
                            None if pooled is None else pooled.to(dtype))
        with torch.inference_mode():
            ref = fp32(x, t, s, class_labels=pooled)
            diffs = {}
            for name, (fn, _, _) in levers.items():  # warm-up (and compile), and correctness
                t0 = time.perf_counter()
                out = fn(*inputs[name])
                if "compile" in name:
                    compile_seconds[f"batch_{B}"] = time.perf_counter() - t0
                fn(*inputs[name])
                diffs[name] = (out.float() - ref).abs().max().item()
            times = {name: [] for name in levers}
            for _ in range(args.rounds):
                for name, (fn, _, _) in levers.items():
                    t0 = time.perf_counter()
                    fn(*inputs[name])
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        results[f"batch_{B}"] = {"seconds": times, "median_s": med,
                                 "speedup_vs_fp32": {k: med["fp32"] / v for k, v in med.items()},
                                 "max_abs_diff_vs_fp32": diffs}
        print(f"batch {B}: " + ", ".join(f"{k} {1000 * v:.1f} ms ({med['fp32'] / v:.2f}×, max|Δ| {diffs[k]:.3f})"
                                         for k, v in med.items()), flush=True)
    write_json_atomic(args.out, {
        "what": "U-Net forward pass (16×16×4 latents, 64 text tokens) per lever; medians of interleaved rounds",
        "model": args.model, "results": results, "compile_seconds": compile_seconds, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
