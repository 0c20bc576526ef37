"""bench/unclip.py --tiny end to end: the start model, the direct route and the prior route trained at equal minutes,
judged alike, with diversity and the figures; a rerun trains nothing again; bad arguments are one line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "unclip.py"), *args], check=False, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_bench_trains_both_routes_in_budget_and_judges_them(tmp_path):
    out, result_path = tmp_path / "runs", tmp_path / "unclip.json"
    done = bench("--tiny", "--quiet", "--out", str(out), "--json", str(result_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert list(result["routes"]) == ["start (0 min)", "direct", "prior"]
    direct, prior = result["routes"]["direct"], result["routes"]["prior"]
    assert set(direct["steps"]) == {"direct"} and set(prior["steps"]) == {"prior", "decoder"}
    budgets = {s: p["budget_s"] for r in (direct, prior) for s, p in r["stages"].items()}
    assert budgets["direct"] == round(budgets["prior"] + budgets["decoder"], 2)  # equal minutes per route
    assert budgets["prior"] == round(result["prior_share"] * budgets["direct"], 2)
    assert json.loads((out / "direct" / "config.json").read_text())["prediction_type"] == "epsilon"
    index = json.loads((Path(prior["model"]) / "model_index.json").read_text())
    assert index["_class_name"] == "CarraraUnCLIP" and (Path(prior["model"]) / "prior").is_dir()
    for name, row in result["routes"].items():
        for what in ("captions", "paraphrases"):
            for metric in ("t2i_top5", "clip_score", "fd_clip"):
                m = row["judged"][what][metric]
                assert math.isfinite(m["value"]) and m["ci95"][0] <= m["ci95"][1], (name, what, metric)
        d = row["diversity"]
        assert d["k"] == 3 and len(d["per_prompt"]) == 3 and 0 <= d["value"] <= 2
        assert abs(d["value"] - sum(d["per_prompt"]) / 3) < 1e-5
    figures = {k: Image.open(v) for k, v in result["figures"].items()}
    assert figures["variations"].width > figures["variations"].height  # 4 rows of picture + 4 variations
    assert figures["interpolation"].width > 6 * figures["interpolation"].height  # picture, 6 steps, picture
    assert "| prior |" in result["table"] and result["cpu"]["kind"] in result["table"]
    # a rerun trains and judges nothing again: every stage has its budget.json, every judgement its cache
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = bench("--tiny", "--quiet", "--out", str(out), "--json", str(result_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    assert json.loads(result_path.read_text())["routes"]["prior"]["diversity"] == prior["diversity"]


def test_bad_arguments_are_one_line(tmp_path):
    for args, message in ((["--minutes", "0"], "--minutes must be > 0"), (["--k", "1", "--tiny"], "at least 2"),
                          ([], "--data DIR and --clip RUN are needed"),
                          (["--data", str(tmp_path), "--clip", str(tmp_path)], "--init V1 is needed")):
        done = bench("--out", str(tmp_path / "o"), *args, timeout=300)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
