"""Training-step time of candidate U-Nets on 16×16×4 latents (batch 64, bf16 autocast, AdamW), interleaved runs.

Chooses the diffusion model of a recipe: which U-Net fits the time budget of a CPU session.

    python bench/unet_step.py [--batch 64] [--rounds 5] [--out bench/results/unet_step.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from carrara.fileio import write_json_atomic
from carrara.models.config import default_unet_config
from carrara.models.unet import UNet2DConditionModel

NO_ATTN_16 = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
CANDIDATES = {
    "64-128-256, attn 16/8/4 (default)": {},
    "64-128-256, attn 8/4": NO_ATTN_16,
    "48-96-192, attn 16/8/4": {"block_out_channels": (48, 96, 192), "norm_num_groups": 16,
                               "attention_head_dim": (2, 3, 6)},
    "32-64-128, attn 16/8/4 (shapes)": {"block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4)},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--out", default="bench/results/unet_step.json")
    args = p.parse_args()
    base = default_unet_config()
    setups = {}
    for name, change in CANDIDATES.items():
        torch.manual_seed(0)
        model = UNet2DConditionModel(dataclasses.replace(base, **change))
        setups[name] = (model, torch.optim.AdamW(model.parameters(), 1e-4))
    x = torch.randn(args.batch, 4, 16, 16)  # (B, 4, 16, 16)
    t = torch.randint(0, 1000, (args.batch,))
    states = torch.randn(args.batch, args.text_tokens, 384)  # (B, L, 384)

    def step(model, opt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x, t, states) - x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {name: [] for name in setups}
    for name, (model, opt) in setups.items():  # warm-up
        step(model, opt)
    for _ in range(args.rounds):  # interleaved: each round times every candidate once
        for name, (model, opt) in setups.items():
            start = time.perf_counter()
            step(model, opt)
            times[name].append(time.perf_counter() - start)
    rows = [{"model": name, "params_M": round(sum(q.numel() for q in m.parameters()) / 1e6, 2),
             "s_per_step_median": statistics.median(times[name]), "runs": times[name],
             "samples_per_s": args.batch / statistics.median(times[name])} for name, (m, _) in setups.items()]
    write_json_atomic(args.out, {"benchmark": "unet_step", "batch": args.batch, "rows": rows, "cores": os.cpu_count(),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__})
    for r in rows:
        print(f"{r['model']:36s} {r['params_M']:6.1f}M  {r['s_per_step_median']:.3f} s/step  "
              f"{r['samples_per_s']:.0f} samples/s")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
