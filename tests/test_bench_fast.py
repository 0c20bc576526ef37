"""bench/fast.py --tiny end to end: diffusers' 20-step pipeline, the teacher and a 3-step student, timed alike."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_fast_bench_times_every_contender(tmp_path):
    out, result_path = tmp_path / "runs", tmp_path / "fast.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fast.py"), "--tiny", "--quiet", "--out", str(out),
                           "--json", str(result_path), "--threads", "1", "--batches", "1,2", "--steps", "1,4"],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and result["tiny"] is True
    assert result["student_record"]["method"] == "lcm"
    names = ["diffusers", "teacher", "student-1", "student-4"]
    for n in (1, 2):
        r = result["results"][f"batch_{n}"]
        assert list(r["images_per_s"]) == names and all(len(r["seconds"][k]) == 1 for k in names)
        for k in names:
            assert r["images_per_s"][k] == n / r["median_s"][k] and r["seconds_per_image"][k] == r["median_s"][k] / n
        assert r["vs_diffusers"]["student-4"] == r["images_per_s"]["student-4"] / r["images_per_s"]["diffusers"]
        assert r["student_vs_teacher"]["student-1"] == r["images_per_s"]["student-1"] / r["images_per_s"]["teacher"]
    for s in ("student-1", "student-4"):
        target = result["targets"][s]
        assert target["speedup_vs_diffusers_batch_2_ge_10"] == (result["results"]["batch_2"]["vs_diffusers"][s] >= 10)
        assert target["seconds_per_image_batch_1_le_0.1"] == (result["results"]["batch_1"]["seconds_per_image"][s] <= 0.1)


@pytest.mark.parametrize("student, words", [(None, "has no few-step student"),
                                            ("teacher", "must be a distilled student of")])
def test_fast_bench_refuses_a_model_that_is_not_a_student(tiny_diffusion_run, student, words):
    """Without --student the teacher's shipped student is timed: a teacher without one is one error line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--teacher", str(tiny_diffusion_run), *(["--student", str(tiny_diffusion_run)] if student else [])]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fast.py"), "--quiet", *args], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr[-500:]
