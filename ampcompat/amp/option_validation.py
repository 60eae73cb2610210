"""Checks on the values ``amp.initialize`` accepts, each raising before anything is changed.

Apex validated few of its options: a loss scale of 0, inf or NaN, ``num_losses=0``,
``min_loss_scale > max_loss_scale`` or ``master_weights="yes"`` were accepted and failed steps later
(a ``ZeroDivisionError`` at the first backward, every step skipped forever, an ``IndexError`` at
``scale_loss``), and its one ``keep_batchnorm_fp32`` check was an ``assert`` that ``python -O``
removes. Every check here is an explicit ``raise``. Where Apex raised, its exception type (and
message) is kept; the values Apex accepted and that make sense (``loss_scale="128.0"``,
``keep_batchnorm_fp32="False"``, any numeric type) are still accepted.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

import torch

#: The two strings argparse-based scripts pass for booleans (Apex converted them for keep_batchnorm_fp32).
_BOOL_STRINGS = {"True": True, "False": False}
#: The loss scale is kept as a float32 on the gradients' device: a larger value would become inf.
LARGEST_LOSS_SCALE = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def check_fits_float32(name: str, number: float, shown: str) -> None:
    """Refuse a loss scale (or bound) float32 cannot hold: stored on the device it would be inf."""
    if number > LARGEST_LOSS_SCALE:
        raise ValueError("{} must be at most {:g} (float32's largest value: the loss scale is kept as a float32), "
                         "found {}.".format(name, LARGEST_LOSS_SCALE, shown))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_finite(name: str, value: Any, hint: str = "") -> float:
    """``value`` as a float, if it is a real number (not a bool or a string), finite and above 0."""
    if not _is_number(value):
        raise TypeError("{} must be a number, found {}={!r}.{}".format(name, name, value, hint))
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError("{} must be a finite number above 0, found {}={!r}.{}".format(name, name, value, hint))
    check_fits_float32(name, number, "{}={!r}".format(name, value))
    return number


_LOSS_SCALE_FORMS = "'dynamic' or a number (a float such as 128.0, or a string such as '128.0')"


def check_loss_scale(value: Any) -> Union[str, float]:
    """``"dynamic"``, or a static loss scale as a float (Apex converted with ``float()``).

    Raises:
        TypeError: for a value that is neither a number, a numeric string nor "dynamic" (a bool too).
        ValueError: for a string that is no number, and for 0, a negative number, inf or NaN (Apex
            accepted these: 0 divided by zero at the first backward, inf/NaN skipped every step).
    """
    if isinstance(value, str) and value == "dynamic":
        return value
    if isinstance(value, bool):
        raise TypeError("loss_scale must be {}, found loss_scale={!r}".format(_LOSS_SCALE_FORMS, value))
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:  # Apex let float()'s own error through: same type, clearer words
        raise type(exc)("loss_scale must be {}, found loss_scale={!r}".format(_LOSS_SCALE_FORMS, value)) from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(
            "loss_scale must be 'dynamic' or a finite number above 0, found loss_scale={!r}: a static scale "
            "multiplies the loss, so 0 loses every gradient and inf/NaN make every step overflow.".format(value))
    check_fits_float32("loss_scale", number, "loss_scale={!r}".format(value))
    return number


def check_keep_batchnorm_fp32(value: Any) -> Optional[bool]:
    """``True``/``False``/``None``, with Apex's conversion of the strings "True" and "False".

    Raises:
        AssertionError: Apex's type and message for anything else (raised explicitly, so that
            ``python -O`` keeps the check).
    """
    if isinstance(value, str) and value in _BOOL_STRINGS:
        return _BOOL_STRINGS[value]
    if value is True or value is False or value is None:
        return value
    raise AssertionError(
        "keep_batchnorm_fp32 must be a boolean, the string 'True' or 'False', or None, "
        "found keep_batchnorm_fp32={}".format(value))


def check_master_weights(value: Any) -> Optional[bool]:
    """``True``/``False``/``None``; the strings "True" and "False" are converted as for keep_batchnorm_fp32.

    Apex used the value's truth, so ``master_weights="False"`` turned master weights *on*.

    Raises:
        TypeError: for any other value.
    """
    if isinstance(value, str) and value in _BOOL_STRINGS:
        return _BOOL_STRINGS[value]
    if value is True or value is False or value is None:
        return value
    raise TypeError(
        "master_weights must be a boolean, the string 'True' or 'False', or None, "
        "found master_weights={!r}".format(value))


def _is_floating_dtype(value: Any) -> bool:
    return isinstance(value, torch.dtype) and value.is_floating_point


def check_cast_model_type(value: Any) -> Any:
    """A floating ``torch.dtype``, or ``None``/``False`` (do not cast the model), as Apex accepted.

    Raises:
        TypeError: for anything else, e.g. the string ``"float16"`` (Apex failed later with
            ``Invalid device string``).
    """
    if value is None or value is False or _is_floating_dtype(value):
        return value
    raise TypeError(
        "cast_model_type must be a floating-point torch.dtype such as torch.float16 or torch.bfloat16, or "
        "None/False to leave the model's dtype alone, found cast_model_type={!r}.".format(value))


def check_cast_model_outputs(value: Any) -> Optional[torch.dtype]:
    """A floating ``torch.dtype`` or ``None``.

    Raises:
        TypeError: for anything else.
    """
    if value is None or _is_floating_dtype(value):
        return value
    raise TypeError(
        "cast_model_outputs must be a floating-point torch.dtype such as torch.float16, or None, "
        "found cast_model_outputs={!r}.".format(value))


def check_num_losses(value: Any) -> int:
    """An integer of at least 1 (one loss scaler per loss).

    Raises:
        TypeError: for a non-integer (a bool too).
        ValueError: for 0 or less.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError("num_losses must be an int, found num_losses={!r}.".format(value))
    if value < 1:
        raise ValueError(
            "num_losses must be at least 1 (one loss scaler per loss passed to amp.scale_loss), "
            "found num_losses={!r}.".format(value))
    return int(value)


def check_verbosity(value: Any) -> int:
    """An integer: 0 silences amp's printing; 1 (the default) and 2 print the options block and overflow lines.

    Raises:
        TypeError: for a non-integer (e.g. the string "0").
    """
    if not isinstance(value, numbers.Integral):
        raise TypeError("verbosity must be an int (0, 1 or 2), found verbosity={!r}.".format(value))
    return int(value)


def check_loss_scale_bounds(min_loss_scale: Any, max_loss_scale: Any) -> None:
    """``min_loss_scale`` (None, 0 or a finite number above 0) not above ``max_loss_scale`` (finite, above 0).

    A floor of 0 means no floor, as in Apex (which tested the floor's truth).

    Raises:
        TypeError: for a bound that is not a number.
        ValueError: for a bound that is 0, negative, inf or NaN, or a floor above the ceiling.
    """
    ceiling = _positive_finite("max_loss_scale", max_loss_scale, " The default is 2.**24.")
    if min_loss_scale is None or (_is_number(min_loss_scale) and min_loss_scale == 0):
        return
    floor = _positive_finite("min_loss_scale", min_loss_scale, " Use None (the default) for no floor.")
    if floor > ceiling:
        raise ValueError(
            "min_loss_scale ({!r}) is above max_loss_scale ({!r}): the dynamic loss scale is kept between "
            "the two, so the floor must not exceed the ceiling.".format(min_loss_scale, max_loss_scale))


def check_initialize_arguments(num_losses: Any, min_loss_scale: Any, max_loss_scale: Any,
                               cast_model_outputs: Any) -> None:
    """Check the arguments of ``amp.initialize`` that are not opt-level properties, before any of them is used.

    The properties (``loss_scale``, ``cast_model_type``, ``keep_batchnorm_fp32``, ``master_weights``)
    are checked by their setters, in Apex's order; ``verbosity`` by :func:`check_verbosity`.

    Raises:
        TypeError, ValueError: the first bad argument, named with its value.
    """
    check_num_losses(num_losses)
    check_loss_scale_bounds(min_loss_scale, max_loss_scale)
    check_cast_model_outputs(cast_model_outputs)
