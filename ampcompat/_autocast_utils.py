"""Apex's rule for its fused ops under autocast: cast the inputs to the autocast dtype, run with autocast off.

(``apex/_autocast_utils.py``'s ``_cast_if_autocast_enabled``.) Apex applied it on CUDA only; here it
holds for the autocast of the inputs' device type, as for ``ampcompat.normalization``.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Tuple

import torch

from .normalization.fused_layer_norm import _autocast_cast, _autocast_dtype

__all__ = ["_cast_if_autocast_enabled"]


def _device_type(args: Tuple[Any, ...]) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def _cast_if_autocast_enabled(*args: Any) -> Tuple[Tuple[Any, ...], ContextManager[Any]]:
    """``(args cast to the active autocast dtype, a context that turns autocast off)``.

    Without autocast on the tensors' device, the arguments come back unchanged with a null context.
    Non-tensor arguments and FP64 tensors are never cast (autocast's own eligibility rule).
    """
    device_type = _device_type(args)
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return args, contextlib.nullcontext()
    cast = tuple(_autocast_cast(a, dtype, device_type) if isinstance(a, torch.Tensor) else a for a in args)
    return cast, torch.autocast(device_type, enabled=False)
