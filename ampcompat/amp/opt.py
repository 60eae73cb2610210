"""Apex's ``apex.amp.opt`` module path."""
from ..old_api import OptimWrapper  # noqa: F401
