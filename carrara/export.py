"""`carrara export default`: copy a trained diffusion run into the package as the default model.

The packaged folder (carrara/assets/default) is an ordinary model folder with fp16 weights (half the bytes;
they are cast back to float32 on load) and, under training/, the run's recipe, log, metrics and loss curves,
so the shipped weights say how they were made.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from carrara.errors import CarraraError
from carrara.modelfolder import PACKAGED, resolve

TRAINING_FILES = ("config.json", "log.txt", "metrics.jsonl", "loss.png")


def _copy_component(src: Path, dst: Path, dtype: torch.dtype) -> None:
    import json

    from carrara.models.config import CONFIG_NAME, load_weights, save_folder

    state = load_weights(src)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_folder(dst, json.loads((src / CONFIG_NAME).read_text()), state)


def export_default(model: str | Path, out: str | Path | None = None, *, autoencoder_run: str | Path | None = None,
                   dtype: torch.dtype = torch.float16, max_mb: float = 60.0) -> dict:
    """Write model folder `model` (a diffusion run) as fp16 to `out` (default: the package's default model)."""
    folder = resolve(model)
    out = Path(out) if out else PACKAGED / "default"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        _copy_component(folder.unet, tmp / "unet", dtype)
        _copy_component(folder.vae, tmp / "vae", dtype)
        shutil.copytree(folder.root / "scheduler", tmp / "scheduler")
        shutil.copy2(folder.root / "model_index.json", tmp / "model_index.json")
        runs = {"diffusion": folder.root}
        if autoencoder_run:
            runs["autoencoder"] = Path(autoencoder_run)
        for stage, run in runs.items():
            for name in TRAINING_FILES:
                if (run / name).is_file():
                    (tmp / "training" / stage).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run / name, tmp / "training" / stage / name)
        size_mb = sum(f.stat().st_size for f in tmp.rglob("*.safetensors")) / 1e6
        if size_mb > max_mb:
            raise CarraraError(f"the exported weights take {size_mb:.1f} MB, more than the {max_mb:.0f} MB budget")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "weights_mb": round(size_mb, 2)}
