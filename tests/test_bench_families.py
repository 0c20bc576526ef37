"""bench/families.py --tiny end to end: every entrant is trained within its budget and has every number of the table."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENTRANTS = ("vae", "vqvae+ar", "igpt", "flow", "gan", "diffusion")
STAGES = {"vae": {"vae": 1.0}, "vqvae+ar": {"vqvae": 0.25, "ar": 0.75}, "igpt": {"igpt": 1.0}, "flow": {"flow": 1.0},
          "gan": {"gan": 1.0}, "diffusion": {"autoencoder": 0.25, "diffusion": 0.75}}
WITH_NLL = ("vae", "vqvae+ar", "igpt", "flow")
FAITHFULNESS = ("color", "position", "size", "shape", "all")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_tiny_bench_has_every_family_and_every_number(tmp_path):
    minutes = 0.01
    out, result_path, grid_path = tmp_path / "runs", tmp_path / "families.json", tmp_path / "grid.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "families.py"), "--tiny", "--quiet", "--minutes",
                           str(minutes), "--out", str(out), "--json", str(result_path), "--grid", str(grid_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other")
    assert result["minutes"] == minutes and result["size"] == 16
    assert list(result["entrants"]) == list(ENTRANTS)
    for name, r in result["entrants"].items():
        for stage, share in STAGES[name].items():  # the budget split, and steps = budget / measured s per step
            plan = r["stages"][stage]
            assert plan["budget_s"] == round(minutes * 60 * share, 2), (name, stage, plan)
            assert plan["steps"] == max(2, int(plan["budget_s"] / plan["seconds_per_step"])), (name, stage, plan)
            assert finite(plan["train_wall_s"]) and plan["train_wall_s"] > 0
        assert r["steps"] == sum(p["steps"] for p in r["stages"].values())
        for a in FAITHFULNESS:
            assert 0.0 <= r["faithfulness"][a] <= 1.0, (name, a)
        for key in ("fd", "kid", "clip_score", "sampling_s_per_image", "train_wall_s"):
            assert finite(r[key]), (name, key, r[key])
        assert r["fd"] >= 0 and 0 <= r["clip_score"] <= 100 and r["sampling_s_per_image"] > 0
        assert isinstance(r["parameters"], int) and r["parameters"] > 1000
        if name in WITH_NLL:
            assert finite(r["nll_bits_per_dim"]) and r["nll_bits_per_dim"] > 0 and r["nll_kind"], name
        else:  # a GAN and a diffusion model define no likelihood here: no number rather than a made-up one
            assert r["nll_bits_per_dim"] is None and r["nll_kind"] is None, name
    assert set(result["reference"]["detector_ceiling"]) == set(FAITHFULNESS)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [*ENTRANTS, "*renderer (ceiling)*"]
    assert all(line.count("|") == table[0].count("|") for line in table)
    grid = Image.open(grid_path)
    assert grid.height == 44 + len(ENTRANTS) * (96 + 2)  # header + one row per entrant
