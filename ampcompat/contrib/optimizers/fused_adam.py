"""``apex.contrib.optimizers.FusedAdam``: the 2019 ``FusedAdam`` (``eps_inside_sqrt``, ``max_grad_norm``,
``step(closure, grads, output_params, scale, grad_norms)``), kept in Apex's contrib after September 2019."""
from __future__ import annotations

from typing import Iterable, Tuple

from ampcompat.optimizers.fused_adam import FusedAdam as _FusedAdam

__all__ = ["FusedAdam"]


class FusedAdam(_FusedAdam):
    """Adam with the 2019 arithmetic of ``ampcompat.optimizers._legacy_adam`` on every step.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate.
        bias_correction: apply Adam's bias corrections (to the step size).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        eps_inside_sqrt: ``sqrt(v + eps)`` instead of ``sqrt(v) + eps``.
        weight_decay: decay added to the update (scaled by the step size).
        max_grad_norm: clip each param group's gradients to this L2 norm (0: no clipping).
        amsgrad: not supported (raises, as Apex).
        use_mt: accepted; the update is always multi-tensor here.
        amp_scale_adjustment: accepted; Apex used it only with amp feeding gradients through
            ``_amp_stash``, which ampcompat's amp does not need (it gives this optimizer FP32 master grads).

    Raises:
        RuntimeError: Apex's message for ``amsgrad=True``.
        ValueError: for a negative ``max_grad_norm``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eps_inside_sqrt: bool = False,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, amsgrad: bool = False,
                 use_mt: bool = False, amp_scale_adjustment: float = 1.0) -> None:
        super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, eps_inside_sqrt=eps_inside_sqrt,
                         max_grad_norm=max_grad_norm)
        if not self._legacy_math:  # no 2019 keyword was given: still the 2019 optimizer
            self._legacy_math = True
            self.defaults["max_grad_norm"] = max_grad_norm
            for group in self.param_groups:
                group.setdefault("max_grad_norm", max_grad_norm)
        self._use_multi_tensor = bool(use_mt)
        self._amp_scale_adjustment = amp_scale_adjustment
