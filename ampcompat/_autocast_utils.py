"""Apex's rule for its fused ops under autocast: cast the inputs to the autocast dtype, run with autocast off.

(``apex/_autocast_utils.py``'s ``_cast_if_autocast_enabled``.) Apex applied it on CUDA only; here it
holds for the autocast of the inputs' device type, as for ``ampcompat.normalization``.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Tuple

import torch

__all__ = ["cast_if_autocast_enabled", "_cast_if_autocast_enabled", "autocast_dtype", "autocast_cast"]


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off (or absent) there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know
        return None


def autocast_cast(tensor: Optional[torch.Tensor], dtype: torch.dtype, device_type: str) -> Optional[torch.Tensor]:
    """Autocast's eligibility rule: floating tensors on the autocast device, FP64 excepted."""
    if (tensor is not None and tensor.is_floating_point() and tensor.device.type == device_type
            and tensor.dtype != torch.float64):
        return tensor.to(dtype)
    return tensor


def _device_type(args: Tuple[Any, ...]) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def cast_if_autocast_enabled(*args: Any) -> Tuple[Tuple[Any, ...], ContextManager[Any]]:
    """``(args cast to the active autocast dtype, a context that turns autocast off)``.

    Without autocast on the tensors' device, the arguments come back unchanged with a null context.
    Non-tensor arguments and FP64 tensors are never cast (autocast's own eligibility rule).
    """
    device_type = _device_type(args)
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return args, contextlib.nullcontext()
    cast = tuple(autocast_cast(a, dtype, device_type) if isinstance(a, torch.Tensor) else a for a in args)
    return cast, torch.autocast(device_type, enabled=False)


#: Apex's name (``apex._autocast_utils._cast_if_autocast_enabled``), which legacy code imports.
_cast_if_autocast_enabled = cast_if_autocast_enabled
