"""Speed of the shapes detector (carrara.evaluate.detector): ms per image, median of 5 runs over 200 images.

    python bench/detector.py [--out bench/results/detector.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from carrara.data import shapes
from carrara.evaluate.detector import detect
from carrara.evaluate.faithfulness import sample_prompts
from carrara.fileio import write_json_atomic


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/detector.json")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    images = [shapes.render(scene) for scene, _ in sample_prompts(200, objects=2, seed=5)]
    detect(images[0])  # the shape prototypes are measured once
    per_run = []
    for _ in range(args.runs):
        start = time.perf_counter()
        for image in images:
            detect(image)
        per_run.append(1000 * (time.perf_counter() - start) / len(images))
    result = {"benchmark": "detector", "ms_per_image_median": statistics.median(per_run), "ms_per_image_runs": per_run,
              "images": len(images), "cores": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version()}
    write_json_atomic(args.out, result)
    print(f"detector: {result['ms_per_image_median']:.2f} ms per image (median of {args.runs}) → {args.out}")


if __name__ == "__main__":
    main()
