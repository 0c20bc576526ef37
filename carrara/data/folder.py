"""Captioned image folders: images + `metadata.jsonl` (Hugging Face imagefolder), or sidecar `.txt` captions.

`metadata.jsonl` holds one JSON object per line with `file_name` (relative to the folder), `text` (the caption;
`caption` is accepted too) and any extra fields, which are passed through. Without a metadata.jsonl, every image
under the folder is paired with the `.txt` file of the same stem (`cat.png` + `cat.txt`). Every image is opened
and decoded once at load time; anything unusable is skipped, counted by reason in `FolderDataset.skipped`, and
reported in one line on stderr.

What counts as unusable (the same rules apply to tar shards, data/shards.py):
- a zero-byte, truncated or otherwise undecodable file; a file that is not an image; a missing file;
- a missing or empty caption; a caption that is not valid UTF-8 (never decoded with replacement characters);
  a caption `.txt` that is not a regular file (a FIFO would block the read forever, a device never end);
- an image or caption outside the folder: a `file_name` with `..`, or a symlink pointing out (both modes);
- when a training size is given: an image whose shorter side is under half that size (upscaling it more than
  2× invents the detail the model would learn), or whose sides differ by more than 2:1 (the center crop would
  drop over half of what the caption describes).
Images in another mode (palette, grayscale, RGBA, CMYK, 16-bit) are not skipped but converted to RGB —
transparency composited over white — because the conversion is exact or standard; they are counted by mode
in `FolderDataset.converted`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from carrara.errors import CarraraError
from carrara.images import to_model_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")  # file magic numbers

# Skip reasons, as counted in FolderDataset.skipped.
BAD_LINE = "bad metadata line"
MISSING_FILE = "missing file"
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image"
CORRUPT_IMAGE = "corrupt image"
UNREADABLE = "unreadable file"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
BAD_CAPTION = "caption not UTF-8"
NOT_A_FILE = "caption not a regular file"
OUTSIDE = "outside the folder"
TOO_SMALL = "image too small"
BAD_ASPECT = "aspect ratio over 2:1"


@dataclass
class Record:
    file_name: str  # relative to the dataset folder
    text: str
    extra: dict = field(default_factory=dict)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: EXIF rotation applied, transparency composited over white, 16-bit scaled to 8."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_size(image: Image.Image, size: int | None) -> str:
    """'' if an image of this size can be fit to size×size without inventing or dropping most of it."""
    if size is None:
        return ""
    short, long = sorted(image.size)
    if 2 * short < size:
        return TOO_SMALL
    return BAD_ASPECT if long > 2 * short else ""


def decode_image(source, size: int | None = None) -> tuple[str, Image.Image | None, str]:
    """Decode a path or bytes fully: ('', RGB image, original mode) or (skip reason, None, '')."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            mode = image.mode
            rgb = to_rgb(image)  # decodes every pixel and proves the mode converts
    except UnidentifiedImageError:  # a known signature that fails to parse is a damaged image, not another file
        if isinstance(source, bytes):
            head = source[:8]
        else:
            with open(source, "rb") as f:
                head = f.read(8)
        return (CORRUPT_IMAGE if head.startswith(_SIGNATURES) else NOT_AN_IMAGE), None, ""
    except PermissionError:
        return UNREADABLE, None, ""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return CORRUPT_IMAGE, None, ""  # truncated data, bad CRC, bad header fields, absurd dimensions
    reason = check_size(rgb, size)
    return reason, (None if reason else rgb), mode


def _check_image(path: Path, size: int | None = None) -> tuple[str, str]:
    """('', original mode) if `path` decodes as a usable image, else (skip reason, '')."""
    try:
        if not path.is_file():
            return (NOT_AN_IMAGE if path.exists() else MISSING_FILE), ""
        if path.stat().st_size == 0:
            return EMPTY_FILE, ""
    except OSError:
        return UNREADABLE, ""
    reason, _, mode = decode_image(path, size)
    return reason, mode


def fit_to_size(rgb: Image.Image, size: int | None) -> Image.Image:
    """Center-crop and resize to size×size (unchanged when size is None or already right)."""
    if size is not None and rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.LANCZOS)
    return rgb


def to_tensor(rgb: Image.Image) -> torch.Tensor:
    """PIL RGB → uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def fingerprint(records: list[Record]) -> str:
    """A short hash of the examples (names and captions, in order): a resumed run checks it is on the same data."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.file_name}\0{r.text}\n".encode("utf-8", "surrogateescape"))  # file names may be any bytes
    return h.hexdigest()[:16]


def describe(report: dict) -> str:
    """'skipped 3 (1 corrupt image, 2 empty caption); converted 2 to RGB (1 P, 1 RGBA)' ('' if nothing)."""
    parts = []
    for what, counts in (("skipped", report.get("skipped")), ("converted to RGB", report.get("converted"))):
        if counts:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
            parts.append(f"{what} {sum(counts.values())} ({detail})")
    return "; ".join(parts)


def warn_report(name, report: dict) -> None:
    """One stderr line about skipped and converted examples, from rank 0 only under torchrun."""
    line = describe(report)
    if line and os.environ.get("RANK", "0") == "0":
        print(f"carrara: warning: {name}: {line}", file=sys.stderr)


def is_unicode(text: str) -> bool:
    """False for text holding lone surrogates: undecodable bytes (surrogateescape) or JSON escapes like \\ud800."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_caption(data: bytes) -> tuple[str, str]:
    """('', caption) from a caption file's bytes, or (skip reason, ''); a UTF-8 byte-order mark is dropped."""
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return BAD_CAPTION, ""
    return (EMPTY_CAPTION, "") if not text else ("", text)


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks followed, lies inside the (resolved) folder `root`."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte in the name
        return False


def _read_caption(path: Path) -> tuple[str, str]:
    """('', caption) or (skip reason, '') for a sidecar .txt; only a regular file is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except FileNotFoundError:
        return MISSING_CAPTION, ""
    except OSError:
        return UNREADABLE, ""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return NOT_A_FILE, ""
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError:
        return UNREADABLE, ""
    return decode_caption(data)


def _read_metadata(root: Path, skipped: Counter) -> list[Record]:
    records, resolved = [], root.resolve()
    for raw in (root / METADATA).read_bytes().split(b"\n"):  # not splitlines(): JSON strings may hold U+2028
        line = raw.decode("utf-8", errors="surrogateescape")  # undecodable bytes are judged per field below
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file_name = entry.pop("file_name")
            text = entry.pop("text", entry.pop("caption", None))
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped[BAD_LINE] += 1
            continue
        if not isinstance(file_name, str) or not is_unicode(file_name + json.dumps(entry, ensure_ascii=False)):
            skipped[BAD_LINE] += 1
        elif not _inside(root / file_name, resolved):
            skipped[OUTSIDE] += 1
        elif not isinstance(text, str) or not text.strip():
            skipped[MISSING_CAPTION if text is None else EMPTY_CAPTION] += 1
        elif not is_unicode(text):
            skipped[BAD_CAPTION] += 1
        else:
            records.append(Record(file_name, text.strip(), entry))
    return records


def _read_sidecars(root: Path, skipped: Counter) -> list[Record]:
    records, resolved = [], root.resolve()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix.lower() not in IMAGE_SUFFIXES or hidden or not path.is_file():
            continue
        caption = path.with_suffix(".txt")
        if not (_inside(path, resolved) and _inside(caption, resolved)):
            skipped[OUTSIDE] += 1
            continue
        reason, text = _read_caption(caption)
        if reason:
            skipped[reason] += 1
            continue
        records.append(Record(relative.as_posix(), text))
    return records


class FolderDataset(torch.utils.data.Dataset):
    """Validated (image, caption) records of one folder; items are {"image": (3, H, W) in [-1, 1], "text", ...}."""

    def __init__(self, root: Path, records: list[Record], skipped: Counter, size: int | None = None,
                 converted: Counter | None = None):
        self.root, self.records, self.skipped, self.size = root, records, skipped, size
        self.converted = converted or Counter()

    def __len__(self) -> int:
        return len(self.records)

    def report(self) -> dict:
        return {"source": str(self.root), "examples": len(self.records), "skipped": dict(self.skipped),
                "converted": dict(self.converted)}

    def load_image(self, i: int) -> Image.Image:
        """Record i's image as RGB, center-cropped and resized to `size`×`size` if a size was given."""
        path = self.root / self.records[i].file_name
        try:
            with Image.open(path) as image:
                rgb = to_rgb(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise CarraraError(f"{path} could no longer be read ({e}); was the folder changed while in use?") from None
        return fit_to_size(rgb, self.size)

    def image_uint8(self, i: int) -> torch.Tensor:
        """Record i's image as uint8 (3, H, W)."""
        return to_tensor(self.load_image(i))

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image = to_model_range(self.image_uint8(i))  # (3, H, W) in [-1, 1]
        return {"image": image, "text": record.text, **record.extra}


def collate(batch: list[dict]) -> dict:
    """Batch items: images stacked to (B, 3, H, W); captions and every extra field become lists."""
    return {"image": torch.stack([item["image"] for item in batch]),
            **{key: [item.get(key) for item in batch] for key in batch[0] if key != "image"}}


def load_folder(path, size: int | None = None) -> FolderDataset:
    """Read a captioned image folder, skipping (and counting) every image or caption that cannot be used."""
    root = Path(path)
    if not root.is_dir():
        raise CarraraError(f"dataset folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    if size is not None and size < 1:
        raise CarraraError(f"size must be a positive number of pixels, got {size}")
    skipped: Counter = Counter()
    try:
        candidates = _read_metadata(root, skipped) if (root / METADATA).is_file() else _read_sidecars(root, skipped)
    except OSError as e:
        raise CarraraError(f"cannot read {root}: {e.strerror or e}") from None
    records, converted = [], Counter()
    for record in candidates:
        reason, mode = _check_image(root / record.file_name, size)
        if reason:
            skipped[reason] += 1
            continue
        records.append(record)
        if mode != "RGB":
            converted[mode] += 1
    dataset = FolderDataset(root, records, skipped, size, converted)
    if not records and skipped:  # every image refused: the reasons are the error, not a warning before it
        small = f"; at {size} px an image's short side must be ≥ {-(-size // 2)} px" if skipped[TOO_SMALL] else ""
        raise CarraraError(f"{root} has no usable images: {describe(dataset.report())}{small}")
    warn_report(root, dataset.report())
    if not records:
        raise CarraraError(f"{root} has no usable images: expected images with a {METADATA} "
                           "(file_name, text per line) or a .txt caption beside each image")
    return dataset
