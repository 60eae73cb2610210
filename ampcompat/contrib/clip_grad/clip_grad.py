"""``apex.contrib.clip_grad.clip_grad_norm_``: torch's own ``clip_grad_norm_`` (Apex fused the 2-norm on CUDA)."""
from __future__ import annotations

from typing import Iterable, Union

import torch

__all__ = ["clip_grad_norm_"]

_TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]


def clip_grad_norm_(parameters: _TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so their total norm is at most ``max_norm``.

    Same contract as Apex's (and ``torch.nn.utils.clip_grad_norm_``, which does the work with its
    foreach kernels): the norm is over all gradients together, the coefficient is
    ``max_norm / (norm + 1e-6)`` clamped at 1, and with no gradients the result is ``tensor(0.)``.

    Args:
        parameters: a tensor or tensors whose ``.grad`` is clipped (those without one are ignored).
        max_norm: the largest allowed total norm.
        norm_type: the p of the p-norm (``inf`` for the max norm).
        error_if_nonfinite: raise if the total norm is inf/NaN instead of scaling by it.

    Returns:
        The total norm before clipping (FP32 for FP16/FP32 gradients).

    Raises:
        RuntimeError: with ``error_if_nonfinite`` and a non-finite norm (torch's message).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.tensor(0.0)
    return torch.nn.utils.clip_grad_norm_(parameters, float(max_norm), norm_type=float(norm_type),
                                          error_if_nonfinite=error_if_nonfinite)
