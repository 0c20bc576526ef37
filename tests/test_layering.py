"""The package's shape: imports point down the layers and never in a cycle; a refactor keeps the default model's pixels.

Layers, lowest first (docs/architecture.md): foundation → data → text → models / diffusion → the cascade's
upsampler → pipeline → train / evaluate / export / families → recipe → interfaces (cli, serve, generate, demo).
A module may import its own layer and any lower one, never a higher one; train and evaluate, the two users of
everything below them, may not import each other.
"""
import ast
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import carrara

PACKAGE = Path(carrara.__file__).parent
DATA = Path(__file__).parent / "data"

LAYERS = [  # (rank, groups): a group is a module or a subpackage of carrara
    (0, ["errors", "fileio", "hardware", "images", "safeload", "png"]),
    (1, ["data"]),
    (2, ["text"]),
    (3, ["models", "diffusion", "modelfolder"]),
    (4, ["upsampler", "prior", "unclip", "student"]),
    (5, ["pipeline"]),
    (6, ["train", "evaluate", "export", "families"]),
    (7, ["recipe"]),
    (8, ["cli", "commands", "serve", "generate", "demo", "__main__", "__init__"]),
]
RANK = {group: rank for rank, groups in LAYERS for group in groups}
APART = {("train", "evaluate"), ("evaluate", "train"), ("models", "diffusion"), ("diffusion", "models")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def group_of(module: str) -> str:
    return module.split(".")[0]


def carrara_imports() -> dict[str, set[str]]:
    """module → the carrara modules it imports anywhere in its file (module level or inside functions)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "carrara":
                base = node.module.removeprefix("carrara").lstrip(".")
                for alias in node.names:  # `from carrara.x import y` imports carrara.x.y when y is a submodule
                    sub = PACKAGE.joinpath(*base.split("."), alias.name) if base else PACKAGE / alias.name
                    is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                    found.add(f"{base}.{alias.name}".lstrip(".") if is_module else base or "__init__")
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("carrara.") for a in node.names if a.name.startswith("carrara.")}
        edges[mod] = {m for m in found if m != mod}
    return edges


def test_every_module_has_a_layer():
    missing = sorted({group_of(m) for m in carrara_imports()} - set(RANK))
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


def test_imports_point_down_the_layers():
    upward = []
    for mod, targets in carrara_imports().items():
        g = group_of(mod)
        for target in targets:
            t = group_of(target)
            if RANK[t] > RANK[g] or (g, t) in APART:
                upward.append(f"{mod} → {target}")
    assert not upward, "imports that point up or sideways: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    edges = carrara_imports()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(mod: str, stack: list[str]) -> list[str] | None:
        state[mod] = 1
        for target in sorted(edges.get(mod, ())):
            if state.get(target) == 1:
                return stack + [mod, target]
            if target not in state and (cycle := visit(target, stack + [mod])):
                return cycle
        state[mod] = 2
        return None

    for mod in sorted(edges):
        if mod not in state and (cycle := visit(mod, [])):
            pytest.fail("import cycle: " + " → ".join(cycle[cycle.index(cycle[-1]):]))


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk is not vacuous: a data module importing the pipeline is reported (in a copy of the package's
    sources, so a test walking the real package at the same time never sees the probe)."""
    copy = tmp_path / "carrara"
    shutil.copytree(PACKAGE, copy, ignore=lambda folder, names: [n for n in names if n in ("assets", "static")
                                                                   or n.endswith((".pyc", ".png", ".json"))])
    (copy / "data" / "_layering_probe.py").write_text("from carrara.pipeline import Pipeline\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    with pytest.raises(AssertionError, match="data._layering_probe → pipeline"):
        test_imports_point_down_the_layers()


@pytest.mark.parametrize("reference, settings", [
    ("default-fp32-4prompts.png", {"prompts": ["cat face", "a happy kitty", "red heart", "snowman"], "steps": 20,
                                   "sampler": "dpmpp", "guidance": 4.0, "seed": 0}),
    ("default-fp32-ddim.png", {"prompts": ["cat face", "a happy kitty"], "steps": 6, "sampler": "ddim",
                               "guidance": 3.0, "seed": 5, "negative_prompt": "blurry"}),
])
def test_the_default_model_draws_what_it_drew_before_the_layering(reference, settings):
    """Same pixels as PNGs made by earlier code: first v1's (commit 51bbb68, before the layering), since the default
    became the v2 cascade its 128-px images (made at the commit that shipped it, fp32, AVX2 kernels) — base and
    upsampler both. Another CPU kind's fp32 kernels sum in another order, so a pixel may move by a level there; a
    changed formula moves many."""
    from carrara.pipeline import Pipeline

    pipe = Pipeline.load("default", precision="fp32")
    prompts = settings.pop("prompts")
    images = pipe(prompts, **settings)
    got = np.concatenate([np.asarray(im, dtype=np.int16) for im in images], axis=1)  # (128, 128·n, 3)
    want = np.asarray(Image.open(DATA / reference).convert("RGB"), dtype=np.int16)
    diff = np.abs(got - want)
    assert got.shape == want.shape
    assert (diff > 1).mean() < 0.005 and diff.mean() < 0.1, f"mean |Δ| {diff.mean():.3f}, max {diff.max()}"


def test_the_checker_sees_a_cycle():
    a, b = PACKAGE / "data" / "_probe_a.py", PACKAGE / "data" / "_probe_b.py"
    a.write_text("def f():\n    from carrara.data import _probe_b  # even a lazy import closes a cycle\n")
    b.write_text("from carrara.data import _probe_a\n")
    try:
        with pytest.raises(pytest.fail.Exception, match="_probe_a"):
            test_no_import_cycles()
    finally:
        a.unlink()
        b.unlink()
