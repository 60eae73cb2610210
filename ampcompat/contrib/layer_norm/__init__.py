"""``apex.contrib.layer_norm`` on native PyTorch: ``FastLayerNorm``."""
from .layer_norm import FastLayerNorm

__all__ = ["FastLayerNorm"]
