"""int8 U-Net for CPUs without fast bf16 (issue 18, docs/performance.md "int8 on the AVX2 kind"): W8A8 for the 3×3
convolutions and the linear layers, everything else fp32.

Weights are s8 per output channel (symmetric), packed once at load; activations are u8 per tensor with a *static*
scale and zero point calibrated over whole sampling runs (every timestep, both guidance halves, a set of prompts)
and stored beside the weights in `unet/int8_calibration.json`, with the U-Net's hash. Activations have 7 bits
(0…127, reduce_range): without VNNI the u8·s8 inner loop (`vpmaddubsw`) sums pairs into s16, and 2·127·127 < 2^15.
Two kernels, chosen per call by the GEMM's row count M (measured, bench/int8_gemm.py): FBGEMM's
`quantized::conv2d` / `quantized::linear` where M is small (u8 output with a calibrated output scale, then
dequantized), oneDNN's `qconv_pointwise` / `qlinear_pointwise` with fp32 output (dequantization fused) above.
Linear GEMMs smaller than SMALL_LINEAR_MACS run in fp32, where int8 measured slower.

Kept fp32 (KEEP_FP32): conv_in / conv_out (4 channels, sensitive), the 1×1 shortcuts, the time embedding and every
time_emb_proj (M = batch), the text's keys and values (computed once per run, blocks.text_kv_cache) and the
feed-forward's second linear (its GEGLU input is off by 4–8 % at 7 bits per tensor).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from carrara.data.emoji import fully_qualified, readable_name
from carrara.errors import CarraraError
from carrara.fileio import write_json_atomic

ACT_QMAX = 127  # 7-bit activations: vpmaddubsw's u8·s8 pair sums stay below 2^15 (2·127·127), no VNNI here
KEEP_FP32 = ("conv_in", "conv_out", "time_embedding.", "class_embedding.", "time_emb_proj", "attn2.to_k", "attn2.to_v",
             "ff.net.2")
FBGEMM_MAX_ROWS = 128  # GEMM rows M up to which FBGEMM measured faster than oneDNN (U-Net batch 2's 8×8 and 4×4)
SMALL_LINEAR_MACS = 1 << 22  # below M·K·N = 4.2 M int8 measured slower than fp32 (batch 2: M = 128, K = N = 128)
CALIBRATION_FILE = "int8_calibration.json"
# the quality check's prompts (bench/sample.py's): fp32 and int8 images of these, same seeds, 20 DPM-Solver++ steps
QUALITY_PROMPTS = ("cat face", "a red sports car", "pizza", "a snowman in the snow", "red heart", "rocket",
                   "a happy kitty", "flag of France", "a slice of watermelon", "a yellow star", "a dog face", "a tree",
                   "a blue whale", "an emoji of a smiling face", "a cup of coffee", "a soccer ball")
FORMAT = 1


def check_cpu() -> None:
    """One clear error where torch has no x86 int8 kernels (FBGEMM and oneDNN need AVX2 or better)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "x86" not in torch.backends.quantized.supported_engines or capability not in ("AVX2", "AVX512"):
        raise CarraraError(f"--precision int8 needs an x86 CPU with AVX2 and torch's x86 int8 kernels (this one: "
                           f"{capability}, engines {', '.join(torch.backends.quantized.supported_engines)}); "
                           "use --precision fp32")


def quantizable(name: str, module: nn.Module) -> bool:
    """The layers that run in int8: 3×3 convolutions and linear layers, but those in KEEP_FP32."""
    if any(k in name for k in KEEP_FP32):
        return False
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (3, 3) and module.groups == 1 and module.dilation == (1, 1)
    return isinstance(module, nn.Linear)


def act_qparams(lo: float, hi: float, qmax: int = ACT_QMAX) -> tuple[float, int]:
    """Per-tensor scale and zero point mapping [min(lo, 0), max(hi, 0)] onto [0, qmax] (0 exactly representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / qmax
    return scale, int(min(max(round(-lo / scale), 0), qmax))


def weight_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric s8 per output channel: the integers (O, …) and the float32 scales (O,)."""
    scales = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127
    w8 = torch.round(w / scales.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8)
    return w8, scales


def fake_quant(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """x rounded to the grid scale·(q − zp), q in [qmin, qmax], in fp32: what the int8 kernels compute, simulated."""
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def plain_view(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The integers of a quantized tensor as a plain u8/s8 tensor, no copy (`int_repr()` copies: a second pass)."""
    return torch.empty(0, dtype=dtype).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def quantize_input(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """x as a quint8 tensor on the 7-bit grid: values beyond the calibrated range saturate at 127, not 255."""
    q = torch.quantize_per_tensor(x, scale, zp, torch.quint8)
    plain_view(q, torch.uint8).clamp_(max=ACT_QMAX)  # in place, on the u8 integers (a quarter of x's bytes)
    return q


def per_channel_weight(w8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FBGEMM's weight: a per-output-channel qint8 tensor."""
    return torch._make_per_channel_quantized_tensor(w8, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)


class Int8Layer(nn.Module):
    """What the int8 conv and linear share: s8 weights, the calibrated input and output grids, the kernel choice.

    `kernel` None picks by the GEMM's rows (and runs small linears in fp32); "fbgemm" or "onednn" forces one
    (bench/int8_gemm.py times each)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, calibration: dict, kernel: str | None = None):
        super().__init__()
        self.kernel = kernel
        self.w8, self.w_scales = weight_qparams(layer.weight.detach().float())
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.scale, self.zero_point = act_qparams(*calibration["input"])
        self.out_scale, self.out_zero_point = act_qparams(*calibration["output"], qmax=255)  # FBGEMM's u8 output
        self.w_zero_points = torch.zeros(len(self.w_scales), dtype=torch.long)
        self._onednn: dict[tuple, object] = {}  # oneDNN's weights, packed for each input shape seen

    def run_int8(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Quantize x onto the calibrated grid, then FBGEMM (u8 out, dequantized) or oneDNN (fp32 out)."""
        q = quantize_input(x, self.scale, self.zero_point)
        if self.kernel == "fbgemm" or (self.kernel is None and rows <= FBGEMM_MAX_ROWS):
            return self.fbgemm(q).dequantize()
        return self.onednn(plain_view(q, torch.uint8))

    def dequantized_weight(self) -> torch.Tensor:
        """The s8 weights times their scales, in fp32: the weights every kernel here multiplies by."""
        return self.w8.float() * self.w_scales.view(-1, *[1] * (self.w8.dim() - 1))

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, weight={tuple(self.w8.shape)}"


class Int8Conv2d(Int8Layer):
    """A 3×3 convolution on s8 weights and 7-bit u8 activations; fp32 in and out."""

    def __init__(self, conv: nn.Conv2d, calibration: dict, kernel: str | None = None):
        super().__init__(conv, calibration, kernel)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self._fbgemm = torch.ops.quantized.conv2d_prepack(per_channel_weight(self.w8, self.w_scales), self.bias,
                                                          self.stride, self.padding, [1, 1], 1)

    def fbgemm(self, q: torch.Tensor) -> torch.Tensor:
        """quantized::conv2d: quint8 (B, C, H, W) in, quint8 out on the calibrated output grid."""
        return torch.ops.quantized.conv2d.new(q, self._fbgemm, self.out_scale, self.out_zero_point)

    def onednn(self, u8: torch.Tensor) -> torch.Tensor:
        """onednn::qconv_pointwise (what inductor's x86 int8 lowering emits): u8 (B, C, H, W) in, fp32 out."""
        packed = self._onednn.get(tuple(u8.shape))
        if packed is None:
            packed = self._onednn[tuple(u8.shape)] = torch.ops.onednn.qconv_prepack(
                self.w8, self.w_scales, self.scale, self.zero_point, self.stride, self.padding, [1, 1], 1,
                list(u8.shape))
        return torch.ops.onednn.qconv_pointwise(
            u8, self.scale, self.zero_point, packed, self.w_scales, self.w_zero_points, self.bias, self.stride,
            self.padding, [1, 1], 1, 1.0, 0, torch.float32, "none", [], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, O, H', W')
        B, _, H, W = x.shape
        return self.run_int8(x, B * math.ceil(H / self.stride[0]) * math.ceil(W / self.stride[1]))  # rows M


class Int8Linear(Int8Layer):
    """A linear layer on s8 weights and 7-bit u8 activations; small GEMMs run the fp32 weights instead."""

    def __init__(self, linear: nn.Linear, calibration: dict, kernel: str | None = None):
        super().__init__(linear, calibration, kernel)
        self.weight = linear.weight.detach().float()  # (N, K) the fp32 weights, for GEMMs too small for int8
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._fbgemm = torch.ops.quantized.linear_prepack(per_channel_weight(self.w8, self.w_scales), self.bias)

    def runs_int8(self, rows: int) -> bool:
        return self.kernel is not None or rows * self.in_features * self.out_features >= SMALL_LINEAR_MACS

    def fbgemm(self, q: torch.Tensor) -> torch.Tensor:
        """quantized::linear: quint8 (M, K) in, quint8 (M, N) out on the calibrated output grid."""
        return torch.ops.quantized.linear(q, self._fbgemm, self.out_scale, self.out_zero_point)

    def onednn(self, u8: torch.Tensor) -> torch.Tensor:
        """onednn::qlinear_pointwise: u8 (M, K) in, fp32 (M, N) out."""
        packed = self._onednn.get(tuple(u8.shape))
        if packed is None:
            packed = self._onednn[tuple(u8.shape)] = torch.ops.onednn.qlinear_prepack(self.w8, list(u8.shape))
        return torch.ops.onednn.qlinear_pointwise(
            u8, self.scale, self.zero_point, packed, self.w_scales, self.w_zero_points, self.bias, 1.0, 0,
            torch.float32, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if not self.runs_int8(x2.shape[0]):
            return F.linear(x, self.weight, self.bias)
        return self.run_int8(x2, x2.shape[0]).view(*x.shape[:-1], self.out_features)


def quantizable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in unet.named_modules() if quantizable(name, m)}


def kept_in_fp32(unet: nn.Module) -> list[str]:
    """The convolutions and linear layers of a U-Net that stay fp32, in module order."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not quantizable(name, m)]


def collect_ranges(unet: nn.Module, run: Callable[[], object]) -> dict[str, dict]:
    """{layer: {"input": [lo, hi], "output": [lo, hi]}}: the extremes every quantizable layer sees during `run()`."""
    ranges: dict[str, dict] = {}

    def widen(entry: list | None, t: torch.Tensor) -> list[float]:
        lo, hi = torch.aminmax(t.detach().float())
        return [float(lo), float(hi)] if entry is None else [min(entry[0], float(lo)), max(entry[1], float(hi))]

    def hook(name):
        def record(module, inputs, output):
            r = ranges.setdefault(name, {"input": None, "output": None})
            r["input"], r["output"] = widen(r["input"], inputs[0]), widen(r["output"], output)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in quantizable_layers(unet).items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: ranges[name] for name in quantizable_layers(unet) if name in ranges}


def calibration_record(unet: nn.Module, ranges: dict, unet_hash: str, settings: dict) -> dict:
    """What `unet/int8_calibration.json` holds: the U-Net it was made for, how, and every layer's ranges."""
    missing = sorted(set(quantizable_layers(unet)) - set(ranges))
    if missing:
        raise CarraraError(f"the calibration run never called {len(missing)} layers ({missing[0]}, …): cannot "
                           "calibrate them")
    return {"format": FORMAT, "unet_hash": unet_hash, "activation_qmax": ACT_QMAX, "settings": settings,
            "kept_fp32": kept_in_fp32(unet), "layers": ranges}


def write_calibration(unet_dir: str | Path, record: dict) -> Path:
    """Write the calibration beside the U-Net's weights, atomically."""
    path = Path(unet_dir) / CALIBRATION_FILE
    write_json_atomic(path, record)
    return path


def read_calibration(unet_dir: str | Path, unet_hash: str, model: str) -> dict:
    """The calibration of these U-Net weights, or one clear line saying to run `carrara quantize`."""
    path = Path(unet_dir) / CALIBRATION_FILE
    hint = f"run `carrara quantize --model {model}` first"
    if not path.is_file():
        raise CarraraError(f"{model} has no int8 calibration ({path} is missing): {hint}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        layers, made_for = record["layers"], record["unet_hash"]
        ok = record["format"] == FORMAT and isinstance(layers, dict) and all(
            len(r["input"]) == 2 and len(r["output"]) == 2 and all(map(math.isfinite, r["input"] + r["output"]))
            and r["input"][0] < r["input"][1] and r["output"][0] < r["output"][1]  # a range, not a point or reversed
            for r in layers.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CarraraError(f"{path} is not a readable int8 calibration: {hint}")
    if made_for != unet_hash:
        raise CarraraError(f"{path} was calibrated for U-Net weights {made_for}, but these are {unet_hash}: {hint}")
    return record


def calibrated(unet_dir: str | Path, unet_hash: str) -> dict | None:
    """The calibration of these weights in `unet_dir` if this CPU has int8 kernels and it is there and readable, else
    None (precision "auto" takes int8 with it, where there is no native bf16)."""
    try:
        check_cpu()
        return read_calibration(unet_dir, unet_hash, str(unet_dir))
    except CarraraError:
        return None


def quantize_unet(unet: nn.Module, record: dict) -> nn.Module:
    """Replace, in place, every quantizable layer of an fp32 U-Net by its int8 module (weights packed now)."""
    check_cpu()
    torch.backends.quantized.engine = "x86"  # FBGEMM where there is no AVX-512 VNNI, oneDNN where there is
    layers = quantizable_layers(unet)
    missing = sorted(set(layers) - set(record["layers"]))
    if missing:
        raise CarraraError(f"the int8 calibration has no ranges for {missing[0]}: run `carrara quantize` again")
    with warnings.catch_warnings():  # torch's one-time notice that quantized tensors are deprecated (FBGEMM's API)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            cls = Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear
            setattr(parent, child, cls(layer, record["layers"][name]))
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)  # the notice fires once, here
    unet.int8 = True
    return unet


def is_int8(unet: nn.Module) -> bool:
    return getattr(unet, "int8", False)


def calibration_prompts(n: int) -> list[str]:
    """n emoji names spread evenly over the `emoji` package's list (what the default model draws), none of them a
    quality-check prompt: the default calibration set."""
    names = [readable_name(d["en"], e) for e, d in fully_qualified().items()]
    names = list(dict.fromkeys(x for x in names if x not in QUALITY_PROMPTS))
    return [names[i * len(names) // n] for i in range(min(n, len(names)))]


def calibrate(unet: nn.Module, sample: Callable[[list[str], int], object], prompts: list[str], unet_hash: str,
              settings: dict, batch: int = 16) -> dict:
    """A calibration record from whole sampling runs of `prompts`, `batch` at a time (image i seeded i):
    `sample(prompts, seed)` runs every timestep with both guidance halves through `unet`."""
    def run():
        for i in range(0, len(prompts), batch):
            sample(prompts[i:i + batch], i)

    return calibration_record(unet, collect_ranges(unet, run), unet_hash,
                              {**settings, "prompts": len(prompts), "batch": batch})


def pixel_diff_255(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |Δpixel| in 1/255 between two image batches in [−1, 1] (the quality check against fp32)."""
    return float((a.float() - b.float()).abs().mean() * 127.5)
