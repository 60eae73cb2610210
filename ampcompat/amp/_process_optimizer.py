"""Apex's ``apex.amp._process_optimizer`` module path."""
from .master_weights import AmpOptimizerState  # noqa: F401
