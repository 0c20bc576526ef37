"""What the dataset builders (`shapes`, `emoji`) share: the largest image side, and the output-folder rule.

A build never silently replaces a dataset: it writes into a missing or empty folder, or into a non-empty one
only when asked to overwrite (`carrara data build ... --overwrite`); then the images the old metadata.jsonl
named and the new build does not rewrite are removed with it, so no orphan is left behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from carrara.errors import CarraraError
from carrara.fileio import ensure_dir

MAX_SIDE = 1024  # the builders render in float64 (H, W, 3) arrays: 1024² is 24 MiB, 100000² would be 224 GiB
METADATA = "metadata.jsonl"


def check_side(size: int, smallest: int, what: str) -> None:
    """Refuse an image side outside [smallest, MAX_SIDE] before anything is allocated or written."""
    if size < smallest:
        raise CarraraError(f"{what} need an image side of at least {smallest} pixels, got {size}")
    if size > MAX_SIDE:
        raise CarraraError(f"{what} images are at most {MAX_SIDE} pixels a side, got {size}")


def previous_files(out: Path) -> list[Path]:
    """The files an earlier build's metadata.jsonl names inside `out` (regular files only)."""
    root, names = out.resolve(), []
    try:
        lines = (out / METADATA).read_bytes().split(b"\n")
    except OSError:
        return []
    for line in lines:
        try:
            name = json.loads(line)["file_name"]
            path = out / name
            if isinstance(name, str) and path.resolve().is_relative_to(root) and path.is_file():
                names.append(path)
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return names


def claim_folder(out, *, overwrite: bool) -> tuple[Path, list[Path]]:
    """Create `out`, or refuse a non-empty one unless `overwrite`; returns it and the old dataset's files."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CarraraError(f"{out} is not empty; pass --overwrite to replace the dataset in it, or pick another --out")
    out = ensure_dir(out)
    old = previous_files(out)
    (out / METADATA).unlink(missing_ok=True)  # the metadata exists only once a build has finished
    return out, old


def remove_stale(old: list[Path], written: set[Path]) -> int:
    """Delete the old dataset's files that the new build did not rewrite; returns how many."""
    stale = [p for p in old if p not in written]
    for path in stale:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return len(stale)
