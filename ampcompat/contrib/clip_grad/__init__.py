"""``apex.contrib.clip_grad`` on native PyTorch."""
from .clip_grad import clip_grad_norm_

__all__ = ["clip_grad_norm_"]
