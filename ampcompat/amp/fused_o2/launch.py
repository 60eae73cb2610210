"""Launching the fused O2 kernels: the read-only overflow check, and one fused step per param group.

Each function takes a :class:`~.plan.FusedPlan` whose gradients' table is current (``plan.set_grads``)
and launches one kernel per param group (the check: one for the whole plan), whatever the number of
tensors. Triton is imported on the first launch.

A step's launches are compiled, all of them, before the first one runs whenever one of them is a
specialisation this plan has not launched before: a kernel that fails to compile (no C compiler for
Triton's launcher, a GPU Triton cannot target) raises before anything of the step changed, so the caller
can take the unfused path instead.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from ... import _torch_compat
from .plan import FusedPlan

_kernels: Any = None


def kernels() -> Any:
    """The Triton kernels module (imported, and Triton with it, on first use)."""
    global _kernels
    if _kernels is None:
        from . import kernels as module  # noqa: PLC0415 - Triton is imported only when a fused step runs
        _kernels = module
    return _kernels


def _grads_ready(plan: FusedPlan) -> None:
    raise RuntimeError("The fused plan has no gradients yet: call plan.set_grads(...) before launching.")


def _check_call(plan: FusedPlan, kind: str, hyper_params: Sequence[Mapping[str, Any]]) -> None:
    if plan.kind != kind:
        raise ValueError(f"fused_{kind}_step needs a plan built from {'AdamTensors' if kind == 'adam' else 'SGDTensors'}.")
    if len(hyper_params) != len(plan.segments):
        raise ValueError(f"{len(hyper_params)} sets of hyper-parameters for {len(plan.segments)} param groups.")
    if plan.grad_table is None:
        _grads_ready(plan)


def _scalars(values: Sequence[Any], names: Sequence[str]) -> tuple:
    """``values`` as Python floats (CPU tensors read), refusing device tensors (one call for a launch's all)."""
    floats = []
    for value, name in zip(values, names):
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise ValueError(f"{name} is a tensor on {value.device}; the fused step takes it as a number "
                                 "(use a Python float or a CPU tensor).")
            value = value.item()
        floats.append(float(value))
    return tuple(floats)


_ADAM_SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay")
_SGD_SCALARS = ("lr", "momentum", "dampening", "weight_decay")


def check_finite_(plan: FusedPlan, inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """Set ``found_inf`` to 1.0 if any gradient of ``plan``, unscaled by ``inv_scale``, is inf or NaN.

    Reads the gradients once and writes nothing but the flag (which is never cleared here, so several
    checks accumulate into it, as ``torch._amp_foreach_non_finite_check_and_unscale_`` does). One launch.

    Args:
        plan: the tensors, with this step's gradients set.
        inv_scale: one-element float32 tensor on the plan's device, ``1 / loss scale``.
        found_inf: one-element float32 tensor on the plan's device.
    """
    if plan.grad_table is None:
        _grads_ready(plan)
    if not plan.chunk_count:
        return
    k = _kernels or kernels()
    options = dict(GRAD=k.TRITON_DTYPES[plan.grad_dtype], ALIGNED=plan.aligned, CHUNK=plan.chunk, BLOCK=plan.block,
                   num_warps=plan.num_warps)
    _launch_all(k, k.nonfinite_kernel, plan, [((plan.chunk_count,), (
        plan.tensor_table, plan.grad_table, plan.chunk_table, inv_scale, found_inf), options)])


def fused_adam_step(plan: FusedPlan, hyper_params: Sequence[Mapping[str, Any]], *, decoupled: bool,
                    inv_scale: torch.Tensor, found_inf: Optional[torch.Tensor]) -> None:
    """One Adam (``decoupled=False``) or AdamW step of every tensor of ``plan``, from its unscaled gradients.

    Per element: ``g = grad * inv_scale``; masters, ``exp_avg``, ``exp_avg_sq`` and ``step`` updated as
    torch's fused Adam/AdamW kernel does; the half model weight written from the new master. With
    ``found_inf`` nonzero on the device nothing changes, step counts included (torch's fused optimizers
    skip the same way). CPU ``step`` tensors (torch's default Adam) are advanced here on the host, so
    they need the verdict on the host: ``found_inf`` must then be None.

    Args:
        plan: an Adam plan with this step's gradients set.
        hyper_params: per param group, a mapping with torch's keys ``lr``, ``betas``, ``eps``,
            ``weight_decay`` and optionally ``maximize`` (e.g. the optimizer's own ``param_groups``).
        decoupled: AdamW's decoupled weight decay (else Adam's L2 term added to the gradient).
        inv_scale: one-element float32 tensor on the plan's device: 1 / the scale the gradients carry.
        found_inf: one-element float32 tensor on the device (skip the step where nonzero), or None.

    Raises:
        ValueError: for a plan of another kind, a hyper-parameter list of another length, a tensor
            hyper-parameter on the device, or ``found_inf`` with CPU step counts.
    """
    _check_call(plan, "adam", hyper_params)
    if not plan.device_steps and found_inf is not None:
        raise ValueError("Adam's step counts are CPU tensors here: decide the overflow on the host and call "
                         "with found_inf=None only for a clean step.")
    launches = []  # every group is checked before any is stepped: a refusal leaves all tensors as they were
    for segment, hyper in zip(plan.segments, hyper_params):
        if segment.chunks is not None:
            beta1, beta2 = hyper["betas"]
            scalars = _scalars((hyper["lr"], beta1, beta2, hyper["eps"], hyper["weight_decay"]), _ADAM_SCALARS)
            launches.append((segment, scalars, bool(hyper.get("maximize", False))))
    k = _kernels or kernels()
    host_steps = plan.done  # a placeholder argument when the steps live on the device
    on_host = not plan.device_steps and plan.steps
    if on_host:  # the values after this step's advance, uploaded once the kernels are known to compile
        host_steps = torch.empty(len(plan.steps), dtype=torch.float32, device=plan.device)
    grad_dtype = k.TRITON_DTYPES[plan.grad_dtype]
    calls = [((segment.chunk_count,), (
        plan.tensor_table, plan.grad_table, segment.chunks, plan.done, host_steps, inv_scale,
        found_inf if found_inf is not None else inv_scale, *scalars), dict(
        GRAD=grad_dtype, MODEL=grad_dtype if plan.writes_model else k.PLACEHOLDER_DTYPE,
        WRITE_MODEL=plan.writes_model, DECOUPLED=bool(decoupled), MAXIMIZE=maximize,
        HAS_WD=scalars[4] != 0.0, SKIP_ON_INF=found_inf is not None, DEVICE_STEPS=plan.device_steps,
        ALIGNED=plan.aligned, LIBDEVICE=not k.INTERPRETED, CHUNK=plan.chunk, BLOCK=plan.block,
        num_warps=plan.num_warps)) for segment, scalars, maximize in launches]

    def advance_host_steps() -> None:
        _torch_compat.foreach_add_(plan.steps, 1)
        host_steps.copy_(torch.stack(plan.steps), non_blocking=True)

    _launch_all(k, k.adam_kernel, plan, calls, advance_host_steps if on_host else None)


def fused_sgd_step(plan: FusedPlan, hyper_params: Sequence[Mapping[str, Any]], *, inv_scale: torch.Tensor,
                   found_inf: Optional[torch.Tensor]) -> None:
    """One SGD step of every tensor of ``plan`` (momentum, dampening, Nesterov, weight decay, maximize).

    Per element as torch's fused SGD kernel, from ``grad * inv_scale``; the half model weight is written
    from the new master. With ``found_inf`` nonzero nothing changes. A param group whose momentum buffers
    the plan allocated takes its first step here (buffer = gradient); that step needs the verdict on the
    host (``found_inf`` None), as a skipped first step would leave the buffers unwritten.

    Args:
        plan: an SGD plan with this step's gradients set.
        hyper_params: per param group, a mapping with torch's keys ``lr``, ``momentum``, ``dampening``,
            ``nesterov``, ``weight_decay`` and optionally ``maximize``.
        inv_scale: one-element float32 tensor on the plan's device: 1 / the scale the gradients carry.
        found_inf: one-element float32 tensor on the device (skip the step where nonzero), or None.

    Raises:
        ValueError: for a plan of another kind, a hyper-parameter list of another length, a group whose
            momentum is nonzero but whose plan has no buffers (or the reverse), or ``found_inf`` with a
            first step pending.
    """
    _check_call(plan, "sgd", hyper_params)
    launches = []  # every group is checked before any is stepped: a refusal leaves all tensors as they were
    for index, (segment, hyper) in enumerate(zip(plan.segments, hyper_params)):
        if segment.chunks is None:
            continue
        scalars = _scalars((hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"]), _SGD_SCALARS)
        momentum = scalars[1]
        has_buffers = plan.groups[index].momentum_buffers is not None
        if (momentum != 0.0) != has_buffers:
            raise ValueError(f"Param group {index} has momentum {momentum} but its fused plan was built "
                             f"{'with' if has_buffers else 'without'} momentum buffers: build a new plan.")
        first = plan.first_step_pending[index]
        if first and found_inf is not None:
            raise ValueError(f"Param group {index} takes its first momentum step: decide the overflow on the host "
                             "and call with found_inf=None only for a clean step.")
        launches.append((index, segment, scalars, first, bool(hyper["nesterov"]), bool(hyper.get("maximize", False))))
    k = _kernels or kernels()
    grad_dtype = k.TRITON_DTYPES[plan.grad_dtype]
    calls = [((segment.chunk_count,), (
        plan.tensor_table, plan.grad_table, segment.chunks, inv_scale,
        found_inf if found_inf is not None else inv_scale, *scalars), dict(
        GRAD=grad_dtype, MODEL=grad_dtype if plan.writes_model else k.PLACEHOLDER_DTYPE,
        WRITE_MODEL=plan.writes_model, HAS_MOMENTUM=scalars[1] != 0.0, FIRST_STEP=first, NESTEROV=nesterov,
        MAXIMIZE=maximize, HAS_WD=scalars[3] != 0.0, SKIP_ON_INF=found_inf is not None, ALIGNED=plan.aligned,
        CHUNK=plan.chunk, BLOCK=plan.block, num_warps=plan.num_warps))
        for _, segment, scalars, first, nesterov, maximize in launches]
    _launch_all(k, k.sgd_kernel, plan, calls)
    for index, *_ in launches:
        plan.first_step_pending[index] = False


def _launch_all(k: Any, kernel: Any, plan: FusedPlan, calls: Sequence[tuple], before: Any = None) -> None:
    """Launch every ``(grid, args, options)`` of ``calls``; ``before()`` runs after compiling, before launching.

    Where a call is a specialisation (its compile-time options, the alignment of its tensor arguments)
    ``plan`` has not launched before, every call is compiled and loaded first (Triton's ``warmup``), so a
    kernel that cannot compile or load raises before anything changed.
    """
    if not k.INTERPRETED:
        keys = [(tuple(options.values()), tuple([a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor)]))
                for _, args, options in calls]
        known = plan.compiled
        for key in keys:
            if key not in known:
                for grid, args, options in calls:
                    compiled = kernel.warmup(*args, grid=grid, **options)
                    getattr(compiled, "run", None)  # loads the binary and builds its launcher now
                known.update(keys)
                break
    if before is not None:
        before()
    for grid, args, options in calls:
        kernel[grid](*args, **options)
