"""The models `carrara serve` offers and the few it keeps loaded.

The choices are the packaged models (each folder under carrara/assets that `modelfolder.resolve` accepts: "default",
and "shapes" when a checkout has it), the model the server started with, and each sub-folder of `--models DIR` that
is a model folder (a diffusion run or a diffusers Stable Diffusion folder); a model with a distilled student beside it
(carrara/student.py) is offered twice, as NAME and as NAME-fast, the student. A model is loaded when a request first
names it; at most `max_loaded` stay in memory: the started one always (it carries the adapters `--lora` merged into
it), the others by least recent use.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carrara.errors import CarraraError
from carrara.modelfolder import PACKAGED, PACKAGED_BUDGET_MB, packaged, resolve
from carrara.student import has_student

MAX_LOADED = 2  # the started model and one other (~0.5 GB for two of the default's size); a third is loaded again


@dataclass(frozen=True)
class Choice:
    """One model the API and the page offer."""

    name: str  # what a request and the menu call it
    path: str  # what Pipeline.load takes: "default" or a folder
    ref: str  # what PNG metadata records as "model" ("default" or the absolute folder): `generate --from` loads it
    fast: bool = False  # the folder's few-step student (carrara/student.py), offered as "NAME-fast"


def is_model_folder(path: Path) -> bool:
    try:
        resolve(path)
    except CarraraError:
        return False
    return True


def _choice(name: str, path: Path | str) -> Choice:
    for shipped in PACKAGED_BUDGET_MB:
        if str(path) == shipped or Path(path).resolve() == (PACKAGED / shipped).resolve():
            return Choice(name, shipped, shipped)
    return Choice(name, str(path), str(Path(path).resolve()))


def discover(started: str, models_dir: str | Path | None = None) -> list[Choice]:
    """The started model first, then the packaged models, then the model folders in `models_dir`, each once, each
    named by its folder (a clash gets its parent's name in front: "runs/default")."""
    found = [_choice(started if packaged(started) else Path(started).resolve().name, started)]
    if PACKAGED.is_dir():
        found += [_choice(sub.name, sub) for sub in sorted(PACKAGED.iterdir()) if sub.is_dir() and is_model_folder(sub)]
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise CarraraError(f"--models {root}: no such folder" if not root.exists() else f"--models {root} is not a folder")
        found += [_choice(sub.name, sub) for sub in sorted(root.iterdir()) if sub.is_dir() and is_model_folder(sub)]
    choices: dict[str, Choice] = {}
    for choice in found:
        if any(c.ref == choice.ref for c in choices.values()):
            continue
        if choice.name in choices:
            choice = Choice(f"{Path(choice.ref).parent.name}/{choice.name}", choice.path, choice.ref)
        choices.setdefault(choice.name, choice)
    for choice in list(choices.values()):  # a teacher with its student beside it: the student is a choice too
        if has_student(packaged(choice.path) or Path(choice.path)) and fast_name(choice.name) not in choices:
            choices[fast_name(choice.name)] = Choice(fast_name(choice.name), choice.path, choice.ref, fast=True)
    return list(choices.values())


def fast_name(name: str) -> str:
    """The menu's name of a model's few-step student."""
    return f"{name}-fast"


class ModelStore:
    """Name → loaded pipeline, loading on first use; the started one stays, the others share max_loaded − 1 places
    by least recent use (with max_loaded 1, another model is loaded for each batch and dropped after it)."""

    def __init__(self, choices: list[Choice], first, load: Callable[[str], object], *, max_loaded: int = MAX_LOADED):
        self.choices = {c.name: c for c in choices}
        self.default = choices[0].name  # the model the server started with, `first`, already loaded
        self._load, self.max_loaded = load, max(1, max_loaded)
        self._loaded: OrderedDict[str, object] = OrderedDict({self.default: first})
        self._lock = threading.Lock()
        self.loads = 0  # models loaded after start-up

    def choice(self, name: str | None) -> Choice:
        """The named choice (None: the default), or a CarraraError naming the ones there are."""
        name = self.default if name is None else name
        if name not in self.choices:
            raise CarraraError(f"no model {name!r}; choose one of {', '.join(self.choices)} (GET /api/models)")
        return self.choices[name]

    def get(self, name: str | None = None):
        """The loaded pipeline of a choice, loading it (and dropping the least recently used other) if need be."""
        choice = self.choice(name)
        with self._lock:
            if choice.name in self._loaded:
                self._loaded.move_to_end(choice.name)
                return self._loaded[choice.name]
            pipe = self._load(choice.path, fast=True) if choice.fast else self._load(choice.path)
            self.loads += 1
            self._loaded[choice.name] = pipe
            while len(self._loaded) > self.max_loaded:
                del self._loaded[next(name for name in self._loaded if name != self.default)]
            return pipe

    def loaded(self) -> list[str]:
        """Names in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)
