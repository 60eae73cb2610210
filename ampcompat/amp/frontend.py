"""Apex's ``apex.amp.frontend`` module path: ``Properties``, the opt levels, ``initialize``."""
from ..frontend import initialize, load_state_dict, state_dict  # noqa: F401
from ..properties import OPT_LEVELS as opt_levels  # noqa: F401
from ..properties import Properties  # noqa: F401
