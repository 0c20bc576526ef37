"""What the machine can do fast: decides bf16 for training (autocast) and for sampling (bf16 weights)."""
from __future__ import annotations

import os
from pathlib import Path

from carrara.errors import CarraraError


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX-512 BF16 or AMX), where bf16 pays off.

    CARRARA_BF16=0 forces the fp32 path on any CPU (with ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 a
    bf16 machine then runs what an AVX2 machine runs: `make test-avx2`); CARRARA_BF16=1 forces bf16.
    """
    forced = os.environ.get("CARRARA_BF16", "")
    if forced:
        if forced not in ("0", "1"):
            raise CarraraError(f"CARRARA_BF16={forced!r}: set it to 0 (fp32) or 1 (bf16), or leave it unset")
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
