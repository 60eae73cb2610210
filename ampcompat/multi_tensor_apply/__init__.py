"""``apex.multi_tensor_apply``: the shared launcher ``multi_tensor_applier`` and its class.

Laid out as Apex's package: the class lives in the submodule ``multi_tensor_apply`` (code imports it
as ``from apex.multi_tensor_apply.multi_tensor_apply import MultiTensorApply``), and the package
holds the one launcher everyone shares, with Apex's chunk size.
"""
from __future__ import annotations

from .multi_tensor_apply import MultiTensorApply

__all__ = ["MultiTensorApply", "multi_tensor_applier"]

multi_tensor_applier = MultiTensorApply(2048 * 32)
