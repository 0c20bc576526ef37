"""The server's gallery: each image a PNG carrying its settings (as `carrara generate` writes them) plus a JSON
sidecar for listing, both under DATA_DIR/images/ and named by a generated uuid, never by anything a client sent.

Only listed images are served. At start-up the folder is tidied after a crash (one server per data dir): leftover
temporary files are removed, an unreadable sidecar is skipped and counted, and a PNG without a sidecar (killed
between the two writes) is adopted from the settings in its own metadata, or removed if it has none.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from PIL import Image
from pydantic import ValidationError

from carrara.fileio import ensure_dir, write_json_atomic
from carrara.png import KEY, save_png
from carrara.serve.schema import MAX_SIZE, ImageItem

IMAGE_ID = re.compile(r"[0-9a-f]{32}")
SETTING_KEYS = ("prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "n")
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, ValidationError)


def make_item(image_id: str, metadata: dict, *, created: float, job_id: str, size: tuple[int, int]) -> dict:
    """The sidecar of one image: what the gallery lists, from the metadata its PNG carries."""
    return {"id": image_id, "url": f"/api/images/{image_id}.png", "created": created, "job_id": job_id,
            "settings": {**{k: metadata[k] for k in SETTING_KEYS}, "size": metadata.get("size"),
                         "model": metadata.get("model_name"),  # the server's name for the model, when it made it
                         "edit": None if "strength" not in metadata else "inpaint" if "mask_sha256" in metadata
                         else "img2img", "strength": metadata.get("strength"), "init_image": metadata.get("init_image")},
            "model": metadata["model"],
            "model_hash": metadata["model_hash"], "size": list(size),
            "unclip": {**metadata["unclip"], "theta": metadata.get("theta", 0.0)} if "unclip" in metadata else None}


def valid_item(item, image_id: str) -> dict:
    """`item` as the API lists it, or ValueError/ValidationError: a sidecar of the wrong shape is not listed."""
    item = ImageItem.model_validate(item, strict=True).model_dump()
    if item["id"] != image_id or not math.isfinite(item["created"]):
        raise ValueError(f"sidecar of {image_id} holds id {item['id']!r}, created {item['created']}")
    return item


def orphan_item(png: Path) -> dict:
    """A gallery item for a PNG whose sidecar was never written, from its own 'carrara' metadata (pixels unread)."""
    with Image.open(png) as im:  # reads the header and the text chunks before the pixels, not the pixels
        if im.format != "PNG" or max(im.size) > MAX_SIZE:
            raise ValueError(f"too large ({im.size[0]}×{im.size[1]})" if im.format == "PNG" else "not a PNG")
        metadata, size = json.loads(im.info[KEY]), im.size
    return valid_item(make_item(png.stem, metadata, created=png.stat().st_mtime, job_id="", size=size), png.stem)


def _reason(error: Exception) -> str:
    """A short, countable reason why an orphan PNG was removed."""
    if isinstance(error, Image.DecompressionBombError) or str(error).startswith("too large"):
        return "too large"
    return "no carrara metadata" if isinstance(error, KeyError) else "unreadable"


class Gallery:
    """Images on disk, newest first; the index lives in memory and is rebuilt from the sidecars at start."""

    def __init__(self, data_dir: str | Path):
        self.dir = ensure_dir(Path(data_dir) / "images")
        self._lock = threading.Lock()
        self._items: list[dict] = []  # oldest first
        self.skipped = 0  # sidecars that could not be read: not listed, their PNG not served
        self.adopted = 0  # PNGs without a sidecar given one from their own metadata
        self.removed: Counter[str] = Counter()  # PNGs without a sidecar removed, by reason
        self.tmp_removed = 0  # temporary files a killed write left behind
        self._scan()
        self._ids = {item["id"] for item in self._items}

    def _scan(self) -> None:
        """Rebuild the index from the sidecars, tidying what a crash left (see the module docstring)."""
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            self.tmp_removed += 1
        for sidecar in self.dir.glob("*.json"):
            try:
                item = valid_item(json.loads(sidecar.read_text(encoding="utf-8")), sidecar.stem)
                ok = (self.dir / f"{sidecar.stem}.png").is_file()
            except UNREADABLE:
                ok = False
            if ok:
                self._items.append(item)
            else:
                self.skipped += 1
        for png in self.dir.glob("*.png"):
            if not IMAGE_ID.fullmatch(png.stem) or png.with_suffix(".json").exists():
                continue
            try:
                item = orphan_item(png)
                write_json_atomic(png.with_suffix(".json"), item)
            except (*UNREADABLE, Image.DecompressionBombError) as e:
                png.unlink(missing_ok=True)
                self.removed[_reason(e)] += 1
                continue
            self._items.append(item)
            self.adopted += 1
        self._items.sort(key=lambda item: item["created"])

    def summary(self) -> str:
        """One log line: what is listed and what start-up skipped, adopted and removed."""
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.removed.items()))
        return (f"gallery {self.dir}: {len(self._items)} images listed; unreadable sidecars skipped: {self.skipped}; "
                f"PNGs without a sidecar: {self.adopted} adopted, {sum(self.removed.values())} removed"
                + (f" ({why})" if why else "") + f"; leftover temporary files removed: {self.tmp_removed}")

    def add_all(self, images: list[Image.Image], metadata: list[dict], *, job_id: str) -> list[dict]:
        """Save a job's images all or none: each PNG (metadata in its 'carrara' chunk), then its sidecar; if any
        write fails, the files already written are removed, nothing is listed, and the error is raised."""
        written, items = [], []
        try:
            for image, meta in zip(images, metadata, strict=True):
                image_id = uuid.uuid4().hex
                png, sidecar = self.dir / f"{image_id}.png", self.dir / f"{image_id}.json"
                written.append(png)
                save_png(png, image, meta)
                item = make_item(image_id, meta, created=time.time(), job_id=job_id, size=image.size)
                written.append(sidecar)
                write_json_atomic(sidecar, item)
                items.append(item)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        with self._lock:
            self._items.extend(items)
            self._ids.update(item["id"] for item in items)
        return items

    def path(self, image_id: str) -> Path | None:
        """The PNG of a listed image, else None (ids are checked, so no path can escape the folder)."""
        if not IMAGE_ID.fullmatch(image_id) or image_id not in self._ids:
            return None
        path = self.dir / f"{image_id}.png"
        return path if path.is_file() else None

    def page(self, offset: int = 0, limit: int = 50) -> tuple[list[dict], int]:
        """Items newest first, from `offset`; and how many there are in all."""
        with self._lock:
            total = len(self._items)
            newest_first = self._items[max(0, total - offset - limit):max(0, total - offset)][::-1]
        return newest_first, total
