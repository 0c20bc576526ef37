"""bench/v2_ablations.py --tiny end to end: v1, every arm and a snapshot judged on captions and paraphrases."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ["eps", "eps+pooled", "v", "v+pooled"]
METRICS = ("t2i_top1", "t2i_top5", "clip_score", "fd_clip")


def test_tiny_bench_judges_every_arm_and_the_snapshot(tmp_path):
    out, result_path = tmp_path / "runs", tmp_path / "ablations.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "v2_ablations.py"), "--tiny", "--quiet", "--out",
                           str(out), "--json", str(result_path)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other")
    assert list(result["arms"]) == ["v1 (start)", *ARMS]
    for arm in ARMS:  # each arm trained its steps with its own objective and conditioning
        config = json.loads((out / arm / "config.json").read_text())
        assert (config["prediction_type"], config["pooled"]) == (
            "v_prediction" if arm.startswith("v") else "epsilon", arm.endswith("pooled")), arm
        assert result["arms"][arm]["steps"] == 2
    rows = {**result["arms"], **result["curve"]}
    for name, row in rows.items():
        for what, n in (("captions", 8), ("paraphrases", 4)):
            judged = row["judged"][what]
            assert judged["n"] == n
            for metric in METRICS:
                m = judged[metric]
                assert math.isfinite(m["value"]) and all(math.isfinite(x) for x in m["ci95"]), (name, what, metric)
                assert m["ci95"][0] <= m["ci95"][1]
        d = row["judged"]["diversity"]  # 1 − cos of unit vectors: in [0, 2]
        assert 0 <= d["value"] <= 2 and d["k"] == 8, name
    # the snapshot is the last arm's final EMA inside that arm's model folder: the same weights, the same numbers
    (snapshot,) = result["curve"].values()
    assert snapshot["steps"] == 2
    assert snapshot["judged"] == result["arms"]["v+pooled"]["judged"]
    assert "| v+pooled | 2 |" in result["table"]


def test_bad_arguments_are_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for args, message in ((["--arms", "x0"], "unknown arm 'x0'"), (["--curve", str(tmp_path)], "go together"),
                          ([], "--data DIR and --clip RUN are needed"),
                          (["--data", str(tmp_path), "--clip", str(tmp_path)], "--init V1 is needed")):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "v2_ablations.py"), "--out", str(tmp_path / "o"),
                               *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_judged_model_is_not_judged_again(tmp_path, monkeypatch):
    """The evaluations are kept in OUT/eval/NAME/ and reused on a rerun with the same settings (as saved: JSON, where
    the metrics tuple is a list) — an interrupted bench resumes without re-generating hundreds of images."""
    sys.path.insert(0, str(ROOT / "bench"))
    import v2_ablations

    from carrara.fileio import write_json_atomic

    calls = []

    def fake_run_eval(settings, folder, progress):
        calls.append(settings.prompts)
        metric = {"value": 0.5, "ci95": [0.4, 0.6]}
        report = {"settings": __import__("dataclasses").asdict(settings),
                  "metrics": {"T2I-top1": metric, "T2I-top5": metric, "CLIPScore[x, generated]": metric,
                              "FD[x]": metric}}
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "metrics.json", report)
        return report

    def fake_diversity(model, name, ctx):  # its own cache is judge_diversity's (tests/test_bench_unclip.py)
        assert ctx["div_prompts"] == ["a", "b"] and ctx["k"] == 8
        return {"value": 0.3, "ci95": [0.2, 0.4], "k": 8}

    monkeypatch.setattr(v2_ablations, "run_eval", fake_run_eval)
    monkeypatch.setattr(v2_ablations, "judge_diversity", fake_diversity)
    (tmp_path / "p.txt").write_text("a\nb\n")
    ctx = {"out": tmp_path, "n": 4, "n_para": 2, "data": "d", "clip": "c", "paraphrases": str(tmp_path / "p.txt"),
           "bootstrap": 5, "progress": False}
    first = v2_ablations.judge("m", "v1", ctx)
    again = v2_ablations.judge("m", "v1", ctx)
    assert calls == [None, str(tmp_path / "p.txt")] and first == again
    assert first["diversity"] == {"value": 0.3, "ci95": [0.2, 0.4], "k": 8, "prompts": 20}
