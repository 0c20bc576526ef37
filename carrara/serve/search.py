"""CLIP retrieval in `carrara serve`: the training images nearest to words, to a picture, or to a gallery image.

The page's search box asks POST /api/search; "nearest training images" on a gallery picture asks it with the
picture's id, a memorisation check anyone can run on what the model made (issue 20; `evaluate/memorisation.py` is
the batch version). The index is a `carrara index` file, loaded once at start-up, its CLIP checked as `carrara
search` checks it. GET /api/search/image/{i} serves the indexed file i: only files the index lists, only inside its
folder, so no request names a path.
"""
from __future__ import annotations

import mimetypes
import threading
import time
from pathlib import Path, PurePosixPath

import torch
from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from carrara.data.folder import IMAGE_SUFFIXES
from carrara.evaluate.retrieval import ClipIndex
from carrara.images import from_pil, to_uint8
from carrara.models.clip import ClipScorer
from carrara.serve.gallery import Gallery
from carrara.serve.schema import MAX_SEARCH_K, SEARCH_K, SearchRequest, SearchResult, error_response
from carrara.serve.uploads import UploadError, decode_data_url, from_gallery

NO_INDEX = ("this server has no search index: build one with carrara index DATA --clip CLIP_RUN, then start "
            "carrara serve --index carrara-index.safetensors")


class Searcher:
    """A loaded index and the CLIP that embedded it; one query at a time (a search is a few ms on one core)."""

    def __init__(self, index: ClipIndex, scorer: ClipScorer, path: str | Path = ""):
        index.check_clip(scorer)
        self.index, self.scorer, self.path = index, scorer, Path(path)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> Searcher:
        """The index file and the CLIP run it names, checked; a missing, stale or foreign one is one CarraraError."""
        index = ClipIndex.load(path)
        searcher = cls(index, ClipScorer.load(index.clip), path)
        searcher.scorer.embed_texts(["warm-up"])  # the text tower's first call sets up its kernels: part of loading
        return searcher

    def summary(self) -> str:
        """One log line: what the index holds."""
        return (f"search index {self.path}: {len(self.index.files)} images of {self.index.root}, "
                f"{self.index.embeddings.shape[1]}-d embeddings of the CLIP {self.index.clip} (POST /api/search)")

    def embed(self, body: SearchRequest, gallery: Gallery) -> torch.Tensor:
        """The unit query vector (1, E). Text is always words: unlike `carrara search`, a query ending in ".png" is
        never read as a file on the server's disk."""
        if body.text is not None:
            return self.scorer.embed_texts([body.text.strip()])
        if body.image is not None:
            picture, _ = decode_data_url(body.image, "image")
        else:
            picture, _ = from_gallery(gallery, body.image_id, "image_id")
        side = self.scorer.model.config.image_size
        return self.scorer.embed_images(to_uint8(from_pil([picture], side)))  # (1, 3, S, S) uint8 in

    def search(self, body: SearchRequest, gallery: Gallery) -> dict:
        """The k nearest indexed images (UploadError: a picture it cannot read), and the query's time in ms."""
        with self._lock:
            start = time.perf_counter()
            scores, idx = self.index.search(self.embed(body, gallery), body.k)  # (1, k) each
            ms = 1000 * (time.perf_counter() - start)
        results = [{"rank": rank, "score": float(score), "file": self.index.files[i], "text": self.index.texts[i],
                    "url": f"/api/search/image/{i}"} for rank, (score, i) in enumerate(zip(scores[0], idx[0]), 1)]
        return {"results": results, "ms": round(ms, 2)}

    def file(self, i: int) -> Path | None:
        """Indexed image i on disk, if it is an image file inside the indexed folder (a hand-made index file listing
        "../secret.png" or "/etc/passwd" serves nothing), else None."""
        if not 0 <= i < len(self.index.files):
            return None
        name = PurePosixPath(self.index.files[i])
        if name.is_absolute() or ".." in name.parts or name.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        path = self.index.root / name
        return path if path.is_file() else None


def search_router(searcher: Searcher | None, gallery: Gallery) -> APIRouter:
    """/api/search and /api/search/image/{i}; without a searcher they answer 404 with NO_INDEX."""
    router = APIRouter()

    @router.get("/api/search")
    async def search_info() -> dict:
        """Whether the server has an index (the page shows its search box only then), its size and the k limits."""
        return {"available": searcher is not None, "images": len(searcher.index.files) if searcher else 0,
                "k": SEARCH_K, "max_k": MAX_SEARCH_K}

    @router.post("/api/search", response_model=SearchResult,
                 responses={404: {"description": "no search index"}, 422: {"description": "a bad query"}})
    async def search(body: SearchRequest):
        """The k indexed images nearest to `text`, a picture (`image`) or a gallery image (`image_id`)."""
        if searcher is None:
            return error_response(404, NO_INDEX)
        try:
            return await run_in_threadpool(searcher.search, body, gallery)
        except UploadError as e:
            return error_response(422, str(e), str(e).split(":")[0])

    @router.get("/api/search/image/{i}", response_class=FileResponse,
                responses={200: {"content": {"image/*": {}}}, 404: {"description": "no such indexed image"}})
    async def indexed_image(i: int):
        """Indexed image i, as the file on disk."""
        if searcher is None:
            return error_response(404, NO_INDEX)
        path = searcher.file(i)
        if path is None:
            return error_response(404, f"no indexed image {i}")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})

    return router
