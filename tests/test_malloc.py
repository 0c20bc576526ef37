"""hardware.keep_freed_memory: a freed 64 MB tensor's memory is reused, not unmapped and page-faulted in again."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from carrara.hardware import keep_freed_memory
    applied = keep_freed_memory()
    x = torch.ones(16, 1024, 1024)  # 64 MB: above glibc's largest mmap threshold (32 MB)
    for _ in range(30):  # the heap settles (it grows by a few blocks' pages at first)
        y = x * 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        y = x * 2  # a new 64 MB block each time, the previous one freed at the assignment
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"applied": applied, "faults": faults, "sum": float(y.sum())}))
""")


def probe(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, default = probe(), probe(CARRARA_MALLOC="0")
    assert kept["applied"] and not default["applied"]
    assert kept["sum"] == default["sum"] == 2.0 * 16 * 1024 * 1024  # the same arithmetic
    pages = 64 * 2**20 // 4096  # 16,384 pages per 64 MB block
    assert default["faults"] >= 19 * pages  # each new block faulted in page by page (the cost that is removed)
    assert kept["faults"] <= 2 * pages  # freed blocks reused (at most two blocks still settling)
