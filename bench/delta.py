"""How a distilled student's weights differ from its teacher's, and what storing the difference in few bits costs:
the measurements behind carrara/models/delta.py's 4-bit per-row format (docs/distill.md, "Shipped").

Per tensor of the teacher: ‖Δ‖/‖W‖ (median, max); over all matrices (conv kernels as out × in·k·k), the share of
Δ's energy the best rank-r approximation keeps (what a LoRA extraction could keep at rank r); and, per bit width, the
mean and max |Δpixel| (/255) of the rebuilt student's images against the student's own (same prompts and seeds,
4 lcm steps, fp32, the base's side), beside the student cast to fp16 for scale.

    python bench/delta.py --teacher default --student runs/default-lcm [--bits 4,8] [--json bench/results/delta.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind

from carrara.diffusion.consistency import STUDENT_STEPS
from carrara.errors import CarraraError
from carrara.export import CHECK_PROMPTS
from carrara.fileio import write_json_atomic
from carrara.modelfolder import resolve
from carrara.models.delta import dequantize_rows, quantize_rows
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.pipeline import Pipeline

RANKS = (8, 16, 32, 64)


def rank_energy(teacher: dict, student: dict) -> dict[int, float]:
    """Share of Σ‖Δ‖² kept by the best rank-r approximation of each matrix (small or 1-D tensors counted whole)."""
    total, kept = 0.0, dict.fromkeys(RANKS, 0.0)
    for name, w in teacher.items():
        d = student[name].float() - w.float()
        energy = float(d.pow(2).sum())
        total += energy
        m = d.reshape(d.shape[0], -1) if d.ndim >= 2 else None
        s = torch.linalg.svdvals(m) if m is not None and min(m.shape) > max(RANKS) else None
        for r in RANKS:
            kept[r] += energy if s is None else float(s[:r].pow(2).sum())
    return {r: kept[r] / total for r in RANKS}


def rebuilt(teacher: dict, student: dict, bits: int) -> dict:
    out = {}
    for name, value in student.items():
        if name not in teacher:
            out[name] = value.half().float()
            continue
        codes, scale = quantize_rows(value.float() - teacher[name].float(), bits)
        out[name] = teacher[name].float() + dequantize_rows(codes, scale, value.shape)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="default", help="the teacher model folder (default: the packaged default)")
    p.add_argument("--student", required=True, help="the `carrara distill` run")
    p.add_argument("--bits", default="4,8", help="bit widths to try (default 4,8)")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    try:
        bits = [int(b) for b in args.bits.split(",")]
        teacher = UNet.from_pretrained(resolve(args.teacher).unet).state_dict()
        pipe = Pipeline.load(args.student, precision="fp32")
    except (CarraraError, ValueError) as e:
        print(f"bench/delta.py: error: {e}", file=sys.stderr)
        return 2
    student = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rel = [float((student[k].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
           for k, w in teacher.items()]
    prompts = list(CHECK_PROMPTS)

    def images():
        return pipe(prompts, seed=0, output="tensor", steps=STUDENT_STEPS, sampler="lcm")

    want = images()
    rows = {}
    for name, state in [*((f"{b} bits", rebuilt(teacher, student, b)) for b in bits),
                        ("student in fp16", {k: v.half().float() for k, v in student.items()})]:
        pipe.unet.load_state_dict(state)
        diff = (images() - want).abs() * 127.5
        rows[name] = {"mean_abs_dpixel_255": float(diff.mean()), "max_abs_dpixel_255": float(diff.max())}
    result = {"teacher": args.teacher, "student": args.student, "cpu": cpu_kind(),
              "relative_delta": {"median": statistics.median(rel), "max": max(rel)},
              "rank_energy": rank_energy(teacher, student), "images": rows,
              "prompts": len(prompts), "steps": STUDENT_STEPS}
    print(f"‖Δ‖/‖W‖ per tensor: median {result['relative_delta']['median']:.4f}, max {max(rel):.4f}")
    print("rank-r share of Δ's energy: " + ", ".join(f"r={r} {v:.1%}" for r, v in result["rank_energy"].items()))
    for name, row in rows.items():
        print(f"{name}: |Δpixel| mean {row['mean_abs_dpixel_255']:.3f}/255, max {row['max_abs_dpixel_255']:.2f}/255")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
