"""bench/cascade.py: PSNR by hand, the bench's upsampling is the pipeline's cascade, --tiny end to end (every row
finite, each interval around its estimate, the figure's size), a rerun reuses what it made, bad input is one line."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carrara.evaluate.fid import feature_stats, frechet_distance
from carrara.images import to_uint8
from carrara.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import cascade  # bench/ is not a package: on sys.path above

FD_KEYS = ("fd", "fd_ci95", "n_gen", "n_real")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def around(row: dict, key: str) -> bool:
    """The row's estimate is finite and inside its finite 95 % interval."""
    lo, hi = row[f"{key}_ci95"]
    return all(finite(v) for v in (lo, row[key], hi)) and lo <= row[key] <= hi


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny run (a tiny cascade 64 → 128 and a tiny 128-px CLIP on 24 shapes), its folder and its result."""
    out = tmp_path_factory.mktemp("cascade-bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cascade.py"), "--tiny", "--quiet", "--out", str(out)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "cascade.json").read_text()), done.stdout


def test_psnr_by_hand():
    """Image 0 off by 5 everywhere: MSE 25; image 1 off by 10 on half its pixels: MSE 50; identical would be ∞."""
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] += 5
    b[1, :, :2] = 10
    got = cascade.psnr(a, b)
    assert got == pytest.approx([10 * math.log10(255**2 / 25), 10 * math.log10(255**2 / 50)], abs=1e-9)
    assert got[0] == pytest.approx(34.1514, abs=1e-4)
    assert cascade.psnr(b, a) == pytest.approx(got)  # symmetric


def test_tiles_are_the_images_quarters_in_reading_order():
    x = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    t = cascade.tiles(x, 2)
    assert t.shape == (2, 4, 3, 2, 2)
    for i, (r, c) in enumerate(((0, 0), (0, 2), (2, 0), (2, 2))):
        assert torch.equal(t[:, i], x[:, :, r:r + 2, c:c + 2])
    with pytest.raises(cascade.CarraraError, match="do not tile"):
        cascade.tiles(x, 3)


def test_patch_fd_pools_tiles_and_is_zero_for_one_set():
    """FD over all tiles = FD of the (N·k, D) features; a set against itself is 0."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 4 * 3)), rng.normal(1.0, 1.0, size=(30, 4 * 3))
    row = cascade.patch_fd_row(a, b, 3, bootstrap=5)
    want = frechet_distance(*feature_stats(b.reshape(-1, 3)), *feature_stats(a.reshape(-1, 3)))
    assert row["patch_fd"] == pytest.approx(want) and want > 2  # means 1 apart in each of 3 dims: ≥ 3 − noise
    assert (row["patch_n_gen"], row["patch_n_real"]) == (80, 120)
    assert cascade.patch_fd_row(a, a, 3, bootstrap=2)["patch_fd"] == pytest.approx(0, abs=1e-6)


def test_tiny_bench_has_every_row_with_its_interval(tiny):
    out, r, stdout = tiny
    assert r["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and r["command"].endswith("--out " + str(out))
    assert r["sizes"] == [64, 128] and r["n"] == 8 and r["n_real"] == 24 and r["bootstrap"] == 5
    assert r["swd_bootstrap"] == 5  # SWD's resamples follow --bootstrap unless given
    assert r["real_set"].startswith("all 24 images") and r["feature_network"] == "carrara-clip[clip]"
    rows = r["rows"]
    assert set(rows["cascade"]) == {"aug0_steps2", "aug100_steps2"} and rows["chosen"] in rows["cascade"]
    finest = str(max(int(k) for k in rows["cascade"][rows["chosen"]]["swd"]))  # chosen by the finest scale's SWD
    assert rows["cascade"][rows["chosen"]]["swd"][finest] == pytest.approx(min(c["swd"][finest] for c in rows["cascade"].values()), rel=1e-6)
    fd_rows = [rows["bicubic"], *rows["cascade"].values(), rows["real64_bicubic"], rows["real64_upsampler"],
               rows["real128_halves"]]
    for row in fd_rows:
        assert set(FD_KEYS) <= set(row) and around(row, "fd") and row["fd"] >= 0, row
    for row in fd_rows[:-1]:
        assert row["n_gen"] == 8 and row["n_real"] == 24
    assert rows["real128_halves"]["n_gen"] == rows["real128_halves"]["n_real"] == 12
    # patch FD: the 64-px CLIP over the 4 tiles of every image; whole images resampled for the interval
    assert r["patch_feature_network"] == "carrara-clip[patch-clip] over every 64² tile"
    for row in fd_rows[:-1]:
        assert around(row, "patch_fd") and row["patch_fd"] >= 0 and (row["patch_n_gen"], row["patch_n_real"]) == (32, 96)
    assert rows["real128_halves"]["patch_n_gen"] == rows["real128_halves"]["patch_n_real"] == 48
    assert set(r["cascade_vs_bicubic"]) >= {"patch_fd_lower", "patch_intervals_disjoint"}
    for name in ("real64_bicubic", "real64_upsampler"):
        assert around(rows[name], "psnr_db"), rows[name]
    assert rows["real64_upsampler"]["aug_level"] == rows["cascade"][rows["chosen"]]["aug_level"]
    # bicubic of box-downsampled shapes is close to the real image; so is an untrained stage's output, which is
    # bicubic plus k times a residual (k = the data's residual std: carrara/upsampler.py) — pixel noise would be < 20
    assert rows["real64_bicubic"]["psnr_db"] > 20 and rows["real64_upsampler"]["psnr_db"] > 20
    t = r["time"]
    for key in ("base", "cascade"):
        assert finite(t[f"{key}_s_per_image_batch"]) and t[f"{key}_s_per_image_one"] > 0
    assert t["upsampler_added_s_per_image_batch"] == pytest.approx(t["cascade_s_per_image_batch"]
                                                                   - t["base_s_per_image_batch"])
    assert isinstance(r["cascade_vs_bicubic"]["intervals_disjoint"], bool)
    grid = Image.open(out / "cascade-grid.png")
    assert grid.size == (90 + 4 * (128 + 2), 44 + 4 * (128 + 2))  # label + 4 captions; header + 4 rows
    table = [line for line in stdout.splitlines() if line.startswith("| ")]  # head, bicubic, 2 settings, 3 real
    assert len(table) == 1 + 1 + 2 + 3 and all(line.count("|") == 8 for line in table)


def test_bench_upsampling_is_the_pipelines_cascade(tiny):
    """Base images made once and upsampled by the bench, batch by batch, are what `pipe(…, size=128)` makes."""
    out = tiny[0]
    pipe = Pipeline.load(out / "tiny" / "model", precision="fp32")
    prompts = ["a red circle", "a small blue square at the top", "a green star"]
    sampling = {"steps": 2, "sampler": "dpmpp", "guidance": 4.0}
    settings = cascade.sweep_settings(pipe, [100], [2])["aug100_steps2"]
    base = cascade.base_images(pipe, prompts, sampling, 5, 2, progress=False)
    got = cascade.upsample(pipe, base, prompts, settings, 5, 2, progress=False)
    want = torch.cat([pipe(prompts[:2], **sampling, seed=5, upsampler=settings, output="tensor"),
                      pipe(prompts[2:], **sampling, seed=7, upsampler=settings, output="tensor")])
    assert got.shape == (3, 3, 128, 128) and torch.equal(got, to_uint8(want))
    other = cascade.upsample(pipe, base, prompts, cascade.sweep_settings(pipe, [0], [2])["aug0_steps2"], 5, 2,
                             progress=False)
    assert not torch.equal(other, got)  # the level reaches the stage


def close(a, b, rel=1e-6) -> bool:
    """Equal structure and values, floats within `rel` (the same images and settings give the same numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=rel)
    return a == b


def test_rerun_reuses_the_images_and_adds_only_the_new_setting(tiny):
    out, r, _ = tiny
    # real64.pt is the chosen setting's output on real images: remade only if the new setting is chosen
    made = {p.name: p.stat().st_mtime_ns for p in [out / "base64.pt", *(out / "upsampled").iterdir()]
            if p.name != "real64.pt"}
    made_real64 = (out / "upsampled" / "real64.pt").stat().st_mtime_ns
    model_time = (out / "tiny" / "model" / "model_index.json").stat().st_mtime_ns
    again = cascade.run(cascade.parse_args(["--tiny", "--quiet", "--out", str(out), "--aug-levels", "0,100,200",
                                            "--json", str(out / "again.json"), "--grid", str(out / "again.png")]))
    assert {p.name: p.stat().st_mtime_ns for p in [out / "base64.pt", *(out / "upsampled").iterdir()]
            if p.name in made} == made
    assert (out / "upsampled" / "aug200_steps2.pt").is_file()
    assert (out / "tiny" / "model" / "model_index.json").stat().st_mtime_ns == model_time
    for name in ("bicubic", "real64_bicubic", "real128_halves"):  # float32 BLAS may round the SWD's last bits
        assert close(again["rows"][name], r["rows"][name])         # differently with the arrays' alignment
    assert close(again["rows"]["cascade"]["aug0_steps2"], r["rows"]["cascade"]["aug0_steps2"])
    assert set(again["rows"]["cascade"]) == {"aug0_steps2", "aug100_steps2", "aug200_steps2"}
    real64 = (out / "upsampled" / "real64.pt").stat().st_mtime_ns
    assert (real64 == made_real64) == (again["rows"]["chosen"] == r["rows"]["chosen"])


@pytest.mark.parametrize("case", ["no model", "no upsampler", "clip at 64", "no data", "data at 64", "aug level",
                                  "swd bootstrap", "nothing given"])
def test_bad_input_is_one_error_line(tiny, case, tmp_path, capsys):
    out, _, _ = tiny
    model, data, clip = out / "tiny" / "model", out / "tiny" / "data128", out / "tiny" / "clip"
    if case == "clip at 64":
        shutil.copytree(clip, tmp_path / "clip64")
        config = tmp_path / "clip64" / "clip" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "image_size": 64}))
        clip = tmp_path / "clip64"
    model = {"no model": tmp_path / "absent", "no upsampler": out / "tiny" / "base"}.get(case, model)
    data = {"no data": tmp_path / "absent", "data at 64": out / "tiny" / "data64"}.get(case, data)
    args = ["--model", str(model), "--data", str(data), "--clip", str(clip), "--out", str(tmp_path / "o"), "--quiet"]
    args = {"aug level": [*args, "--aug-levels", "0,1000"], "swd bootstrap": [*args, "--swd-bootstrap", "-1"],
            "nothing given": ["--out", str(tmp_path / "o")]}.get(
        case, args)
    with pytest.raises(SystemExit) as exit_:
        cascade.main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("carrara: error: ") and "\n" not in err, err
    expected = {"no upsampler": "no upsampler stage", "clip at 64": "trained at 64 px", "data at 64": "64×64 images",
                "aug level": "[0, 999]", "swd bootstrap": "--swd-bootstrap", "nothing given": "--tiny", "no data": "does not exist"}
    assert expected.get(case, "") in err
    assert not (tmp_path / "o").exists()  # refused before writing anything: no empty --out folder left


def test_time_only_times_base_and_cascade_with_the_recorded_setting(tiny, tmp_path, capsys):
    out, _, _ = tiny
    json_path = tmp_path / "time.json"
    cascade.main(["--model", str(out / "tiny" / "model"), "--time-only", "--batch", "2", "--rounds", "1",
                  "--json", str(json_path)])
    r = json.loads(json_path.read_text())
    t = r["time"]
    assert r["batch"] == 2 and r["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other")
    assert all(t[f"{stage}_s_per_image_{k}"] > 0 for stage in ("base", "cascade") for k in ("batch", "one"))
    for k in ("batch", "one"):  # the upsampler's time is the difference, and the verdict follows from it
        added = t[f"cascade_s_per_image_{k}"] - t[f"base_s_per_image_{k}"]
        assert t[f"upsampler_added_s_per_image_{k}"] == pytest.approx(added)
        assert t[f"upsampler_at_most_base_{k}"] == (added <= t[f"base_s_per_image_{k}"])
    assert r["upsampler"]["steps"] >= 1
    with pytest.raises(SystemExit) as exit_:  # no model: one line
        cascade.main(["--time-only", "--json", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and "--time-only needs --model" in capsys.readouterr().err
