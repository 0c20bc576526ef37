"""Recipes: typed dataclass configs, `--set key=value` overrides, and TOML files that run all stages."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import tomllib

from carrara.data.emoji import build_emoji
from carrara.data.shapes import build_shapes
from carrara.errors import CarraraError
from carrara.fileio import ensure_dir
from carrara.models.codec import pixel_factor
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
from carrara.train.checkpoint import latest_checkpoint
from carrara.train.diffusion import DiffusionRecipe, train_diffusion
from carrara.train.upsampler import UpsamplerRecipe, train_upsampler
from carrara.upsampler import assemble_cascade


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(obj: Any, overrides: dict[str, Any] | list[str]) -> Any:
    """Set dotted fields of a (nested) dataclass: {"train.steps": 500} or ["train.steps=500"]."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise CarraraError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            pairs[key.strip()] = _parse_value(value.strip())
        overrides = pairs
    for key, value in overrides.items():
        node, parts = obj, key.split(".")
        for part in parts[:-1]:
            node = getattr(node, part, None) if dataclasses.is_dataclass(node) else (node or {}).get(part)
            if node is None:
                raise CarraraError(f"unknown setting {key!r}")
        last = parts[-1]
        if isinstance(node, dict):
            node[last] = value
        elif dataclasses.is_dataclass(node) and last in {f.name for f in dataclasses.fields(node)}:
            current = getattr(node, last)
            if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif current is not None and not isinstance(value, type(current)) and not (
                    isinstance(current, (dict, list)) or (value is None)):
                raise CarraraError(f"setting {key!r} expects {type(current).__name__}, got {value!r}")
            setattr(node, last, value)
        else:
            raise CarraraError(f"unknown setting {key!r}")
    return obj


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 5}} → {"train.steps": 5}: tables merge into the defaults, key by key."""
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_recipe_file(path: str | Path) -> dict:
    """Read a recipe TOML file ([data], [autoencoder], [diffusion], [eval] tables)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CarraraError(f"recipe {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise CarraraError(f"recipe {path}: invalid TOML ({e})") from None


def _stage_done(run_dir: Path, steps: int) -> bool:
    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and int(ckpt.name.split("_")[1]) >= steps


def _build_data(cfg: dict, folder: Path, size: int, progress: bool) -> Path:
    """The recipe's dataset at `size` in `folder` (built once), or the user's own folder named by `dataset`."""
    if cfg["dataset"] not in ("shapes", "emoji"):
        return Path(cfg["dataset"])  # a user's own folder, resized on load
    if not (folder / "metadata.jsonl").is_file():  # the recipe's own folder: no metadata.jsonl = an interrupted build
        if cfg["dataset"] == "shapes":
            build_shapes(folder, n=cfg["n"], size=size, seed=cfg["seed"], progress=progress, overwrite=True,
                         two_object_fraction=cfg.get("two_object_fraction", 0.5))
        else:
            build_emoji(folder, size=size, progress=progress, overwrite=True, categories=cfg.get("categories", False))
    return folder


STAGES = ("data", "autoencoder", "diffusion", "finetune", "upsampler", "eval")


def run_recipe(path: str | Path, out: str | Path, *, resume: bool = False, overrides: list[str] = (),
               progress: bool = True) -> dict:
    """Build the data, train the autoencoder, the diffusion model, (if the recipe has them) its fine-tune phase and
    the upsampler, skipping what is done; with an upsampler, `out/model` is the cascade (base + upsampler/).

    `[finetune]` continues the diffusion model as a second run (out/finetune, fresh optimizer and schedule): its keys
    override the diffusion stage's, and `categories = true` trains it on the emoji data with category captions
    (out/data-categories, `carrara data build emoji --categories`); `categories = "groups"` also with the CLDR
    subgroups' (out/data-groups, `--categories groups`)."""
    table = load_recipe_file(path)
    unknown = set(table) - set(STAGES)
    if unknown:
        raise CarraraError(f"recipe {path}: unknown table(s) {sorted(unknown)}")
    out = ensure_dir(out)
    if not resume and any((out / d).exists() for d in ("autoencoder", "diffusion", "finetune", "upsampler")):
        raise CarraraError(f"{out} already holds runs; pass --resume to continue them, or pick another --out")
    flat = flatten(table)
    for item in overrides:
        if "=" not in item:
            raise CarraraError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        flat[key.strip()] = _parse_value(value.strip())
    stage = {s: {k[len(s) + 1:]: v for k, v in flat.items() if k.startswith(s + ".")} for s in STAGES}

    data_cfg = {"dataset": "shapes", "n": 2000, "size": 64, "seed": 0, **stage["data"]}
    if (data_cfg.get("categories") or stage["finetune"].get("categories")) and data_cfg["dataset"] != "emoji":
        raise CarraraError("categories = true ([data] or [finetune]) applies to the emoji dataset only")
    for where in ("data", "finetune"):
        if stage[where].get("categories", False) not in (False, True, "kinds", "groups"):
            raise CarraraError(f"[{where}] categories = {stage[where]['categories']!r}: use true (the kinds' "
                               "captions) or \"groups\" (and the CLDR subgroups')")
    if "two_object_fraction" in data_cfg and data_cfg["dataset"] != "shapes":
        raise CarraraError("[data] two_object_fraction applies to the shapes dataset only")
    data_dir = _build_data(data_cfg, out / "data", data_cfg["size"], progress)

    ae_dir = Path(stage["autoencoder"].pop("from", out / "autoencoder"))  # `from`: reuse a finished autoencoder run
    ae = apply_overrides(AutoencoderRecipe(data=str(data_dir), size=data_cfg["size"]), stage["autoencoder"])
    fine_tune = bool(stage["diffusion"].get("from_model"))  # a fine-tune uses its model's own autoencoder
    pixels = pixel_factor(str(stage["diffusion"].get("autoencoder", ""))) is not None  # pixel space: no autoencoder
    if ae_dir == out / "autoencoder" and not (fine_tune or pixels) and not _stage_done(ae_dir, ae.train.steps):
        train_autoencoder(ae, ae_dir, resume=(ae_dir / "checkpoints").is_dir(), progress=progress)
    dm = apply_overrides(DiffusionRecipe(data=str(data_dir), autoencoder=str(ae_dir), size=data_cfg["size"]),
                         stage["diffusion"])
    if not _stage_done(out / "diffusion", dm.train.steps):
        train_diffusion(dm, out / "diffusion", resume=(out / "diffusion" / "checkpoints").is_dir(), progress=progress)
    base = out / "diffusion"
    if "finetune" in table:
        tune = dict(stage["finetune"])
        categories = tune.pop("categories", False)
        tune_data = data_dir
        if categories:
            folder = out / ("data-groups" if categories == "groups" else "data-categories")
            tune_data = _build_data({**data_cfg, "categories": categories}, folder, data_cfg["size"], progress)
        ft = apply_overrides(dataclasses.replace(copy.deepcopy(dm), data=str(tune_data), init_unet=str(base)), tune)
        if not _stage_done(out / "finetune", ft.train.steps):
            train_diffusion(ft, out / "finetune", resume=(out / "finetune" / "checkpoints").is_dir(),
                            progress=progress)
        base = out / "finetune"
    model = base
    if "upsampler" in table:
        up = apply_overrides(UpsamplerRecipe(), stage["upsampler"])
        if up.degrade == "autoencoder":  # the base's own autoencoder: what its images are decoded by
            if pixels:
                raise CarraraError(f"recipe {path}: [upsampler] degrade = 'autoencoder' needs a latent base; this "
                                   "one works in pixel space")
            up.degrade = f"autoencoder:{base}"  # the base model folder: its vae/
        up.data = str(_build_data(data_cfg, out / f"data{up.size}", up.size, progress))
        if not _stage_done(out / "upsampler", up.train.steps):
            train_upsampler(up, out / "upsampler", resume=(out / "upsampler" / "checkpoints").is_dir(),
                            progress=progress)
        model = out / "model"
        shutil.rmtree(model, ignore_errors=True)  # re-assembled from the finished stages every time
        assemble_cascade(base, out / "upsampler", model)
    try_it = f"--model {dm.from_model} --lora {model / 'lora.safetensors'}" if dm.lora_rank else f"--model {model}"
    print(f"model ready: {model}  (try: carrara generate \"a red circle\" {try_it})")
    return {"data": str(data_dir), "autoencoder": dm.autoencoder if pixels else str(ae_dir),
            "diffusion": str(base), "model": str(model)}
