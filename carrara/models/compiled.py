"""The U-Net compiled ahead of time (AOTInductor): `carrara compile` pays the compilation once per machine kind, model
and precision, and every later process loads the package in a fraction of a second.

`torch.compile` compiles in the process that runs it (70–80 s per batch size for the default U-Net, docs/
performance.md), which a fresh `carrara generate` cannot afford. Here `torch.export` traces the U-Net at a few static
batch sizes (symbolic shapes lost most of compile's gain on the bf16 kind, docs/performance.md) and the model's fixed
text length; AOTInductor compiles each graph with
its weights into a `.pt2` package, written beside the model's `unet/` weights under a name that says what it was
compiled for: the precision, the CPU's vector ISA (a package compiled for AVX-512 would not run on an AVX2 CPU),
whether bf16 is native, the torch version, the weights' hash, frozen or not, the batch and the text length.

A package is *frozen* by default (inductor's `freezing`): the weights become constants of the compiled graph, so
oneDNN's convolutions and GEMMs get them prepacked in their blocked layouts and constant subgraphs are folded. That
is where compilation pays on the bf16 kind (AMD Zen 5, 2026-11-30, `bench/aot_freeze.py`: one batch-2 U-Net pass
15.1 ms frozen, 25.8 ms code-only, 26.1 ms eager; docs/performance.md), at the price of a copy of the weights in
every package (56 MB each for the default U-Net in bf16). `--no-freeze` makes code-only packages instead (AOTInductor's
`package_constants_in_so = False`): at load they are handed the eager U-Net's weights (`load_constants`), so five
batch sizes cost a few MB on disk. Either is for the weights it was compiled with (the name carries their hash),
and weights changed after loading (a LoRA merge) set it aside (`Pipeline.merge_loras`). A call pads its batch
to the next compiled size (repeating its last row; the padding's outputs are dropped) and runs larger batches in
chunks of the largest; another text length runs eager. `Pipeline.load` finds a package whose name matches (a path check: a model without one pays nothing).

Loading a package imports inductor's runtime, ~1.5 s: more than a one-image `carrara generate` takes on the bf16
kind. So a pipeline loads its package only once its process has asked for LOAD_AFTER_PASSES U-Net image-passes (a
guided step of one image is two): a one-shot generate of a few images stays eager and no slower; `carrara serve`,
`carrara eval` and batch jobs switch to the package after their first images. CARRARA_COMPILED=1 loads it at once,
0 never. A package that fails to load is one warning line, and the model runs eager.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from carrara.errors import CarraraError
from carrara.hardware import cpu_isa, cpu_supports_bf16

PACKAGE_DIR = "compiled"  # inside the model's unet/ folder
# `carrara compile` keeps a package only if its images are eager's within this mean |Δpixel| (fp32: float rounding
# of a different kernel order, ~0.01/255; bf16: bf16 rounding of fused ops)
COMPILED_TOLERANCE_255 = 1.0
# `carrara compile` keeps a package only if it is this much faster than eager, for one image or a batch of 16: on
# the AVX2 kind a fp32 package gave 0.98× for one image (eager reuses the text's keys and values; docs/performance.md)
MIN_SPEEDUP = 1.05
# U-Net image-passes a process runs eager before it loads its package: the ~1.5 s import against ~10 % of a 65 ms
# batch-2 pass on the AVX2 kind (fp32) and ~50 % of one on the bf16 kind (docs/performance.md): about 20 guided
# images at 20 steps
LOAD_AFTER_PASSES = 800


def package_prefix(model_hash: str, precision: str, frozen: bool) -> str:
    """The name of this machine kind's, model's and precision's packages, up to their batch size and text length."""
    bf16 = "-bf16native" if cpu_supports_bf16() else ""
    version = torch.__version__.split("+")[0]
    return f"unet-{precision}-{cpu_isa()}{bf16}-torch{version}-{model_hash}-{'frozen' if frozen else 'code'}-b"


def package_name(model_hash: str, precision: str, batch: int, tokens: int, frozen: bool = True) -> str:
    return f"{package_prefix(model_hash, precision, frozen)}{batch}x{tokens}.pt2"


def is_frozen(path: Path) -> bool:
    """Whether a package holds its weights (frozen) rather than taking them at load (code only), by its name."""
    return "-frozen-b" in path.name


def package_dirs(unet_folder: str | Path) -> list[Path]:
    """Where packages are kept, in the order they are looked for: beside the weights, then the user's cache (for a
    model folder that cannot be written, e.g. an installed package's)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carrara" / PACKAGE_DIR
    return [Path(unet_folder) / PACKAGE_DIR, cache]


def package_dir(unet_folder: str | Path) -> Path:
    """Where `carrara compile` writes: beside the weights if that folder can be written, else the user's cache."""
    beside, cache = package_dirs(unet_folder)
    return beside if os.access(unet_folder, os.W_OK) else cache


def find_packages(unet_folder: str | Path, model_hash: str, precision: str) -> dict[int, tuple[int, Path]]:
    """batch → (text length, path) of the packages compiled for this machine kind, model and precision (the first
    folder of package_dirs that has any; frozen packages before code-only ones)."""
    folders = [folder for folder in package_dirs(unet_folder) if folder.is_dir()]  # usually none: two stat calls
    for folder in folders:
        for frozen in (True, False):
            prefix, found = package_prefix(model_hash, precision, frozen), {}
            for path in sorted(folder.glob(f"{prefix}*.pt2")):
                batch, _, tokens = path.name[len(prefix):-len(".pt2")].partition("x")
                if batch.isdigit() and tokens.isdigit():
                    found[int(batch)] = (int(tokens), path)
            if found:
                return found
    return {}


class _Exported(nn.Module):
    """The U-Net with positional inputs only (what torch.export traces): x, t (B,), text states, and the pooled text
    embedding and a student's guidance embedding where the config has them."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.pooled = cfg.class_embed_type is not None
        self.student = cfg.time_cond_proj_dim is not None

    def forward(self, x, t, context, *extra):
        k = 0
        class_labels = timestep_cond = None
        if self.pooled:
            class_labels, k = extra[0], 1
        if self.student:
            timestep_cond = extra[k]
        return self.unet(x, t, context, class_labels=class_labels, timestep_cond=timestep_cond)


def _example(unet: nn.Module, dtype: torch.dtype, batch: int, tokens: int) -> tuple:
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype)
    t = torch.full((batch,), 500.0)
    args = [x, t, torch.randn(batch, tokens, cfg.cross_attention_dim, dtype=dtype)]
    if cfg.class_embed_type == "projection":
        args.append(torch.randn(batch, cfg.projection_class_embeddings_input_dim, dtype=dtype))
    elif cfg.class_embed_type is not None:
        args.append(torch.full((batch,), 100.0))
    if cfg.time_cond_proj_dim is not None:
        args.append(torch.randn(batch, cfg.time_cond_proj_dim))
    return tuple(args)


def compile_unet(unet: nn.Module, path: str | Path, *, batch: int, tokens: int, frozen: bool = True) -> float:
    """Export and compile `unet` (in the dtype of its weights) for one batch size and text length, its weights frozen
    into the package or (frozen=False) handed over at load; write the package to `path` atomically. Returns the
    seconds it took. CarraraError if this machine cannot compile (no C++ compiler) or the U-Net cannot be traced."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor import config as inductor_config

    path = Path(path)
    net = _Exported(unet.eval())
    args = _example(unet, next(unet.parameters()).dtype, batch, tokens)
    started = time.perf_counter()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # AOTInductor wants the .pt2 suffix
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own deprecation notices, not the user's business
            program = torch.export.export(net, args)
            path.parent.mkdir(parents=True, exist_ok=True)
            patch = {"freezing": frozen, "aot_inductor.package_constants_in_so": frozen}  # the module docstring
            with inductor_config.patch(patch):
                aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 (inductor raises many kinds; each is one line for the user)
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "compiler" in f"{type(e).__name__} {e}".lower() or isinstance(e, FileNotFoundError):
            raise CarraraError(f"cannot compile the U-Net here: {first} (AOTInductor needs a C++ compiler: "
                               "`apt-get install g++`); carrara runs it uncompiled") from None
        raise CarraraError(f"cannot compile the U-Net: {type(e).__name__}: {first}") from None
    return time.perf_counter() - started


def load_package(path: Path, weights: dict[str, torch.Tensor], *, frozen: bool):
    """A package, runnable: a frozen one holds its weights; a code-only one is handed `weights` (the `_Exported`
    U-Net's state dict) by name, all of them, without copies."""
    from torch._inductor import aoti_load_package

    run = aoti_load_package(str(path))
    if not frozen:
        run.load_constants({name: weights[name] for name in run.get_constant_fqns()}, check_full_update=True,
                           user_managed=True)
    return run


class CompiledUNet:
    """Loaded packages, called like the U-Net (the pipeline's keyword arguments): a batch is padded to the next
    compiled size, or split into chunks of the largest; another text length runs `eager`."""

    def __init__(self, packages: dict[int, tuple[int, Path]], config, eager: nn.Module):
        self.config, self.eager = config, eager
        self.tokens = {tokens for tokens, _ in packages.values()}
        weights = _Exported(eager).state_dict()  # the eager U-Net's weights as they are now
        self._run = {batch: load_package(path, weights, frozen=is_frozen(path))
                     for batch, (_, path) in sorted(packages.items())}
        self._class = config.class_embed_type  # "projection": a pooled text vector; "timestep": a noise level
        self._student = config.time_cond_proj_dim is not None

    def __call__(self, x, timestep, context, class_labels=None, timestep_cond=None):
        if context.shape[1] not in self.tokens:
            return self.eager(x, timestep, context, class_labels=class_labels, timestep_cond=timestep_cond)
        B = x.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        args = [x, t.expand(B) if t.numel() == 1 else t.float(), context.to(x.dtype)]
        if self._class == "projection":
            args.append(class_labels.to(x.dtype))
        elif self._class is not None:
            level = torch.as_tensor(class_labels, dtype=torch.float32).reshape(-1)
            args.append(level.expand(B) if level.numel() == 1 else level)
        if self._student:
            args.append(timestep_cond.float())
        largest, out = max(self._run), []
        for start in range(0, B, largest):
            rows = min(largest, B - start)
            size = min(b for b in self._run if b >= rows)
            chunk = [a[start:start + rows] for a in args]
            if size > rows:  # pad with copies of the last row; their outputs are dropped
                chunk = [torch.cat([a, a[-1:].expand(size - rows, *a.shape[1:])]) for a in chunk]
            result = self._run[size](*[a.contiguous() for a in chunk])
            out.append((result[0] if isinstance(result, (list, tuple)) else result)[:rows])
        return out[0] if len(out) == 1 else torch.cat(out)


class Package:
    """A pipeline's compiled U-Net: found at load, loaded once the process has done enough work (LOAD_AFTER_PASSES)."""

    def __init__(self, packages: dict[int, tuple[int, Path]], config, eager: nn.Module, load_after: int):
        self.packages, self.config, self.eager, self.load_after = packages, config, eager, load_after
        self.passes, self.unet, self.failed = 0, None, False

    def get(self, passes: int) -> CompiledUNet | None:
        """Count `passes` more U-Net image-passes; the compiled U-Net once it is worth loading, else None (eager)."""
        self.passes += passes
        if self.unet is None and not self.failed and self.passes >= self.load_after:
            self.unet = self._load()
            self.failed = self.unet is None
        return self.unet

    def _load(self) -> CompiledUNet | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return CompiledUNet(self.packages, self.config, self.eager)
        except Exception as e:  # noqa: BLE001 (a damaged or foreign package must not stop generation)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            folder = next(iter(self.packages.values()))[1].parent
            print(f"carrara: warning: cannot load the compiled U-Net in {folder} ({first}); running it uncompiled — "
                  "`carrara compile` makes it again", file=sys.stderr)
            return None


def find_package(unet_folder: str | Path, model_hash: str, precision: str, eager: nn.Module) -> Package | None:
    """The packages compiled for this machine kind, model and precision, or None (none compiled; CARRARA_COMPILED=0;
    an int8 U-Net). CARRARA_COMPILED=1 loads them at once (a damaged one: one warning line, then eager)."""
    mode = os.environ.get("CARRARA_COMPILED", "")
    if mode not in ("", "0", "1"):
        raise CarraraError(f"CARRARA_COMPILED={mode!r}: set it to 1 (load a compiled U-Net at once), 0 (never), or "
                           "leave it unset (once the process has done enough work)")
    if mode == "0" or precision not in ("fp32", "bf16"):
        return None
    packages = find_packages(unet_folder, model_hash, precision)
    if not packages:
        return None
    package = Package(packages, eager.config, eager, 0 if mode == "1" else LOAD_AFTER_PASSES)
    if mode == "1":
        package.get(0)
    return package
