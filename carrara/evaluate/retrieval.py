"""CLIP retrieval over a dataset: a k-nearest-neighbour index of its CLIP image embeddings, searched by text or image.

LAION's clip-retrieval, small: every image is embedded once by a `carrara train clip` run, the unit vectors go into
a faiss `IndexFlatIP` (exact inner product = cosine similarity on unit vectors; Johnson et al. 2019), and a query —
a caption through the CLIP text tower, or a picture through the image tower — returns the k most similar images.
Without faiss the same exact search runs as one matrix product in torch (`ExactIndex`, same interface).

The index is one safetensors file, written atomically: the faiss index (serialised), the embeddings, and in its
metadata the file list, the data folder, the CLIP run and its weights' fingerprint, and a signature of the files
(name, size, mtime), so a search on an index of another CLIP, or of files that changed since, stops with one line.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from carrara.data.folder import IMAGE_SUFFIXES
from carrara.data.load import load_dataset, preload_images
from carrara.errors import CarraraError
from carrara.fileio import atomic_path
from carrara.images import from_pil, image_grid, open_picture, to_uint8
from carrara.models.clip import ClipScorer

try:
    import faiss
except ImportError:  # faiss-cpu is a dependency; without it the exact torch search below does the same job
    faiss = None

DEFAULT_INDEX = "carrara-index.safetensors"
FORMAT = "carrara-clip-index/1"


class ExactIndex:
    """faiss' IndexFlatIP interface in torch: exact inner-product search over the stored vectors."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))  # (N, E)
        self.ntotal = len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = (torch.from_numpy(queries) @ self.vectors.T).topk(k, dim=1)  # (Q, k) each
        return scores.numpy(), idx.numpy()


def make_index(vectors: np.ndarray):
    """An exact inner-product index of unit vectors (N, E): faiss' IndexFlatIP, or ExactIndex without faiss."""
    if faiss is None:
        return ExactIndex(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _agreeing_index(vectors: np.ndarray, blob: np.ndarray, files, texts):
    """The kNN index of an index file whose file list, captions, embeddings and faiss index agree (ValueError if not:
    a damaged or hand-edited file would search past its lists, or crash)."""
    if not (isinstance(files, list) and isinstance(texts, list) and all(isinstance(s, str) for s in files + texts)):
        raise ValueError("its file list and captions must be lists of text")
    if vectors.ndim != 2 or not len(files) == len(texts) == len(vectors):
        raise ValueError(f"{len(files)} files, {len(texts)} captions and embeddings of shape {vectors.shape} disagree")
    try:
        index = faiss.deserialize_index(blob) if faiss is not None and blob.size else make_index(vectors)
    except RuntimeError:
        raise ValueError("its faiss index is damaged") from None
    if index.ntotal != len(vectors):
        raise ValueError(f"its faiss index holds {index.ntotal} vectors, not {len(vectors)}")
    return index


def files_signature(root: Path, files: list[str]) -> str:
    """SHA-256 of each file's name, size and modification time: changes when an indexed image changes or goes."""
    h = hashlib.sha256()
    for name in files:
        try:
            st = (root / name).stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{name}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


@dataclass
class ClipIndex:
    """The embeddings of a dataset's images, the kNN index over them, and what they were computed from."""

    index: object  # faiss.IndexFlatIP or ExactIndex
    embeddings: np.ndarray  # (N, E) float32 unit vectors
    files: list[str]  # relative to root, in index order
    texts: list[str]
    root: Path
    clip: str
    clip_fingerprint: str
    signature: str

    @classmethod
    def build(cls, data: str | Path, scorer: ClipScorer, clip: str | Path, *, progress: bool = True) -> ClipIndex:
        """Embed every usable image of the dataset folder `data` with the CLIP run `clip`."""
        root = Path(data).resolve()
        dataset = load_dataset(str(root), size=scorer.model.config.image_size)
        if not hasattr(dataset, "root"):
            raise CarraraError("carrara index takes a dataset folder (tar shards have no files to show)")
        images, texts = preload_images(dataset, progress=progress)  # (N, 3, S, S) uint8
        vectors = scorer.embed_images(images).numpy().astype(np.float32)  # (N, E), unit
        files = [r.file_name for r in dataset.records]
        return cls(make_index(vectors), vectors, files, texts, root, str(Path(clip).resolve()), scorer.fingerprint(),
                   files_signature(root, files))

    def save(self, path: str | Path) -> Path:
        """One safetensors file, written to a temporary name and renamed."""
        path = Path(path)
        if path.is_dir():
            raise CarraraError(f"--out {path} is a folder; give a file name such as {path / DEFAULT_INDEX}")
        blob = faiss.serialize_index(self.index) if faiss is not None else np.zeros(0, dtype=np.uint8)
        meta = {"format": FORMAT, "files": json.dumps(self.files, ensure_ascii=False),
                "texts": json.dumps(self.texts, ensure_ascii=False), "root": str(self.root), "clip": self.clip,
                "clip_fingerprint": self.clip_fingerprint, "signature": self.signature}
        try:
            with atomic_path(path) as tmp:
                save_file({"embeddings": torch.from_numpy(self.embeddings),
                           "faiss": torch.from_numpy(np.asarray(blob, dtype=np.uint8))}, str(tmp), metadata=meta)
        except OSError as e:
            raise CarraraError(f"cannot write the index {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClipIndex:
        """Read an index file; a missing, damaged, foreign or stale one is one CarraraError."""
        path = Path(path)
        if not path.is_file():
            raise CarraraError(f"no index at {path}: build one with carrara index DATA --clip CLIP_RUN"
                               + ("" if path.suffix else f" --out {path}"))
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CarraraError(f"{path} is not a carrara CLIP index (rebuild it with carrara index)")
                vectors = f.get_tensor("embeddings").numpy()
                blob = f.get_tensor("faiss").numpy()
            files, texts = json.loads(meta["files"]), json.loads(meta["texts"])
            root, clip, fingerprint, signature = (meta[k] for k in ("root", "clip", "clip_fingerprint", "signature"))
            index = _agreeing_index(vectors, blob, files, texts)
        except KeyError as e:
            raise CarraraError(f"cannot read the index {path}: its metadata has no {e}") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise CarraraError(f"cannot read the index {path}: {str(e).splitlines()[0]}") from None
        out = cls(index, vectors, files, texts, Path(root), clip, fingerprint, signature)
        if files_signature(out.root, files) != out.signature:
            raise CarraraError(f"the index {path} is stale: images in {out.root} changed since it was built; "
                               f"rebuild it with carrara index {out.root} --clip {out.clip}")
        return out

    def check_clip(self, scorer: ClipScorer) -> None:
        """Queries must be embedded by the CLIP that embedded the images."""
        if scorer.fingerprint() != self.clip_fingerprint:
            raise CarraraError(f"the index was built with another CLIP (weights {self.clip_fingerprint}, this one "
                               f"{scorer.fingerprint()}); rebuild it with carrara index {self.root} --clip CLIP_RUN")

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities (Q, k), indices (Q, k)) of the k images nearest to unit query vectors (Q, E)."""
        return self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, len(self.files)))


def is_image_query(query: str) -> bool:
    """A query naming an image file (an existing file, or a name ending like one) is a picture; else it is text."""
    return Path(query).suffix.lower() in IMAGE_SUFFIXES or Path(query).is_file()


def embed_query(scorer: ClipScorer, query: str) -> torch.Tensor:
    """The unit query vector (1, E): the picture's CLIP image embedding, or the text's CLIP text embedding."""
    if not query.strip():
        raise CarraraError("the search query is empty: give words (\"a happy kitty\") or an image file")
    if is_image_query(query):
        picture = from_pil([open_picture(query, "query image")], scorer.model.config.image_size)  # (1, 3, S, S)
        return scorer.embed_images(to_uint8(picture))
    return scorer.embed_texts([query.strip()])


def search(index: ClipIndex, scorer: ClipScorer, query: str, k: int = 8) -> dict:
    """The k nearest images to a text or image query, with their scores and the time the search took."""
    if k < 1:
        raise CarraraError(f"--k must be at least 1, got {k}")
    start = time.perf_counter()
    vector = embed_query(scorer, query)
    embedded = time.perf_counter()
    scores, idx = index.search(vector, k)
    done = time.perf_counter()
    hits = [{"file": index.files[i], "text": index.texts[i], "score": float(s)} for s, i in zip(scores[0], idx[0])]
    return {"query": query, "kind": "image" if is_image_query(query) else "text", "hits": hits,
            "ms_embed": 1000 * (embedded - start), "ms_knn": 1000 * (done - embedded), "ms": 1000 * (done - start)}


def contact_sheet(index: ClipIndex, result: dict, side: int = 64):
    """The hits as one labelled grid ("rank. score caption"), the query picture first for an image query."""
    pictures, labels = [], []
    if result["kind"] == "image":
        pictures.append(open_picture(result["query"], "query image").convert("RGB").resize((side, side)))
        labels.append("query")
    for rank, hit in enumerate(result["hits"], 1):
        pictures.append(open_picture(index.root / hit["file"], "indexed image").convert("RGB").resize((side, side)))
        labels.append(f"{rank}. {hit['score']:.3f} {hit['text']}")
    return image_grid(pictures, rows=max(1, round(len(pictures) ** 0.5)), labels=labels, scale=max(1, 128 // side))
