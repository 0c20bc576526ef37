"""Sampling a trained family run the way `Pipeline` samples a diffusion model, so the same evaluation judges both.

A family run folder holds `family.json` (kind, the model's config, the text encoder's fingerprint, the
measurements of `report`) and `family.safetensors` (the EMA weights). `FamilyPipeline.load(run)(prompts,
seed=s)` gives one image per prompt, image i from seed s + i. Diffusion's settings (`steps`, `sampler`) mean
nothing here and are accepted and ignored; `guidance` is classifier-free guidance on the logits of the two
autoregressive families when they were trained with caption dropout, and ignored by the others.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carrara.errors import CarraraError
from carrara.families import build, config_for, family
from carrara.fileio import atomic_path, write_json_atomic
from carrara.images import to_pil
from carrara.pipeline import Pipeline
from carrara.text.encoder import TextEncoder

META = "family.json"
WEIGHTS = "family.safetensors"
GUIDED = ("ar", "igpt")  # families whose sampler takes classifier-free guidance
MAX_BATCH = 64


def is_family_run(path: str | Path) -> bool:
    """True for a folder written by train_family (what `carrara generate --model` should route here)."""
    return (Path(path) / META).is_file()


def save_family(out: Path, kind: str, model: torch.nn.Module, meta: dict) -> None:
    """Weights first, then family.json, each written to a temporary name and renamed."""
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    write_json_atomic(out / META, {"kind": kind, **meta})


def read_meta(run: Path) -> dict:
    try:
        meta = json.loads((run / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CarraraError(f"{run} is not a family run (no {META}): train one with `carrara train family`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CarraraError(f"cannot read {run / META}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CarraraError(f"{run / META} is not a family description (no config)")
    family(meta.get("kind"))  # an unknown kind is one clear line
    return meta


def load_model(run: str | Path) -> tuple[str, torch.nn.Module, dict]:
    """(kind, the EMA model in eval mode, family.json) of a trained family run."""
    run = Path(run)
    meta = read_meta(run)
    kind = meta["kind"]
    model = build(kind, config_for(kind, meta["config"]))
    try:
        state = load_file(str(run / WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CarraraError(f"cannot read {run / WEIGHTS}: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CarraraError(f"{run / WEIGHTS} does not fit its {META}: {str(e).splitlines()[0]}") from None
    return kind, model.eval(), meta


def draw(kind: str, model: torch.nn.Module, cond: torch.Tensor, null: torch.Tensor, seed: int,
         guidance: float = 1.0, **options) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1]; `null` (B, D) is the unconditional caption for the guided families."""
    if kind in GUIDED:
        options.update(guidance=guidance, uncond=null)
    return family(kind).sample(model, cond, seed, **options)


def load_any(path: str | Path, **options):
    """A family run's `FamilyPipeline`, or `Pipeline.load(path, **options)` for a diffusion model or cascade: what
    `carrara generate` and `carrara eval` load, so every family is judged like the diffusion models."""
    if is_family_run(path):
        if options.get("fast"):
            raise CarraraError(f"--fast samples a diffusion model's distilled student; {path} is a family model")
        if options.get("precision", "auto") not in ("auto", "fp32"):
            raise CarraraError(f"--precision {options['precision']} sets a diffusion model's U-Net; {path} is a family "
                               "model, which runs in fp32")
        return FamilyPipeline.load(path)
    return Pipeline.load(path, **options)


class FamilyPipeline:
    """Prompts → images with a trained family model, called like `Pipeline`."""

    def __init__(self, kind: str, model: torch.nn.Module, text_encoder: TextEncoder, meta: dict, model_hash: str = ""):
        self.kind, self.model, self.text_encoder, self.meta = kind, model, text_encoder, meta
        self.model_hash = model_hash
        self.precision = "fp32"  # recorded in PNG metadata like a diffusion model's
        self.guided = kind in GUIDED and float(meta.get("cond_dropout", 0.0)) > 0

    @classmethod
    def load(cls, run: str | Path) -> FamilyPipeline:
        run = Path(run)
        kind, model, meta = load_model(run)
        text_encoder = TextEncoder.load(meta.get("text_encoder", "minilm"))
        if isinstance(meta.get("text_encoder_fingerprint"), dict):
            text_encoder.check_fingerprint(meta["text_encoder_fingerprint"])
        digest = hashlib.sha256((run / WEIGHTS).read_bytes()).hexdigest()[:12]
        return cls(kind, model, text_encoder, meta, model_hash=digest)

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, *, guidance: float = 1.0, negative_prompt: str = "", seed: int = 0,
                 output: str = "pil", steps: int | None = None, sampler: str | None = None, **ignored):
        """One image per prompt, image i from seed + i; output "pil" or "tensor" (B, 3, H, W) in [−1, 1]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not 1 <= len(prompts) <= MAX_BATCH:
            raise CarraraError(f"give between 1 and {MAX_BATCH} prompts, got {len(prompts)}")
        if output not in ("pil", "tensor"):
            raise CarraraError(f"output must be 'pil' or 'tensor', got {output!r}")
        cond = self.text_encoder.pooled(prompts)  # (B, D)
        null = self.text_encoder.pooled([negative_prompt] * len(prompts))
        images = draw(self.kind, self.model, cond, null, seed, guidance if self.guided else 1.0)
        return images if output == "tensor" else to_pil(images)
