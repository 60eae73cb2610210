"""The verbosity amp prints at: ``initialize``'s argument, unless ``AMPCOMPAT_VERBOSITY`` overrides it.

The environment variable lets an unchanged script (``python -m ampcompat run train.py``) silence the
options block and overflow lines that its ``amp.initialize(...)`` call would print, or ask for more.
"""
from __future__ import annotations

import os
from typing import Optional

#: ``AMPCOMPAT_VERBOSITY=0`` silences amp; 1 (Apex's default) and 2 print the options block and overflow lines.
ENV_VAR = "AMPCOMPAT_VERBOSITY"


def verbosity_override() -> Optional[int]:
    """The verbosity ``AMPCOMPAT_VERBOSITY`` asks for, or None when it is unset or empty.

    Raises:
        ValueError: when it is set to something other than an integer.
    """
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            "{} must be an integer (0 silences amp's printing; 1 and 2 print the options block and "
            "overflow lines), found {}={!r}. Unset it to use amp.initialize's verbosity.".format(
                ENV_VAR, ENV_VAR, raw)) from None


def effective_verbosity(requested: int, strict: bool = True) -> int:
    """``requested``, or the environment's override.

    Args:
        requested: the verbosity the program asked for (``amp.initialize``'s argument).
        strict: raise on a malformed ``AMPCOMPAT_VERBOSITY`` (``initialize`` does); when False it is
            ignored (printing never raises: ``initialize`` has already refused it).

    Raises:
        ValueError: with ``strict``, for a malformed ``AMPCOMPAT_VERBOSITY``.
    """
    try:
        override = verbosity_override()
    except ValueError:
        if strict:
            raise
        return requested
    return requested if override is None else override
