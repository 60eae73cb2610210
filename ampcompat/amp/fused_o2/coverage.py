"""Where the fused O2 step applies: the device, Triton, and the optimizer options its kernels compute.

Each function answers with None when the fused step covers the case, else one sentence saying why not;
the caller then takes the unfused path (master gradients, ``GradScaler``-style unscale, the optimizer's
own ``step``). Triton is imported by the first :func:`unavailable_reason` call for a CUDA device, never
by ``import ampcompat``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch

_triton_error: Optional[str] = None
_triton_checked = False


def _triton_import_error() -> Optional[str]:
    global _triton_checked, _triton_error
    if not _triton_checked:
        _triton_checked = True
        try:
            from .launch import kernels  # noqa: PLC0415 - imports Triton

            kernels()
        except Exception as error:  # ImportError, or a Triton that does not match this torch
            _triton_error = f"Triton could not be imported ({type(error).__name__}: {error})"
    return _triton_error


def unavailable_reason(device: Any) -> Optional[str]:
    """Why the fused kernels cannot run on ``device`` (None when they can).

    They run on CUDA devices of compute capability 7.0 and newer with Triton importable, and on the CPU
    only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "the fused O2 kernels are verified on NVIDIA GPUs only, not on ROCm"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device)[0] < 7:
            return "Triton needs a GPU of compute capability 7.0 or newer"
    elif device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"the fused O2 kernels run on CUDA devices, not on {device.type}"
    return _triton_import_error()


_ADAM_FLAGS = ("amsgrad", "capturable", "differentiable")
_SGD_FLAGS = ("differentiable",)


def _device_tensor_option(group: dict, keys) -> Optional[str]:
    for key in keys:
        values = group.get(key)
        for value in values if isinstance(values, (tuple, list)) else (values,):
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                return f"{key} is a tensor on {value.device}"
    return None


def adam_not_covered(optimizer: Any) -> Optional[str]:
    """Why the fused kernel cannot step this optimizer (None for ``torch.optim.Adam``/``AdamW`` it covers).

    Covered: every form (for-loop, ``foreach``, ``fused``), ``weight_decay``, ``maximize``, Adam's L2
    decay and AdamW's decoupled decay, scalar or CPU-tensor hyper-parameters. Not covered: ``amsgrad``,
    ``capturable``, ``differentiable``, hyper-parameters given as device tensors, subclasses that replace
    ``step``, and any other optimizer class.
    """
    if not isinstance(optimizer, torch.optim.Adam) or not _own_step(optimizer, torch.optim.Adam):
        return f"{type(optimizer).__name__} is not torch.optim.Adam or AdamW"
    return _group_options(optimizer, _ADAM_FLAGS, ("lr", "betas", "eps", "weight_decay"))


def sgd_not_covered(optimizer: Any) -> Optional[str]:
    """Why the fused kernel cannot step this optimizer (None for the ``torch.optim.SGD`` it covers).

    Covered: every form, momentum, dampening, Nesterov, weight decay, maximize. Not covered:
    ``differentiable``, hyper-parameters given as device tensors, subclasses that replace ``step``.
    """
    if not isinstance(optimizer, torch.optim.SGD) or not _own_step(optimizer, torch.optim.SGD):
        return f"{type(optimizer).__name__} is not torch.optim.SGD"
    return _group_options(optimizer, _SGD_FLAGS, ("lr", "momentum", "dampening", "weight_decay"))


def _own_step(optimizer: Any, cls: type) -> bool:
    """Whether ``optimizer`` steps with ``cls.step`` (torch wraps each class's ``step`` in a profiling hook
    when its first instance is built, so the functions are compared unwrapped)."""
    return inspect.unwrap(type(optimizer).step) is inspect.unwrap(cls.step)


def _group_options(optimizer: Any, flags, scalars) -> Optional[str]:
    for group in optimizer.param_groups:
        for flag in flags:
            if group.get(flag):
                return f"{flag}=True"
        reason = _device_tensor_option(group, scalars)
        if reason is not None:
            return reason
    return None


def decoupled_weight_decay(optimizer: Any, group: dict) -> bool:
    """Whether ``group`` of a covered Adam optimizer decays weights AdamW's way."""
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
