"""bench/routes.py --tiny end to end: both routes trained within their budget, each with every number of the table."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"latent": {"autoencoder": 0.25, "diffusion": 0.75}, "imagen": {"base": 0.75, "upsampler": 0.25}}
FAITHFULNESS = ("color", "position", "size", "shape", "all")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_bench(out: Path, result_path: Path, grid_path: Path, minutes: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "routes.py"), "--tiny", "--quiet", "--minutes",
                           str(minutes), "--out", str(out), "--json", str(result_path), "--grid", str(grid_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_bench_has_both_routes_and_every_number(tmp_path):
    minutes = 0.01
    out, result_path, grid_path = tmp_path / "runs", tmp_path / "routes.json", tmp_path / "grid.png"
    done = run_bench(out, result_path, grid_path, minutes)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other")
    assert result["minutes"] == minutes and result["size"] == 32
    assert list(result["routes"]) == ["latent", "imagen"]
    for name, r in result["routes"].items():
        for stage, share in STAGES[name].items():  # the budget split, and steps = budget / measured s per step
            plan = r["stages"][stage]
            assert plan["budget_s"] == round(minutes * 60 * share, 2), (name, stage, plan)
            assert plan["steps"] == max(2, int(plan["budget_s"] / plan["seconds_per_step"])), (name, stage, plan)
            assert finite(plan["train_wall_s"]) and plan["train_wall_s"] > 0
        assert list(r["stages"]) == list(STAGES[name]) and r["steps"] == sum(p["steps"] for p in r["stages"].values())
        for a in FAITHFULNESS:
            assert 0.0 <= r["faithfulness"][a] <= 1.0, (name, a)
        for key in ("fd", "kid", "clip_score", "s_per_image_batch", "s_per_image_one", "train_wall_s"):
            assert finite(r[key]), (name, key, r[key])
        assert r["fd"] >= 0 and 0 <= r["clip_score"] <= 100 and r["s_per_image_batch"] > 0
        assert r["parameters"] == sum(r["parameters_by_part"].values()) > 1000
    latent, imagen = result["routes"]["latent"], result["routes"]["imagen"]
    assert latent["sizes"] == [32] and imagen["sizes"] == [16, 32]  # the cascade: a 16-px base, then ×2
    assert latent["intermediate_product"] == "latent 16×16×4 → KL decoder"  # the tiny autoencoder: f = 2
    assert imagen["intermediate_product"] == "image 16×16×3 → upsampler ×2"
    assert set(latent["parameters_by_part"]) == {"unet", "vae"} and latent["parameters_by_part"]["vae"] > 0
    assert imagen["parameters_by_part"]["vae"] == 0 and imagen["parameters_by_part"]["upsampler"] > 0  # pixel codec
    assert finite(imagen["base_s_per_image_batch"]) and "base_s_per_image_batch" not in latent
    assert imagen["upsampler_sampling"]["steps"] == 2 and latent["upsampler_sampling"] is None
    vae = json.loads((out / "imagen" / "model" / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "CarraraPixelCodec"
    assert set(result["reference"]["detector_ceiling"]) == set(FAITHFULNESS)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["latent", "imagen", "*renderer (ceiling)*"]
    assert all(line.count("|") == table[0].count("|") for line in table)
    grid = Image.open(grid_path)
    assert grid.height == 44 + 3 * (96 + 2)  # header + latent 32 px, imagen base 16 px, imagen 32 px

    again = run_bench(out, result_path, grid_path, minutes)  # resumed: nothing is trained or evaluated again
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(result_path.read_text())["routes"] == result["routes"]
    other = run_bench(out, result_path, grid_path, 2 * minutes)  # another budget in the same folder: one line
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0 and "planned for" in other.stderr
