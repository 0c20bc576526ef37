"""`carrara compile`: the U-Net compiled ahead of time (AOTInductor), loaded by later processes, equal to eager."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carrara.cli import main
from carrara.hardware import cpu_isa
from carrara.models.compiled import LOAD_AFTER_PASSES, PACKAGE_DIR, is_frozen, package_name
from carrara.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: "
                               "`make setup` installs g++ as root, else run `sudo apt-get install g++`")
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def compiled_run(tiny_diffusion_run, tmp_path_factory):
    """A copy of the tiny run with its fp32 U-Net compiled by `carrara compile`."""
    run = tmp_path_factory.mktemp("compiled") / "run"
    shutil.copytree(tiny_diffusion_run, run)
    assert main(["compile", "--model", str(run), "--precision", "fp32", "--keep", "--batches", "2,4"]) == 0
    return run


@pytest.fixture
def at_once(monkeypatch):
    monkeypatch.setenv("CARRARA_COMPILED", "1")  # load a package at once, not after LOAD_AFTER_PASSES


@needs_cxx
def test_compile_writes_a_package_named_for_this_machine_and_model(compiled_run, at_once):
    pipe = Pipeline.load(compiled_run, precision="fp32")
    tokens = pipe.text_encoder.max_length
    packages = sorted((compiled_run / "unet" / PACKAGE_DIR).iterdir())
    assert [p.name for p in packages] == [package_name(pipe.model_hash, "fp32", b, tokens) for b in (2, 4)]
    name = packages[0].name
    assert pipe.model_hash in name and f"-{cpu_isa()}" in name and f"torch{torch.__version__.split('+')[0]}" in name
    assert name.endswith(f"-b2x{tokens}.pt2")
    assert pipe.compiled.packages == {2: (tokens, packages[0]), 4: (tokens, packages[1])}
    assert pipe.compiled.unet is not None
    assert Pipeline.load(compiled_run, precision="bf16").compiled is None  # compiled for fp32 only


@needs_cxx
@pytest.mark.parametrize("prompts, guidance", [(PROMPTS, 4.0), (PROMPTS[:1], 1.0), (PROMPTS + ["a green star"], 4.0)],
                         ids=["batch 4", "batch 1 padded to 2", "batch 6 as 4 + 2"])
def test_the_compiled_unet_makes_eagers_images_and_is_the_one_used(compiled_run, at_once, monkeypatch, prompts,
                                                                   guidance):
    pipe = Pipeline.load(compiled_run, precision="fp32")
    fast = pipe(prompts, steps=4, seed=3, guidance=guidance, output="tensor")
    compiled, pipe.compiled = pipe.compiled, None
    eager = pipe(prompts, steps=4, seed=3, guidance=guidance, output="tensor")
    assert (fast - eager).abs().max() < 1e-4
    pipe.compiled = compiled

    def refuse(*a, **k):
        raise AssertionError("the eager U-Net ran")

    monkeypatch.setattr(pipe.unet, "forward", refuse)
    again = pipe(prompts, steps=4, seed=3, guidance=guidance, output="tensor")  # made by the packages alone
    assert torch.equal(again, fast)
    monkeypatch.setenv("CARRARA_COMPILED", "0")
    assert Pipeline.load(compiled_run, precision="fp32").compiled is None


@needs_cxx
def test_a_process_loads_its_package_once_it_has_done_enough_work(compiled_run):
    """A one-shot run stays eager (the package's import would cost more than it saves); the pass that reaches
    LOAD_AFTER_PASSES U-Net image-passes loads it."""
    pipe = Pipeline.load(compiled_run, precision="fp32")
    package = pipe.compiled
    assert package is not None and package.unet is None  # found, not loaded
    pipe(PROMPTS, steps=4, output="latent")  # 4 steps × 2 images × 2 (guidance) = 16 passes
    assert package.passes == 16 and package.unet is None
    pipe(PROMPTS[:1], steps=4, guidance=1.0, output="latent")  # w = 1: one pass per step
    assert package.passes == 20 and package.unet is None
    package.passes = LOAD_AFTER_PASSES - 16
    pipe(PROMPTS, steps=4, output="latent")
    assert package.unet is not None


@needs_cxx
def test_a_damaged_package_is_one_warning_and_eager(compiled_run, at_once, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(compiled_run, run)
    package = max((run / "unet" / PACKAGE_DIR).iterdir())
    package.write_bytes(package.read_bytes()[:1000])  # truncated
    pipe = Pipeline.load(run, precision="fp32")
    err = capsys.readouterr().err.strip().splitlines()
    assert pipe.compiled.failed and pipe.compiled.unet is None
    assert len(err) == 1 and err[0].startswith("carrara: warning: cannot load the compiled")
    assert pipe(PROMPTS[:1], steps=2, output="tensor").shape[0] == 1  # eager, and no second warning
    assert capsys.readouterr().err == ""


@needs_cxx
def test_merging_a_lora_sets_the_package_aside(compiled_run, at_once):
    pipe = Pipeline.load(compiled_run, precision="fp32")
    assert pipe.compiled is not None
    pipe.merge_loras([])  # the package holds the weights without the adapters
    assert pipe.compiled is None


def test_without_a_cxx_compiler_compile_is_one_error_line(tiny_diffusion_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_diffusion_run, run)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "carrara", "compile", "--model", str(run), "--precision", "fp32"],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [s for s in done.stderr.strip().splitlines() if s.startswith("carrara")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines[-1].startswith("carrara: error: cannot compile the U-Net"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not list((run / "unet").rglob("*.pt2")) and not list((run / "unet").rglob("*.tmp"))


@pytest.fixture(scope="module")
def code_run(tiny_diffusion_run, tmp_path_factory):
    """A copy of the tiny run with code-only packages (`carrara compile --no-freeze`)."""
    run = tmp_path_factory.mktemp("code") / "run"
    shutil.copytree(tiny_diffusion_run, run)
    assert main(["compile", "--model", str(run), "--precision", "fp32", "--keep", "--batches", "2",
                 "--no-freeze"]) == 0
    return run


@needs_cxx
def test_frozen_packages_hold_their_weights(compiled_run, at_once):
    """The default package is frozen: the weights are compiled into it (each is at least their size) and the name
    says so."""
    pipe = Pipeline.load(compiled_run, precision="fp32")
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    assert all(is_frozen(path) and path.stat().st_size > weights for _, path in pipe.compiled.packages.values())


@needs_cxx
def test_code_only_packages_are_handed_the_weights_and_make_eagers_images(code_run, at_once):
    """--no-freeze: a package holds the compiled code, not the weights: it is smaller than they are, it asks for
    every U-Net tensor by name at load, and its images are eager's."""
    pipe = Pipeline.load(code_run, precision="fp32")
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    tokens = pipe.text_encoder.max_length
    assert [p.name for _, p in pipe.compiled.packages.values()] == [
        package_name(pipe.model_hash, "fp32", 2, tokens, frozen=False)]
    assert all(path.stat().st_size < weights for _, path in pipe.compiled.packages.values())
    names = {f"unet.{k}" for k in pipe.unet.state_dict()}
    for run in pipe.compiled.unet._run.values():
        asked = set(run.get_constant_fqns())
        assert asked <= names and len(asked) > len(names) / 2
    fast = pipe(PROMPTS[:1], steps=4, seed=3, output="tensor")
    pipe.compiled = None
    assert (fast - pipe(PROMPTS[:1], steps=4, seed=3, output="tensor")).abs().max() < 1e-4


@needs_cxx
def test_frozen_packages_are_found_before_code_only_ones(compiled_run, code_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(compiled_run, run)
    for path in (code_run / "unet" / PACKAGE_DIR).iterdir():
        shutil.copy(path, run / "unet" / PACKAGE_DIR / path.name)
    pipe = Pipeline.load(run, precision="fp32")
    assert sorted(pipe.compiled.packages) == [2, 4]
    assert all(is_frozen(path) for _, path in pipe.compiled.packages.values())


def test_a_compile_stopped_after_its_packages_were_written_leaves_nothing(tiny_diffusion_run, tmp_path, monkeypatch,
                                                                         capsys):
    """Whatever stops `carrara compile` once packages exist (here: they do not load) removes them and the folder it
    made, so no later process finds a package that was never checked against eager."""
    import carrara.models.compiled as aot

    run = tmp_path / "run"
    shutil.copytree(tiny_diffusion_run, run)
    written = []

    def fake_compile(unet, path, *, batch, tokens, frozen):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a package")
        written.append(path)
        return 1.0

    monkeypatch.setattr(aot, "compile_unet", fake_compile)
    assert main(["compile", "--model", str(run), "--precision", "fp32", "--batches", "2,4"]) == 2
    assert len(written) == 2 and not any(p.exists() for p in written)
    assert not (run / "unet" / PACKAGE_DIR).exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("carrara")]
    assert err[-1].startswith("carrara: error: the packages compiled in 2 s do not load here")
