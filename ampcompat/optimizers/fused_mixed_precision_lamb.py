"""``FusedMixedPrecisionLamb``: named so Apex imports resolve; not provided (use ``FusedLAMB``)."""
from __future__ import annotations

from typing import Any

_MESSAGE = (
    "ampcompat does not provide FusedMixedPrecisionLamb (Apex's LAMB with tensor lr/step, FP32 master copies of "
    "reduced-precision parameters and GradScaler-driven unscaling). Use ampcompat.optimizers.FusedLAMB, which "
    "keeps FP32 optimizer state and does its math in FP32 for FP16/BF16 parameters, together with amp's O2 "
    "master weights or torch.amp.GradScaler (scaler.unscale_(optimizer) before optimizer.step())."
)


class FusedMixedPrecisionLamb:
    """Placeholder for Apex's ``FusedMixedPrecisionLamb``; constructing it raises ``NotImplementedError``.

    Raises:
        NotImplementedError: always, naming the replacement.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_MESSAGE)
