"""Tar shards in the WebDataset layout: `carrara data shard` writes them, training reads them.

A shard is a plain tar file; the files of one sample are consecutive and share a key, the name up to the
first dot (https://github.com/webdataset/webdataset#the-webdataset-format): `000000042.png` (the image, RGB
PNG), `000000042.txt` (the caption, UTF-8) and `000000042.json` (the metadata.jsonl fields besides the
caption, and the source `file_name`). Any WebDataset reader can stream them; carrara reads them with the
standard library's `tarfile`, so a shard set is one `--data 'shards/{000000..000099}.tar'`.

Why shards: a million small files are slow to copy to a GPU node and slow to list; a hundred tar files are
read front to back. Reading is one sequential pass, shard after shard, that decodes, checks and resizes
every sample exactly as a folder's are checked (data/folder.py), counting what is skipped by reason, plus
"unreadable shard" for a shard that is missing, is not a tar, or breaks off (its samples before the break
are kept). The pass fills the training stage's in-memory cache; see docs/scaling.md for why the
stages cache rather than stream through a shuffle buffer.
"""
from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from carrara.data import folder
from carrara.data.folder import Record, decode_image, fit_to_size, load_folder, to_rgb, to_tensor, warn_report
from carrara.errors import CarraraError
from carrara.fileio import atomic_path, ensure_dir
from carrara.images import to_model_range

UNREADABLE_SHARD = "unreadable shard"
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: 'a/{000..002}.tar' → a/000.tar a/001.tar a/002.tar; '{x,y}' lists too.

    Numbered ranges keep the zero padding of their first bound, as webdataset's (braceexpand's) do.
    """
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def shard_paths(spec: str) -> list[Path]:
    """The shard files a --data pattern names: braces expanded, then globs ('*', '?') matched, in order."""
    paths = []
    for name in expand_braces(str(spec)):
        matches = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
        paths.extend(Path(m) for m in matches)
    if not paths:
        raise CarraraError(f"--data {spec}: no shard matches that pattern")
    return paths


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one tar, grouping consecutive files by key (WebDataset rule).

    Raises tarfile.TarError or OSError when the shard cannot be read, after yielding the samples before the
    damage. `tarfile` itself reads a tar cut short without complaint (it stops at the end of the data), so
    each file's length and the end-of-archive marker (two zero blocks, POSIX.1-1988) are checked here.
    """
    key, sample = None, {}
    with tarfile.open(path, "r:") as tar:  # "r:" = uncompressed; a gzipped or foreign file raises ReadError
        for member in tar:
            if not member.isfile() or Path(member.name).name.startswith("."):
                continue
            k, _, ext = Path(member.name).name.partition(".")
            if k != key and key is not None:
                yield key, sample
                sample = {}
            key = k
            sample[ext.lower()] = data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"{member.name} is cut short")
        end = tar.offset
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise tarfile.ReadError("no end-of-archive marker: the shard is cut short")
    if key is not None:
        yield key, sample


class ShardDataset(torch.utils.data.Dataset):
    """The usable samples of a shard set, decoded and resized once while reading: uint8 pixels in memory."""

    def __init__(self, spec: str, records: list[Record], pixels: list[torch.Tensor], skipped: Counter,
                 converted: Counter, size: int | None):
        self.spec, self.records, self.pixels, self.skipped, self.converted, self.size = (
            spec, records, pixels, skipped, converted, size)

    def __len__(self) -> int:
        return len(self.records)

    def report(self) -> dict:
        return {"source": self.spec, "examples": len(self.records), "skipped": dict(self.skipped),
                "converted": dict(self.converted)}

    def image_uint8(self, i: int) -> torch.Tensor:
        return self.pixels[i]

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        return {"image": to_model_range(self.pixels[i]), "text": record.text, **record.extra}


def _sample_reason(files: dict[str, bytes]) -> tuple[str, str, bytes, dict]:
    """(skip reason or '', caption, image bytes, attributes) of one sample's files."""
    image_ext = next((e for e in files if f".{e}" in folder.IMAGE_SUFFIXES), None)
    if image_ext is None:
        return folder.MISSING_FILE, "", b"", {}
    if "txt" not in files:
        return folder.MISSING_CAPTION, "", b"", {}
    reason, text = folder.decode_caption(files["txt"])
    if reason:
        return reason, "", b"", {}
    try:
        extra = json.loads(files["json"]) if "json" in files else {}
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        return folder.BAD_LINE, "", b"", {}
    if not files[image_ext]:
        return folder.EMPTY_FILE, "", b"", {}
    return "", text, files[image_ext], extra


def load_shards(spec: str, size: int | None = None, *, progress: bool = False) -> ShardDataset:
    """Read every shard of `spec` once, keeping the usable samples (resized to size×size when size is given)."""
    if size is not None and size < 1:
        raise CarraraError(f"size must be a positive number of pixels, got {size}")
    records, pixels, skipped, converted = [], [], Counter(), Counter()
    for path in tqdm(shard_paths(spec), desc="reading shards", disable=not progress, leave=False):
        try:
            for key, files in iter_samples(path):
                reason, text, data, extra = _sample_reason(files)
                mode = ""
                if not reason:
                    reason, rgb, mode = decode_image(data, size)
                if reason:
                    skipped[reason] += 1
                    continue
                if mode != "RGB":
                    converted[mode] += 1
                extra.pop("file_name", None)
                records.append(Record(f"{path.name}#{key}", text, extra))
                pixels.append(to_tensor(fit_to_size(rgb, size)))
        except (tarfile.TarError, OSError, EOFError):
            skipped[UNREADABLE_SHARD] += 1
    dataset = ShardDataset(str(spec), records, pixels, skipped, converted, size)
    warn_report(spec, dataset.report())
    if not records:
        raise CarraraError(f"--data {spec}: the shards hold no usable samples (an image and a .txt caption per key)")
    return dataset


def write_shards(source: str | Path, out: str | Path, *, per_shard: int = 1000, progress: bool = True) -> dict:
    """Pack a captioned image folder into `out/000000.tar`, `000001.tar`, … (each written to a temporary name, then
    renamed); returns {"shards", "samples", "pattern", "skipped"}. The tars are byte-identical for the same folder."""
    if per_shard < 1:
        raise CarraraError(f"--size must be a positive number of samples per shard, got {per_shard}")
    dataset = load_folder(source)
    out = ensure_dir(out)
    if any(out.glob("*.tar")):
        raise CarraraError(f"{out} already holds .tar shards; write to an empty folder")
    n = len(dataset)
    n_shards = (n + per_shard - 1) // per_shard
    bar = tqdm(total=n, desc="writing shards", disable=not progress, leave=False)
    for s in range(n_shards):
        with atomic_path(out / f"{s:06d}.tar") as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                record = dataset.records[i]
                with open(dataset.root / record.file_name, "rb") as f, Image.open(f) as im:
                    png = io.BytesIO()
                    to_rgb(im).save(png, format="PNG")
                attributes = {**record.extra, "file_name": record.file_name}
                for ext, data in (("png", png.getvalue()), ("txt", record.text.encode("utf-8")),
                                  ("json", json.dumps(attributes, ensure_ascii=False).encode("utf-8"))):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")  # mtime, uid, gid default to 0: reproducible bytes
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                bar.update(1)
    bar.close()
    pattern = str(out / (f"{{000000..{n_shards - 1:06d}}}.tar" if n_shards > 1 else "000000.tar"))
    return {"shards": n_shards, "samples": n, "pattern": pattern, "skipped": dict(dataset.skipped)}
