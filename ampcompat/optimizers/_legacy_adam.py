"""The 2019 ``FusedAdam`` step: Apex's pre-September-2019 arithmetic and ``step()`` arguments.

Until Apex 0.1's optimizer rework (and afterwards as ``apex.contrib.optimizers.FusedAdam``),
``FusedAdam.step(closure, grads, output_params, scale, grad_norms)`` took gradients from the caller
(typically ``FP16_Optimizer``: the model's FP16 gradients, still multiplied by the loss scale), updated
the FP32 parameters and wrote an FP16 copy into ``output_params``. Per element, with ``t`` the
parameter's step count::

    g = grad / combined_scale
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v + eps) if eps_inside_sqrt else sqrt(v) + eps
    step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t) if bias_correction else lr
    p -= step_size * (m / denom + weight_decay * p)

``combined_scale`` is ``scale``, times ``(grad_norm / scale + 1e-6) / max_grad_norm`` when that exceeds
one: the same clipping as ``torch.nn.utils.clip_grad_norm_(max_norm=max_grad_norm)`` on the unscaled
gradients, folded into the unscale.
"""
from __future__ import annotations

import math
import types
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import _torch_compat

from ._base import step_tensor
from .._multi_tensor.tensor_lists import LOW_PRECISION, Fp32Work, group_indices, pick

__all__ = ["legacy_adam_step", "per_group"]


def per_group(value: Any, num_groups: int, what: str) -> List[Any]:
    """Apex's reading of ``grads``/``output_params``: None, one flat list (one group), or a list per group.

    Raises:
        ValueError: if a list of lists does not have one entry per param group.
    """
    if value is None:
        return [None] * num_groups
    if isinstance(value, types.GeneratorType):
        return [list(value)]
    value = list(value)
    if value and not isinstance(value[0], (list, tuple)):
        groups: List[Any] = [value]
    else:
        groups = [list(v) if v is not None else None for v in value]
    if len(groups) != num_groups:
        raise ValueError(f"FusedAdam.step got {what} for {len(groups)} param groups; the optimizer has {num_groups}")
    return groups


def _combined_scale(scale: float, grad_norm: Optional[float], max_grad_norm: float) -> float:
    if max_grad_norm <= 0 or grad_norm is None:
        return scale
    clip = ((grad_norm / scale) + 1e-6) / max_grad_norm
    return clip * scale if clip > 1 else scale


def _group_norm(grads: Sequence[torch.Tensor]) -> float:
    """L2 norm of all ``grads`` together, accumulated in FP32 (one host sync)."""
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float32).to(grads[0].device) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(norms), 2))


def legacy_adam_step(optimizer: torch.optim.Optimizer, *, grads: Any, output_params: Any, scale: float,
                     grad_norms: Any, eps_inside_sqrt: bool) -> None:
    """Apply one 2019-style FusedAdam step to every param group of ``optimizer`` (see the module docstring).

    Parameters with neither a ``.grad`` nor a passed gradient are skipped. Group options read:
    ``lr``, ``betas``, ``eps``, ``weight_decay``, ``bias_correction``, ``max_grad_norm`` (0 when absent).
    With ``max_grad_norm > 0`` and no ``grad_norms``, the group's gradient norm is computed here
    (Apex raised ``TypeError`` then).

    Raises:
        RuntimeError: for a sparse gradient (Apex's message).
        ValueError: for ``grads``/``output_params``/``grad_norms`` that do not match the param groups.
    """
    groups = optimizer.param_groups
    grads_per_group = per_group(grads, len(groups), "grads")
    outputs_per_group = per_group(output_params, len(groups), "output_params")
    norms = [None] * len(groups) if grad_norms is None else list(grad_norms)
    if len(norms) != len(groups):
        raise ValueError(f"FusedAdam.step got grad_norms for {len(norms)} param groups; "
                         f"the optimizer has {len(groups)}")
    scale = float(scale)
    for group, group_grads, group_outputs, grad_norm in zip(groups, grads_per_group, outputs_per_group, norms):
        params, param_grads, outputs = _members(group, group_grads, group_outputs)
        if not params:
            continue
        max_grad_norm = group.get("max_grad_norm", 0.0)
        if max_grad_norm > 0 and grad_norm is None:
            grad_norm = _group_norm(param_grads)
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        combined = _combined_scale(scale, grad_norm, max_grad_norm)
        states = [_init_state(optimizer, p) for p in params]
        for state in states:
            state["step"] += 1
        steps = [float(s["step"]) for s in states]
        buckets = group_indices(range(len(params)), key=lambda i: (params[i].device, params[i].dtype, steps[i]))
        for (_, _, step), members in buckets.items():
            _update(group, pick(params, members), pick(param_grads, members), pick(outputs, members),
                    pick(states, members), step, combined, eps_inside_sqrt)


def _members(group: Dict[str, Any], grads: Optional[List[Any]], outputs: Optional[List[Any]]):
    """The group's parameters that get a step, with their gradients and output copies (or None)."""
    group_params = group["params"]
    grads = grads if grads is not None else [None] * len(group_params)
    outputs = outputs if outputs is not None else [None] * len(group_params)
    params, param_grads, param_outputs = [], [], []
    for p, grad, out in zip(group_params, grads, outputs):
        if grad is None:
            grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("FusedAdam does not support sparse gradients, please consider SparseAdam instead")
        params.append(p)
        param_grads.append(grad)
        param_outputs.append(out)
    return params, param_grads, param_outputs


def _init_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Dict[str, Any]:
    state = optimizer.state[p]
    if len(state) == 0:
        dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
        state["step"] = step_tensor(0, torch.device("cpu"))
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    elif not isinstance(state["step"], torch.Tensor):  # an Apex checkpoint's int step
        state["step"] = step_tensor(float(state["step"]), torch.device("cpu"))
    return state


def _update(group: Dict[str, Any], params: List[torch.Tensor], grads: List[torch.Tensor],
            outputs: List[Optional[torch.Tensor]], states: List[Dict[str, Any]], step: float,
            combined_scale: float, eps_inside_sqrt: bool) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    if group["bias_correction"]:
        step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    else:
        step_size = lr
    weights = Fp32Work(params)
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    g = _torch_compat.foreach_div([x.to(exp_avgs[0].dtype) for x in grads], combined_scale)
    _torch_compat.foreach_mul_(exp_avgs, beta1)
    _torch_compat.foreach_add_(exp_avgs, g, alpha=1 - beta1)
    _torch_compat.foreach_mul_(exp_avg_sqs, beta2)
    _torch_compat.foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    if eps_inside_sqrt:
        denom = _torch_compat.foreach_add(exp_avg_sqs, eps)
        _torch_compat.foreach_sqrt_(denom)
    else:
        denom = _torch_compat.foreach_sqrt(exp_avg_sqs)
        _torch_compat.foreach_add_(denom, eps)
    update = _torch_compat.foreach_div(exp_avgs, denom)
    if weight_decay != 0:
        _torch_compat.foreach_add_(update, weights.values, alpha=weight_decay)
    _torch_compat.foreach_add_(weights.values, update, alpha=-step_size)
    weights.write_back()
    with_output = [i for i, out in enumerate(outputs) if out is not None]
    if with_output:
        _torch_compat.foreach_copy_(pick(outputs, with_output), pick(weights.values, with_output))
