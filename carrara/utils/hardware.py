"""What the machine can do fast: decides bf16 for training (autocast) and for sampling (bf16 weights)."""
from __future__ import annotations

from pathlib import Path


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX-512 BF16 or AMX), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
