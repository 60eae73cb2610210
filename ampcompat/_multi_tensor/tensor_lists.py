"""Tensor-list plumbing shared by the fused optimizers and ``amp_C``: grouping and FP32 working copies.

Foreach kernels want every list on one device with one dtype, and Apex's kernels did their math in
FP32 whatever the storage dtype. These helpers give both without per-tensor Python loops of kernels:
grouping is pure bookkeeping, and up/down casts are one ``torch._foreach_copy_`` per list.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import _torch_compat

LOW_PRECISION = (torch.float16, torch.bfloat16)


def group_indices(items: Sequence[Any], key: Optional[Callable[[Any], Hashable]] = None) -> Dict[Hashable, List[int]]:
    """Indices of ``items`` bucketed by ``key`` (by default a tensor's ``(device, dtype)``), first-seen order."""
    groups: Dict[Hashable, List[int]] = defaultdict(list)
    if key is None:  # the default inline: no Python call per tensor (this runs on amp's unscale path)
        for index, item in enumerate(items):
            groups[(item.device, item.dtype)].append(index)
    else:
        for index, item in enumerate(items):
            groups[key(item)].append(index)
    return dict(groups)


def pick(items: Sequence, indices: Iterable[int]) -> list:
    """``[items[i] for i in indices]``."""
    return [items[i] for i in indices]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: FP32 for half types (as Apex's kernels), else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class Fp32Work:
    """FP32 working copies of the half-precision tensors of one list; the others are used as they are.

    ``values`` is the list to compute on; :meth:`write_back` copies the results into the original
    (half) tensors. Both directions are a single ``torch._foreach_copy_``.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.originals = list(tensors)
        self.values = list(tensors)
        self._upcast = [i for i, t in enumerate(tensors) if t.dtype in LOW_PRECISION]
        if self._upcast:
            sources = pick(self.originals, self._upcast)
            copies = [torch.empty_like(t, dtype=torch.float32) for t in sources]
            _torch_compat.foreach_copy_(copies, sources)
            for i, copy in zip(self._upcast, copies):
                self.values[i] = copy

    def write_back(self) -> None:
        """Store the computed values into the original tensors (rounding half types)."""
        if self._upcast:
            _torch_compat.foreach_copy_(pick(self.originals, self._upcast), pick(self.values, self._upcast))


def as_fp32(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Read-only FP32 view of a list: half tensors are copied up, the others returned as they are."""
    return Fp32Work(tensors).values


def fused_kernels_supported(tensors: Sequence[torch.Tensor], op: str = "") -> bool:
    """Whether torch's ``fused=True`` optimizer kernel accepts every tensor (device type and dtype).

    Args:
        tensors: the parameters.
        op: the fused ATen op (e.g. ``"_fused_adagrad_"``); when given, the op must also have a kernel
            registered for each device (not every fused optimizer exists on every backend).
    """
    devices = set(_torch_compat.fused_optimizer_devices())
    if not all(t.device.type in devices and t.is_floating_point() for t in tensors):
        return False
    return not op or all(_has_kernel(op, device_type) for device_type in {t.device.type for t in tensors})


def _has_kernel(op: str, device_type: str) -> bool:
    try:
        key = _torch_compat.dispatch_key_name(device_type)
        return bool(_torch_compat.has_kernel_for_dispatch_key("aten::" + op, key))
    except RuntimeError:  # the op does not exist in this torch
        return False


def capturable_supported(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether torch's ``capturable=True`` optimizer paths accept every tensor's device."""
    devices = set(_torch_compat.capturable_optimizer_devices())
    return all(t.device.type in devices for t in tensors)


def stack_scalars(scalars: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One 1-D FP32 tensor on ``device`` from 0-dim tensors (e.g. ``torch._foreach_norm`` results)."""
    return torch.stack([s.to(device=device, dtype=torch.float32) for s in scalars]).reshape(-1)


def non_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One-element bool tensor: does any of ``tensors`` (one device) hold inf or NaN? Reads only: one
    ``foreach_norm(inf)`` per dtype, no host read."""
    device = tensors[0].device
    max_abs = stack_scalars(_torch_compat.foreach_norm(list(tensors), math.inf), device)
    return ~torch.isfinite(max_abs).all()


def flag_where(flag: torch.Tensor, condition: torch.Tensor) -> None:
    """Set ``flag`` (Apex's int ``noop_flag``) to 1 where the one-element ``condition`` holds, never clear it."""
    flag.masked_fill_(condition.to(flag.device).reshape(()), 1)


def split(items: Sequence, predicate: Callable[[object], bool]) -> Tuple[list, list]:
    """``(matching, others)``, order kept."""
    yes, no = [], []
    for item in items:
        (yes if predicate(item) else no).append(item)
    return yes, no
