"""PNG files that say how to make them again: generation settings and model hash in a tEXt chunk."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from carrara.errors import CarraraError
from carrara.io import save_image_atomic

KEY = "carrara"


def save_png(path: str | Path, image: Image.Image, metadata: dict) -> None:
    """Write `image` to `path` atomically with `metadata` as JSON in the 'carrara' tEXt chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    if "prompt" in metadata:
        info.add_text("Description", str(metadata["prompt"]))
    info.add_text("Software", "carrara")
    save_image_atomic(Path(path), image, pnginfo=info)


def read_png_metadata(path: str | Path) -> dict:
    """The generation settings a carrara PNG carries, or a one-line CarraraError."""
    try:
        with Image.open(path) as im:
            text = im.text.get(KEY) if hasattr(im, "text") else None
    except FileNotFoundError:
        raise CarraraError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CarraraError(f"{path}: not a readable PNG ({e})") from None
    if text is None:
        raise CarraraError(f"{path} carries no carrara generation metadata")
    try:
        return json.loads(text)
    except ValueError:
        raise CarraraError(f"{path}: its carrara metadata is not valid JSON") from None
