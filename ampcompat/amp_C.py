"""``amp_C``: Apex's multi-tensor CUDA extension, on ``torch._foreach_*`` and torch's fused AMP kernels.

Same names, arguments, return values, flag semantics and in-place effects as Apex's ``csrc`` kernels,
on any device. Each op takes ``(chunk_size, noop_flag, tensor_lists, *args)``; ``chunk_size`` is
accepted and unused (chunking is the foreach kernels' business). ``noop_flag`` is Apex's int tensor:
ops that detect inf/NaN set it to 1 and never clear it. Tensors are processed in groups of one device
and dtype, a few kernel launches per group, with no host synchronisation, except where an op must decide
on the host what Apex's kernels decided on the device: ``multi_tensor_sgd`` and ``multi_tensor_lamb_mp``
read the flag to skip, ``multi_tensor_lamb_stage1_cuda`` reads its per-tensor decays. Math runs in FP32
for FP16/BF16 tensors.

Ops of Apex's extension that are not provided raise ``NotImplementedError`` naming the replacement.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from . import _torch_compat

from ._multi_tensor import lamb_math, update_rules
from ._multi_tensor.tensor_lists import (LOW_PRECISION, Fp32Work, as_fp32, flag_where, group_indices, non_finite,
                                       pick, stack_scalars)

TensorLists = Sequence[Sequence[torch.Tensor]]

__all__ = [
    "multi_tensor_scale", "multi_tensor_axpby", "multi_tensor_l2norm", "multi_tensor_l2norm_mp",
    "multi_tensor_l2norm_scale", "multi_tensor_unscale_l2norm", "update_scale_hysteresis", "multi_tensor_adam",
    "multi_tensor_sgd", "multi_tensor_adagrad", "multi_tensor_lamb", "multi_tensor_lamb_mp",
    "multi_tensor_lamb_stage1_cuda", "multi_tensor_lamb_stage2_cuda", "multi_tensor_novograd",
]


def _check_lists(tensor_lists: TensorLists, depths: Tuple[int, ...]) -> List[List[torch.Tensor]]:
    """Apex's ``multi_tensor_apply`` checks (same ``RuntimeError`` texts); returns the lists as lists."""
    if len(tensor_lists) not in depths:
        raise RuntimeError("tensor_lists.size() != depth")
    lists = [list(tensors) for tensors in tensor_lists]
    if len(lists[0]) == 0:
        raise RuntimeError("tensor_lists[0].size() is not > 0")
    for tensors in lists:
        if len(tensors) != len(lists[0]):
            raise RuntimeError("Size mismatch among tensor lists")
        for tensor, first in zip(tensors, lists[0]):
            if tensor.numel() != first.numel():
                raise RuntimeError("Size mismatch")
    return lists


def _as_c_float(value: float) -> float:
    """``value`` rounded to FP32, as Apex's kernels received their ``float`` arguments."""
    return float(torch.tensor(value, dtype=torch.float32))




def _accumulation_dtype(tensor: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a norm of ``tensor`` is accumulated in (None: its own).

    Apex accumulated in FP32 whatever the storage dtype. CUDA's foreach norm does the same; PyTorch's CPU
    norm kernel sums FP32 sequentially (relative errors ~5e-6 at 600k elements, outside FP32 tolerance),
    so on CPU half and FP32 tensors are accumulated in FP64 and the result rounded to FP32.
    """
    if tensor.dtype == torch.float64:
        return None
    if tensor.device.type == "cpu":
        return torch.float64
    return torch.float32 if tensor.dtype in LOW_PRECISION else None


def _per_tensor_norms(tensors: Sequence[torch.Tensor], device: torch.device, order: float = 2) -> torch.Tensor:
    """FP32 norms of ``tensors`` in list order, as one 1-D tensor on ``device`` (no host round trip)."""
    ordered: List[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for indices in group_indices(tensors).values():
        members = pick(tensors, indices)
        accumulate = _accumulation_dtype(members[0])
        extra = {"dtype": accumulate} if accumulate is not None else {}
        for i, norm in zip(indices, _torch_compat.foreach_norm(members, order, **extra)):
            ordered[i] = norm
    return stack_scalars(ordered, device)


@torch.no_grad()
def multi_tensor_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, scale: float) -> None:
    """``dst = src * scale`` for ``tensor_lists = [src, dst]`` (dtype converting; in place if ``dst is src``).

    The product is computed in FP32 and stored in ``dst``'s dtype. ``noop_flag`` is set to 1 if any
    ``src`` element is inf/NaN (the products are written regardless, as Apex did).
    """
    sources, destinations = _check_lists(tensor_lists, (2,))
    pairs = list(zip(sources, destinations))
    for (device, src_dtype, dst_dtype), indices in group_indices(
            pairs, key=lambda pair: (pair[0].device, pair[0].dtype, pair[1].dtype)).items():
        src, dst = pick(sources, indices), pick(destinations, indices)
        if src_dtype == dst_dtype and src_dtype != torch.bfloat16:  # no bf16 kernel for the check on CUDA
            if any(s is not d for s, d in zip(src, dst)):
                _torch_compat.foreach_copy_(dst, src)
            work = dst
        else:
            work_dtype = torch.float64 if torch.float64 in (src_dtype, dst_dtype) else torch.float32
            work = [torch.empty_like(s, dtype=work_dtype) for s in src]
            _torch_compat.foreach_copy_(work, src)
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        factor = torch.full((1,), scale, dtype=torch.float32, device=device)
        _torch_compat.amp_foreach_non_finite_check_and_unscale_(work, found_inf, factor)
        if work is not dst:
            _torch_compat.foreach_copy_(dst, work)
        flag_where(noop_flag, found_inf > 0)


@torch.no_grad()
def multi_tensor_axpby(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, a: float, b: float,
                       arg_to_check: int) -> None:
    """``out = a*x + b*y`` for ``tensor_lists = [x, y, out]`` (FP32 math, stored in ``out``'s dtype).

    ``noop_flag`` is set to 1 on inf/NaN in ``x`` and ``y`` (``arg_to_check=-1``), ``x`` only (0) or
    ``y`` only (1); any other value checks nothing.
    """
    xs, ys, outs = _check_lists(tensor_lists, (3,))
    a, b = _as_c_float(a), _as_c_float(b)
    for indices in group_indices(xs, key=lambda t: t.device).values():
        x, y, out = pick(xs, indices), pick(ys, indices), pick(outs, indices)
        checked = {-1: x + y, 0: x, 1: y}.get(arg_to_check, [])
        if checked:
            flag_where(noop_flag, non_finite(checked))
        result = _torch_compat.foreach_mul(as_fp32(x), a)
        _torch_compat.foreach_add_(result, as_fp32(y), alpha=b)
        _torch_compat.foreach_copy_(out, result)


def _norms_and_total(tensors: Sequence[torch.Tensor], per_tensor: Optional[bool],
                     factor: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    device = tensors[0].device
    norms = _per_tensor_norms(tensors, device)
    if factor is not None:
        norms = norms * factor.to(device=device, dtype=torch.float32).abs().reshape(())
    total = norms.square().sum().sqrt().reshape(1)
    per = norms if per_tensor else torch.empty(0, dtype=torch.float32, device=device)
    return total, per


@torch.no_grad()
def multi_tensor_l2norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists,
                        per_tensor: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2 norm of all tensors together, and of each when ``per_tensor``.

    Returns:
        ``(total, per_tensor_norms)``: FP32 on the first tensor's device; ``total`` has shape ``(1,)``,
        ``per_tensor_norms`` shape ``(len(tensors),)``, or ``(0,)`` without ``per_tensor``. ``noop_flag``
        is set to 1 if the norm is not finite (an inf/NaN element, or overflow).
    """
    (tensors,) = _check_lists(tensor_lists, (1,))
    total, per = _norms_and_total(tensors, per_tensor)
    flag_where(noop_flag, ~torch.isfinite(total))
    return total, per


multi_tensor_l2norm_mp = multi_tensor_l2norm  # Apex's mixed-dtype-list variant: this one handles any mix


@torch.no_grad()
def multi_tensor_unscale_l2norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists,
                                inv_scale: torch.Tensor, per_tensor: Optional[bool] = None,
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`multi_tensor_l2norm` for the tensors multiplied by ``inv_scale`` (a 1-element tensor).

    The tensors themselves are not modified.
    """
    (tensors,) = _check_lists(tensor_lists, (1,))
    total, per = _norms_and_total(tensors, per_tensor, factor=inv_scale)
    flag_where(noop_flag, ~torch.isfinite(total))
    return total, per


@torch.no_grad()
def multi_tensor_l2norm_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, scale: float,
                              per_tensor: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``dst = src * scale`` for ``tensor_lists = [src, dst]``, and the L2 norms of ``src`` (before scaling).

    The products are computed in FP32 and stored in ``dst``'s dtype (in place if ``dst is src``).

    Returns:
        ``(total, per_tensor_norms)`` of ``src`` as :func:`multi_tensor_l2norm` returns them; ``noop_flag``
        is set to 1 if the norm is not finite (the products are written regardless, as Apex did).
    """
    sources, destinations = _check_lists(tensor_lists, (2,))
    total, per = _norms_and_total(sources, per_tensor)
    flag_where(noop_flag, ~torch.isfinite(total))
    factor = _as_c_float(scale)
    for indices in group_indices(sources, key=lambda t: t.device).values():
        _torch_compat.foreach_copy_(pick(destinations, indices), _torch_compat.foreach_mul(as_fp32(pick(sources, indices)), factor))
    return total, per


@torch.no_grad()
def update_scale_hysteresis(current_scale: torch.Tensor, growth_tracker: torch.Tensor,
                            hysteresis_tracker: torch.Tensor, found_inf: torch.Tensor, growth_factor: float,
                            backoff_factor: float, growth_interval: int, hysteresis: int) -> torch.Tensor:
    """Dynamic loss-scale update with hysteresis (``apex.transformer``'s scaler), in place, no host sync.

    With inf/NaN found (``found_inf > 0``): the hysteresis tracker counts down; while it stays above 0
    only the growth tracker is reset, once it reaches 0 the scale is multiplied by ``backoff_factor``
    (a result below FP32's normal range becomes 0, as Apex's fast-math kernel flushed it).
    Without: after ``growth_interval`` clean steps the scale grows by ``growth_factor`` (unless that
    overflows FP32) and the hysteresis tracker is reset to ``hysteresis``.

    Returns:
        ``current_scale`` (updated in place, like the trackers).
    """
    positive = found_inf > 0
    nonzero = found_inf != 0
    hysteresis_left = torch.where(positive, hysteresis_tracker - 1, hysteresis_tracker)
    tolerated = positive & (hysteresis_left > 0)
    back_off = ~tolerated & nonzero
    clean = ~tolerated & ~nonzero
    successful = growth_tracker + 1
    grow = clean & (successful == growth_interval)
    scale64 = current_scale.double()
    grown = (scale64 * growth_factor).float()
    backed_off = (scale64 * backoff_factor).float()
    # Apex's kernel is built with --use_fast_math: a backed-off scale below FP32's normal range flushes to 0.
    backed_off = torch.where(backed_off.abs() < torch.finfo(torch.float32).tiny, 0.0, backed_off)
    new_scale = torch.where(back_off, backed_off, torch.where(grow & torch.isfinite(grown), grown, current_scale))
    new_growth = torch.where(clean & ~grow, successful, torch.zeros_like(growth_tracker))
    new_hysteresis = torch.where(found_inf <= 0, torch.full_like(hysteresis_tracker, hysteresis), hysteresis_left)
    current_scale.copy_(new_scale)
    growth_tracker.copy_(new_growth)
    hysteresis_tracker.copy_(new_hysteresis)
    return current_scale


def _bias_corrections(bias_correction: int, beta1: float, beta2: float, step: int) -> Tuple[float, float]:
    if bias_correction == 1:
        return 1 - beta1 ** step, 1 - beta2 ** step
    return 1.0, 1.0


@torch.no_grad()
def multi_tensor_adam(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, lr: float,
                      beta1: float, beta2: float, epsilon: float, step: int, mode: int, bias_correction: int,
                      weight_decay: float) -> None:
    """Adam step on ``[grads, params, exp_avgs, exp_avg_sqs]`` (mode 0: L2, mode 1: AdamW), in place."""
    grads, params, exp_avgs, exp_avg_sqs = _check_lists(tensor_lists, (4,))
    bc1, bc2 = _bias_corrections(bias_correction, beta1, beta2, step)
    for indices in group_indices(params).values():
        p, m, v = (Fp32Work(pick(lst, indices)) for lst in (params, exp_avgs, exp_avg_sqs))
        update_rules.adam_(p.values, as_fp32(pick(grads, indices)), m.values, v.values, lr=lr, beta1=beta1,
                          beta2=beta2, eps=epsilon, weight_decay=weight_decay, adam_w_mode=mode == 1,
                          bias_correction1=bc1, bias_correction2=bc2)
        for work in (p, m, v):
            work.write_back()


@torch.no_grad()
def multi_tensor_sgd(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, wd: float,
                     momentum: float, dampening: float, lr: float, nesterov: bool, first_run: bool,
                     wd_after_momentum: bool, scale: float = 1.0) -> None:
    """SGD step on ``[grads, params, momentum_buffers(, half_param_copies)]``, in place.

    Gradients are multiplied by ``scale`` first; with a fourth list the updated parameters are also
    written into it (Apex's FP16 model copy). Nothing happens when ``noop_flag`` is set (one host read).
    """
    lists = _check_lists(tensor_lists, (3, 4))
    if bool(noop_flag.any()):
        return
    grads, params, buffers = lists[:3]
    for indices in group_indices(params).values():
        g = as_fp32(pick(grads, indices))
        if scale != 1.0:
            g = _torch_compat.foreach_mul(g, _as_c_float(scale))
        p = Fp32Work(pick(params, indices))
        m = Fp32Work(pick(buffers, indices) if momentum != 0 else [])
        update_rules.sgd_(p.values, g, m.values, lr=lr, weight_decay=wd, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, wd_after_momentum=wd_after_momentum, first_run=first_run)
        p.write_back()
        m.write_back()
        if len(lists) == 4:
            _torch_compat.foreach_copy_(pick(lists[3], indices), p.values)


@torch.no_grad()
def multi_tensor_adagrad(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, lr: float,
                         epsilon: float, mode: int, weight_decay: float) -> None:
    """Adagrad step on ``[grads, params, sums]`` (mode 0: L2, mode 1: decoupled decay), in place."""
    grads, params, sums = _check_lists(tensor_lists, (3,))
    for indices in group_indices(params).values():
        p, h = Fp32Work(pick(params, indices)), Fp32Work(pick(sums, indices))
        update_rules.adagrad_(p.values, as_fp32(pick(grads, indices)), h.values, lr=lr, eps=epsilon,
                             weight_decay=weight_decay, adagrad_w_mode=mode == 1)
        p.write_back()
        h.write_back()


@torch.no_grad()
def multi_tensor_lamb(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, lr: float,
                      beta1: float, beta2: float, epsilon: float, step: int, bias_correction: int,
                      weight_decay: float, grad_averaging: int, mode: int, global_grad_norm: torch.Tensor,
                      max_grad_norm: float, use_nvlamb: Optional[bool] = None) -> None:
    """LAMB step on ``[grads, params, exp_avgs, exp_avg_sqs]``, in place (mode 0: L2, mode 1: AdamW).

    As Apex's kernel, the gradients are overwritten with the Adam-style update (before the trust ratio).
    """
    grads, params, exp_avgs, exp_avg_sqs = _check_lists(tensor_lists, (4,))
    bc1, bc2 = _bias_corrections(bias_correction, beta1, beta2, step)
    norm = global_grad_norm.to(torch.float32).reshape(-1)[0]
    clip_divisor = torch.where(norm > max_grad_norm, norm / max_grad_norm, torch.ones_like(norm))
    for indices in group_indices(params).values():
        p, m, v = (Fp32Work(pick(lst, indices)) for lst in (params, exp_avgs, exp_avg_sqs))
        update = lamb_math.lamb_(
            p.values, as_fp32(pick(grads, indices)), m.values, v.values, lr=lr, beta1=beta1, beta2=beta2,
            beta3=1 - beta1 if grad_averaging == 1 else 1.0, eps=epsilon, weight_decay=weight_decay,
            adam_w_mode=mode == 1, bias_correction1=bc1, bias_correction2=bc2, grad_clip_divisor=clip_divisor,
            use_nvlamb=bool(use_nvlamb))
        for work in (p, m, v):
            work.write_back()
        _torch_compat.foreach_copy_(pick(grads, indices), update)


def _index(values: torch.Tensor, indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """``values[indices]`` as FP32 on ``device`` (a per-tensor table, e.g. norms, for one group of tensors)."""
    values = values.to(device=device, dtype=torch.float32).reshape(-1)
    first, last = indices[0], indices[-1]
    if list(indices) == list(range(first, last + 1)):  # one group, the usual case: no index tensor to upload
        return values[first:last + 1]
    return values.index_select(0, torch.tensor(list(indices), device=device))


@torch.no_grad()
def multi_tensor_lamb_mp(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists, lr: torch.Tensor,
                         beta1: float, beta2: float, epsilon: float, step: torch.Tensor, bias_correction: int,
                         weight_decay: float, grad_averaging: int, mode: int, global_grad_norm: torch.Tensor,
                         max_grad_norm: torch.Tensor, use_nvlamb: Optional[bool] = None,
                         found_inf: Optional[torch.Tensor] = None, inv_scale: Optional[torch.Tensor] = None) -> None:
    """``FusedMixedPrecisionLamb``'s kernel: LAMB on ``[grads, params, exp_avgs, exp_avg_sqs(, model_params)]``.

    ``lr``, ``step`` (int), ``global_grad_norm`` (of the still-scaled gradients), ``max_grad_norm`` (times
    the loss scale) and ``inv_scale`` are tensors, read on the device. With five lists the second holds
    FP32 masters and the fifth the reduced-precision model parameters they are copied into. As Apex's
    kernel: nothing happens when ``noop_flag`` is set (``found_inf`` is not read: callers copy it into
    the flag); a non-finite parameter norm sets the flag and skips the step, a non-finite update norm
    sets it after the moments and gradients were written and skips the parameter update; the gradients
    are overwritten with the update (in their dtype), and that stored update is what is applied. Math in
    FP32; three host reads of the flag per call.
    """
    lists = _check_lists(tensor_lists, (4, 5))
    grads, params, exp_avgs, exp_avg_sqs = lists[:4]
    model_params = lists[4] if len(lists) == 5 else None
    device = params[0].device
    param_norms = _per_tensor_norms(params, device)
    flag_where(noop_flag, ~torch.isfinite(param_norms.square().sum()))
    if bool(noop_flag.any()):
        return
    steps = step.to(device=device, dtype=torch.float32).reshape(())
    bc1, bc2 = (1 - beta1 ** steps, 1 - beta2 ** steps) if bias_correction == 1 else (1.0, 1.0)
    norm = global_grad_norm.to(device=device, dtype=torch.float32).reshape(-1)[0]
    clip = lamb_math.clip_divisor(norm, max_grad_norm.to(device=device, dtype=torch.float32).reshape(()))
    scale_back = None if inv_scale is None else inv_scale.to(device=device, dtype=torch.float32)
    buckets = group_indices(params).values()
    updates = []
    for indices in buckets:
        members = Fp32Work(pick(params, indices))
        moments, second_moments = Fp32Work(pick(exp_avgs, indices)), Fp32Work(pick(exp_avg_sqs, indices))
        update = lamb_math.lamb_update_(
            members.values, as_fp32(pick(grads, indices)), moments.values, second_moments.values, beta1=beta1,
            beta2=beta2, beta3=1 - beta1 if grad_averaging == 1 else 1.0, eps=epsilon, weight_decay=weight_decay,
            adam_w_mode=mode == 1, bias_correction1=bc1, bias_correction2=bc2, grad_clip_divisor=clip,
            inv_scale=scale_back)
        moments.write_back()
        second_moments.write_back()
        lamb_math.store_update_(pick(grads, indices), update)
        updates.append(update)
    update_norms = _per_tensor_norms(grads, device)
    flag_where(noop_flag, ~torch.isfinite(update_norms.square().sum()))
    if bool(noop_flag.any()):
        return
    trusted = bool(use_nvlamb) or weight_decay != 0
    for indices, update in zip(buckets, updates):
        members = Fp32Work(pick(params, indices))
        lamb_math.apply_trust_ratio_(members.values, update, lr=lr.to(device),
                                     trusted=trusted, param_norms=_index(param_norms, indices, device),
                                     update_norms=_index(update_norms, indices, device))
        members.write_back()
        if model_params is not None:
            _torch_compat.foreach_copy_(pick(model_params, indices), members.values)


@torch.no_grad()
def multi_tensor_lamb_stage1_cuda(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists,
                                  per_tensor_decay: torch.Tensor, step: int, beta1: float, beta2: float,
                                  epsilon: float, global_grad_norm: torch.Tensor, max_global_grad_norm: float) -> None:
    """LAMB's first stage on ``[grads, params, exp_avgs, exp_avg_sqs, updates]`` (Apex's 2019 two-kernel LAMB).

    The gradients are clipped by the global norm (divided by ``norm / max_global_grad_norm`` when that
    exceeds 1), the moments updated in place (``beta3 = 1 - beta1``), and
    ``m/bc1 / (sqrt(v/bc2) + eps) + per_tensor_decay[i] * p`` written to ``updates``, with the bias
    corrections of step ``step + 1``. Gradients and parameters are only read; ``noop_flag`` is neither
    read nor set, as in Apex. Math in FP32 (Apex's kernel computed in the parameters' dtype).

    Raises:
        RuntimeError: if ``per_tensor_decay`` has fewer entries than there are tensors.
    """
    grads, params, exp_avgs, exp_avg_sqs, updates = _check_lists(tensor_lists, (5,))
    decays = per_tensor_decay.reshape(-1).tolist()
    if len(decays) < len(params):
        raise RuntimeError(f"per_tensor_decay has {len(decays)} entries for {len(params)} tensors")
    next_step = step + 1
    bc1, bc2 = _as_c_float(1 - _as_c_float(beta1) ** next_step), _as_c_float(1 - _as_c_float(beta2) ** next_step)
    norm = global_grad_norm.to(torch.float32).reshape(-1)[0]
    for indices in group_indices(params).values():
        device = params[indices[0]].device
        moments, second_moments = Fp32Work(pick(exp_avgs, indices)), Fp32Work(pick(exp_avg_sqs, indices))
        update = lamb_math.lamb_update_(
            as_fp32(pick(params, indices)), as_fp32(pick(grads, indices)), moments.values, second_moments.values,
            beta1=beta1, beta2=beta2, beta3=1 - beta1, eps=epsilon, weight_decay=pick(decays, indices),
            adam_w_mode=True, bias_correction1=bc1, bias_correction2=bc2,
            grad_clip_divisor=lamb_math.clip_divisor(norm.to(device), _as_c_float(max_global_grad_norm)))
        moments.write_back()
        second_moments.write_back()
        _torch_compat.foreach_copy_(pick(updates, indices), update)


@torch.no_grad()
def multi_tensor_lamb_stage2_cuda(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists,
                                  per_tensor_param_norm: torch.Tensor, per_tensor_update_norm: torch.Tensor,
                                  lr: float, weight_decay: float, use_nvlamb: Optional[bool] = None) -> None:
    """LAMB's second stage on ``[params, updates]``: ``p -= lr * ratio * u`` in place.

    ``ratio = per_tensor_param_norm[i] / per_tensor_update_norm[i]`` when ``use_nvlamb`` or
    ``weight_decay != 0`` and both norms are nonzero, else 1. ``noop_flag`` is neither read nor set, as
    in Apex. Math in FP32.
    """
    params, updates = _check_lists(tensor_lists, (2,))
    trusted = bool(use_nvlamb) or weight_decay != 0
    for indices in group_indices(params).values():
        device = params[indices[0]].device
        members = Fp32Work(pick(params, indices))
        lamb_math.apply_trust_ratio_(members.values, as_fp32(pick(updates, indices)), lr=_as_c_float(lr),
                                     trusted=trusted, param_norms=_index(per_tensor_param_norm, indices, device),
                                     update_norms=_index(per_tensor_update_norm, indices, device))
        members.write_back()


@torch.no_grad()
def multi_tensor_novograd(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: TensorLists,
                          grad_norms: torch.Tensor, lr: float, beta1: float, beta2: float, epsilon: float,
                          step: int, bias_correction: int, weight_decay: float, grad_averaging: int,
                          moment_mode: int, norm_type: int) -> None:
    """NovoGrad step on ``[grads, params, exp_avgs]``; ``grad_norms`` (one FP32 entry per tensor) is blended
    with this step's gradient norms in place (norm_type 0: infinity norm, else L2)."""
    grads, params, exp_avgs = _check_lists(tensor_lists, (3,))
    bc1, bc2 = 1.0, 1.0
    if bias_correction == 1:
        bc1, bc2 = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    current = _per_tensor_norms(grads, grad_norms.device, math.inf if norm_type == 0 else 2)
    blended = update_rules.blend_grad_norms(grad_norms.float(), current, beta2, 0 if norm_type == 0 else 2)
    grad_norms.copy_(blended)
    per_tensor = blended.unbind()
    for indices in group_indices(params).values():
        device = params[indices[0]].device
        p, m = Fp32Work(pick(params, indices)), Fp32Work(pick(exp_avgs, indices))
        update_rules.novograd_(
            p.values, as_fp32(pick(grads, indices)), m.values,
            stack_scalars(pick(per_tensor, indices), device), lr=lr, beta1=beta1,
            beta3=1 - beta1 if grad_averaging == 1 else 1.0, eps=epsilon, weight_decay=weight_decay,
            reg_inside_moment=moment_mode == 0, bias_correction1=bc1, bias_correction2=bc2)
        p.write_back()
        m.write_back()


def _not_provided(name: str, replacement: str) -> Callable[..., Any]:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ampcompat.amp_C does not provide {}. {}".format(name, replacement))
    op.__name__ = name
    op.__doc__ = "Not provided: raises ``NotImplementedError`` ({})".format(replacement)
    return op


# Not called by any NVIDIA recipe surveyed (migration_guide.md, "amp_C ops NVIDIA's recipes call"): Apex's own
# FusedAdam(capturable=True) was their only caller, and ampcompat's FusedAdam runs torch's capturable Adam.
_USE_FUSED_ADAM = "Use ampcompat.optimizers.FusedAdam(capturable=True[, master_weights=True]) instead."

multi_tensor_adam_capturable = _not_provided("multi_tensor_adam_capturable", _USE_FUSED_ADAM)
multi_tensor_adam_capturable_master = _not_provided("multi_tensor_adam_capturable_master", _USE_FUSED_ADAM)
multi_tensor_lars = _not_provided(
    "multi_tensor_lars", "Use torch.optim.SGD wrapped in a LARC/LARS trust-ratio step instead.")
