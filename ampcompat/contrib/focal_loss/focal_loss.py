"""``apex.contrib.focal_loss``: RetinaNet's sigmoid focal loss (Apex's fused kernel), in plain PyTorch ops.

Per element of ``cls_output`` (``[..., C]`` logits) with ``sigma = sigmoid(x)``, for the example's
label ``y`` (``>= 0`` a class, ``-1`` background, ``-2`` ignored) and smoothing ``s``::

    positive (class == y):   target t = 1 - s/2,  factor alpha * (1 - sigma)**gamma
    negative:                target t = s/2,      factor (1 - alpha) * sigma**gamma
    loss = sum(factor * BCE_with_logits(x, t)) / num_positives_sum

Ignored examples and classes ``>= num_real_classes`` (padding) contribute nothing. The loss is an FP32
scalar and the math runs in FP32; the gradient has the logits' dtype (as the kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FocalLoss", "focal_loss"]


def _check(cls_output: torch.Tensor, targets: torch.Tensor, num_positives_sum: torch.Tensor,
           num_real_classes: int) -> None:
    if targets.dtype != torch.long:
        raise RuntimeError(f"focal_loss: labels must be torch.long; got {targets.dtype}")
    if cls_output.dim() != targets.dim() + 1 or cls_output.shape[:-1] != targets.shape:
        raise RuntimeError(f"focal_loss: cls_output must be labels' shape plus a class dimension; got "
                           f"{tuple(cls_output.shape)} and {tuple(targets.shape)}")
    if not 0 < num_real_classes <= cls_output.size(-1):
        raise RuntimeError(f"focal_loss: num_real_classes must be in 1..{cls_output.size(-1)}; got {num_real_classes}")
    if not isinstance(num_positives_sum, torch.Tensor) or num_positives_sum.numel() != 1:
        raise RuntimeError("focal_loss: num_positives_sum must be a one-element tensor")


def _focal_loss(cls_output: torch.Tensor, targets: torch.Tensor, num_positives_sum: torch.Tensor,
                num_real_classes: int, alpha: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    _check(cls_output, targets, num_positives_sum, num_real_classes)
    with torch.autocast(cls_output.device.type, enabled=False):
        x = cls_output.float()
        classes = torch.arange(x.size(-1), device=x.device)
        positive = (targets.unsqueeze(-1) == classes) & (targets.unsqueeze(-1) >= 0)
        counted = (targets.unsqueeze(-1) != -2) & (classes < num_real_classes)
        target = torch.where(positive, 1.0 - label_smoothing / 2, label_smoothing / 2)
        bce = F.softplus(-x) + (1.0 - target) * x
        sigma = torch.sigmoid(x)
        factor = torch.where(positive, alpha * (1.0 - sigma) ** gamma, (1.0 - alpha) * sigma ** gamma)
        losses = torch.where(counted, factor * bce, torch.zeros_like(x))
        return losses.sum() / num_positives_sum.reshape(()).to(device=x.device, dtype=torch.float32)


class FocalLoss:
    """Apex's autograd-function call form: ``FocalLoss.apply(cls_output, cls_targets_at_level,
    num_positives_sum, num_real_classes, alpha, gamma, label_smoothing=0.0)``; autograd differentiates
    the formula above (the kernel's hand-written gradient is that derivative)."""

    @staticmethod
    def apply(cls_output: torch.Tensor, cls_targets_at_level: torch.Tensor, num_positives_sum: torch.Tensor,
              num_real_classes: int, alpha: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
        return _focal_loss(cls_output, cls_targets_at_level, num_positives_sum, num_real_classes, alpha, gamma,
                           label_smoothing)


def focal_loss(cls_output: torch.Tensor, cls_targets_at_level: torch.Tensor, num_positive_sum: torch.Tensor,
               num_real_classes: int, alpha: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Apex's fused focal loss (see the module docstring).

    Args:
        cls_output: logits ``[..., C]`` (FP16/BF16/FP32), C possibly padded beyond ``num_real_classes``.
        cls_targets_at_level: ``long`` labels of ``cls_output``'s leading shape.
        num_positive_sum: one-element tensor the summed loss is divided by.
        num_real_classes: classes counted (the rest are padding).
        alpha: weight of the positives (``1 - alpha`` for the negatives).
        gamma: focusing exponent.
        label_smoothing: target smoothing ``s``.

    Returns:
        The loss, an FP32 scalar.

    Raises:
        RuntimeError: for mismatched shapes, non-``long`` labels, a bad ``num_real_classes`` or
            ``num_positive_sum``.
    """
    return _focal_loss(cls_output, cls_targets_at_level, num_positive_sum, num_real_classes, alpha, gamma,
                       label_smoothing)
