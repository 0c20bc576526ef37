"""Checkpoints without pickle that survive a kill at any moment: tensors in safetensors, the rest in JSON.

A checkpoint is a folder `checkpoints/step_NNNNNNN/` holding model, EMA, optimizer and RNG tensors and
`state.json` (step, optimizer scalars, data position, Python/NumPy RNG state, and the size and SHA-256 of
every file). It is written under a temporary name, each file fsync'ed, then renamed in one step, so a run
killed mid-write leaves only a hidden `.step_*` folder that nothing reads (and the next save deletes).
Loading checks every file against state.json first, so a checkpoint damaged afterwards (a file cut short by
a full disk, a copy interrupted) is detected, and `load_latest` falls back to the previous complete one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carrara.errors import CarraraError
from carrara.fileio import file_sha256

STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG this process has: torch (CPU and each GPU), Python's `random`, NumPy's global generator."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(mt, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": [version, gauss], "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "python" in tensors:  # older checkpoints saved the torch state only
        version, gauss = meta["python"]
        random.setstate((version, tuple(tensors["python"].tolist()), gauss))
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _digest(path: Path) -> str:
    return file_sha256(path)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never points at data still in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a folder: renamed to a hidden name first, so a kill mid-delete leaves nothing that looks complete."""
    trash = folder.with_name(f".trash.{folder.name}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2) -> Path:
    """Write checkpoints/step_{step}/ atomically (temp folder + rename) and keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*"):  # what an earlier kill left behind: never complete, never read
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.", dir=root))
    try:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        rng_tensors, rng_meta = rng_state()
        files = {"model.safetensors": model.state_dict(), "optimizer.safetensors": opt_tensors,
                 "rng.safetensors": rng_tensors}
        if ema is not None:
            files["ema.safetensors"] = ema.state_dict()
        for name, tensors in files.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
            _fsync(tmp / name)
        state = {"step": step, "optimizer": opt_meta, "rng": rng_meta, **extra,
                 "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _digest(tmp / name)}
                           for name in files}}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        _fsync(tmp / STATE_FILE)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_dir)[keep:]:
        _remove(old)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders holding a state.json, newest first."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(done, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (one holding state.json), or None."""
    done = complete_checkpoints(run_dir)
    return done[0] if done else None


def check_state(state, path: Path) -> None:
    """Raise TypeError or ValueError unless state.json has the shape save_checkpoint writes (valid JSON of the
    wrong shape is as damaged as a file cut short)."""
    if not isinstance(state, dict):
        raise TypeError(f"{STATE_FILE} holds {type(state).__name__}, not an object")
    step = state.get("step")
    if type(step) is not int or f"step_{step:07d}" != path.name:
        raise ValueError(f"{STATE_FILE} gives step {step!r} to the folder {path.name}")
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
            and isinstance(optimizer.get("scalars"), dict)):
        raise TypeError(f"{STATE_FILE} has no optimizer state")
    for key in ("files", "rng", "data", "scaler", "config"):
        if not isinstance(state.get(key, {}), dict):
            raise TypeError(f"{STATE_FILE}: {key!r} is not an object")
    for name, info in state.get("files", {}).items():
        if name not in TENSOR_FILES or not isinstance(info, dict) or type(info.get("bytes")) is not int \
                or not isinstance(info.get("sha256"), str):
            raise TypeError(f"{STATE_FILE}: bad entry {name!r} in 'files'")


def read_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """state.json and every tensor file of a checkpoint, each file checked against its recorded size and hash."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        check_state(state, path)
        recorded = state.get("files", {})  # checkpoints before hashes were recorded have none
        for name, info in recorded.items():
            size = (path / name).stat().st_size
            if size != info["bytes"]:
                raise ValueError(f"{name} has {size} bytes, {info['bytes']} were written")
            if _digest(path / name) != info["sha256"]:
                raise ValueError(f"{name} does not match its SHA-256")
        names = recorded or [p.name for p in path.glob("*.safetensors")]
        return state, {name.removesuffix(".safetensors"): load_file(path / name) for name in names}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CarraraError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0]}") from None


def load_checkpoint(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, EMA, optimizer and every RNG from a checkpoint folder; returns its state.json."""
    state, tensors = read_checkpoint(path)  # everything is read and verified before anything is changed
    try:
        model.load_state_dict(tensors["model"])
        if ema is not None:
            ema.load_state_dict(tensors["ema"])
        optimizer.load_state_dict(_unflatten_optimizer(tensors["optimizer"], state["optimizer"]))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CarraraError(f"checkpoint {path} does not match this model: {str(e).splitlines()[0]}") from None
    try:
        set_rng_state(tensors["rng"], state.get("rng", {}))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CarraraError(f"checkpoint {path} is unreadable: its RNG state is damaged ({e})") from None
    return state


def load_latest(run_dir: Path, *, warn=None, **parts) -> tuple[Path, dict]:
    """Load the newest checkpoint that reads back whole; each damaged newer one costs one warning line."""
    warn = warn or (lambda line: print(f"carrara: warning: {line}", file=sys.stderr))
    candidates = complete_checkpoints(run_dir)
    for path in candidates:
        try:
            return path, load_checkpoint(path, **parts)
        except CarraraError as e:
            if "does not match this model" in str(e):
                raise
            older = next((p.name for p in candidates if p < path), None)
            warn(f"{e}; " + (f"falling back to {older}" if older else "no older checkpoint"))
    if candidates:
        raise CarraraError(f"--resume: none of the {len(candidates)} checkpoints in {Path(run_dir) / 'checkpoints'} "
                           "reads back whole (see the warnings above)")
    raise CarraraError(f"--resume: no complete checkpoint in {Path(run_dir) / 'checkpoints'}")
