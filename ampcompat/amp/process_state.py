"""The one process-wide amp state object, under Apex's private attribute names.

Legacy code reaches into ``amp._amp_state`` directly (``loss_scalers[0]._loss_scale = 2**20``,
``opt_properties.master_weights``, ``handle._deactivate()``), so the names here are Apex's. Everything
ampcompat adds of its own is underscored and removed again by :func:`reset`.
"""
from __future__ import annotations

from typing import Any

import torch

from .verbosity import effective_verbosity


class AmpState:
    """Holds the options, loss scalers and O1 handle of the current ``amp.initialize``.

    Attributes that only exist after ``initialize`` (``opt_properties``, ``loss_scalers``, ``handle``,
    ``min_loss_scale``, ``max_loss_scale``) are absent before it, as in Apex, so ``hasattr`` checks in
    legacy code keep working.
    """

    def __init__(self) -> None:
        self.hard_override = False
        self.allow_incoming_model_not_fp32 = False
        self.verbosity = 1


_amp_state = AmpState()


def _is_rank_zero() -> bool:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def maybe_print(msg: str, rank0: bool = False) -> None:
    """Print ``msg`` when verbosity is on; with ``rank0`` only on the first distributed rank (as Apex).

    Every line amp prints goes through here, so ``verbosity`` (and ``AMPCOMPAT_VERBOSITY``) silence them all.
    """
    if effective_verbosity(_amp_state.verbosity, strict=False) <= 0:
        return
    if rank0 and not _is_rank_zero():
        return
    print(msg)


def warn_or_err(msg: str) -> None:
    """Raise ``RuntimeError(msg)``, or only print it when ``_amp_state.hard_override`` is set (as Apex)."""
    if _amp_state.hard_override:
        maybe_print("Warning:  " + msg)
    else:
        raise RuntimeError(msg)
