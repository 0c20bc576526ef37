"""1 vs 2 processes on this machine: samples/s of the same `carrara train autoencoder` command, alone and under
`torchrun --nproc_per_node 2`, and the largest weight difference between the two runs.

Workload (docs/scaling.md): 256 `shapes` images at 32 px, a 0.66M-parameter VAE (channels 32-64), global batch
32, 40 steps; samples/s is the median of the logged values over the last 30 steps. Runs alternate (1, 2, 1, 2…).

    python bench/scaling.py [--rounds 2] [--precision bf16|fp32] [--out bench/results/scaling.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from carrara.data.shapes import build_shapes
from carrara.fileio import write_json_atomic

MODEL = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
         "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(data: Path, out: Path, procs: int, threads: int, bf16: bool) -> float:
    args = ["-m", "carrara", "train", "autoencoder", "--data", str(data), "--size", "32", "--steps", "40",
            "--batch-size", "32", "--quiet", "--set", f"train.bf16={'true' if bf16 else 'false'}",
            "--set", f"model={json.dumps(MODEL)}", "--out", str(out)]
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                                      "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, *launcher, *args], env=env, check=True, capture_output=True, timeout=1800)
    rates = [m["samples_per_s"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if m["step"] >= 10]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--out", default="bench/results/scaling.json")
    args = p.parse_args()
    setups = {"1 process x 2 threads": (1, 2), "1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1)}
    rates = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_shapes(data, n=256, size=32, seed=0, progress=False)
        for r in range(args.rounds):
            for name, (procs, threads) in setups.items():
                out = Path(tmp) / f"{procs}x{threads}-{r}"
                rates[name].append(run(data, out, procs, threads, args.precision == "bf16"))
                print(f"{name}: {rates[name][-1]:.1f} samples/s", flush=True)
        one = load_file(Path(tmp) / "1x1-0" / "vae" / "diffusion_pytorch_model.safetensors")
        two = load_file(Path(tmp) / "2x1-0" / "vae" / "diffusion_pytorch_model.safetensors")
        diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    med = {name: statistics.median(v) for name, v in rates.items()}
    write_json_atomic(args.out, {
        "what": "autoencoder stage, 256 shapes images at 32 px, 0.66M-param VAE, global batch 32, 40 steps; median "
                "logged samples/s over steps 10-39; 1 vs 2 processes (torchrun, gloo)",
        "precision": args.precision, "samples_per_s": rates, "median_samples_per_s": med,
        "max_weight_diff_1_vs_2_processes": diff, "cores": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    })
    print("median: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()) + f"; max |Δw| 1 vs 2 processes {diff:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
