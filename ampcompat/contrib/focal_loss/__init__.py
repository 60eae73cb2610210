"""``apex.contrib.focal_loss`` on native PyTorch.

As in Apex, ``from apex.contrib.focal_loss import focal_loss`` gives the *module* ``focal_loss``:
call ``focal_loss.focal_loss(...)`` or ``focal_loss.FocalLoss.apply(...)``.
"""
from . import focal_loss  # noqa: F401
