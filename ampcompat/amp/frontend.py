"""Apex's ``apex.amp.frontend`` module path: ``Properties``, the opt levels, ``initialize``."""
from .initialization import initialize, load_state_dict, state_dict  # noqa: F401
from .opt_levels import OPT_LEVELS as opt_levels  # noqa: F401
from .opt_levels import Properties  # noqa: F401
