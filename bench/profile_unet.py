"""Where sampling time goes: torch.profiler over U-Net forwards at batch 2 and 32 (the model's sampling precision),
plus the VAE decode and a text encoding, timed alone. Prints the top operators; writes the shares as JSON.

    python bench/profile_unet.py [--model default] [--out bench/results/profile_unet.json]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from carrara.fileio import write_json_atomic
from carrara.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/profile_unet.json")
    args = p.parse_args()
    pipe = Pipeline.load(args.model)
    c, dtype = pipe.unet.config, pipe.unet_dtype
    result = {"precision": pipe.precision, "batches": {}}
    with torch.inference_mode():
        for B in (2, 32):
            x = torch.randn(B, c.in_channels, c.sample_size, c.sample_size).to(dtype)
            t, s = torch.full((B,), 500), torch.randn(B, 64, c.cross_attention_dim).to(dtype)
            for _ in range(3):
                pipe.unet(x, t, s)
            with torch.profiler.profile() as prof:
                for _ in range(args.repeats):
                    pipe.unet(x, t, s)
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            top = {e.key: e.self_cpu_time_total / total for e in events[:12]}
            result["batches"][f"batch_{B}"] = {"ms_per_forward": total / 1000 / args.repeats, "self_cpu_share": top}
            print(f"batch {B}: {total / 1000 / args.repeats:.1f} ms per forward (profiled)")
            for name, share in top.items():
                print(f"  {share:6.1%}  {name}")
        for n in (1, 16):
            z = torch.randn(n, c.in_channels, c.sample_size, c.sample_size)
            pipe.decode(z)
            t0 = time.perf_counter()
            pipe.decode(z)
            result[f"decode_{n}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.text_encoder.encode(["a prompt never seen before"])
        result["text_encode_s"] = time.perf_counter() - t0
    print(f"decode 1: {result['decode_1_s'] * 1000:.0f} ms, decode 16: {result['decode_16_s'] * 1000:.0f} ms, "
          f"one new prompt: {result['text_encode_s'] * 1000:.0f} ms")
    write_json_atomic(args.out, {**result, "model": args.model, "threads": torch.get_num_threads(),
                                 "cores": os.cpu_count(), "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
