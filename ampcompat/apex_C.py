"""``apex_C``: Apex's compiled flatten/unflatten helpers, on PyTorch's own ones.

Apex's ``apex_C.flatten``/``unflatten`` were thin bindings of the C++ functions behind
``torch._utils._flatten_dense_tensors`` / ``_unflatten_dense_tensors``; these call the same functions,
on any device, so results (a new contiguous 1-D tensor; views into it) are identical.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from . import _torch_compat

__all__ = ["flatten", "unflatten"]


def _check_tensors(tensors: Sequence[torch.Tensor], what: str) -> List[torch.Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"apex_C.{what} needs at least one tensor")
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"apex_C.{what} takes a sequence of tensors; got an element of type {type(tensor).__name__}")
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise TypeError(f"apex_C.{what} needs tensors of one dtype and device; got {sorted(map(str, kinds))} "
                        "(group them first, e.g. with apex.parallel.distributed.split_by_type)")
    return tensors


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate dense tensors into one new contiguous 1-D tensor.

    Args:
        tensors: tensors of one dtype and device.

    Returns:
        A 1-D tensor holding every element of ``tensors`` in order.

    Raises:
        ValueError: if ``tensors`` is empty.
        TypeError: for a non-tensor element or mixed dtypes/devices.
    """
    return _torch_compat.flatten_dense_tensors(_check_tensors(tensors, "flatten"))


def unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views into ``flat`` shaped like each of ``tensors`` (the inverse of :func:`flatten`).

    Args:
        flat: a 1-D tensor with at least as many elements as ``tensors`` together.
        tensors: the tensors whose shapes (in order) cut ``flat`` up.

    Returns:
        One view of ``flat`` per tensor, with its shape.

    Raises:
        ValueError: if ``tensors`` is empty or ``flat`` is too small.
        TypeError: for a non-tensor argument.
    """
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"apex_C.unflatten takes a tensor first; got {type(flat).__name__}")
    tensors = _check_tensors(tensors, "unflatten")
    needed = sum(t.numel() for t in tensors)
    if flat.numel() < needed:
        raise ValueError(f"apex_C.unflatten: the flat tensor has {flat.numel()} elements, the tensors need {needed}")
    return list(_torch_compat.unflatten_dense_tensors(flat, tensors))
