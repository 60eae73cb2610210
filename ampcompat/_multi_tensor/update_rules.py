"""Apex's fused-optimizer update rules, written with ``torch._foreach_*`` (a few launches per list).

Each function updates one list of parameters (one device, FP32 or FP64: callers upcast half tensors
with :class:`~ampcompat._multi_tensor.tensor_lists.Fp32Work`) and its state in place, following the
arithmetic of Apex's ``csrc/multi_tensor_{adam,sgd,adagrad,novograd}*.cu`` kernels (LAMB's is in
:mod:`.lamb_math`). Gradients are never modified (where a rule needs a modified gradient it works on a
new list).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

from .. import _torch_compat


Tensors = Sequence[torch.Tensor]


def adam_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, *,
          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, adam_w_mode: bool,
          bias_correction1: float, bias_correction2: float) -> None:
    """Adam (``adam_w_mode=False``: L2 added to the gradient) or AdamW (decay added to the update).

    ``p -= lr * (m/bc1 / (sqrt(v/bc2) + eps) [+ wd * p])`` with ``m``, ``v`` the usual moments.
    """
    update = adam_direction(params, grads, exp_avgs, exp_avg_sqs, beta1=beta1, new_grad_weight=1 - beta1,
                            beta2=beta2, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                            bias_correction1=bias_correction1, bias_correction2=bias_correction2)
    _torch_compat.foreach_add_(params, update, alpha=-lr)


def adam_direction(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, *,
                   beta1: float, new_grad_weight: float, beta2: float, eps: float, weight_decay: float,
                   adam_w_mode: bool, bias_correction1: Union[float, torch.Tensor],
                   bias_correction2: Union[float, torch.Tensor]) -> List[torch.Tensor]:
    """Update the moments in place and return ``m/bc1 / (sqrt(v/bc2) + eps)`` (+ ``wd * p`` in AdamW mode).

    ``m = beta1*m + new_grad_weight*g``; in L2 mode the decay is added to (a copy of) the gradient first.
    Shared by Adam and LAMB's first stage (:mod:`.lamb_math`).
    """
    if not adam_w_mode and weight_decay != 0:
        grads = _torch_compat.foreach_add(grads, params, alpha=weight_decay)
    _torch_compat.foreach_mul_(exp_avgs, beta1)
    _torch_compat.foreach_add_(exp_avgs, grads, alpha=new_grad_weight)
    _torch_compat.foreach_mul_(exp_avg_sqs, beta2)
    _torch_compat.foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = _torch_compat.foreach_div(exp_avg_sqs, bias_correction2)
    _torch_compat.foreach_sqrt_(denom)
    _torch_compat.foreach_add_(denom, eps)
    update = _torch_compat.foreach_div(exp_avgs, bias_correction1)
    _torch_compat.foreach_div_(update, denom)
    if adam_w_mode and weight_decay != 0:
        _torch_compat.foreach_add_(update, params, alpha=weight_decay)
    return update


def sgd_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float, weight_decay: float,
         momentum: float, dampening: float, nesterov: bool, wd_after_momentum: bool, first_run: bool) -> None:
    """SGD with momentum as Apex's kernel: ``v = m*v + (1-dampening)*g`` (``v = g`` on the first run).

    ``wd_after_momentum`` adds ``weight_decay * p`` after the momentum instead of to the gradient.
    ``momentum_buffers`` is ignored (and may be empty) when ``momentum == 0``.
    """
    d_p: List[torch.Tensor] = list(grads)
    if weight_decay != 0 and not wd_after_momentum:
        d_p = _torch_compat.foreach_add(d_p, params, alpha=weight_decay)
    if momentum != 0:
        if first_run:
            _torch_compat.foreach_copy_(momentum_buffers, d_p)
        else:
            _torch_compat.foreach_mul_(momentum_buffers, momentum)
            _torch_compat.foreach_add_(momentum_buffers, d_p, alpha=1 - dampening)
        if nesterov:
            d_p = _torch_compat.foreach_add(d_p, momentum_buffers, alpha=momentum)
        else:
            d_p = list(momentum_buffers)
    if weight_decay != 0 and wd_after_momentum:
        d_p = _torch_compat.foreach_add(d_p, params, alpha=weight_decay)
    _torch_compat.foreach_add_(params, d_p, alpha=-lr)


def adagrad_(params: Tensors, grads: Tensors, sums: Tensors, *, lr: float, eps: float, weight_decay: float,
             adagrad_w_mode: bool) -> None:
    """Adagrad: ``h += g*g; p -= lr * (g / (sqrt(h) + eps) [+ wd * p])`` (decay inside ``g`` unless w-mode)."""
    if not adagrad_w_mode and weight_decay != 0:
        grads = _torch_compat.foreach_add(grads, params, alpha=weight_decay)
    _torch_compat.foreach_addcmul_(sums, grads, grads, value=1)
    std = _torch_compat.foreach_sqrt(sums)
    _torch_compat.foreach_add_(std, eps)
    update = _torch_compat.foreach_div(grads, std)
    if adagrad_w_mode and weight_decay != 0:
        _torch_compat.foreach_add_(update, params, alpha=weight_decay)
    _torch_compat.foreach_add_(params, update, alpha=-lr)



def blend_grad_norms(previous: torch.Tensor, current: torch.Tensor, beta2: float, norm_type: int) -> torch.Tensor:
    """NovoGrad's per-tensor second moment: ``sqrt(b2*v^2 + (1-b2)*n^2)`` (L2) or ``b2*v + (1-b2)*n`` (inf)."""
    if norm_type == 0:
        return beta2 * previous + (1 - beta2) * current
    return torch.sqrt(beta2 * previous * previous + (1 - beta2) * current * current)


def novograd_(params: Tensors, grads: Tensors, exp_avgs: Tensors, grad_norms: torch.Tensor, *, lr: float,
              beta1: float, beta3: float, eps: float, weight_decay: float, reg_inside_moment: bool,
              bias_correction1: float, bias_correction2: float) -> None:
    """NovoGrad with the blended per-tensor gradient norms ``grad_norms`` (1-D, one entry per tensor).

    ``denom = grad_norms / bc2 + eps`` per tensor. With ``reg_inside_moment`` (Apex moment mode 0):
    ``m = b1*m + beta3*(g/denom + wd*p); p -= lr*m/bc1``; otherwise (mode 1):
    ``m = b1*m + beta3*g; p -= lr*(m/bc1/denom + wd*p)``.
    """
    denom = list((grad_norms / bias_correction2 + eps).unbind())
    if reg_inside_moment:
        normalized = _torch_compat.foreach_div(grads, denom)
        if weight_decay != 0:
            _torch_compat.foreach_add_(normalized, params, alpha=weight_decay)
        _torch_compat.foreach_mul_(exp_avgs, beta1)
        _torch_compat.foreach_add_(exp_avgs, normalized, alpha=beta3)
        _torch_compat.foreach_add_(params, exp_avgs, alpha=-lr / bias_correction1)
        return
    _torch_compat.foreach_mul_(exp_avgs, beta1)
    _torch_compat.foreach_add_(exp_avgs, grads, alpha=beta3)
    update = _torch_compat.foreach_div(exp_avgs, bias_correction1)
    _torch_compat.foreach_div_(update, denom)
    if weight_decay != 0:
        _torch_compat.foreach_add_(update, params, alpha=weight_decay)
    _torch_compat.foreach_add_(params, update, alpha=-lr)
