"""bench/guided.py: its plan, its pieces (fixed β_t variance, diversity), and --tiny end to end: every experiment's numbers in range, resumed without training again."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from carrara.diffusion.objectives import step_betas
from carrara.diffusion.samplers import sample_ddpm
from carrara.diffusion.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import guided  # bench/ is not a package: on sys.path above

MODELS = ["base", "learned", "cosine", "adagn"]
VARIANCES = ["learned Σθ", "fixed β_t", "fixed β̃_t"]
ONE = ("color", "position", "size", "shape", "count", "all")
TWO = ("both objects", "relation", "all", "color", "shape", "size", "count")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "guided.py"), "--tiny", "--quiet", *args],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_fixed_beta_variance_widens_the_ddpm_step_by_sqrt_beta():
    """With the hook, a DDPM step t → s adds √β z instead of √β̃ z (Ho et al.'s two fixed choices); without it, or
    after it, the model's own β̃."""
    torch.manual_seed(0)
    pipe = SimpleNamespace(unet=torch.nn.Conv2d(4, 4, 1))
    schedule = NoiseSchedule.from_config("scaled_linear", T=100)
    x_T, ts = torch.randn(2, 4, 4, 4), [80, 40, 0]

    def first_step():
        seen = []
        with torch.no_grad():
            sample_ddpm(lambda x, t: pipe.unet(x), x_T, schedule, ts, generator=torch.Generator().manual_seed(1),
                        after_step=lambda i, abar, x: seen.append(x) or x)
        return seen[0]

    plain = first_step()
    with guided.sampled_variance(pipe, "beta"):
        wide = first_step()
    with guided.sampled_variance(pipe, "model"):
        same = first_step()
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1))
    beta, beta_tilde = step_betas(float(schedule.alphas_cumprod[80]), float(schedule.alphas_cumprod[40]))
    torch.testing.assert_close(wide - plain, (math.sqrt(beta) - math.sqrt(beta_tilde)) * z, atol=1e-5, rtol=1e-4)
    assert torch.equal(same, plain) and torch.equal(first_step(), plain)  # the hook is gone afterwards


def test_plan_lists_every_run_and_experiment_and_trains_nothing(tmp_path):
    out = tmp_path / "runs"
    done = bench("--plan", "--only", "adagn,guidance", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("plan on ") and "U-Net call" in lines[0]
    trains = [re.match(r"  train (.+?) +([\d.]+) min$", s) for s in lines if s.startswith("  train ")]
    assert [m.group(1) for m in trains] == ["autoencoder", "clip", "diffusion base", "diffusion adagn", "classifier"]
    evals = [re.match(r"  eval  (\S+) +([\d.]+) min", s) for s in lines if s.startswith("  eval ")]
    assert [m.group(1) for m in evals] == ["adagn", "guidance"]
    total = re.search(r"total ≈ ([\d.]+) h: training ([\d.]+) h .*evaluation ([\d.]+) h", done.stdout)
    train_h = sum(float(m.group(2)) * 60 + guided.RUN_OVERHEAD_S for m in trains) / 3600
    eval_h = sum(float(m.group(2)) for m in evals) / 60
    assert float(total.group(2)) == pytest.approx(train_h, abs=0.006)
    assert float(total.group(3)) == pytest.approx(eval_h, abs=0.006)
    assert float(total.group(1)) == pytest.approx(train_h + eval_h, abs=0.011)
    assert not out.exists()  # a plan builds and trains nothing


def test_plan_point_counts():
    """The estimate counts each point's images and network calls: CFG doubles the U-Net calls, w = 1 does not."""
    scale = guided.TINY
    points = guided.experiment_points("variance", scale, MODELS, (0, 4), (1, 4))
    assert len(points) == 3 * len(scale.steps) + 3 and {p.sampler for p in points if p.kind == "quality"} == {"ddpm"}
    p = guided.Point("quality", "base", steps=10, guidance=4.0, cg_scale=2.0, diversity=True)
    images = scale.n + scale.n_fd + 2 * 3
    assert guided.point_calls(p, scale, 50) == {"unet": images * 20, "classifier": images * 10, "decode": images}
    assert guided.point_calls(guided.Point("nll", "base"), scale, 50)["unet"] == scale.n_nll * 50
    two = guided.experiment_points("two-object", scale, ["base"], (0, 4), (1, 4), (2.0,))
    assert [(p.model, p.cg_scale) for p in two] == [("base", None), ("base", 2.0)]
    assert guided.point_calls(two[1], scale, 50)["classifier"] == scale.n * scale.sample_steps
    assert guided.needs_classifier(["two-object"], (2.0,)) and not guided.needs_classifier(["two-object"], ())


@pytest.mark.parametrize(("args", "message"), [(("--only", "colour"), "unknown experiment 'colour'"),
                                               (("--table", "/nonexistent.json"), "--table /nonexistent.json: cannot"),
                                               (("--table", __file__), "--table"),
                                               (("--steps", "0,25"), "--steps"),
                                               (("--cfg-scales", "0.5"), "w is at least 1")])
def test_bad_settings_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        guided.main(["--tiny", "--plan", "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("carrara: error: ") and err.count("\n") == 1 and message in err


def test_tiny_bench_has_every_experiment_and_every_number(tmp_path):
    out, result_path, plot = tmp_path / "runs", tmp_path / "guided.json", tmp_path / "tradeoff.png"
    args = ("--out", str(out), "--json", str(result_path), "--plot", str(plot), "--cg-scales", "0,4",
            "--cfg-scales", "1,4", "--two-object-cg", "3")
    done = bench(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("plan on ")  # the plan comes before anything runs
    r = json.loads(result_path.read_text())
    assert r["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and r["tiny"] is True and r["size"] == 32
    assert list(r["experiments"]) == ["variance", "schedule", "guidance", "adagn", "two-object"]
    steps = r["trained_steps"]
    assert steps >= 2 and all(r["training"][m]["steps"] == steps for m in MODELS)  # equal steps
    assert r["training"]["classifier"]["steps"] >= 2
    assert r["plan"]["estimate_s"] > 0 and set(r["plan"]["seconds_per_image"]) == {"unet", "decode", "classifier"}

    def check_quality(q):
        assert finite(q["fd"]) and q["fd"] >= 0, q
        assert set(ONE) <= set(q["faithfulness"]) and all(0 <= v <= 1 for v in q["faithfulness"].values()), q

    v = r["experiments"]["variance"]
    assert v["sampler"] == "ddpm" and v["steps"] == [2, 3] and list(v["runs"]) == VARIANCES
    for label in VARIANCES:
        assert list(v["runs"][label]) == ["2", "3"]  # one entry per requested step count
        for q in v["runs"][label].values():
            check_quality(q)
        assert finite(v["nll_bits_per_dim"][label]) and v["nll_bits_per_dim"][label] > 0
    assert v["nll_bits_per_dim"]["fixed β_t"] != v["nll_bits_per_dim"]["fixed β̃_t"]  # one network, two variances
    for label in ("scaled_linear", "cosine"):
        check_quality(r["experiments"]["schedule"][label])
        assert r["experiments"]["schedule"][label]["nll_bits_per_dim"] > 0
    g = r["experiments"]["guidance"]
    assert [q["scale"] for q in g["classifier"]] == [0, 4] and [q["w"] for q in g["classifier_free"]] == [1, 4]
    for q in g["classifier"] + g["classifier_free"]:
        check_quality(q)
        assert 0 <= q["diversity"] <= 2  # unit embeddings
    assert Image.open(plot).size == (1000, 400)
    for label in ("off", "on"):
        check_quality(r["experiments"]["adagn"][label])
    two = r["experiments"]["two-object"]
    assert list(two) == [*MODELS, "base + relation guidance s=3"]  # item 5's lever beside every model
    for q in two.values():
        assert set(TWO) <= set(q["faithfulness"]) and all(0 <= q["faithfulness"][a] <= 1 for a in TWO)
    assert r["reference"]["detector_ceiling_two_objects"]["relation"] == 1.0
    table = [s for s in done.stdout.splitlines() if s.startswith("| ")]
    heads = [s for s in table if not s.startswith("| ---") and s.split("|")[1].strip() in
             ("σ²", "Schedule", "AdaGN", "guidance", "model")]
    assert [s.split("|")[1].strip() for s in heads] == ["σ²", "Schedule", "AdaGN", "guidance", "model"]
    assert all(s.count("|") == h.count("|") for h in heads for s in table[table.index(h):][:2])
    two_rows = table[table.index(heads[-1]) + 1:]  # (the separator row starts "|---")
    assert [s.split("|")[1].strip() for s in two_rows] == [*MODELS, "base + relation guidance s=3",
                                                           "*renderer (ceiling)*"]
    assert guided.table_of(str(result_path)) in done.stdout  # --table prints the same tables from the JSON

    marks = {p: p.stat().st_mtime_ns for p in out.glob("*/budget.json")}
    again = bench(*args[:4], "--two-object-cg", "3", "--only", "two-object,adagn")  # nothing trained or measured
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(result_path.read_text())["experiments"]
    assert resumed["two-object"] == {m: two[m] for m in ("base", "adagn", "base + relation guidance s=3")}
    assert resumed["adagn"] == r["experiments"]["adagn"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/budget.json")} == marks
    other = bench("--out", str(out), "--json", str(result_path), "--minutes", "0.02", "--only", "adagn")
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0 and "planned for" in other.stderr
