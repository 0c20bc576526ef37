"""Issue 18, Part B: a distilled few-step student (docs/distill.md) against its teacher, in one run.

For the teacher at its usual 20 DPM-Solver++ steps and the student at 1, 2 and 4 `lcm` steps (the same guidance w):
  speed    images/s at one batch size (median of SAMPLING_ROUNDS timed batches after a warm-up batch), and the
           student's ratio to the teacher;
  quality  FD in a trained CLIP's image features (FD_clip, `carrara eval` with --clip) against the data's images, and
           text→image top-1 / top-5 retrieval among the generated images; on `shapes` (--shapes) also faithfulness
           (carrara.evaluate.faithfulness: colour, position, size, shape, all); and each student's difference to the
           teacher (FD ratio, retrieval and faithfulness in points), the issue's targets being FD ≤ 1.2 × the
           teacher's, top-5 ≥ teacher − 5 points, faithfulness ≥ teacher − 3 points, ≥ 10× the images/s.

    python bench/distill.py --teacher runs/shapes/diffusion --student runs/shapes-lcm --data runs/shapes/data \\
        --clip runs/shapes-clip --shapes [--n 500] [--json bench/results/distill-shapes.json]
    python bench/distill.py --tiny     # seconds, a tiny random teacher and a 3-step student: checks the bench only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from families import cpu_kind, families_grid, image_row
from lora import tiny_base
from PIL import Image

from carrara.data.shapes import build_shapes
from carrara.errors import CarraraError
from carrara.evaluate.faithfulness import evaluate_faithfulness
from carrara.evaluate.suite import EvalSettings, run_eval
from carrara.fileio import ensure_dir, save_image_atomic, write_json_atomic
from carrara.modelfolder import resolve
from carrara.pipeline import Pipeline
from carrara.student import FOLDER as STUDENT_FOLDER
from carrara.train.clip import ClipRecipe, train_clip
from carrara.train.core import TrainConfig
from carrara.train.distill import DistillRecipe, train_distill

SAMPLING_ROUNDS = 3
FAITHFULNESS = ("color", "position", "size", "shape", "all")
PROMPTS = ["a large red circle on the left", "a small blue square at the top", "a large green triangle in the center",
           "a small yellow star at the bottom"]


def images_per_second(pipe: Pipeline, steps: int, sampler: str, guidance: float, batch: int, rounds: int) -> float:
    """Median over `rounds` timed batches of images per second, after one warm-up batch; a cascade at its base's side
    (the student is a base model: the upsampler would cost both the same)."""
    prompts, size = (PROMPTS * batch)[:batch], pipe.sizes[0]
    pipe(prompts, steps=steps, sampler=sampler, guidance=guidance, seed=0, output="tensor", size=size)
    rates = []
    for r in range(rounds):
        started = time.perf_counter()
        pipe(prompts, steps=steps, sampler=sampler, guidance=guidance, seed=1000 * (r + 1), output="tensor", size=size)
        rates.append(batch / (time.perf_counter() - started))
    return statistics.median(rates)


def quality(model: str, steps: int, sampler: str, args, out: Path, fast: bool = False) -> dict:
    """FD_clip and retrieval (run_eval), and faithfulness on shapes, for one model (fast: the student beside it) at
    one step count."""
    report = run_eval(EvalSettings(model=model, data=args.data, n=args.n, metrics=("fd", "retrieval"), clip=args.clip,
                                   guidance=args.guidance, steps=steps, sampler=sampler, batch_size=args.batch,
                                   bootstrap=args.bootstrap, kid_subset_size=min(1000, args.n), fast=fast,
                                   precision=args.precision),
                      out, progress=not args.quiet)
    metrics = report["metrics"]
    pick = lambda prefix: next(v for k, v in metrics.items() if k.startswith(prefix))
    fd = pick("FD[")
    row = {"fd_clip": fd["value"], "fd_clip_ci95": fd["ci95"], "feature_network": fd["extractor"],
           "t2i_top1": pick("T2I-top1")["value"], "t2i_top5": pick("T2I-top5")["value"]}
    if args.shapes:
        faith = evaluate_faithfulness(Pipeline.load(model, precision=args.precision, fast=fast), n=args.n_faithfulness,
                                      steps=steps, sampler=sampler, guidance=args.guidance, batch_size=args.batch,
                                      progress=not args.quiet)
        row["faithfulness"] = {a: faith["attributes"][a]["accuracy"] for a in FAITHFULNESS}
    return row


def figure(teacher: Pipeline, student: Pipeline, steps: list[int], args) -> Image.Image:
    """The teacher at its steps and the student at each step count on the student run's sample prompts (the
    recipe's; else PROMPTS), image i from seed i in every row."""
    config = Path(args.student) / "config.json" if args.student else \
        resolve(args.teacher).root / STUDENT_FOLDER / "training" / "config.json"
    prompts = (json.loads(config.read_text()).get("sample_prompts") if config.is_file() else None) or PROMPTS
    settings = {"guidance": args.guidance, "seed": 0}
    rows = {f"teacher {args.teacher_steps}": image_row(teacher(prompts, steps=args.teacher_steps, sampler="dpmpp",
                                                               size=teacher.sizes[0], **settings))}
    for k in steps:
        rows[f"student {k}"] = image_row(student(prompts, steps=k, sampler="lcm", size=student.sizes[0], **settings))
    return families_grid(rows, prompts)


def compare(student: dict, teacher: dict) -> dict:
    """The student's distance to the teacher, in the issue's terms."""
    out = {"speedup": student["images_per_s"] / teacher["images_per_s"],
           "fd_ratio": student["fd_clip"] / teacher["fd_clip"],
           "t2i_top5_points": 100 * (student["t2i_top5"] - teacher["t2i_top5"])}
    if "faithfulness" in teacher:
        out["faithfulness_points"] = {a: 100 * (student["faithfulness"][a] - teacher["faithfulness"][a])
                                      for a in FAITHFULNESS}
    return out


def tiny_setup(out: Path, progress: bool) -> dict:
    """--tiny: 32 shapes at 16 px, a random teacher, a 3-step student and a 6-step CLIP, in seconds."""
    data = out / "shapes"
    if not (data / "metadata.jsonl").is_file():
        build_shapes(data, n=32, size=16, seed=0, progress=False)
    teacher = tiny_base(out / "teacher", prediction_type="v_prediction")
    tiny = TrainConfig(steps=3, batch_size=8, lr=1e-4, warmup_steps=1, log_every=1, checkpoint_every=3,
                       sample_every=3, bf16=False, ema_decay=0.95)
    train_distill(DistillRecipe(teacher=str(teacher), data=str(data), embed_dim=16, train=tiny), out / "student",
                  progress=progress)
    clip = ClipRecipe(data=str(data), size=16, holdout=4, shift=1, model={"channels": [8, 16], "embed_dim": 32,
                                                                          "groups": 4},
                      train=TrainConfig(steps=6, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2,
                                        checkpoint_every=6, sample_every=6, bf16=False))
    train_clip(clip, out / "clip", progress=progress)
    return {"teacher": str(teacher), "student": str(out / "student"), "data": str(data), "clip": str(out / "clip")}


def run(args: argparse.Namespace) -> dict:
    out = ensure_dir(args.out or ("runs/distill-bench-tiny" if args.tiny else "runs/distill-bench"))
    if args.tiny:
        vars(args).update(tiny_setup(out, not args.quiet), shapes=True, n=16, n_faithfulness=8, batch=4,
                          bootstrap=5, rounds=1)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    teacher_pipe = Pipeline.load(args.teacher, precision=args.precision)
    try:  # the run, or the student shipped beside the teacher (carrara export student)
        student_pipe = Pipeline.load(args.student or args.teacher, precision=args.precision, fast=not args.student)
    except CarraraError as e:
        raise SystemExit(f"bench/distill.py: {e}") from None
    student_model, fast = (args.student, False) if args.student else (args.teacher, True)
    if not student_pipe.student or teacher_pipe.student:
        raise SystemExit(f"bench/distill.py: {args.student} must be a distilled student of {args.teacher}")
    teacher = {"steps": args.teacher_steps, "sampler": "dpmpp",
               "images_per_s": images_per_second(teacher_pipe, args.teacher_steps, "dpmpp", args.guidance, args.batch,
                                                 args.rounds),
               **quality(args.teacher, args.teacher_steps, "dpmpp", args, out / "eval" / "teacher")}
    students = {}
    for steps in args.steps:
        row = {"steps": steps, "sampler": "lcm",
               "images_per_s": images_per_second(student_pipe, steps, "lcm", args.guidance, args.batch, args.rounds),
               **quality(student_model, steps, "lcm", args, out / "eval" / f"student-{steps}", fast)}
        students[str(steps)] = {**row, "vs_teacher": compare(row, teacher)}
    result = {"cpu": cpu_kind(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
              "teacher_model": args.teacher, "student_model": args.student or f"{args.teacher} --fast", "student_record": student_pipe.student,
              "guidance": args.guidance, "batch": args.batch, "n": args.n, "precision": teacher_pipe.precision,
              "teacher": teacher, "students": students}
    json_path = args.json or f"bench/results/distill{'-tiny' if args.tiny else ''}.json"
    write_json_atomic(json_path, result)
    if args.grid:
        save_image_atomic(args.grid, figure(teacher_pipe, student_pipe, args.steps, args))
    if not args.quiet:
        print(json.dumps({k: {s: v["vs_teacher"] for s, v in students.items()} if k == "students" else v
                          for k, v in result.items() if k in ("cpu", "students")}, indent=1))
    return result


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes whole numbers separated by commas, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="default", help="the teacher model (default: the packaged one)")
    p.add_argument("--student", help="the `carrara distill` run of that teacher (default: the student shipped beside "
                   "it, `carrara export student`)")
    p.add_argument("--data", help="real images and captions (FD_clip's reference, the prompts)")
    p.add_argument("--clip", help="a `carrara train clip` run: FD_clip's features and the retrieval")
    p.add_argument("--shapes", action="store_true", help="also faithfulness (a model trained on shapes)")
    p.add_argument("--steps", type=_steps, default=[1, 2, 4], help="the student's step counts (default 1,2,4)")
    p.add_argument("--teacher-steps", type=int, default=20, help="the teacher's DPM-Solver++ steps (default 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance w of both (default 4)")
    p.add_argument("--n", type=int, default=500, help="images for FD_clip and retrieval (default 500)")
    p.add_argument("--n-faithfulness", type=int, default=200, help="prompts for faithfulness (default 200)")
    p.add_argument("--batch", type=int, default=16, help="batch size of the speed measurement (default 16)")
    p.add_argument("--rounds", type=int, default=SAMPLING_ROUNDS, help="timed batches (median; default 3)")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples of FD's interval (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--precision", default="auto", help="sampling precision (default auto)")
    p.add_argument("--out", help="work folder (default runs/distill-bench, tiny runs/distill-bench-tiny)")
    p.add_argument("--json", help="results (default bench/results/distill.json, tiny distill-tiny.json)")
    p.add_argument("--grid", help="also a figure: the teacher and the student at each step count, same seeds")
    p.add_argument("--tiny", action="store_true", help="seconds on a tiny random teacher: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.tiny and not (args.data and args.clip):
        p.error("give --data DIR and --clip RUN (and --student RUN unless the teacher has its student beside it), "
                "or --tiny")
    return args


if __name__ == "__main__":
    run(parse_args())
