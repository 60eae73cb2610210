"""Apex's ``apex.amp.handle`` module path."""
from ..autocast_scope import AmpHandle, NoOpHandle  # noqa: F401
from ..handle import disable_casts, scale_loss  # noqa: F401
