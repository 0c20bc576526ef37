"""A model folder in diffusers' Stable Diffusion layout: model_index.json, unet/, vae/, scheduler/,
and either text_encoder/ + tokenizer/ or a named built-in text encoder (carrara's own runs).

A diffusion run folder *is* a model folder: the trainer exports its EMA weights in this layout.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from carrara.errors import CarraraError
from carrara.fileio import file_sha256, write_json_atomic
from carrara.safeload import weights_file

PACKAGED = Path(__file__).parent / "assets"
# Names that mean a model shipped in the package (carrara/assets/NAME), budget in MB of fp16 weights: the default
# emoji model, and the small `shapes` model whose faithfulness anyone can check in seconds. A local folder of the
# same name is reached as ./NAME.
PACKAGED_BUDGET_MB = {"default": 100.0, "shapes": 20.0}


def packaged(name: str | Path) -> Path | None:
    """The package's folder for a packaged model's name ("default", "shapes"), None for any other path."""
    return PACKAGED / str(name) if str(name) in PACKAGED_BUDGET_MB else None


@dataclass
class ModelFolder:
    """Where each component of a model lives on disk."""

    root: Path
    unet: Path
    vae: Path
    scheduler_config: dict
    text_encoder: str  # "minilm" or a folder
    tokenizer: str | None

    def unet_hash(self, *, allow_pickle: bool = False) -> str:
        """First 12 hex digits of the SHA-256 of the U-Net weights: names the model in PNG metadata."""
        return weights_hash(self.unet, allow_pickle=allow_pickle)


def weights_hash(unet_dir: Path, *, allow_pickle: bool = False) -> str:
    """First 12 hex digits of the SHA-256 of a U-Net folder's weights file (a model's, or an upsampler stage's)."""
    return file_sha256(weights_file(unet_dir, "diffusion_pytorch_model", allow_pickle=allow_pickle))[:12]


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or a one-line CarraraError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CarraraError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise CarraraError(f"{path} does not hold a JSON object: is this a diffusers model folder?")
    return data


def resolve(path: str | Path) -> ModelFolder:
    """Find the components of the model at `path` ("default", "shapes" = the packaged models)."""
    root = packaged(path) or Path(path)
    if packaged(path) and not root.is_dir():
        raise CarraraError(f"no {path} model is packaged in this checkout; pass --model RUN_DIR "
                           "(train one with `carrara train diffusion`, or `carrara recipe recipes/...`)")
    if not root.is_dir():
        raise CarraraError(f"model folder {root} does not exist")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        hint = " (this is an autoencoder run; pass a diffusion run)" if (root / "vae").is_dir() else ""
        raise CarraraError(f"{root} is not a model folder: no model_index.json{hint}")
    index = read_json_object(index_path)
    for part in ("unet", "vae"):
        if not (root / part / "config.json").is_file():
            raise CarraraError(f"{root} has no {part}/config.json: copy the complete model folder")
    scheduler = read_json_object(root / "scheduler" / "scheduler_config.json")
    builtin = _builtin_text_encoder(index, index_path)
    if (root / "text_encoder").is_dir():
        text_encoder, tokenizer = str(root / "text_encoder"), str(root / "tokenizer")
    else:
        text_encoder, tokenizer = builtin, None
    return ModelFolder(root, root / "unet", root / "vae", scheduler, text_encoder, tokenizer)


def _builtin_text_encoder(index: dict, index_path: Path) -> str:
    """The text encoder named by model_index.json's "carrara" object (default "minilm"), checked for shape."""
    carrara = index.get("carrara", {})
    if not isinstance(carrara, dict):
        raise CarraraError(f'{index_path}: "carrara" must be an object like {{"text_encoder": "minilm"}}, '
                           f"got {json.dumps(carrara)[:60]}")
    name = carrara.get("text_encoder", "minilm")
    if not isinstance(name, str) or not name:
        raise CarraraError(f'{index_path}: "carrara"."text_encoder" must be a text encoder name or folder, '
                           f"got {json.dumps(name)[:60]}")
    return name


def write_model_folder(root: Path, *, unet, vae_dir: Path | None = None, vae=None, scheduler_config: dict,
                       text_encoder: str, extra: dict | None = None) -> None:
    """Write unet/ (and vae/ from a model or a folder), scheduler/ and model_index.json into root."""
    root = Path(root)
    unet.save_pretrained(root / "unet")
    if vae is not None:
        vae.save_pretrained(root / "vae")
    elif vae_dir is not None and Path(vae_dir).resolve() != (root / "vae").resolve():
        (root / "vae").mkdir(parents=True, exist_ok=True)
        for f in Path(vae_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, root / "vae" / f.name)
    vae_class = read_json_object(root / "vae" / "config.json").get("_class_name", "AutoencoderKL")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "scheduler" / "scheduler_config.json",
                      {"_class_name": "DDIMScheduler", "clip_sample": False, **scheduler_config})
    write_json_atomic(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers" if vae_class == "AutoencoderKL" else "carrara", vae_class],  # or the pixel codec
        "scheduler": ["diffusers", "DDIMScheduler"],
        "carrara": {"text_encoder": text_encoder, **(extra or {})},
    })
