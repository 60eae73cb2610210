"""Apex's ``apex.amp._amp_state`` module path: the state object and its helpers."""
from ..state import AmpState, _amp_state, maybe_print, master_params, warn_or_err  # noqa: F401
