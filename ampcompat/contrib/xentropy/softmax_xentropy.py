"""``apex.contrib.xentropy.SoftmaxCrossEntropyLoss``: per-row softmax cross entropy with label smoothing.

For logits ``x`` (``[N, C]``) and labels ``y``, with ``lse = logsumexp(x)`` and ``s`` the smoothing::

    loss = (1 - s) * (lse - x[y]) + s * (lse - mean(x))     (0 where y == padding_idx)
    dloss/dx = grad * (softmax(x) - (1 - s) * onehot(y) - s / C)

As Apex's kernel: the losses are FP32 whatever the logits' dtype, the math runs in FP32, the logits'
gradient has the logits' dtype, and only ``lse`` is kept for the backward pass (not the probabilities).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["SoftmaxCrossEntropyLoss"]


def _check(logits: torch.Tensor, labels: torch.Tensor, half_to_float: bool) -> None:
    if logits.dim() != 2:
        raise RuntimeError(f"SoftmaxCrossEntropyLoss: logits must be 2-D [N, C]; got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.size(0) != logits.size(0):
        raise RuntimeError(f"SoftmaxCrossEntropyLoss: labels must be 1-D with one label per row of logits; got "
                           f"labels of shape {tuple(labels.shape)} for logits of shape {tuple(logits.shape)}")
    if labels.dtype != torch.long:
        raise RuntimeError(f"SoftmaxCrossEntropyLoss: labels must be torch.long; got {labels.dtype}")
    if logits.size(1) == 0:
        raise RuntimeError("SoftmaxCrossEntropyLoss: logits have no classes")
    if half_to_float and logits.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"SoftmaxCrossEntropyLoss: half_to_float=True needs FP16/BF16 logits; got {logits.dtype}")


class SoftmaxCrossEntropyLoss(torch.autograd.Function):
    """Apex's fused softmax cross entropy, called as ``SoftmaxCrossEntropyLoss.apply(...)``.

    ``apply(logits, labels, smoothing=0.0, padding_idx=0, half_to_float=False)`` returns the
    per-row FP32 losses (``[N]``), 0 for rows whose label is ``padding_idx``; reduce them yourself.
    ``half_to_float`` is accepted for FP16/BF16 logits (the result is FP32 either way, as in Apex).

    Raises:
        RuntimeError: for logits that are not 2-D, labels that are not 1-D ``long`` of matching
            length, or ``half_to_float`` with FP32/FP64 logits.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                padding_idx: int = 0, half_to_float: bool = False) -> torch.Tensor:
        _check(logits, labels, half_to_float)
        work = logits.float() if logits.dtype != torch.float64 else logits
        lse = torch.logsumexp(work, dim=1)
        picked = work.gather(1, labels.clamp(0, work.size(1) - 1).unsqueeze(1)).squeeze(1)
        losses = (1.0 - smoothing) * (lse - picked) + smoothing * (lse - work.mean(dim=1))
        padding = labels == padding_idx
        losses = losses.masked_fill(padding, 0.0).to(torch.promote_types(work.dtype, torch.float32))
        ctx.save_for_backward(logits, lse, labels)
        ctx.smoothing = float(smoothing)
        ctx.padding_idx = padding_idx
        return losses

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        logits, lse, labels = ctx.saved_tensors
        smoothing = ctx.smoothing
        grad = grad_loss.to(lse.dtype).masked_fill(labels == ctx.padding_idx, 0.0)
        probs = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(1))
        probs.sub_(smoothing / logits.size(1))
        probs.scatter_add_(1, labels.clamp(0, logits.size(1) - 1).unsqueeze(1),
                           torch.full_like(lse, -(1.0 - smoothing)).unsqueeze(1))
        grad_logits = (probs * grad.unsqueeze(1)).to(logits.dtype)
        return grad_logits, None, None, None, None
