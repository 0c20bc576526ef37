"""carrara: a readable text-to-image diffusion system (text encoder → latent diffusion → decoder)."""

__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    """`from carrara import Pipeline` without importing torch on `import carrara` (the CLI stays fast); the version
    comes from the installed package's metadata (pyproject.toml is its one source), looked up when asked."""
    if name == "Pipeline":
        from carrara.pipeline import Pipeline

        return Pipeline
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("carrara")
        except PackageNotFoundError:  # a source tree on sys.path that was never `pip install`ed
            return "0+unknown"
    raise AttributeError(f"module 'carrara' has no attribute {name!r}")
