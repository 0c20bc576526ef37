"""carrara: a readable text-to-image diffusion system (text encoder → latent diffusion → decoder)."""

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    """`from carrara import Pipeline` without importing torch on `import carrara` (the CLI stays fast)."""
    if name == "Pipeline":
        from carrara.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'carrara' has no attribute {name!r}")
