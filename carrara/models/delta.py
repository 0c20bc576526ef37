"""A network stored as a low-bit difference from another: how a distilled student ships beside its teacher.

A few hundred distillation steps move the teacher's weights by ~1 % (median ‖Δ‖/‖W‖ of the default model's student,
docs/distill.md), and Δ is not low-rank (rank 64 holds 77 % of its energy), so a LoRA extraction would be lossy.
Quantizing Δ itself is not: fine-tuning deltas survive a few bits (Liu et al. 2024, "BitDelta: Your Fine-Tune May
Only Be Worth One Bit" keeps one bit and a scale per matrix). Here each output row of Δ (each output channel of a
convolution, each row of a linear layer; a 1-D tensor is one row) gets its own scale and `bits`-bit symmetric codes:

    s_row = max |Δ_row| / q,   code = round(Δ / s_row) ∈ [−q, q],   q = 2^(bits−1) − 1,   W = W_teacher + s · code

so a weight's error is at most s_row / 2. At 4 bits the default model's student (25.5 M parameters) takes 12.9 MB
against 51 MB in fp16, and its 64-px images differ from the unquantized student's by 0.14/255 on average (max
5.6/255; 8 bits: 0.008/255, less than casting the student to fp16: `python bench/delta.py`, docs/distill.md). Tensors the teacher lacks (the student's guidance
embedding) are stored whole, in fp16. Codes are packed two per byte (offset by 8, low nibble first).

The file is a safetensors file with, per tensor NAME, `NAME.codes` (uint8, packed) and `NAME.scale` (fp32, one per
row), or `NAME.full` (fp16); its header records the bits, each tensor's shape, and the teacher's weights hash, which
`apply_delta` checks, so a delta is never added to weights it was not made from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from carrara.errors import CarraraError
from carrara.fileio import atomic_path

DELTA_NAME = "delta.safetensors"
BITS = 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


def quantize_rows(delta: torch.Tensor, bits: int = BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (rows, n) in [−q, q], scale fp32 (rows,)) of a tensor's difference; a zero row has scale 0."""
    if not 2 <= bits <= 8:
        raise CarraraError(f"a delta takes 2 to 8 bits per weight, got {bits}")
    q = 2 ** (bits - 1) - 1
    m = _rows(delta.float())
    scale = m.abs().amax(dim=1) / q
    codes = torch.round(m / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-q, q)
    return codes.to(torch.int8), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (codes.float() * scale[:, None]).reshape(shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [−7, 7] → uint8, two per byte (code + 8; the even-indexed code in the low nibble)."""
    flat = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), 8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: the first n codes, int8."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]
    return (out.to(torch.int16) - 8).to(torch.int8)


def make_delta(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], bits: int = BITS
               ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The stored tensors and shapes of student − teacher. Every teacher tensor must be in the student, same shape."""
    missing = sorted(set(teacher) - set(student))
    if missing:
        raise CarraraError(f"the student lacks the teacher's {missing[0]}: it was not distilled from this teacher")
    tensors, shapes = {}, {}
    for name, value in student.items():
        shapes[name] = list(value.shape)
        if name not in teacher:
            tensors[f"{name}.full"] = value.detach().to(torch.float16).contiguous()
            continue
        if teacher[name].shape != value.shape:
            raise CarraraError(f"{name} is {tuple(teacher[name].shape)} in the teacher but {tuple(value.shape)} in the "
                               "student: it was not distilled from this teacher")
        codes, scale = quantize_rows(value.float() - teacher[name].float(), bits)
        tensors[f"{name}.codes"] = pack_nibbles(codes) if bits <= 4 else codes.reshape(-1)
        tensors[f"{name}.scale"] = scale.contiguous()
    return tensors, shapes


def save_delta(path: str | Path, teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], *,
               teacher_hash: str, bits: int = BITS) -> None:
    """Write student − teacher (`make_delta`) to `path`, atomically."""
    tensors, shapes = make_delta(teacher, student, bits)
    header = {"bits": str(bits), "teacher_hash": teacher_hash, "shapes": json.dumps(shapes, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header with bits, teacher_hash and shapes parsed) of a delta file, or one CarraraError."""
    path = Path(path)
    if not path.is_file():
        raise CarraraError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        header["bits"], header["shapes"] = int(header["bits"]), json.loads(header["shapes"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise CarraraError(f"{path}: not a readable student delta ({why})") from None
    return tensors, header


def apply_delta(teacher: dict[str, torch.Tensor], path: str | Path, *, teacher_hash: str) -> dict[str, torch.Tensor]:
    """The student's float32 state dict: teacher + the stored difference (fp32 arithmetic), checked against the
    teacher's weights hash and every tensor's shape."""
    tensors, header = read_delta(path)
    if header.get("teacher_hash") != teacher_hash:
        raise CarraraError(f"{path} was made from a teacher with weights {header.get('teacher_hash')}, but this "
                           f"model's are {teacher_hash}: export the student again from this model")
    bits, state = header["bits"], {}
    try:
        for name, shape in header["shapes"].items():
            if f"{name}.full" in tensors:
                state[name] = tensors[f"{name}.full"].float().reshape(shape)
                continue
            base = teacher[name].float()
            if list(base.shape) != shape:
                raise CarraraError(f"{path}: {name} is {tuple(shape)} there but {tuple(base.shape)} in the teacher")
            rows = base.shape[0] if base.ndim >= 2 else 1
            codes = tensors[f"{name}.codes"]
            codes = unpack_nibbles(codes, base.numel()) if bits <= 4 else codes
            state[name] = base + dequantize_rows(codes.reshape(rows, -1), tensors[f"{name}.scale"], base.shape)
    except (KeyError, RuntimeError) as e:
        raise CarraraError(f"{path}: a truncated or mismatched student delta ({e})") from None
    return state
