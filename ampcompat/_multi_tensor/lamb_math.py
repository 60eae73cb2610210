"""LAMB's arithmetic, shared by ``FusedLAMB``, ``FusedMixedPrecisionLamb`` and ``amp_C``'s LAMB kernels.

Apex computed LAMB in two stages, and so does this (``torch._foreach_*``, a few launches per list):

1. :func:`lamb_update_`: the gradient is unscaled (``inv_scale``) and clipped (divided by the global
   clip divisor), Adam's moments are updated in place, and the Adam-style update
   ``u = m/bc1 / (sqrt(v/bc2) + eps)`` is returned, the weight decay either inside the gradient (L2
   mode) or added to ``u`` (decoupled, AdamW mode).
2. :func:`apply_trust_ratio_`: ``p -= lr * ratio * u`` per tensor, ``ratio = ||p|| / ||u||`` (1 if either
   norm is 0) where the trust ratio applies: tensors with nonzero weight decay, or all with NVLAMB.

The lists passed in are of one device and are computed on as they are: callers give FP32 (or FP64)
working copies of half-precision tensors (``tensor_lists.Fp32Work``) and store the results back.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .. import _torch_compat
from .update_rules import adam_direction
from .tensor_lists import Fp32Work, as_fp32, group_indices, pick, stack_scalars

Tensors = Sequence[torch.Tensor]
Scalar = Union[float, torch.Tensor]

__all__ = ["lamb_", "lamb_mixed_precision_", "lamb_update_", "apply_trust_ratio_", "store_update_", "tensor_norms",
           "global_grad_norm", "clip_divisor"]


def lamb_update_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, *, beta1: float,
                 beta2: float, beta3: float, eps: float, weight_decay: Union[float, Sequence[float]],
                 adam_w_mode: bool, bias_correction1: Scalar, bias_correction2: Scalar,
                 grad_clip_divisor: torch.Tensor, inv_scale: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """LAMB's first stage: update the moments in place and return the update (before the trust ratio).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: one device's tensors (not modified but for the moments).
        beta3: the weight of the new gradient in the first moment (``1 - beta1`` with grad averaging, else 1).
        weight_decay: one factor, or one per tensor (per-tensor factors are decoupled: AdamW mode only).
        bias_correction1, bias_correction2: ``1 - beta**step`` (1 without bias correction); numbers or
            one-element tensors on the params' device.
        grad_clip_divisor: 0-dim tensor the (unscaled) gradients are divided by.
        inv_scale: multiplies the gradients first (a loss scale's reciprocal); None: 1.

    Returns:
        The per-tensor updates ``u`` (new tensors).
    """
    device = params[0].device
    scaled = list(grads) if inv_scale is None else _torch_compat.foreach_mul(grads, inv_scale.to(device).reshape(()))
    scaled = _torch_compat.foreach_div(scaled, grad_clip_divisor.to(device).reshape(()))
    per_tensor = not isinstance(weight_decay, (int, float))
    if per_tensor and not adam_w_mode:
        raise ValueError("per-tensor weight decay is decoupled (adam_w_mode=True) only")
    update = adam_direction(params, scaled, exp_avgs, exp_avg_sqs, beta1=beta1, new_grad_weight=beta3, beta2=beta2,
                            eps=eps, weight_decay=0.0 if per_tensor else weight_decay, adam_w_mode=adam_w_mode,
                            bias_correction1=bias_correction1, bias_correction2=bias_correction2)
    if per_tensor:
        decayed = [i for i, decay in enumerate(weight_decay) if decay != 0]
        if decayed:
            _torch_compat.foreach_add_(pick(update, decayed),
                                _torch_compat.foreach_mul(pick(params, decayed), [float(weight_decay[i]) for i in decayed]))
    return update


def apply_trust_ratio_(params: Tensors, updates: Tensors, *, lr: Scalar, trusted: Union[bool, Sequence[bool]],
                       param_norms: Optional[torch.Tensor] = None, update_norms: Optional[torch.Tensor] = None
                       ) -> None:
    """LAMB's second stage: ``p -= lr * ratio * u``, in place.

    Args:
        lr: the learning rate (a number, or a one-element tensor).
        trusted: whether the trust ratio ``||p|| / ||u||`` applies, to every tensor or per tensor; where it
            does not (or either norm is 0) the ratio is 1.
        param_norms, update_norms: 1-D FP32 tensors of the per-tensor norms (of the parameters before this
            step and of ``updates``); computed here when omitted and needed.
    """
    device = params[0].device
    applies = [trusted] * len(params) if isinstance(trusted, bool) else list(trusted)
    if not any(applies):
        if isinstance(lr, torch.Tensor):
            _torch_compat.foreach_sub_(params, _torch_compat.foreach_mul(updates, lr.to(device).reshape(())))
        else:
            _torch_compat.foreach_add_(params, updates, alpha=-lr)
        return
    p_norm = tensor_norms(params, device) if param_norms is None else param_norms.to(device)
    u_norm = tensor_norms(updates, device) if update_norms is None else update_norms.to(device)
    use = (p_norm != 0) & (u_norm != 0)
    if not all(applies):
        use = use & torch.tensor(applies, device=device)
    lr_value = lr.to(device).reshape(()) if isinstance(lr, torch.Tensor) else lr
    ratio = torch.where(use, p_norm / torch.where(use, u_norm, 1.0), 1.0) * lr_value
    _torch_compat.foreach_sub_(params, _torch_compat.foreach_mul(updates, list(ratio.unbind())))


def lamb_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, *, lr: Scalar, beta1: float,
          beta2: float, beta3: float, eps: float, weight_decay: float, adam_w_mode: bool, bias_correction1: Scalar,
          bias_correction2: Scalar, grad_clip_divisor: torch.Tensor, use_nvlamb: bool,
          inv_scale: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """One LAMB step on one device's tensors (both stages); returns the updates (before the trust ratio).

    See :func:`lamb_update_` and :func:`apply_trust_ratio_`; the trust ratio applies to every tensor when
    ``weight_decay != 0`` or ``use_nvlamb``.
    """
    trusted = use_nvlamb or weight_decay != 0
    param_norms = tensor_norms(params, params[0].device) if trusted else None
    update = lamb_update_(params, grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, beta3=beta3, eps=eps,
                          weight_decay=weight_decay, adam_w_mode=adam_w_mode, bias_correction1=bias_correction1,
                          bias_correction2=bias_correction2, grad_clip_divisor=grad_clip_divisor, inv_scale=inv_scale)
    apply_trust_ratio_(params, update, lr=lr, trusted=trusted, param_norms=param_norms)
    return update


def lamb_mixed_precision_(grads: Tensors, params: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                          model_params: Optional[Tensors], *, lr: Scalar, beta1: float, beta2: float, beta3: float,
                          eps: float, weight_decay: float, adam_w_mode: bool, bias_correction1: Scalar,
                          bias_correction2: Scalar, grad_clip_divisor: torch.Tensor,
                          inv_scale: Optional[torch.Tensor], use_nvlamb: bool) -> None:
    """One LAMB step as Apex's ``multi_tensor_lamb_mp`` kernel, on one device's tensors of any dtypes.

    The math runs in FP32 whatever the storage dtypes. As in Apex, the update is stored into ``grads``
    (so it is rounded to the gradients' dtype), and that stored update is what the trust ratio is
    measured on and what is applied to ``params``; ``params``, ``exp_avgs`` and ``exp_avg_sqs`` keep their
    dtypes. With ``model_params`` (Apex's fifth list), ``params`` are FP32 master copies and the result is
    also copied into ``model_params`` (rounded to their dtype).
    """
    device = params[0].device
    trusted = use_nvlamb or weight_decay != 0
    weights, moments, second_moments = Fp32Work(params), Fp32Work(exp_avgs), Fp32Work(exp_avg_sqs)
    param_norms = tensor_norms(weights.values, device) if trusted else None
    update = lamb_update_(weights.values, as_fp32(grads), moments.values, second_moments.values, beta1=beta1,
                          beta2=beta2, beta3=beta3, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                          bias_correction1=bias_correction1, bias_correction2=bias_correction2,
                          grad_clip_divisor=grad_clip_divisor, inv_scale=inv_scale)
    moments.write_back()
    second_moments.write_back()
    store_update_(grads, update)
    apply_trust_ratio_(weights.values, update, lr=lr, trusted=trusted, param_norms=param_norms)
    weights.write_back()
    if model_params is not None:
        _torch_compat.foreach_copy_(list(model_params), weights.values)


def store_update_(grads: Tensors, update: Tensors) -> None:
    """Write ``update`` into ``grads``, as Apex's mixed-precision kernels did, and round ``update`` in place to
    what was stored (the gradients' dtype): the stored update is the one applied."""
    _torch_compat.foreach_copy_(list(grads), list(update))
    rounded = [i for i, (g, u) in enumerate(zip(grads, update)) if g.dtype != u.dtype]
    if rounded:
        _torch_compat.foreach_copy_(pick(update, rounded), pick(grads, rounded))


def tensor_norms(tensors: Tensors, device: torch.device) -> torch.Tensor:
    """Per-tensor L2 norms of one device's ``tensors`` as one 1-D FP32 tensor on ``device``."""
    return stack_scalars(_torch_compat.foreach_norm(list(tensors)), device)


def global_grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm (FP32, 0-dim, on the first parameter's device) of all ``params``' gradients together."""
    device = params[0].device
    squares = []
    for indices in group_indices(params).values():
        norms = _torch_compat.foreach_norm([p.grad for p in pick(params, indices)], 2, dtype=torch.float32)
        squares.append(stack_scalars(norms, device).square().sum())
    return torch.stack(squares).sum().sqrt()


def clip_divisor(norm: torch.Tensor, max_norm: Scalar) -> torch.Tensor:
    """``norm / max_norm`` where ``norm`` exceeds ``max_norm``, else 1 (what LAMB divides gradients by)."""
    return torch.where(norm > max_norm, norm / max_norm, torch.ones_like(norm))
