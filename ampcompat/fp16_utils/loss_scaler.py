"""The pre-amp loss scalers of ``apex.fp16_utils``: ``LossScaler`` (static) and ``DynamicLossScaler``.

These are the *legacy* classes, distinct from amp's ``ampcompat.amp.scaler.LossScaler`` that
``FP16_Optimizer`` uses today. The trap legacy code relies on is kept: here ``loss_scale`` is a
**property**, there it is a method. Attribute names (``cur_scale``, ``cur_iter``,
``last_overflow_iter``, ``scale_factor``, ``scale_window``) are Apex's, and methods use nothing
else, so objects unpickled from old checkpoints (``apex.fp16_utils.loss_scaler.*``) work as-is.

Unlike Apex, ``DynamicLossScaler.has_overflow`` checks every gradient exactly (inf or NaN anywhere,
not "the float sum is not finite") with the fused non-finite kernel and one host sync in total.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..amp.scaler import any_non_finite

from .fp16util import to_python_float

__all__ = ["LossScaler", "DynamicLossScaler", "to_python_float"]


class _ScaledBackward:
    """What both legacy scalers share: ``loss_scale`` (a property over ``cur_scale``) and the backward."""

    cur_scale: float

    @property
    def loss_scale(self) -> float:
        """The current scale (a property, unlike amp's ``LossScaler.loss_scale()``)."""
        return self.cur_scale

    def scale_gradient(self, module: torch.nn.Module, grad_in, grad_out) -> tuple:
        """A backward hook body that multiplies every incoming gradient by the scale."""
        return tuple(self.loss_scale * g for g in grad_in)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backpropagate ``loss * loss_scale``."""
        (loss * self.loss_scale).backward(retain_graph=retain_graph)


class LossScaler(_ScaledBackward):
    """A static loss scale for the pre-amp ``FP16_Optimizer`` workflow.

    Args:
        scale: the loss scale (default 1).
    """

    def __init__(self, scale: float = 1) -> None:
        self.cur_scale = scale

    def has_overflow(self, params: Iterable[torch.Tensor]) -> bool:
        """Always False: a static scaler never reports overflow (Apex's behaviour)."""
        return False

    @staticmethod
    def _has_inf_or_nan(x: torch.Tensor) -> bool:
        return False

    def update_scale(self, overflow: bool) -> None:
        """No-op: the static scale never changes."""


class DynamicLossScaler(_ScaledBackward):
    """The pre-amp dynamic loss scale: shrink on overflow, grow after a clean window.

    ``update_scale(True)`` divides the scale by ``scale_factor`` (never below 1) and records the
    iteration; ``update_scale(False)`` multiplies it by ``scale_factor`` whenever the number of
    iterations since the last overflow is a multiple of ``scale_window``. Each call is one iteration.

    Args:
        init_scale: the first scale (default ``2**32``).
        scale_factor: the factor of every change (default 2).
        scale_window: clean iterations between increases (default 1000).
    """

    def __init__(self, init_scale: float = 2 ** 32, scale_factor: float = 2.0, scale_window: int = 1000) -> None:
        self.cur_scale = init_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = scale_factor
        self.scale_window = scale_window

    def has_overflow(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether any parameter's gradient holds inf or NaN (parameters without one are ignored).

        Args:
            params: tensors whose ``.grad`` is checked.

        Returns:
            True if at least one gradient is not finite.
        """
        return any_non_finite(p.grad for p in params if p.grad is not None)

    @staticmethod
    def _has_inf_or_nan(x: torch.Tensor) -> bool:
        return any_non_finite([x])

    def update_scale(self, overflow: bool) -> None:
        """Advance one iteration, shrinking the scale on overflow or growing it after a clean window."""
        if overflow:
            self.cur_scale = max(self.cur_scale / self.scale_factor, 1)
            self.last_overflow_iter = self.cur_iter
        elif (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
            self.cur_scale *= self.scale_factor
        self.cur_iter += 1

