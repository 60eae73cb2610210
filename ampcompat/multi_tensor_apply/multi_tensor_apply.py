"""``apex.multi_tensor_apply.multi_tensor_apply``: the launcher class legacy code calls ``amp_C`` kernels through.

Apex's ``MultiTensorApply`` split tensor lists into CUDA chunks and was only *available* when the
``amp_C`` extension had been compiled. Here every ``ampcompat.amp_C`` op works on any device through
``torch._foreach_*``, so the launcher is always available and simply forwards its arguments; the chunk
size is kept (and passed on) because Apex's op signatures take it, but chunking is the foreach
kernels' business.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["MultiTensorApply"]


class MultiTensorApply:
    """Calls ``op(chunk_size, noop_flag_buffer, tensor_lists, *args)``, as Apex's launcher did.

    Args:
        chunk_size: the chunk size handed to every op (Apex's default launcher uses ``2048 * 32``).
    """

    available = True
    warned = False

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def check_avail(self) -> None:
        """Apex raised here when ``amp_C`` was missing; ampcompat's ops are always present."""

    def __call__(
        self,
        op: Callable[..., Any],
        noop_flag_buffer: torch.Tensor,
        tensor_lists: Sequence[Sequence[torch.Tensor]],
        *args: Any,
    ) -> Any:
        """Run ``op`` over ``tensor_lists`` and return whatever it returns.

        Args:
            op: an ``amp_C``-style op, e.g. :func:`ampcompat.amp_C.multi_tensor_scale`.
            noop_flag_buffer: the int overflow flag the op reads and/or sets.
            tensor_lists: the lists of tensors the op works on.
            *args: the op's remaining arguments.
        """
        return op(self.chunk_size, noop_flag_buffer, tensor_lists, *args)
