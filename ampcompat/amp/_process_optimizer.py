"""Apex's ``apex.amp._process_optimizer`` module path."""
from ..master import AmpOptimizerState  # noqa: F401
