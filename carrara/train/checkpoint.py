"""Checkpoints without pickle: weights, EMA and optimizer state in safetensors, scalars in JSON.

A checkpoint is a folder `checkpoints/step_NNNNNNN/` written under a temporary name and renamed when
complete, so a killed run never leaves a half-written checkpoint that `--resume` would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carrara.errors import CarraraError

STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint


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


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2) -> Path:
    """Write checkpoints/step_{step}/ atomically (temp folder + rename) and keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        save_file(rng, tmp / "rng.safetensors")
        state = {"step": step, "optimizer": opt_meta, **extra}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (one holding state.json), or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, EMA, optimizer and RNG from a checkpoint folder; returns its state.json."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        model.load_state_dict(load_file(path / "model.safetensors"))
        if ema is not None:
            ema.load_state_dict(load_file(path / "ema.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
        torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise CarraraError(f"checkpoint {path} is unreadable or does not match this model: {str(e).splitlines()[0]}") from None
    return state
