"""PNG files that say how to make them again: generation settings and model hash in a tEXt chunk."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from carrara.errors import CarraraError
from carrara.fileio import atomic_path

KEY = "carrara"


def _pnginfo(metadata: dict) -> PngImagePlugin.PngInfo:
    """`metadata` as JSON in the 'carrara' tEXt chunk, the prompt also as the standard 'Description'."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    if "prompt" in metadata:
        info.add_text("Description", str(metadata["prompt"]))
    info.add_text("Software", "carrara")
    return info


def save_png(path: str | Path, image: Image.Image, metadata: dict) -> None:
    """Write `image` to `path` atomically with `metadata` as JSON in the 'carrara' tEXt chunk."""
    save_pngs([(path, image, metadata)])


def save_pngs(items: list[tuple[str | Path, Image.Image, dict]]) -> None:
    """Write several (path, image, metadata) PNGs all or none: every file is written under a temporary name and
    renamed only once all of them are written, so a failure (disk full, Ctrl-C) leaves no half of a set."""
    with contextlib.ExitStack() as stack:
        for path, image, metadata in items:
            tmp = stack.enter_context(atomic_path(Path(path)))
            image.save(tmp, format="PNG", pnginfo=_pnginfo(metadata))


def read_png_metadata(path: str | Path) -> dict:
    """The generation settings a carrara PNG carries, or a one-line CarraraError."""
    try:
        with Image.open(path) as im:
            text = im.text.get(KEY) if hasattr(im, "text") else None
    except FileNotFoundError:
        raise CarraraError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise CarraraError(f"{path}: the image is too large to read (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CarraraError(f"{path}: not a readable PNG ({e})") from None
    if text is None:
        raise CarraraError(f"{path} carries no carrara generation metadata")
    try:
        meta = json.loads(text)
    except ValueError:
        raise CarraraError(f"{path}: its carrara metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CarraraError(f"{path}: its carrara metadata is not a JSON object of settings")
    return meta
