"""What the machine can do fast: decides bf16 for training (autocast) and for sampling (bf16 weights), and keeps
freed memory in the process (glibc's malloc)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys
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
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (read once per process; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "").split())


@functools.cache
def cpu_isa() -> str:
    """The CPU's vector instruction set as compiled code depends on it: "avx512" (F, BW, VL and DQ), "avx2" (with
    FMA) or "none", plus "-amx" with AMX tiles. From cpu_flags (no compiler run, unlike inductor's own probe): what a
    compiled U-Net's package is named for (models/compiled.py)."""
    flags = cpu_flags()
    isa = ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else
           "avx2" if {"avx2", "fma"} <= flags else "none")
    return isa + ("-amx" if "amx_tile" in flags else "")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_ABOVE = 2**31 - 1  # bytes of free heap top kept before glibc returns any to the OS (mallopt takes an int)


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the OS; True if it applied.

    glibc serves every block above its mmap threshold (32 MB at most) with a fresh mmap and unmaps it on free, so a
    tensor of that size page-faults and is zeroed by the kernel again on every use: a batch-128 CLIP training step at
    64 px spent a third of its time in the kernel, and an elementwise loop over a 64 MB tensor took 4× its compute
    (docs/decisions.md, 2026-11-30). PyTorch's CPU tuning guide preloads jemalloc or tcmalloc for this; glibc's own
    mallopt does it with no dependency: no mmap'd blocks, and the heap's free top is trimmed only above 2 GB. The
    process's memory then stays at its high-water mark, which is what a training or sampling process wants.
    CARRARA_MALLOC=0 leaves malloc as it is. Elsewhere than glibc (macOS, musl) nothing changes.
    """
    if os.environ.get("CARRARA_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
