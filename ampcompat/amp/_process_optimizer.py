"""Apex's ``apex.amp._process_optimizer`` module path."""
from .optimizer_lifecycle import OptimizerLifecycle as AmpOptimizerState  # noqa: F401
