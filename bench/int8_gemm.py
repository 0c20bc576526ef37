"""int8 against fp32 on the default U-Net's own convolution and linear shapes, on this CPU (issue 18, Part A).

The int8 calls are carrara's own (models/int8.py's Int8Conv2d / Int8Linear, forced on one kernel). The layers an
int8 U-Net would quantize are read from one real sampling run (20-step schedule cut to `--steps`,
guidance 4; hooks keep every layer's input at the U-Net call `--at-call`, mid-trajectory): the 3×3 convolutions
but conv_in/conv_out, and the linear layers but the time embedding's, each ResBlock's time_emb_proj (M = batch) and
the text's keys and values (computed once per run, models/blocks.text_kv_cache). The 1×1 shortcut convolutions stay
fp32 too (docs/notes/2026-11-29-int8-research.md). Each distinct shape is timed at U-Net batch 2 (one image with
guidance) and 32 (sixteen) in fp32 (F.conv2d / F.linear, oneDNN) and on every int8 path torch 2.13 runs without a
C++ compiler, all with per-output-channel symmetric s8 weights and per-tensor activations:

  fbgemm     quantized::conv2d / quantized::linear (engine x86: FBGEMM on CPUs without AVX-512 VNNI), 7-bit u8
             activations (reduce_range), u8 output with a calibrated scale, then dequantize;
  onednn     onednn::qconv_pointwise / qlinear_pointwise, 7-bit u8 activations, fp32 output (dequantize fused);
  dynamic    quantized::linear_dynamic (linear only): fp32 in and out, the activation's range found in the kernel;
  int_mm     torch._int_mm, s8 × s8 → s32, then the scales and the bias in fp32; convolutions via an int8 im2col.

"net" times the whole replacement of the fp32 layer: quantize the fp32 input (static scale: one pass), the int8
kernel, dequantize. "kernel" times the int8 op alone on an input already quantized (and laid out as it wants).
Timings are medians of `--runs` interleaved rounds (every shape, every variant, round after round), each a loop
long enough to time, after a warm-up; the U-Net's whole forward (text K/V cached, as sampling runs it) is timed in
the same rounds. Totals weight each shape by how many layers have it. The U-Net-level ratio follows by Amdahl from
the quantizable layers' share of the U-Net's FLOPs (FlopCounterMode) and of its fp32 time (their summed times over
the forward's), and the implied ratio over diffusers multiplies the measured one (`--baseline`, bench/sample.py).
Stop rule of the research note: conv+linear below 1.4× in kernels or 1.32× net cannot give 1.5× over diffusers.

Accuracy, per shape and path, on the real activation: relative L2 error against fp32, and against `reference`,
the same quantization simulated in fp32 (round, clamp, rescale; the u8 output too where the path has one), which
only wrong scales, zero points or saturating arithmetic can move far from the int8 result.

    python bench/int8_gemm.py [--model default] [--runs 7] [--out bench/results/int8-gemm-avx2.json]
    python bench/int8_gemm.py --tiny --model RUN --out X.json   # largest conv and linear shape, batch 2, 1 round
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind
from sample import PROMPTS

from carrara.fileio import write_json_atomic
from carrara.models import int8
from carrara.models.blocks import text_kv_cache
from carrara.models.int8 import ACT_QMAX, fake_quant, plain_view, weight_qparams
from carrara.pipeline import Pipeline

KEEP_FP32 = ("conv_in", "conv_out", "time_embedding.", "class_embedding.", "time_emb_proj", "attn2.to_k", "attn2.to_v")
STOP_KERNEL, STOP_NET = 1.4, 1.32  # the research note's stop rule for 1.5× over diffusers
MIN_SECONDS = 0.01  # each timed loop runs at least this long
PATHS = {"conv": ("fbgemm", "onednn", "int_mm"), "linear": ("fbgemm", "onednn", "dynamic", "int_mm")}


@dataclass
class Shape:
    """One distinct layer shape: the first layer's weight and real input, and how many layers share the shape."""
    kind: str  # "conv" | "linear"
    label: str
    names: list[str]
    weight: torch.Tensor  # (O, C, 3, 3) | (N, K)
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    x: torch.Tensor  # (B, C, H, W) | (M, K)
    flops: int  # per layer call, 2 per multiply-add as FlopCounterMode counts

    def fp32(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if w is None else w
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, self.stride, self.padding)
        return F.linear(x, w, self.bias)


@dataclass
class Variant:
    net: object  # () -> fp32 output
    kernel: object | None  # () -> the int8 op's output on a prepared input
    reference: torch.Tensor  # the same quantization simulated in fp32


def quantizable(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (3, 3) and name not in KEEP_FP32
    return isinstance(module, nn.Linear) and not any(k in name for k in KEEP_FP32)


def capture(pipe: Pipeline, n_images: int, steps: int, at_call: int) -> tuple[dict, tuple, dict]:
    """Every quantizable layer's (module, input) at U-Net call `at_call` of a real sampling run, and that call's args."""
    unet, calls, seen, args = pipe.unet, [0], {}, {}

    def count(module, a, kw):
        calls[0] += 1
        if calls[0] == at_call:
            args["a"], args["kw"] = a, kw

    def keep(name):
        def hook(module, inputs, output):
            if calls[0] == at_call:
                seen[name] = (module, inputs[0].detach().clone(), output.shape)
        return hook

    handles = [unet.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [m.register_forward_hook(keep(n)) for n, m in unet.named_modules() if quantizable(n, m)]
    try:
        pipe((PROMPTS * n_images)[:n_images], steps=steps, sampler="dpmpp", guidance=4.0, seed=0, output="tensor")
    finally:
        for h in handles:
            h.remove()
    return seen, args["a"], args["kw"]


def group_shapes(seen: dict) -> list[Shape]:
    """One Shape per distinct (kind, input shape, weight shape, stride), in the U-Net's order."""
    groups: dict[tuple, Shape] = {}
    for name, (m, x, out_shape) in seen.items():
        if isinstance(m, nn.Conv2d):
            B, C, H, W = x.shape
            key = ("conv", B, C, H, W, m.out_channels, m.stride)
            label = f"conv {C}→{m.out_channels} 3×3 {H}×{W}" + (" /2" if m.stride[0] > 1 else "") + f" B={B}"
            flops, x = 2 * math.prod(out_shape) * C * 9, x.contiguous()  # out (B, O, Ho, Wo)
        else:
            x = x.reshape(-1, m.in_features)  # (M, K): the GEMM a linear layer is
            key = ("linear", *x.shape, m.out_features)
            label = f"linear M={x.shape[0]} K={x.shape[1]} N={m.out_features}"
            flops = 2 * x.shape[0] * x.shape[1] * m.out_features
        if key in groups:
            groups[key].names.append(name)
            continue
        b = None if m.bias is None else m.bias.detach()
        stride, padding = (m.stride, m.padding) if key[0] == "conv" else ((1, 1), (0, 0))
        groups[key] = Shape(key[0], label, [name], m.weight.detach(), b, tuple(stride), tuple(padding), x, flops)
    return list(groups.values())


def own_range(x: torch.Tensor) -> list[float]:
    return [float(x.min()), float(x.max())]


def act_qparams(x: torch.Tensor, qmax: int = ACT_QMAX) -> tuple[float, int]:
    """The per-tensor grid the int8 U-Net would calibrate from this tensor alone (its own range: the best case)."""
    return int8.act_qparams(*own_range(x), qmax=qmax)


def dequantized_weight(shape: Shape, w8: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    return w8.float() * ws.view(-1, *[1] * (w8.dim() - 1))


def int8_module(shape: Shape, kernel: str) -> int8.Int8Layer:
    """carrara's int8 layer (models/int8.py) for this shape, calibrated on the shape's own input, forced on `kernel`."""
    if shape.kind == "conv":
        O, C = shape.weight.shape[:2]
        layer = nn.Conv2d(C, O, 3, shape.stride, shape.padding, bias=shape.bias is not None)
    else:
        layer = nn.Linear(shape.weight.shape[1], shape.weight.shape[0], bias=shape.bias is not None)
    with torch.no_grad():
        layer.weight.copy_(shape.weight)
        if shape.bias is not None:
            layer.bias.copy_(shape.bias)
    calibration = {"input": own_range(shape.x), "output": own_range(shape.fp32(shape.x))}
    return (int8.Int8Conv2d if shape.kind == "conv" else int8.Int8Linear)(layer, calibration, kernel)


def fbgemm(shape: Shape) -> Variant:
    """quantized::conv2d / quantized::linear: u8 in, u8 out with a calibrated output scale, then dequantize."""
    x, m = shape.x, int8_module(shape, "fbgemm")
    ready = int8.quantize_input(x, m.scale, m.zero_point)
    if shape.kind == "conv":
        ready = ready.contiguous(memory_format=torch.channels_last)
    reference = shape.fp32(fake_quant(x, m.scale, m.zero_point, 0, ACT_QMAX), m.dequantized_weight())
    return Variant(net=lambda: m(x), kernel=lambda: m.fbgemm(ready),
                   reference=fake_quant(reference, m.out_scale, m.out_zero_point, 0, 255))


def onednn(shape: Shape) -> Variant:
    """onednn::qconv_pointwise / qlinear_pointwise, the ops inductor's x86 int8 lowering emits: u8 in, fp32 out."""
    x, m = shape.x, int8_module(shape, "onednn")
    memory_format = torch.channels_last if shape.kind == "conv" else torch.contiguous_format
    ready = int8.quantize_input(x, m.scale, m.zero_point).int_repr().contiguous(memory_format=memory_format)
    return Variant(net=lambda: m(x), kernel=lambda: m.onednn(ready),
                   reference=shape.fp32(fake_quant(x, m.scale, m.zero_point, 0, ACT_QMAX), m.dequantized_weight()))


def dynamic(shape: Shape) -> Variant:
    """quantized::linear_dynamic (torch's quantize_dynamic): the input's range is found and quantized in the op."""
    x, (w8, ws) = shape.x, weight_qparams(shape.weight)
    packed = torch.ops.quantized.linear_prepack(int8.per_channel_weight(w8, ws), shape.bias)
    s, zp = torch._choose_qparams_per_tensor(x, True)  # the op's own choice, reduce_range = 7 bits
    return Variant(net=lambda: torch.ops.quantized.linear_dynamic(x, packed, True), kernel=None,
                   reference=shape.fp32(fake_quant(x, s, zp, 0, ACT_QMAX), dequantized_weight(shape, w8, ws)))


def im2col_s8(q: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) s8 → (B·Ho·Wo, C·9) in the weight's (C, kh, kw) order; F.unfold has no int8 kernel."""
    p = F.pad(q, (padding[1], padding[1], padding[0], padding[0]))  # 0 is the quantized zero (symmetric)
    cols = p.unfold(2, 3, stride[0]).unfold(3, 3, stride[1])  # (B, C, Ho, Wo, 3, 3)
    return cols.permute(0, 2, 3, 1, 4, 5).reshape(-1, q.shape[1] * 9)


def int_mm(shape: Shape) -> Variant:
    """torch._int_mm (s8 × s8 → s32) with symmetric per-tensor activations; scales and bias applied in fp32."""
    x, (w8, ws) = shape.x, weight_qparams(shape.weight)
    s = max(float(x.abs().max()), 1e-8) / 127
    wt, scale = w8.flatten(1).t(), s * ws  # (K, N), (N,)

    def epilogue(acc: torch.Tensor) -> torch.Tensor:  # (M, N) s32 → fp32
        y = acc * scale
        return y if shape.bias is None else y.add_(shape.bias)

    if shape.kind == "conv":
        B, Ho, Wo = x.shape[0], *shape.fp32(x).shape[-2:]

        def net():
            q = plain_view(torch.quantize_per_tensor(x, s, 0, torch.qint8), torch.int8)
            y = epilogue(torch._int_mm(im2col_s8(q, shape.stride, shape.padding), wt))  # (B·Ho·Wo, O)
            return y.view(B, Ho, Wo, -1).permute(0, 3, 1, 2)  # (B, O, Ho, Wo), channels_last in memory
        ready = im2col_s8(torch.quantize_per_tensor(x, s, 0, torch.qint8).int_repr(), shape.stride, shape.padding)
    else:
        def net():
            return epilogue(torch._int_mm(plain_view(torch.quantize_per_tensor(x, s, 0, torch.qint8), torch.int8), wt))
        ready = torch.quantize_per_tensor(x, s, 0, torch.qint8).int_repr()
    return Variant(net=net, kernel=lambda: torch._int_mm(ready, wt),
                   reference=shape.fp32(fake_quant(x, s, 0, -127, 127), dequantized_weight(shape, w8, ws)))


BUILD = {"fbgemm": fbgemm, "onednn": onednn, "dynamic": dynamic, "int_mm": int_mm}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-12))


def loop(fn, reps: int) -> float:
    """Seconds per call over `reps` calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def reps_for(fn) -> int:
    """Calls per timed loop: enough for MIN_SECONDS, after a warm-up call (primitive creation, caches)."""
    fn()
    return max(1, math.ceil(MIN_SECONDS / max(loop(fn, 1), 1e-7)))


def measure(shapes: list[Shape], variants: dict, unet_call, runs: int) -> tuple[dict, float]:
    """Median seconds per call of every (shape, variant, net|kernel) and of the U-Net, in interleaved rounds."""
    jobs = {("unet",): unet_call}
    for i, shape in enumerate(shapes):
        jobs[(i, "fp32")] = lambda shape=shape: shape.fp32(shape.x)
        for path, v in variants[i].items():
            jobs[(i, path, "net")] = v.net
            if v.kernel is not None:
                jobs[(i, path, "kernel")] = v.kernel
    reps = {key: reps_for(fn) for key, fn in jobs.items()}
    times = {key: [] for key in jobs}
    for _ in range(runs):
        for key, fn in jobs.items():
            times[key].append(loop(fn, reps[key]))
    med = {key: statistics.median(ts) for key, ts in times.items()}
    return med, med.pop(("unet",))


def amdahl(share: float, speedup: float) -> float:
    return 1 / ((1 - share) + share / speedup)


def layer_seconds(row: dict, path: str, what: str) -> float:
    """One layer of this shape on `path` ("net" or "kernel"): fp32 where the path does not cover the shape, the net
    time where it has no separate kernel (dynamic); best_int8 is the fastest int8 path, best_mixed also fp32."""
    times = {name: p[f"{what}_s"] or p["net_s"] for name, p in row["paths"].items()}
    if path == "best_int8":
        return min(times.values())
    if path == "best_mixed":
        return min(row["fp32_s"], *times.values())
    return times.get(path, row["fp32_s"])


def totals(rows: list[dict]) -> dict:
    """Seconds per U-Net pass in each group's layers (each shape × its layer count) and the speed-ups over fp32."""
    out = {}
    for group in ("conv", "linear", "all"):
        mine = [r for r in rows if group in ("all", r["kind"])]
        if not mine:
            continue
        fp32 = sum(r["count"] * r["fp32_s"] for r in mine)
        out[group] = entry = {"fp32_s": fp32, "gflop": sum(r["count"] * r["gflop"] for r in mine)}
        for path in (*BUILD, "best_int8", "best_mixed"):
            entry[path] = {}
            for what in ("net", "kernel"):
                seconds = sum(r["count"] * layer_seconds(r, path, what) for r in mine)
                entry[path].update({f"{what}_s": seconds, f"speedup_{what}": fp32 / seconds})
    return out


def bench_batch(pipe: Pipeline, n_images: int, args, baseline: dict | None) -> dict:
    """Shapes, timings, accuracy and the Amdahl projection at U-Net batch 2·n_images."""
    seen, a, kw = capture(pipe, n_images, args.steps, args.at_call)
    shapes = group_shapes(seen)
    if args.tiny:  # the largest conv and linear shape: checks the bench, measures nothing
        shapes = [max((s for s in shapes if s.kind == k), key=lambda s: s.flops) for k in ("conv", "linear")
                  if any(s.kind == k for s in shapes)]
    variants = [{path: BUILD[path](s) for path in PATHS[s.kind]} for s in shapes]
    unet = pipe.unet
    with torch.inference_mode(), text_kv_cache(unet):
        unet(*a, **kw)  # the text's K/V into the cache, as after sampling's first step
        with FlopCounterMode(display=False) as counter:
            unet(*a, **kw)
        med, unet_s = measure(shapes, variants, lambda: unet(*a, **kw), args.runs)
    rows = []
    for i, s in enumerate(shapes):
        y = s.fp32(s.x)
        row = {"kind": s.kind, "shape": s.label, "layers": s.names, "count": len(s.names), "gflop": s.flops / 1e9,
               "fp32_s": med[(i, "fp32")], "paths": {}}
        for path, v in variants[i].items():
            with torch.inference_mode():
                out = v.net()
            net_s, kernel_s = med[(i, path, "net")], med.get((i, path, "kernel"))
            row["paths"][path] = {
                "net_s": net_s, "kernel_s": kernel_s, "speedup_net": row["fp32_s"] / net_s,
                "speedup_kernel": None if kernel_s is None else row["fp32_s"] / kernel_s,
                "rel_err_vs_fp32": rel_err(out, y), "rel_err_vs_reference": rel_err(out, v.reference),
                "reference_rel_err_vs_fp32": rel_err(v.reference, y)}
        rows.append(row)
    tot = totals(rows)
    unet_gflop = counter.get_total_flops() / 1e9
    share = {"flops": tot["all"]["gflop"] / unet_gflop, "time": min(tot["all"]["fp32_s"] / unet_s, 1.0)}
    projection = {}
    for path in (*BUILD, "best_int8", "best_mixed"):
        s_net = tot["all"][path]["speedup_net"]
        projection[path] = {f"unet_speedup_by_{k}_share": amdahl(f, s_net) for k, f in share.items()}
        if baseline is not None:
            projection[path]["implied_vs_diffusers"] = {
                k: baseline["ratio"] * u for k, u in ((k, projection[path][f"unet_speedup_by_{k}_share"])
                                                      for k in share)}
    best = tot["all"]["best_mixed"]
    return {"unet_batch": 2 * n_images, "unet_s": unet_s, "unet_gflop_per_step": unet_gflop,
            "unet_gflops_per_s": unet_gflop / unet_s, "quantizable_share": share, "shapes": rows, "totals": tot,
            "projection": projection, "baseline_vs_diffusers": baseline,
            "stop_rule": {"kernel_speedup": best["speedup_kernel"], "net_speedup": best["speedup_net"],
                          "kernel_bar": STOP_KERNEL, "net_bar": STOP_NET,
                          "met": best["speedup_kernel"] < STOP_KERNEL or best["speedup_net"] < STOP_NET}}


def read_baseline(path: str, n_images: int) -> dict | None:
    """carrara's fp32 speed-up over diffusers at this batch from a bench/sample.py JSON (mean of its fp32 rows)."""
    try:
        data = json.loads(Path(path).read_text())
        result = data["results"][f"batch_{n_images}"]["speedup_vs_diffusers"]
        rows = {k: v for k, v in result.items() if k == "carrara-fp32" or data["precision"] == "fp32"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"source": path, "ratio": statistics.mean(rows.values()), "rows": rows} if rows else None


def print_batch(r: dict) -> None:
    print(f"U-Net batch {r['unet_batch']}: forward {r['unet_s'] * 1e3:.1f} ms, {r['unet_gflops_per_s']:.0f} GFLOP/s; "
          f"quantizable layers {r['quantizable_share']['flops']:.0%} of FLOPs, {r['quantizable_share']['time']:.0%} "
          "of time")
    for row in r["shapes"]:
        print(f"  {row['shape']:38} ×{row['count']:2} fp32 {row['fp32_s'] * 1e3:7.3f} ms | " + " ".join(
            f"{p} {v['speedup_net']:.2f}/{v['speedup_kernel'] or float('nan'):.2f}× e{v['rel_err_vs_fp32']:.3f}"
            for p, v in row["paths"].items()))
    for group, entry in r["totals"].items():
        print(f"  {group:6} fp32 {entry['fp32_s'] * 1e3:7.2f} ms | " + " ".join(
            f"{p} {entry[p]['speedup_net']:.2f}/{entry[p]['speedup_kernel']:.2f}×" for p in (*BUILD, "best_mixed")))
    for path, proj in r["projection"].items():
        implied = proj.get("implied_vs_diffusers")
        print(f"  U-Net with {path}: {proj['unet_speedup_by_flops_share']:.2f}× (FLOP share), "
              f"{proj['unet_speedup_by_time_share']:.2f}× (time share)"
              + (f"; vs diffusers {implied['flops']:.2f}× / {implied['time']:.2f}×" if implied else ""))
    stop = r["stop_rule"]
    print(f"  stop rule: kernels {stop['kernel_speedup']:.2f}× (bar {STOP_KERNEL}), net {stop['net_speedup']:.2f}× "
          f"(bar {STOP_NET}): {'met' if stop['met'] else 'not met'}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--images", default="1,16", help="images per batch; the U-Net runs twice as many (guidance)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the run the activations come from")
    p.add_argument("--at-call", type=int, default=3, help="the U-Net call whose activations are kept")
    p.add_argument("--baseline", default="bench/results/sample-avx2.json")
    p.add_argument("--tiny", action="store_true", help="largest conv and linear shape, 1 image, 1 round")
    p.add_argument("--out", default="bench/results/int8-gemm-avx2.json")
    args = p.parse_args()
    if args.tiny:
        args.images, args.runs, args.steps, args.at_call = "1", 1, 2, 2
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"  # FBGEMM where there is no AVX-512 VNNI, oneDNN where there is
    pipe = Pipeline.load(args.model, precision="fp32")
    results = {}
    for n in (int(b) for b in args.images.split(",")):
        results[f"batch_{2 * n}"] = r = bench_batch(pipe, n, args, read_baseline(args.baseline, n))
        print_batch(r)
    write_json_atomic(args.out, {
        "what": "int8 against fp32 on the U-Net's quantizable conv 3×3 and linear shapes (real activations of a "
                "sampling run); net = quantize + int8 op + dequantize, kernel = the int8 op alone; medians of "
                "interleaved rounds; U-Net ratio by Amdahl over the layers' FLOP and time shares",
        "model": args.model, "model_hash": pipe.model_hash, "cpu": cpu_kind(), "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine, "activation_qmax": ACT_QMAX, "runs": args.runs,
        "threads": torch.get_num_threads(), "steps": args.steps, "at_call": args.at_call, "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d"), "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
