"""bench/lora.py --tiny end to end: the LoRA is trained and applied, every number of the table is there and in range."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCORES = ("taught_concept_i2t_top1", "taught_style_rate", "unseen_concept_i2t_top1", "unseen_style_rate",
          "old_t2i_top1", "old_t2i_top5")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs folder for both benches: the second reuses the first's data, base model and CLIP judge."""
    return tmp_path_factory.mktemp("lora-bench")


def test_tiny_lora_bench_has_every_number(runs, tmp_path):
    out, result_path = runs, tmp_path / "lora.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lora.py"), "--tiny", "--quiet", "--out", str(out),
                           "--json", str(result_path)], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and result["tiny"] is True
    names = result["names"]
    assert [len(names[k]) for k in ("taught", "unseen", "old")] == [6, 4, 8]
    assert not (set(names["taught"]) & set(names["unseen"]) | set(names["taught"]) & set(names["old"])
                | set(names["unseen"]) & set(names["old"]))  # disjoint: "unseen" and "old" were never taught
    concept = [json.loads(line)["text"] for line in (out / "concept" / "metadata.jsonl").read_text().splitlines()]
    assert concept == [f"{n}, cyanotype" for n in names["taught"]]
    for when in ("before", "after"):
        assert set(result[when]) == set(SCORES)
        assert all(0.0 <= result[when][k] <= 1.0 for k in SCORES), result[when]
    drop = 100 * (result["before"]["old_t2i_top5"] - result["after"]["old_t2i_top5"])
    assert result["old_t2i_top5_drop_points"] == round(drop, 1)
    lora = result["lora"]
    assert (lora["rank"], lora["steps"]) == (4, 4) and lora["train_wall_s"] > 0
    adapter = load_file(lora["file"])
    assert lora["adapter_bytes"] == Path(lora["file"]).stat().st_size
    assert all(v.shape[0] == 4 for k, v in adapter.items() if k.endswith("lora_A.weight"))
    assert math.isfinite(result["sampling_s_per_image"]) and result["sampling_s_per_image"] > 0
    grid = np.asarray(Image.open(result["grid"]), dtype=np.int16)
    assert grid.shape == (2 + 2 * (16 + 2), 2 + 16 * (16 + 2), 3)  # 2 rows (before, after) of 4 + 4 + 8 images
    before, after = grid[2:18], grid[20:36]
    assert np.abs(before - after).mean() > 0.5  # the after row was drawn with the adapter merged


def test_prior_preservation_data_and_a_weight_sweep_where_zero_is_the_base(runs, tmp_path):
    out, result_path = runs, tmp_path / "lora.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lora.py"), "--tiny", "--quiet", "--out", str(out),
                           "--json", str(result_path), "--regularize", "3", "--weights", "1,0"], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    names = result["names"]
    assert len(names["regular"]) == 3 and not set(names["regular"]) & set(
        names["taught"] + names["unseen"] + names["old"])
    concept = [json.loads(line)["text"] for line in (out / "concept-reg3" / "metadata.jsonl").read_text().splitlines()]
    assert concept == [f"{n}, cyanotype" for n in names["taught"]] + names["regular"]  # plain captions, plain images
    assert result["lora"]["run"].endswith("lora-reg3") and result["weights"] == [1.0, 0.0]
    assert result["after_by_weight"]["1.0"] == result["after"]
    assert result["after_by_weight"]["0.0"] == result["before"]  # weight 0 is the base model, image for image
