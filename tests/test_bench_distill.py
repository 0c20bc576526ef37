"""bench/distill.py --tiny end to end: a tiny teacher and its 3-step student, every number of the table there."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_distill_bench_has_every_number(tmp_path):
    out, result_path = tmp_path / "runs", tmp_path / "distill.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "distill.py"), "--tiny", "--quiet", "--out", str(out),
                           "--json", str(result_path), "--threads", "1", "--grid", str(tmp_path / "grid.png")],
                          check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and result["tiny"] is True
    assert result["student_record"]["method"] == "lcm"
    teacher, students = result["teacher"], result["students"]
    assert (teacher["steps"], teacher["sampler"]) == (20, "dpmpp") and sorted(students) == ["1", "2", "4"]
    for steps, row in students.items():
        assert (row["steps"], row["sampler"]) == (int(steps), "lcm")
        for r in (row, teacher):
            assert r["images_per_s"] > 0 and r["fd_clip"] >= 0 and math.isfinite(r["fd_clip"])
            assert 0 <= r["t2i_top1"] <= r["t2i_top5"] <= 1
            assert set(r["faithfulness"]) == {"color", "position", "size", "shape", "all"}
        vs = row["vs_teacher"]
        assert vs["speedup"] == row["images_per_s"] / teacher["images_per_s"]
        assert vs["fd_ratio"] == row["fd_clip"] / teacher["fd_clip"]
        assert vs["t2i_top5_points"] == 100 * (row["t2i_top5"] - teacher["t2i_top5"])
        assert vs["faithfulness_points"]["all"] == 100 * (row["faithfulness"]["all"] - teacher["faithfulness"]["all"])
    for name in ("teacher", "student-1", "student-2", "student-4"):  # each model's own evaluation was written
        assert (out / "eval" / name / "metrics.json").is_file()
    grid = Image.open(tmp_path / "grid.png")  # a labelled row each: the teacher and the student at 1, 2, 4 steps
    assert grid.height > 4 * 96 and grid.width > 4 * 96  # four rows; a column per sample prompt (the tiny run: 4)


def test_distill_bench_judges_the_student_shipped_beside_its_teacher(tmp_path):
    """No --student: the teacher's student/ (carrara export student) is judged, through `carrara eval --fast`."""
    import shutil

    from carrara.export import export_student

    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [sys.executable, str(ROOT / "bench" / "distill.py"), "--quiet", "--threads", "1", "--steps", "4"]
    done = subprocess.run([*common, "--tiny", "--out", str(out), "--json", str(tmp_path / "run.json")], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((tmp_path / "run.json").read_text())
    teacher = tmp_path / "teacher"
    shutil.copytree(first["teacher_model"], teacher)
    export_student(first["student_model"], teacher, prompts=("a red circle",))
    done = subprocess.run([*common, "--teacher", str(teacher), "--data", str(out / "shapes"), "--clip", str(out / "clip"),
                           "--shapes", "--n", "16", "--n-faithfulness", "8", "--batch", "4", "--bootstrap", "5",
                           "--rounds", "1", "--out", str(tmp_path / "shipped"), "--json", str(tmp_path / "shipped.json")],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = json.loads((tmp_path / "shipped.json").read_text())
    assert shipped["student_model"] == f"{teacher} --fast" and shipped["student_record"] == first["student_record"]
    report = json.loads((tmp_path / "shipped" / "eval" / "student-4" / "metrics.json").read_text())
    assert report["settings"]["fast"] and report["model_hash"] != json.loads(
        (tmp_path / "shipped" / "eval" / "teacher" / "metrics.json").read_text())["model_hash"]
    # the shipped student is the run's up to 4-bit rounding: the same faithfulness on the same prompts and seeds
    assert shipped["students"]["4"]["faithfulness"] == first["students"]["4"]["faithfulness"]
