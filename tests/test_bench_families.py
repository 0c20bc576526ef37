"""bench/families.py --tiny end to end: every entrant is trained within its budget and has every number of the table."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import families  # bench/families.py: bench/ is not a package, on sys.path above

ENTRANTS = ("vae", "vqvae+ar", "igpt", "flow", "gan", "diffusion")
STAGES = {"vae": {"vae": 1.0}, "vqvae+ar": {"vqvae": 0.25, "ar": 0.75}, "igpt": {"igpt": 1.0}, "flow": {"flow": 1.0},
          "gan": {"gan": 1.0}, "diffusion": {"autoencoder": 0.25, "diffusion": 0.75}}
WITH_NLL = ("vae", "vqvae+ar", "igpt", "flow")
FAITHFULNESS = ("color", "position", "size", "shape", "all")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


MINUTES = 0.01


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny bench, run once: (its --out folder, the JSON, the run's stdout, the grid's path)."""
    tmp_path = tmp_path_factory.mktemp("families")
    minutes = MINUTES
    out, result_path, grid_path = tmp_path / "runs", tmp_path / "families.json", tmp_path / "grid.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "families.py"), "--tiny", "--quiet", "--minutes",
                           str(minutes), "--out", str(out), "--json", str(result_path), "--grid", str(grid_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(result_path.read_text()), done.stdout, grid_path


def test_tiny_bench_has_every_family_and_every_number(tiny):
    _, result, stdout, grid_path = tiny
    minutes = MINUTES
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
        lo, hi = r["diversity_ci95"]
        assert 0 <= r["diversity"] <= 2 and lo <= hi, (name, r["diversity"], r["diversity_ci95"])
        if name in WITH_NLL:
            assert finite(r["nll_bits_per_dim"]) and r["nll_bits_per_dim"] > 0 and r["nll_kind"], name
        else:  # a GAN and a diffusion model define no likelihood here: no number rather than a made-up one
            assert r["nll_bits_per_dim"] is None and r["nll_kind"] is None, name
    assert set(result["reference"]["detector_ceiling"]) == set(FAITHFULNESS)
    assert result["reference"]["renderer_diversity"]["diversity"] > 0  # the jitter moves the shapes
    assert result["diversity"] == {"captions": 2, "seeds": 3, "caption_seed": families.DIVERSITY_SEED}
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [*ENTRANTS, "*renderer (ceiling)*"]
    assert all(line.count("|") == table[0].count("|") for line in table)
    grid = Image.open(grid_path)
    assert grid.height == 44 + len(ENTRANTS) * (96 + 2)  # header + one row per entrant


class FixedPipe:
    """A model that draws `image` for every prompt and seed (a collapsed generator), or noise if `image` is None."""

    def __init__(self, image: torch.Tensor | None):
        self.image = image

    def __call__(self, prompts, *, seed, output, **kwargs):
        if self.image is None:
            g = torch.Generator().manual_seed(seed)
            return torch.rand(len(prompts), 3, 16, 16, generator=g) * 2 - 1
        return self.image.expand(len(prompts), -1, -1, -1)


def test_diversity_is_zero_for_a_collapsed_generator_and_not_for_noise(tiny):
    out, result, _, _ = tiny
    ctx = {"scale": families.TINY, "clip": out / "clip", "guidance": 1.0}
    collapsed = families.entrant_diversity(FixedPipe(torch.zeros(1, 3, 16, 16)), ctx)
    noise = families.entrant_diversity(FixedPipe(None), ctx)
    assert collapsed["diversity"] == pytest.approx(0, abs=1e-6)
    assert noise["diversity"] > 1e-3
    assert families.renderer_diversity(ctx) == result["reference"]["renderer_diversity"]  # seeded: reproducible
