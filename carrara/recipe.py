"""Recipes: typed dataclass configs, `--set key=value` overrides, and TOML files that run all stages."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import tomllib

from carrara.errors import CarraraError


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
    from carrara.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and int(ckpt.name.split("_")[1]) >= steps


def run_recipe(path: str | Path, out: str | Path, *, resume: bool = False, overrides: list[str] = (),
               progress: bool = True) -> dict:
    """Build the data, train the autoencoder, train the diffusion model, evaluate — skipping what is done."""
    from carrara.io import ensure_dir
    from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
    from carrara.train.diffusion import DiffusionRecipe, train_diffusion

    table = load_recipe_file(path)
    unknown = set(table) - {"data", "autoencoder", "diffusion", "eval"}
    if unknown:
        raise CarraraError(f"recipe {path}: unknown table(s) {sorted(unknown)}")
    out = ensure_dir(out)
    if not resume and any((out / d).exists() for d in ("autoencoder", "diffusion")):
        raise CarraraError(f"{out} already holds runs; pass --resume to continue them, or pick another --out")
    flat = flatten(table)
    for item in overrides:
        if "=" not in item:
            raise CarraraError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        flat[key.strip()] = _parse_value(value.strip())
    stage = {s: {k[len(s) + 1:]: v for k, v in flat.items() if k.startswith(s + ".")} for s in table.keys() | {
        "data", "autoencoder", "diffusion", "eval"}}

    data_cfg = {"dataset": "shapes", "n": 2000, "size": 64, "seed": 0, **stage["data"]}
    data_dir = out / "data"
    if not (data_dir / "metadata.jsonl").is_file():
        if data_cfg["dataset"] == "shapes":
            from carrara.data.shapes import build_shapes

            build_shapes(data_dir, n=data_cfg["n"], size=data_cfg["size"], seed=data_cfg["seed"], progress=progress,
                         overwrite=True)  # out/data is the recipe's own: no metadata.jsonl = an interrupted build
        elif data_cfg["dataset"] == "emoji":
            from carrara.data.emoji import build_emoji

            build_emoji(data_dir, size=data_cfg["size"], progress=progress, overwrite=True)
        else:
            data_dir = Path(data_cfg["dataset"])  # a user's own folder

    ae = apply_overrides(AutoencoderRecipe(data=str(data_dir), size=data_cfg["size"]), stage["autoencoder"])
    if not _stage_done(out / "autoencoder", ae.train.steps):
        train_autoencoder(ae, out / "autoencoder", resume=(out / "autoencoder" / "checkpoints").is_dir(),
                          progress=progress)
    dm = apply_overrides(DiffusionRecipe(data=str(data_dir), autoencoder=str(out / "autoencoder"),
                                         size=data_cfg["size"]), stage["diffusion"])
    if not _stage_done(out / "diffusion", dm.train.steps):
        train_diffusion(dm, out / "diffusion", resume=(out / "diffusion" / "checkpoints").is_dir(), progress=progress)
    print(f"model ready: {out / 'diffusion'}  (try: carrara generate \"a red circle\" --model {out / 'diffusion'})")
    return {"data": str(data_dir), "autoencoder": str(out / "autoencoder"), "diffusion": str(out / "diffusion")}
