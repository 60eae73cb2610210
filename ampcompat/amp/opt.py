"""Apex's ``apex.amp.opt`` module path."""
from .legacy_handle import OptimWrapper  # noqa: F401
