"""Apex's ``apex.amp.handle`` module path."""
from .legacy_handle import AmpHandle, NoOpHandle  # noqa: F401
from .scaled_backward import disable_casts, scale_loss  # noqa: F401
