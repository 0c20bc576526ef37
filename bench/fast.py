"""Issue 18, Part B's speed target: a distilled student at its few steps against diffusers' 20-step pipeline.

In one process, interleaved rounds (diffusers, teacher, student at each step count, diffusers, …; medians compared):
  diffusers  `StableDiffusionPipeline` + `DPMSolverMultistepScheduler` on the teacher's exported weights, 20 steps,
             classifier-free guidance w (two U-Net passes per step), carrara's timesteps and x_T (bench/sample.py);
  teacher    carrara's Pipeline on the same weights and settings (its default precision);
  student    the `carrara distill` student at 1, 2, 4 `lcm` steps, w embedded (one pass per step);
at each batch size (default 1 and 16). Printed and written: images/s; each contender's ratio to diffusers
(`vs_diffusers`; the issue's target for the student: ≥ 10× at batch 16), the student's to the teacher, and one
image's seconds at batch 1 (target ≤ 0.1 s on the bf16 kind), with the CPU kind. Quality (FD_clip, retrieval, faithfulness) is bench/distill.py's job.

    python bench/fast.py --teacher default --student runs/default-lcm [--batches 1,16] [--steps 1,2,4] [--runs 5]
    python bench/fast.py --tiny     # seconds, a tiny random teacher and a 3-step student: checks the bench only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distill import tiny_setup
from families import cpu_kind
from sample import PROMPTS, diffusers_pipeline, image_runner, interleaved_seconds

from carrara.errors import CarraraError
from carrara.fileio import ensure_dir, write_json_atomic
from carrara.pipeline import Pipeline

TARGET_SPEEDUP, TARGET_SECONDS = 10.0, 0.1  # the issue's: ≥ 10× diffusers' images/s at batch 16; ≤ 0.1 s per image


def runner(teacher: str, student: str, steps: list[int], guidance: float, precision: str, teacher_steps: int):
    """run(name, n) over diffusers, the teacher and the student at each step count; and the names."""
    ours = {"carrara-fp32": Pipeline.load(teacher, precision="fp32"), "teacher": Pipeline.load(teacher,
                                                                                               precision=precision)}
    base = image_runner(ours, diffusers_pipeline(teacher), PROMPTS, teacher_steps, guidance)
    try:  # the run, or the student shipped beside the teacher (carrara export student)
        pupil = Pipeline.load(student or teacher, precision=precision, fast=not student)
    except CarraraError as e:
        raise SystemExit(f"bench/fast.py: {e}") from None
    if not pupil.student or ours["teacher"].student:
        raise SystemExit(f"bench/fast.py: {student} must be a distilled student of {teacher}")
    if pupil.unet.config.sample_size != ours["teacher"].unet.config.sample_size:
        raise SystemExit(f"bench/fast.py: {student} makes other images than {teacher}")

    def run(name: str, n: int):
        if name.startswith("student-"):
            return pupil((PROMPTS * n)[:n], steps=int(name.split("-")[1]), sampler="lcm", guidance=guidance, seed=0,
                         output="tensor", size=pupil.sizes[0])
        return base(name, n)

    return run, ["diffusers", "teacher", *(f"student-{s}" for s in steps)], pupil


def run_bench(args: argparse.Namespace) -> dict:
    # eager unless asked: a compiled package loads after 800 passes, part-way through the timing (models/compiled.py)
    os.environ.setdefault("CARRARA_COMPILED", "0")
    if args.tiny:
        out = ensure_dir(args.out or "runs/fast-bench-tiny")
        vars(args).update({k: v for k, v in tiny_setup(out, not args.quiet).items() if k in ("teacher", "student")},
                          runs=1)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    run, names, pupil = runner(args.teacher, args.student, args.steps, args.guidance, args.precision,
                               args.teacher_steps)
    results = {}
    for n in args.batches:
        for name in names:
            run(name, n)  # warm-up
        times = interleaved_seconds(run, names, n, args.runs)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rate = {name: n / s for name, s in med.items()}
        results[f"batch_{n}"] = {
            "seconds": times, "median_s": med, "images_per_s": rate,
            "seconds_per_image": {name: s / n for name, s in med.items()},
            "vs_diffusers": {name: rate[name] / rate["diffusers"] for name in names if name != "diffusers"},
            "student_vs_teacher": {name: rate[name] / rate["teacher"] for name in names if name.startswith("student")},
        }
        if not args.quiet:
            r = results[f"batch_{n}"]
            print(f"batch {n}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in rate.items()) + " | vs diffusers "
                  + ", ".join(f"{k} {v:.1f}×" for k, v in r["vs_diffusers"].items()), flush=True)
    biggest, one = results[f"batch_{max(args.batches)}"], results.get("batch_1")
    result = {
        "what": f"images/s at {args.teacher_steps} DPM-Solver++ steps (diffusers, teacher) and the student's lcm steps, "
                f"guidance {args.guidance}; medians of {args.runs} interleaved rounds in one process",
        "cpu": cpu_kind(), "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "tiny": args.tiny, "teacher": args.teacher, "student": args.student or f"{args.teacher} --fast", "student_record": pupil.student,
        "precision": pupil.precision, "compiled": os.environ["CARRARA_COMPILED"] == "1", "results": results,
        "targets": {f"student-{s}": {
            f"speedup_vs_diffusers_batch_{max(args.batches)}_ge_{TARGET_SPEEDUP:g}":
                biggest["vs_diffusers"][f"student-{s}"] >= TARGET_SPEEDUP,
            **({f"seconds_per_image_batch_1_le_{TARGET_SECONDS:g}":
                one["seconds_per_image"][f"student-{s}"] <= TARGET_SECONDS} if one else {})} for s in args.steps},
    }
    json_path = args.json or f"bench/results/fast{'-tiny' if args.tiny else ''}.json"
    write_json_atomic(json_path, result)
    if not args.quiet:
        print(json.dumps({"cpu": result["cpu"], "targets": result["targets"]}, indent=1))
        print(f"wrote {json_path}")
    return result


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give whole numbers ≥ 1 separated by commas, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="default", help="the teacher model (default: the packaged one)")
    p.add_argument("--student", help="the `carrara distill` run of that teacher (default: the student shipped beside "
                   "it, `carrara export student`)")
    p.add_argument("--steps", type=_ints, default=[1, 2, 4], help="the student's step counts (default 1,2,4)")
    p.add_argument("--teacher-steps", type=int, default=20, help="diffusers' and the teacher's steps (default 20)")
    p.add_argument("--batches", type=_ints, default=[1, 16], help="batch sizes (default 1,16)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance w (default 4)")
    p.add_argument("--runs", type=int, default=5, help="interleaved timed rounds (median; default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--precision", default="auto", help="carrara's sampling precision (default auto)")
    p.add_argument("--out", help="work folder of --tiny (default runs/fast-bench-tiny)")
    p.add_argument("--json", help="results (default bench/results/fast.json, tiny fast-tiny.json)")
    p.add_argument("--tiny", action="store_true", help="seconds on a tiny random teacher: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    return args


if __name__ == "__main__":
    run_bench(parse_args())
