"""The one process-wide amp state object, under Apex's private attribute names, and its owner.

Legacy code reaches into ``amp._amp_state`` directly (``loss_scalers[0]._loss_scale = 2**20``,
``opt_properties.master_weights``, ``handle._deactivate()``), so the names here are Apex's. This module
is the only one that sets or removes them: ``initialize`` and the old ``amp.init`` go through
:func:`begin_initialize`, :func:`set_loss_scale_bounds`, :func:`install_loss_scalers` and
:func:`install_handle`; :func:`reset` returns to the defaults; :func:`snapshot` / :func:`restore` let a
refused ``initialize`` (and tests) put everything back. The functions registered for O1's casts
(``register_half_function`` ...) are process-wide too and live here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

import torch

from .verbosity import effective_verbosity

#: The attributes ``_amp_state`` has before any ``initialize`` (Apex's defaults).
DEFAULTS: Dict[str, Any] = {"hard_override": False, "allow_incoming_model_not_fp32": False, "verbosity": 1}
#: Attributes that exist only after ``initialize`` (or ``amp.init`` for ``handle``), as in Apex, so that
#: ``hasattr`` checks in legacy code keep working.
SET_BY_INITIALIZE: Tuple[str, ...] = ("opt_properties", "loss_scalers", "handle", "min_loss_scale",
                                      "max_loss_scale")


class AmpState:
    """Holds the options, loss scalers and O1 handle of the current ``amp.initialize``.

    Attributes that only exist after ``initialize`` (``opt_properties``, ``loss_scalers``, ``handle``,
    ``min_loss_scale``, ``max_loss_scale``) are absent before it, as in Apex.
    """

    def __init__(self) -> None:
        self.__dict__.update(DEFAULTS)


_amp_state = AmpState()

#: ``(module, name, kind)`` of the functions registered for O1 casting before the next ``initialize``.
cast_registry: Set[Tuple[Any, str, str]] = set()


def snapshot() -> Dict[str, Any]:
    """A shallow copy of every attribute ``_amp_state`` has now (for :func:`restore`)."""
    return dict(_amp_state.__dict__)


def restore(saved: Dict[str, Any], names: Tuple[str, ...] = ()) -> None:
    """Put back the attributes of a :func:`snapshot` (only ``names``, when given; absent ones are removed)."""
    for name in names or tuple(set(_amp_state.__dict__) | set(saved)):
        if name in saved:
            setattr(_amp_state, name, saved[name])
        else:
            _amp_state.__dict__.pop(name, None)


def begin_initialize(opt_properties: Any, verbosity: int) -> None:
    """Record the options object a new ``initialize`` fills in, and its verbosity."""
    _amp_state.opt_properties = opt_properties
    _amp_state.verbosity = verbosity


def set_loss_scale_bounds(min_loss_scale: Any, max_loss_scale: Any) -> None:
    """Record ``initialize``'s ``min_loss_scale`` / ``max_loss_scale`` (Apex keeps them on the state)."""
    _amp_state.min_loss_scale = min_loss_scale
    _amp_state.max_loss_scale = max_loss_scale


def install_loss_scalers(loss_scalers: List[Any]) -> None:
    """Make ``loss_scalers`` the ones ``scale_loss(..., loss_id=i)`` uses."""
    _amp_state.loss_scalers = loss_scalers


def remove_handle() -> None:
    """Turn the current O1 handle (if any) off and forget it."""
    handle = _amp_state.__dict__.pop("handle", None)
    if handle is not None:
        handle._deactivate()


def install_handle(handle: Any) -> None:
    """Make ``handle`` the O1 handle (``_amp_state.handle``), turning off the one it replaces."""
    previous = getattr(_amp_state, "handle", None)
    if previous is not None and previous is not handle:
        previous._deactivate()
    _amp_state.handle = handle


def reset() -> None:
    """Forget every ``amp.initialize``: undo O1's autocast and patched functions, drop scalers and options.

    Models and optimizers already patched keep their casts and master weights; the process-wide state
    returns to its defaults, so a new ``initialize`` (or a test) starts clean.
    """
    remove_handle()
    for name in SET_BY_INITIALIZE:
        _amp_state.__dict__.pop(name, None)
    _amp_state.__dict__.update(DEFAULTS)
    cast_registry.clear()
    for device_type in ("cpu", "cuda"):
        torch.set_autocast_enabled(device_type, False)
    torch.set_autocast_cache_enabled(True)
    torch.clear_autocast_cache()


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
