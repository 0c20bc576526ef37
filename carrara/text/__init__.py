"""Text encoders: prompt → token states for cross-attention."""
from carrara.text.encoder import TextEncoder

__all__ = ["TextEncoder"]
