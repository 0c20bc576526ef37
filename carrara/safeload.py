"""Loading weights from files we did not write: safetensors by default, pickle only when the user says so.

A `.ckpt`/`.pt`/`.pth`/`.bin` file is a Python pickle, and unpickling can run arbitrary code
(https://pytorch.org/docs/stable/generated/torch.load.html, "Warning"). safetensors holds only tensors and a
JSON header, so it is always safe to read. carrara reads safetensors; a pickle file is refused with one line
unless the user passes --allow-pickle, and even then it is read with `torch.load(weights_only=True)`, whose
restricted unpickler accepts tensors and plain containers only and refuses anything that would run code.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from carrara.errors import CarraraError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def is_pickle(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | Path) -> CarraraError:
    return CarraraError(f"{path} is a pickle file, which can run code when loaded; carrara loads safetensors only. "
                        "Convert it, or pass --allow-pickle if you trust its source")


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A {name: tensor} dict from a .safetensors file, or (with allow_pickle) from a pickle read weights-only."""
    path = Path(path)
    if not path.is_file():
        raise CarraraError(f"weights file {path} not found")
    if not is_pickle(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CarraraError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    if not allow_pickle:
        raise refuse_pickle(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CarraraError(f"cannot read {path} as plain tensors (weights_only=True): "
                           f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning / original SD .ckpt
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CarraraError(f"{path} does not hold a state dict of tensors")
    return state


def weights_file(folder: str | Path, stem: str, *, allow_pickle: bool = False) -> Path:
    """`folder/stem.safetensors`, else (with allow_pickle) `folder/stem.{bin,ckpt,pt,pth}`; refuses a lone pickle."""
    folder = Path(folder)
    safe = folder / f"{stem}.safetensors"
    if safe.is_file():
        return safe
    pickles = [folder / f"{stem}{s}" for s in PICKLE_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if not pickles:
        raise CarraraError(f"weights file {safe} not found")
    if not allow_pickle:
        raise refuse_pickle(pickles[0])
    return pickles[0]
