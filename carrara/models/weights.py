"""The diffusers folder layout of one network: `<folder>/config.json` + `<folder>/diffusion_pytorch_model.safetensors`
(a pipeline folder holds one such folder per part, `unet/`, `vae/`), read strictly and written atomically."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from carrara.errors import CarraraError
from carrara.fileio import atomic_path, ensure_dir, write_json_atomic
from carrara.models.config import CONFIG_NAME, WEIGHTS_NAME
from carrara.safeload import load_state_dict, weights_file


def resolve_model_folder(folder: str | os.PathLike, subfolder: str) -> Path:
    """`folder` itself if it holds `config.json`, else `folder/subfolder` (a diffusers pipeline folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CarraraError(f"model folder {folder} not found")
    for candidate in (folder, folder / subfolder):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise CarraraError(f"no {CONFIG_NAME} in {folder} or {folder / subfolder}: is this a diffusers model folder?")


def load_weights(folder: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read `diffusion_pytorch_model.safetensors` from `folder` (or, with allow_pickle, its `.bin` twin)."""
    return load_state_dict(weights_file(folder, WEIGHTS_NAME.removesuffix(".safetensors"), allow_pickle=allow_pickle),
                           allow_pickle=allow_pickle)


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict `load_state_dict` whose failure is one CarraraError naming the first mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with wrong shape", wrong)) if v]
        raise CarraraError(f"weights in {source} do not fit this config: " + ", ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def save_folder(folder: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor], *,
                weights_name: str = WEIGHTS_NAME) -> Path:
    """Write `config.json` and the safetensors weights into `folder`, each atomically."""
    folder = ensure_dir(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(folder / weights_name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG_NAME, config)
    return folder
