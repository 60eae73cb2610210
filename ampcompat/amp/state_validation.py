"""Checks on a saved amp state before ``amp.load_state_dict`` restores any of it.

Apex's ``load_state_dict`` assigned each entry as it went, so a checkpoint with a bad value was
half-loaded, or loaded whole and failed steps later: ``{"loss_scale": "x"}`` was stored and broke the
next ``amp.state_dict()``; a scale of 0, inf or NaN divided by zero or skipped every step. Here
:func:`plan_load` reads the whole dict first and either raises or returns what to assign, keeping
Apex's loading rules: entries whose key contains ``loss_scaler`` go to the scalers by position, in
the dict's own order (not by the number in the key); surplus entries are skipped with Apex's
message, and keys after the first skipped one are not examined; other keys are Apex's
``RuntimeError``. A ``torch.amp.GradScaler`` state dict (the likeliest wrong file) and a whole
checkpoint passed in place of its ``"amp"`` entry are recognised and named in the error.
"""
from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

from .option_validation import check_fits_float32

#: The keys of ``torch.amp.GradScaler.state_dict()``.
_GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
_ENTRY_FORM = "{'loss_scale': <a finite number above 0>, 'unskipped': <an int of at least 0>}"


class AmpNotInitializedError(RuntimeError, AttributeError):
    """amp's state was used before ``amp.initialize`` created it.

    A ``RuntimeError`` that is also an ``AttributeError``: Apex raised ``AttributeError`` here (its
    state object had no ``loss_scalers`` yet), and legacy code may catch that.
    """


def not_initialized_error(call: str, then: str) -> AmpNotInitializedError:
    """The error for ``call`` made before ``amp.initialize``; ``then`` says how to call it afterwards."""
    return AmpNotInitializedError(
        "{} was called before amp.initialize: there are no loss scalers yet. Call model, optimizer = "
        "amp.initialize(model, optimizer, opt_level=...) first, then {}.".format(call, then))


@dataclass(frozen=True)
class ScalerEntry:
    """One checked entry of a saved amp state, and the loss scaler it is loaded into."""

    scaler_index: int
    key: str
    loss_scale: float
    unskipped: int


@dataclass(frozen=True)
class LoadPlan:
    """What ``amp.load_state_dict`` does once the whole state dict passed its checks."""

    entries: Tuple[ScalerEntry, ...]
    #: Apex's lines, in Apex's order (the entry-count warning, the "Skipping loss_scaler" line).
    messages: Tuple[str, ...]


def _short(value: Any) -> str:
    return reprlib.repr(value)


def _check_entry(key: str, entry: Any) -> Tuple[float, int]:
    if not isinstance(entry, Mapping):
        raise TypeError("amp state_dict entry {!r} must be a dict {}, found {} ({}).".format(
            key, _ENTRY_FORM, _short(entry), type(entry).__name__))
    for field in ("loss_scale", "unskipped"):
        if field not in entry:
            raise ValueError("amp state_dict entry {!r} has no {!r}: it must be {}, found {}.".format(
                key, field, _ENTRY_FORM, _short(dict(entry))))
    loss_scale, unskipped = entry["loss_scale"], entry["unskipped"]
    if not isinstance(loss_scale, numbers.Real) or isinstance(loss_scale, bool):
        raise TypeError("amp state_dict entry {!r}: loss_scale must be a number, found {} ({}).".format(
            key, _short(loss_scale), type(loss_scale).__name__))
    if not (math.isfinite(loss_scale) and loss_scale > 0):
        raise ValueError(
            "amp state_dict entry {!r}: loss_scale must be a finite number above 0, found {}; training on it "
            "would skip every step or lose every gradient.".format(key, _short(loss_scale)))
    check_fits_float32("amp state_dict entry {!r}: loss_scale".format(key), float(loss_scale), _short(loss_scale))
    if not isinstance(unskipped, numbers.Real) or isinstance(unskipped, bool):
        raise TypeError("amp state_dict entry {!r}: unskipped must be an int, found {} ({}).".format(
            key, _short(unskipped), type(unskipped).__name__))
    if not (math.isfinite(unskipped) and float(unskipped).is_integer() and unskipped >= 0):
        raise ValueError("amp state_dict entry {!r}: unskipped must be a whole number of at least 0, found {}."
                         .format(key, _short(unskipped)))
    return float(loss_scale), int(unskipped)


def _unexpected_keys_error(state_dict: Mapping, unexpected: List[Any], num_scalers: int) -> RuntimeError:
    # Apex's sentence first (code may match on it), then what the keys suggest.
    message = "Error(s) in loading state_dict. Unexpected key(s) in state_dict: {}. ".format(
        ", ".join('"{}"'.format(k) for k in unexpected))
    if any(k in _GRAD_SCALER_KEYS for k in unexpected):
        message += ("This is a torch.amp.GradScaler state dict, not an amp.state_dict(): convert it with "
                    "amp.load_state_dict(ampcompat.grad_scaler_to_amp_state(state, num_losses={})).".format(
                        num_scalers))
    else:
        nested = [k for k in unexpected
                  if isinstance(state_dict[k], Mapping) and any(isinstance(j, str) and "loss_scaler" in j
                                                                for j in state_dict[k])]
        if nested:
            message += "The entry {!r} holds an amp state dict: pass that entry (checkpoint[{!r}]).".format(
                nested[0], nested[0])
    return RuntimeError(message)


def plan_load(state_dict: Any, num_scalers: Optional[int]) -> LoadPlan:
    """Check a saved amp state against ``num_scalers`` loss scalers and say what loading it assigns.

    Args:
        state_dict: what ``amp.state_dict()`` returned, e.g. ``{"loss_scaler0": {"loss_scale": 65536.0,
            "unskipped": 0}}``.
        num_scalers: how many loss scalers ``amp.initialize`` made (its ``num_losses``); None to check
            every entry without loading any (amp disabled).

    Returns:
        The entries to assign, and Apex's messages to print.

    Raises:
        TypeError: ``state_dict`` is not a mapping, or an entry or one of its values has the wrong type.
        ValueError: an entry lacks ``loss_scale`` or ``unskipped``, or holds a loss scale that is 0,
            negative, inf or NaN, or a negative or fractional ``unskipped``.
        RuntimeError: Apex's error for keys that name no loss scaler (it names the converter when
            they are a GradScaler's).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "amp.load_state_dict expects the dict amp.state_dict() returned, {{'loss_scaler0': {}, ...}}, "
            "found {} ({}).".format(_ENTRY_FORM, _short(state_dict), type(state_dict).__name__))
    messages = []
    if num_scalers is not None and len(state_dict) != num_scalers:
        messages.append("Warning: state_dict contains {} entries, while {} loss_scalers are used".format(
            len(state_dict), num_scalers))
    entries: List[ScalerEntry] = []
    unexpected: List[Any] = []
    for key, entry in state_dict.items():
        if not (isinstance(key, str) and "loss_scaler" in key):
            unexpected.append(key)
            continue
        if num_scalers is not None and len(entries) == num_scalers:
            messages.append("Skipping loss_scaler[{}], since num_losses was set to {}".format(
                len(entries), num_scalers))
            break
        loss_scale, unskipped = _check_entry(key, entry)
        entries.append(ScalerEntry(len(entries), key, loss_scale, unskipped))
    if unexpected:
        raise _unexpected_keys_error(state_dict, unexpected, num_scalers or 1)
    return LoadPlan(tuple(entries), tuple(messages))


def loaded_counter(unskipped: int, dynamic: bool, scale_window: int) -> int:
    """The clean-pass counter a scaler takes from a saved ``unskipped``.

    A static scaler counts its passes forever (Apex), but a dynamic one grows only when the count
    *reaches* its window, so a count at or past the window (a static scaler's state loaded into a
    dynamic one) would stop growth until the next overflow. The count within the current window is
    what a dynamic scaler with that history would hold.
    """
    if dynamic and scale_window > 0 and unskipped >= scale_window:
        return unskipped % scale_window
    return unskipped
