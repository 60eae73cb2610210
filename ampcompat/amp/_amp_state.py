"""Apex's ``apex.amp._amp_state`` module path: the state object and its helpers."""
from .master_weights import master_params  # noqa: F401
from .process_state import AmpState, _amp_state, maybe_print, warn_or_err  # noqa: F401
