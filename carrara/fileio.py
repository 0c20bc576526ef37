"""Atomic file writes: write to a temporary name in the same folder, then rename (POSIX-atomic)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from carrara.errors import CarraraError


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB chunks: names weights, adapters and pictures."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) or raise a one-line CarraraError if that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CarraraError(f"{path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CarraraError(f"cannot create folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise CarraraError(f"folder {path} is not writable")
    return path


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail before the work if the file `path` cannot be written: not a folder, its folder there and taking a file."""
    path = Path(path)
    if path.is_dir():
        raise CarraraError(f"{flag} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise CarraraError(f"{flag} {path}: folder {folder} does not exist" if not folder.exists()
                           else f"{flag} {path}: {folder} is not a folder")
    try:  # the honest test (os.access says yes to root on a read-only mount, and to /sys)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise CarraraError(f"{flag} {path}: cannot write in folder {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def no_empty_folder_left(path: str | os.PathLike) -> Iterator[None]:
    """If `path` did not exist and the body fails (a refused input), remove what the body left there as long as it
    holds no file: a refused run leaves no empty run folder behind (a real one, with files, stays for --resume)."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            shutil.rmtree(path, ignore_errors=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; done once, at import (threads)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the file what open() would have
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_dir_beside(folder: str | os.PathLike, prefix: str) -> Path:
    """A new hidden folder in `folder` to fill and then rename into place, with the permissions mkdir would give
    (mkdtemp makes 0700 folders, which would stay private after the rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_image_atomic(path: str | os.PathLike, image, **save_kwargs) -> None:
    """Save a PIL image atomically; the format comes from `path`'s suffix."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)
