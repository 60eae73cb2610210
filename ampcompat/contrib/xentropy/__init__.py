"""``apex.contrib.xentropy`` on native PyTorch: ``SoftmaxCrossEntropyLoss`` (label smoothing, padding)."""
from .softmax_xentropy import SoftmaxCrossEntropyLoss

__all__ = ["SoftmaxCrossEntropyLoss"]
