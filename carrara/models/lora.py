"""LoRA adapters of the U-Net's attention projections: the file, and merging one into the weights for sampling.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3) keeps a trained weight W₀ frozen
and learns a low-rank update: h = W₀x + (α/r)·B A x with A (r, in), B (out, r), B = 0 at the start. Training wraps
the projections with peft's LoRA layers (train/diffusion.py); this module needs no peft.

The file is the layout diffusers' `load_lora_weights` reads: a safetensors file with keys
`unet.<module>.lora_A.weight` (r, in) and `unet.<module>.lora_B.weight` (out, r), and the LoraConfig arguments
(`unet.r`, `unet.lora_alpha`, `unet.target_modules`) as JSON under the header key `lora_adapter_metadata`.

For sampling an adapter is merged: W = W₀ + weight · (α/r) · B A, so a step costs what it cost without it. `merge_lora`
returns the original weights of the modules it changed, and `unmerge_lora` puts them back bit for bit.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from carrara.errors import CarraraError
from carrara.fileio import atomic_path, file_sha256

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' training scripts adapt the same four projections
PREFIX = "unet."
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class LoraAdapter:
    """One adapter file: per module (its name in the U-Net) the pair (A (r, in), B (out, r)) and the scale α/r."""

    path: Path
    sha256: str  # first 12 hex digits of the file's SHA-256: names the adapter in PNG metadata
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.pairs.values())


def save_lora(path: str | Path, state: dict[str, torch.Tensor], *, rank: int, alpha: float) -> None:
    """Write peft's adapter state dict (`<module>.lora_A.weight` …) as a diffusers LoRA file, atomically."""
    tensors = {PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config = {f"{PREFIX}r": rank, f"{PREFIX}lora_alpha": alpha, f"{PREFIX}target_modules": list(TARGETS)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)})


def file_hash(path: Path) -> str:
    return file_sha256(path)[:12]


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the LoraConfig arguments (prefix removed) of a safetensors file, or one clear error."""
    if not path.is_file():
        raise CarraraError(f"--lora {path}: no such file" if not path.exists() else f"--lora {path}: not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise CarraraError(f"--lora {path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        raw = json.loads(header.get(METADATA_KEY) or "{}")
    except ValueError:
        raise CarraraError(f"--lora {path}: its {METADATA_KEY} header is not JSON") from None
    if not isinstance(raw, dict):
        raise CarraraError(f"--lora {path}: its {METADATA_KEY} header is not a JSON object")
    config = {k.removeprefix(PREFIX): v for k, v in raw.items() if k.startswith(PREFIX)}
    return tensors, config


def _alpha(path: Path, config: dict) -> float | None:
    """α from the file's LoraConfig (None: α = r, what diffusers assumes without one); refuses what it cannot apply."""
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag):
            raise CarraraError(f"--lora {path}: {flag} adapters are not supported (plain LoRA only)")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise CarraraError(f"--lora {path}: per-module alpha_pattern/rank_pattern is not supported")
    alpha = config.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise CarraraError(f"--lora {path}: lora_alpha must be a positive number, got {json.dumps(alpha)[:40]}")
    return None if alpha is None else float(alpha)


def read_lora(path: str | Path) -> LoraAdapter:
    """Read and check an adapter file (diffusers/peft layout, U-Net only); any problem is one CarraraError."""
    path = Path(path)
    tensors, config = _read_tensors(path)
    alpha = _alpha(path, config)
    if not tensors:
        raise CarraraError(f"--lora {path}: the file holds no tensors")
    if any(k.startswith("text_encoder") for k in tensors):
        raise CarraraError(f"--lora {path}: it adapts a text encoder too; carrara applies U-Net adapters only")
    odd = [k for k in tensors if not k.endswith(_SUFFIXES)]
    if odd:
        raise CarraraError(f"--lora {path}: not a LoRA in the diffusers/peft layout (keys like "
                           f"unet.<module>.lora_A.weight), found {odd[0]!r}")
    for key in tensors:
        if key.endswith(_SUFFIXES[1]) and key.removesuffix(_SUFFIXES[1]) + _SUFFIXES[0] not in tensors:
            raise CarraraError(f"--lora {path}: {key} has no lora_A partner")
    pairs, scales = {}, {}
    for key in sorted(k for k in tensors if k.endswith(_SUFFIXES[0])):
        module = key.removesuffix(_SUFFIXES[0]).removeprefix(PREFIX)
        a, b = tensors[key], tensors.get(key.removesuffix(_SUFFIXES[0]) + _SUFFIXES[1])
        if b is None:
            raise CarraraError(f"--lora {path}: {key} has no lora_B partner")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise CarraraError(f"--lora {path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                               "are not (r, in) and (out, r)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CarraraError(f"--lora {path}: {module} holds NaN or inf")
        pairs[module] = (a.float(), b.float())
        scales[module] = (alpha if alpha is not None else a.shape[0]) / a.shape[0]
    return LoraAdapter(path, file_hash(path), pairs, scales)


def _targets(unet: torch.nn.Module, adapter: LoraAdapter) -> dict[str, torch.nn.Linear]:
    """The U-Net's Linear layer for each adapted module, all checked for shape before anything changes."""
    modules = dict(unet.named_modules())
    out = {}
    for name, (a, b) in adapter.pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear):
            raise CarraraError(f"--lora {adapter.path}: this U-Net has no projection {name!r}: "
                               "the adapter was trained for another model")
        if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            raise CarraraError(f"--lora {adapter.path}: {name} is {tuple(layer.weight.shape)} here but "
                               f"{(b.shape[0], a.shape[1])} in the adapter: it was trained for another model")
        out[name] = layer
    return out


@torch.no_grad()
def merge_lora(unet: torch.nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """W ← W + weight·(α/r)·B A for every adapted projection (in fp32, stored in W's dtype); returns the originals."""
    if not math.isfinite(weight):
        raise CarraraError(f"--lora {adapter.path}: the weight must be a finite number, got {weight}")
    layers = _targets(unet, adapter)
    originals = {}
    for name, layer in layers.items():
        a, b = adapter.pairs[name]
        delta = (b @ a) * (weight * adapter.scales[name])  # (out, r) @ (r, in) -> (out, in)
        originals[name] = layer.weight.detach().clone()
        layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    return originals


@torch.no_grad()
def unmerge_lora(unet: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back the weights `merge_lora` replaced (exactly: no subtraction, no rounding)."""
    modules = dict(unet.named_modules())
    for name, weight in originals.items():
        modules[name].weight.copy_(weight)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """"FILE" → (FILE, 1.0); "FILE:0.7" → (FILE, 0.7). A colon inside a path that exists stays part of the path."""
    path, sep, tail = text.rpartition(":")
    if not sep or Path(text).exists() or "/" in tail or "\\" in tail or not path:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        raise CarraraError(f"--lora {text}: the weight {tail!r} is not a number (use FILE or FILE:0.8)") from None
    if not math.isfinite(weight):
        raise CarraraError(f"--lora {text}: the weight must be a finite number, got {tail!r}")
    return path, weight


def apply_loras(unet: torch.nn.Module, specs: list[str]) -> list[dict]:
    """Merge each "FILE[:weight]" into `unet` in order; returns what PNG metadata records of each (file, hash, weight).

    Every file is read and checked before the first merge, so a bad one leaves the U-Net untouched."""
    parsed = [parse_lora_arg(s) for s in specs]
    adapters = [(read_lora(path), weight) for path, weight in parsed]
    for adapter, _ in adapters:
        _targets(unet, adapter)
    for adapter, weight in adapters:
        merge_lora(unet, adapter, weight)
    return [{"file": str(adapter.path.resolve()), "sha256": adapter.sha256, "weight": weight} for adapter, weight in adapters]
