"""``apex.contrib.group_norm`` on native PyTorch: ``GroupNorm`` (with the optional SiLU)."""
from .group_norm import GroupNorm

__all__ = ["GroupNorm"]
