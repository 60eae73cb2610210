"""Apex's ``apex.amp.scaler`` module path (old pickles name ``apex.amp.scaler.LossScaler``)."""
from ..scaler import LossScaler  # noqa: F401
