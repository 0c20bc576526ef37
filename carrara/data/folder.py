"""Captioned image folders: images + `metadata.jsonl` (Hugging Face imagefolder), or sidecar `.txt` captions.

`metadata.jsonl` holds one JSON object per line with `file_name` (relative to the folder), `text` (the caption;
`caption` is accepted too) and any extra fields, which are passed through. Without a metadata.jsonl, every image
under the folder is paired with the `.txt` file of the same stem (`cat.png` + `cat.txt`). Every image is opened
and decoded once at load time; anything unusable is skipped, counted by reason in `FolderDataset.skipped`, and
reported in one line on stderr.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from carrara.errors import CarraraError

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


def _check_image(path: Path) -> str:
    """'' if `path` decodes as an image, else the skip reason."""
    try:
        if not path.is_file():
            return NOT_AN_IMAGE if path.exists() else MISSING_FILE
        if path.stat().st_size == 0:
            return EMPTY_FILE
        with Image.open(path) as image:
            to_rgb(image)  # decodes every pixel and proves the mode converts
    except UnidentifiedImageError:  # a known signature that fails to parse is a damaged image, not another file
        with open(path, "rb") as f:
            return CORRUPT_IMAGE if f.read(8).startswith(_SIGNATURES) else NOT_AN_IMAGE
    except PermissionError:
        return UNREADABLE
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return CORRUPT_IMAGE  # truncated data, bad CRC, bad header fields, absurd dimensions
    return ""


def _read_metadata(root: Path, skipped: Counter) -> list[Record]:
    records = []
    lines = (root / METADATA).read_text(encoding="utf-8", errors="replace").splitlines()
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file_name = entry.pop("file_name")
            inside = (root / file_name).resolve().is_relative_to(root.resolve())
        except (ValueError, KeyError, TypeError, AttributeError):
            inside = False
        if not inside or not isinstance(file_name, str):
            skipped[BAD_LINE] += 1
            continue
        text = entry.pop("text", entry.pop("caption", None))
        if not isinstance(text, str) or not text.strip():
            skipped[EMPTY_CAPTION] += 1
            continue
        records.append(Record(file_name, text.strip(), entry))
    return records


def _read_sidecars(root: Path, skipped: Counter) -> list[Record]:
    records = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix.lower() not in IMAGE_SUFFIXES or hidden or not path.is_file():
            continue
        try:
            text = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            skipped[MISSING_CAPTION] += 1
            continue
        except OSError:
            skipped[UNREADABLE] += 1
            continue
        if not text:
            skipped[EMPTY_CAPTION] += 1
            continue
        records.append(Record(relative.as_posix(), text))
    return records


class FolderDataset(torch.utils.data.Dataset):
    """Validated (image, caption) records of one folder; items are {"image": (3, H, W) in [-1, 1], "text", ...}."""

    def __init__(self, root: Path, records: list[Record], skipped: Counter, size: int | None = None):
        self.root, self.records, self.skipped, self.size = root, records, skipped, size

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int) -> Image.Image:
        """Record i's image as RGB, center-cropped and resized to `size`×`size` if a size was given."""
        path = self.root / self.records[i].file_name
        try:
            with Image.open(path) as image:
                rgb = to_rgb(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise CarraraError(f"{path} could no longer be read ({e}); was the folder changed while in use?") from None
        if self.size is not None and rgb.size != (self.size, self.size):
            rgb = ImageOps.fit(rgb, (self.size, self.size), Image.Resampling.LANCZOS)
        return rgb

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        pixels = torch.from_numpy(np.asarray(self.load_image(i), dtype=np.uint8).copy())  # (H, W, 3)
        image = pixels.permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
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
    records = []
    for record in candidates:
        reason = _check_image(root / record.file_name)
        if reason:
            skipped[reason] += 1
        else:
            records.append(record)
    if skipped:
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        print(f"carrara: warning: {root}: skipped {sum(skipped.values())} ({detail})", file=sys.stderr)
    if not records:
        raise CarraraError(f"{root} has no usable images: expected images with a {METADATA} "
                           "(file_name, text per line) or a .txt caption beside each image")
    return FolderDataset(root, records, skipped, size)
