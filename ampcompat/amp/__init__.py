"""Apex's ``apex.amp`` surface, name for name; the work is done in the core modules beside this file.

``amp._amp_state`` is the state *object* (as in Apex), while ``ampcompat.amp._amp_state`` as an
import path is the module holding it, so both spellings legacy code uses keep working.
"""
from ._amp_state import _amp_state, master_params  # noqa: F401  (first: binds the object over the module)
from .amp import (  # noqa: F401
    float_function,
    half_function,
    init,
    promote_function,
    register_float_function,
    register_half_function,
    register_promote_function,
)
from .frontend import initialize, load_state_dict, state_dict  # noqa: F401
from .handle import disable_casts, scale_loss  # noqa: F401
from . import scaler  # noqa: F401
