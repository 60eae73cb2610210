"""Apex's ``apex.amp.amp`` module path: ``init`` and the function-casting registry."""
from .o1_autocast import (  # noqa: F401
    float_function,
    half_function,
    promote_function,
    register_float_function,
    register_half_function,
    register_promote_function,
)
from .legacy_handle import init  # noqa: F401
