"""``apex.contrib.optimizers`` on native PyTorch: the fused optimizers Apex kept in contrib.

``FP16_Optimizer`` with ``FusedAdam`` (the 2019 Adam) or ``FusedSGD``, and the first ``FusedLAMB``.
``DistributedFusedAdam`` / ``DistributedFusedLAMB`` are not provided: their modules raise
``ApexModuleNotProvided`` naming the replacement (FSDP2 / ``ZeroRedundancyOptimizer``).
"""
import importlib
from typing import Any

from .fp16_optimizer import FP16_Optimizer
from .fused_adam import FusedAdam
from .fused_lamb import FusedLAMB
from .fused_sgd import FusedSGD

__all__ = ["FP16_Optimizer", "FusedAdam", "FusedLAMB", "FusedSGD"]

_REFUSED = {"DistributedFusedAdam": "distributed_fused_adam", "DistributedFusedLAMB": "distributed_fused_lamb"}


def __getattr__(name: str) -> Any:
    if name in _REFUSED:  # importing the module raises ApexModuleNotProvided, an ImportError
        importlib.import_module("." + _REFUSED[name], __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
