"""``apex.contrib.optimizers.FusedLAMB``: the first (``--deprecated_fused_lamb``) LAMB of Apex."""
from __future__ import annotations

from typing import Iterable, Tuple

from ampcompat.optimizers.fused_lamb import FusedLAMB as _FusedLAMB

__all__ = ["FusedLAMB"]


class FusedLAMB(_FusedLAMB):
    """Apex contrib's ``FusedLAMB``: ``apex.optimizers.FusedLAMB``'s arithmetic without ``use_nvlamb``.

    Global-norm clipping at ``max_grad_norm`` (the constructor's value), Adam moments, and the trust
    ratio ``||p|| / ||update||`` for tensors with nonzero weight decay. Unlike Apex's kernel, the update
    is not written into ``.grad`` as a side effect.

    Raises:
        RuntimeError: Apex's message for ``amsgrad=True``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 amsgrad: bool = False, adam_w_mode: bool = True, grad_averaging: bool = True,
                 set_grad_none: bool = True, max_grad_norm: float = 1.0) -> None:
        super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, adam_w_mode=adam_w_mode,
                         grad_averaging=grad_averaging, set_grad_none=set_grad_none, max_grad_norm=max_grad_norm,
                         use_nvlamb=False)
