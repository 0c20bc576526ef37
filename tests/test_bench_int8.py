"""bench/int8_gemm.py: every int8 path computes what its quantization says (scales, zero points, no saturation), and
the --tiny run writes every number of the table, with totals and projections that follow from its rows."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("int8_gemm", ROOT / "bench" / "int8_gemm.py")
bench = sys.modules["int8_gemm"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up there
SPEC.loader.exec_module(bench)

MATCH = 2e-3  # int8 result vs the same quantization simulated in fp32: rounding ties and the fp32 sums only
QUANT = 0.04  # int8 (7-bit activations, 8-bit weights) vs fp32: measured 0.7–1.9 % on the U-Net's layers


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def layers():
    """A ResBlock-like conv (SiLU input), a strided one (Downsample2D), and linear layers with and without bias."""
    g = torch.Generator().manual_seed(0)
    x = F.silu(torch.randn(2, 16, 8, 8, generator=g) * 2)  # (B, C, H, W)
    w = torch.randn(24, 16, 3, 3, generator=g) * 0.08
    b = torch.randn(24, generator=g) * 0.1
    conv = bench.Shape("conv", "conv", ["a"], w, b, (1, 1), (1, 1), x, 0)
    down = bench.Shape("conv", "down", ["b"], w, None, (2, 2), (1, 1), x, 0)
    h = torch.randn(64, 32, generator=g) * 1.5 + 0.3  # (M, K): a signed, off-centre activation
    lin = bench.Shape("linear", "linear", ["c"], torch.randn(48, 32, generator=g) * 0.1, b.repeat(2), (1, 1), (0, 0),
                      h, 0)
    return [conv, down, lin, bench.Shape("linear", "q", ["d"], lin.weight, None, (1, 1), (0, 0), h, 0)]


@pytest.mark.parametrize("shape", layers(), ids=lambda s: s.label)
def test_every_int8_path_matches_its_simulated_quantization(shape):
    torch.backends.quantized.engine = "x86"
    y = shape.fp32(shape.x)
    for path in bench.PATHS[shape.kind]:
        v = bench.BUILD[path](shape)
        with torch.inference_mode():
            out = v.net()
            kernel = None if v.kernel is None else v.kernel()
        assert out.shape == y.shape and out.dtype == torch.float32, path
        assert bench.rel_err(out, v.reference) <= MATCH, (path, bench.rel_err(out, v.reference))
        assert 1e-4 < bench.rel_err(out, y) <= QUANT, (path, bench.rel_err(out, y))  # int8, and close to fp32
        if kernel is not None:  # the kernel-only call computes the same product
            kernel = kernel.dequantize() if kernel.is_quantized else kernel
            if path == "int_mm":  # (M, N) s32 before the scales
                ws = bench.weight_qparams(shape.weight)[1]
                kernel = kernel * (float(shape.x.abs().max()) / 127 * ws)
                kernel = kernel if shape.bias is None else kernel + shape.bias
                kernel = kernel.view(out.shape[0], *out.shape[2:], -1).permute(0, 3, 1, 2) if shape.kind == "conv" \
                    else kernel
            assert torch.allclose(kernel.reshape(out.shape), out, atol=1e-4, rtol=1e-4), path


@pytest.mark.parametrize("shape", layers()[::2], ids=lambda s: s.label)
def test_the_bound_fails_when_a_zero_point_or_scale_is_off(shape):
    """The MATCH bound separates the right result from one whose integers were read with the zero point one off or
    the scale 3 % off (a kernel handed the wrong quantization parameters)."""
    torch.backends.quantized.engine = "x86"
    out = bench.onednn(shape).net()
    s, zp = bench.act_qparams(shape.x)
    w8, ws = bench.weight_qparams(shape.weight)
    wd = bench.dequantized_weight(shape, w8, ws)
    x_hat = bench.fake_quant(shape.x, s, zp, 0, bench.ACT_QMAX)  # s·(q − zp)
    right = shape.fp32(x_hat, wd)
    off_zp, off_scale = shape.fp32(x_hat - s, wd), shape.fp32(x_hat * 1.03, wd)  # s·(q − zp − 1), 1.03·s·(q − zp)
    assert bench.rel_err(out, right) <= MATCH
    assert bench.rel_err(out, off_zp) > 5 * MATCH and bench.rel_err(out, off_scale) > 5 * MATCH


def test_plain_view_is_the_quantized_integers_without_a_copy():
    x = torch.randn(3, 5, 4)
    q = torch.quantize_per_tensor(x, 0.02, 60, torch.quint8)
    u8 = bench.plain_view(q, torch.uint8)
    assert u8.dtype == torch.uint8 and torch.equal(u8, q.int_repr())
    assert u8.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()


def test_amdahl_and_the_layer_totals():
    assert bench.amdahl(0.8, 2.0) == pytest.approx(1 / 0.6)
    assert bench.amdahl(0.0, 5.0) == 1.0
    rows = [{"kind": "conv", "count": 2, "gflop": 1.0, "fp32_s": 1.0,
             "paths": {"a": {"net_s": 0.5, "kernel_s": 0.25}, "b": {"net_s": 2.0, "kernel_s": 1.5}}},
            {"kind": "linear", "count": 1, "gflop": 0.5, "fp32_s": 1.0,
             "paths": {"a": {"net_s": 4.0, "kernel_s": 2.0}, "c": {"net_s": 0.8, "kernel_s": None}}}]
    seconds = {path: bench.layer_seconds(rows[1], path, "kernel") for path in ("a", "b", "c", "best_int8",
                                                                               "best_mixed")}
    assert seconds == {"a": 2.0, "b": 1.0, "c": 0.8, "best_int8": 0.8, "best_mixed": 0.8}  # b: fp32; c: its net
    assert bench.layer_seconds(rows[1], "best_mixed", "net") == 0.8
    assert bench.layer_seconds(rows[0], "best_mixed", "net") == 0.5
    assert bench.layer_seconds(rows[0], "b", "net") == 2.0  # slower than fp32, and counted so


def test_tiny_bench_writes_every_number(tiny_diffusion_run, tmp_path):
    baseline = tmp_path / "sample.json"
    baseline.write_text(json.dumps({"precision": "fp32", "results": {
        "batch_1": {"speedup_vs_diffusers": {"carrara": 1.2, "carrara-fp32": 1.0}}}}))
    out = tmp_path / "int8.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "int8_gemm.py"), "--tiny", "--model",
                           str(tiny_diffusion_run), "--threads", "1", "--baseline", str(baseline), "--out", str(out)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and result["tiny"] is True
    assert result["quantized_engine"] == "x86" and result["activation_qmax"] == 127 and result["runs"] == 1
    r = result["results"]["batch_2"]
    assert list(result["results"]) == ["batch_2"] and r["unet_batch"] == 2
    assert finite(r["unet_s"]) and r["unet_s"] > 0 and r["unet_gflop_per_step"] > 0
    assert [row["kind"] for row in r["shapes"]] == ["conv", "linear"]
    for row in r["shapes"]:
        assert row["count"] == len(row["layers"]) >= 1 and row["fp32_s"] > 0 and row["gflop"] > 0
        assert row["shape"].endswith("B=2") or row["shape"].startswith("linear")
        assert list(row["paths"]) == list(bench.PATHS[row["kind"]])
        for path, p in row["paths"].items():
            assert p["net_s"] > 0 and p["speedup_net"] == pytest.approx(row["fp32_s"] / p["net_s"])
            assert (p["kernel_s"] is None) == (path == "dynamic")
            assert p["rel_err_vs_reference"] <= MATCH, (row["shape"], path, p)
            assert 1e-4 < p["rel_err_vs_fp32"] <= QUANT, (row["shape"], path, p)
    totals = r["totals"]
    for group in ("conv", "linear"):
        (row,) = [row for row in r["shapes"] if row["kind"] == group]
        assert totals[group]["fp32_s"] == pytest.approx(row["count"] * row["fp32_s"])
        for path, p in row["paths"].items():
            assert totals[group][path]["speedup_net"] == pytest.approx(p["speedup_net"])
    all_ = totals["all"]
    assert all_["fp32_s"] == pytest.approx(totals["conv"]["fp32_s"] + totals["linear"]["fp32_s"])
    assert all_["best_mixed"]["speedup_net"] >= max(1.0, all_["best_int8"]["speedup_net"] - 1e-9)
    share = r["quantizable_share"]
    assert 0 < share["flops"] <= 1 and 0 < share["time"] <= 1
    for path, proj in r["projection"].items():
        u = bench.amdahl(share["flops"], all_[path]["speedup_net"])
        assert proj["unet_speedup_by_flops_share"] == pytest.approx(u)
        assert proj["implied_vs_diffusers"]["flops"] == pytest.approx(1.1 * u)  # mean of the fp32 rows 1.2, 1.0
    stop = r["stop_rule"]
    assert stop["kernel_speedup"] == pytest.approx(all_["best_mixed"]["speedup_kernel"])
    assert stop["met"] == (stop["kernel_speedup"] < 1.4 or stop["net_speedup"] < 1.32)


def test_end_to_end_bench_writes_ratios_quality_and_peak(tiny_diffusion_run, tmp_path):
    """bench/int8.py on a tiny model calibrated by `carrara quantize`: every ratio follows from its own medians."""
    import shutil

    from carrara.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusion_run, model)
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["quantize", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--n", "1"]) == 0
    out = tmp_path / "int8.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "int8.py"), "--model", str(model), "--batches", "2",
                           "--runs", "1", "--steps", "2", "--threads", "1", "--peak-sizes", "512", "--out", str(out)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other") and result["peak_fp32_gflops_per_s"] > 0
    r = result["results"]["batch_2"]
    med = r["median_s"]
    assert set(med) == {"carrara-int8", "carrara-fp32", "diffusers"}
    assert r["int8_vs_fp32"] == pytest.approx(med["carrara-fp32"] / med["carrara-int8"])
    assert r["speedup_vs_diffusers"]["carrara-int8"] == pytest.approx(med["diffusers"] / med["carrara-int8"])
    for name, share in r["fraction_of_fp32_peak"].items():
        assert share == pytest.approx(r["gflop"] / med[name] / result["peak_fp32_gflops_per_s"])
    diff = r["mean_abs_pixel_diff_255"]
    assert 0 < diff["carrara-int8_vs_fp32"] < 20 and diff["diffusers_vs_fp32"] < 1  # int8 differs, diffusers ≈ fp32
