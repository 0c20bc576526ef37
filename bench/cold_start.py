"""Cold start: wall time of `carrara generate "a cat face"` in a fresh process, split into start-up, load, compute.

The command prints its own load and generate times; start-up (interpreter, imports, PNG write) is the rest of
the wall time. Also timed in fresh processes: `import torch` alone, and the imports of the generate path.
Runs are interleaved; medians. Target (issue 6): start-up + load ≤ 2.5 s; (issue 5): the whole command ≤ 4 s.

    python bench/cold_start.py [--model default] [--runs 5] [--out bench/results/cold_start.json]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from carrara.fileio import write_json_atomic


def wall(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--prompt", default="a cat face")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="bench/results/cold_start.json")
    args = p.parse_args()
    carrara = shutil.which("carrara", path=os.path.dirname(sys.executable)) or shutil.which("carrara")
    tmp = tempfile.mkdtemp()
    commands = {
        "python": [sys.executable, "-c", "pass"],
        "import_torch": [sys.executable, "-c", "import torch"],
        "import_generate_path": [sys.executable, "-c", ("import carrara.cli, carrara.generate, carrara.pipeline, "
                                                        "carrara.models.unet, carrara.models.autoencoder, "
                                                        "carrara.text.encoder, carrara.diffusion.samplers, carrara.png")],
        "generate": [carrara, "generate", args.prompt, "--model", args.model, "-o", f"{tmp}/out.png"],
    }
    times = {name: [] for name in commands}
    parts = {"load": [], "compute": [], "startup": []}
    wall(commands["generate"])  # warm the page cache once
    for _ in range(args.runs):
        for name, cmd in commands.items():
            seconds, out = wall(cmd)
            times[name].append(seconds)
            if name == "generate":
                m = re.search(r"load ([\d.]+) s, generate ([\d.]+) s", out)
                load, compute = float(m[1]), float(m[2])
                parts["load"].append(load)
                parts["compute"].append(compute)
                parts["startup"].append(seconds - load - compute)
    med = {name: statistics.median(v) for name, v in {**times, **parts}.items()}
    med["startup_plus_load"] = statistics.median(s + lo for s, lo in zip(parts["startup"], parts["load"]))
    shutil.rmtree(tmp)
    write_json_atomic(args.out, {
        "what": f"fresh-process wall times (s) of `carrara generate {args.prompt!r}` (1 image, default settings) and "
                "its parts; startup = wall − load − generate (interpreter, imports, PNG write); medians of "
                "interleaved runs", "model": args.model,
        "seconds": {**times, **parts}, "median_s": med, "runs": args.runs, "torch": torch.__version__,
        "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    })
    print("median: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
