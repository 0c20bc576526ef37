"""The server's gallery: each image a PNG carrying its settings (as `carrara generate` writes them) plus a JSON
sidecar for listing, both under DATA_DIR/images/ and named by a generated uuid, never by anything a client sent.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

from PIL import Image

from carrara.io import ensure_dir, write_json_atomic
from carrara.png import save_png

IMAGE_ID = re.compile(r"[0-9a-f]{32}")


class Gallery:
    """Images on disk, newest first; the index lives in memory and is rebuilt from the sidecars at start."""

    def __init__(self, data_dir: str | Path):
        self.dir = ensure_dir(Path(data_dir) / "images")
        self._lock = threading.Lock()
        self._items: list[dict] = []  # oldest first
        self.skipped = 0  # sidecars that could not be read (a crash between the two writes leaves none)
        for sidecar in self.dir.glob("*.json"):
            try:
                item = json.loads(sidecar.read_text(encoding="utf-8"))
                ok = IMAGE_ID.fullmatch(item["id"]) and (self.dir / f"{item['id']}.png").is_file()
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if ok:
                self._items.append(item)
            else:
                self.skipped += 1
        self._items.sort(key=lambda item: item["created"])

    def add(self, image: Image.Image, metadata: dict, *, job_id: str) -> dict:
        """Write the PNG (metadata in its 'carrara' chunk), then the sidecar; returns the gallery item."""
        image_id = uuid.uuid4().hex
        save_png(self.dir / f"{image_id}.png", image, metadata)
        settings = {k: metadata[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "n")}
        item = {"id": image_id, "url": f"/api/images/{image_id}.png", "created": time.time(), "job_id": job_id,
                "settings": settings, "model": metadata["model"], "model_hash": metadata["model_hash"],
                "size": list(image.size)}
        write_json_atomic(self.dir / f"{image_id}.json", item)
        with self._lock:
            self._items.append(item)
        return item

    def path(self, image_id: str) -> Path | None:
        """The PNG of a well-formed id that exists, else None (ids are checked, so no path can escape the folder)."""
        if not IMAGE_ID.fullmatch(image_id):
            return None
        path = self.dir / f"{image_id}.png"
        return path if path.is_file() else None

    def page(self, offset: int = 0, limit: int = 50) -> tuple[list[dict], int]:
        """Items newest first, from `offset`; and how many there are in all."""
        with self._lock:
            total = len(self._items)
            newest_first = self._items[max(0, total - offset - limit):max(0, total - offset)][::-1]
        return newest_first, total
