"""``apex.contrib.optimizers.FusedSGD``: SGD taking ``step(closure, grads, output_params, scale)``
from ``apex.contrib.optimizers.FP16_Optimizer``."""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import torch
from torch.optim.optimizer import required

from ... import _torch_compat

from ampcompat.optimizers._legacy_adam import per_group
from ampcompat.optimizers.fused_sgd import FusedSGD as _FusedSGD

__all__ = ["FusedSGD"]


class FusedSGD(_FusedSGD):
    """Apex contrib's ``FusedSGD``: ``ampcompat.optimizers.FusedSGD``'s arithmetic, plus the fused-wrapper protocol.

    Given ``grads`` (typically the FP16 model gradients, multiplied by ``scale``), the update uses
    ``grad / scale`` on the FP32 parameters and copies the result into ``output_params``. Without
    them it is an ordinary optimizer over ``.grad`` (Apex raised then).

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, wd_after_momentum,
        materialize_master_grads: as ``apex.optimizers.FusedSGD``.

    Raises:
        ValueError: Apex's messages for a negative lr, momentum or weight decay, and for Nesterov
            without momentum or with dampening.
    """

    def __init__(self, params: Iterable, lr: float = required, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, wd_after_momentum: bool = False,
                 materialize_master_grads: bool = True) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, wd_after_momentum=wd_after_momentum,
                         materialize_master_grads=materialize_master_grads, set_grad_none=True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, grads: Any = None, output_params: Any = None,
             scale: float = 1.0, grad_norms: Any = None) -> Any:
        """One SGD step, on ``grads / scale`` when given (else on ``.grad``).

        Args:
            closure: re-evaluates the model and returns the loss.
            grads: per param group (or one flat list), the gradients to use.
            output_params: per param group, tensors that receive a copy of the updated parameters.
            scale: divide ``grads`` by this.
            grad_norms: accepted and unused (as in Apex).

        Returns:
            The closure's loss, or None.

        Raises:
            ValueError: if ``grads``/``output_params`` do not match the param groups.
        """
        if grads is None and output_params is None:
            return super().step(closure)
        loss = self._closure_loss(closure)
        groups = self.param_groups
        grads_per_group = per_group(grads, len(groups), "grads")
        outputs_per_group = per_group(output_params, len(groups), "output_params")
        saved: List[Any] = []
        for group, group_grads in zip(groups, grads_per_group):
            for i, p in enumerate(group["params"]):
                grad = group_grads[i] if group_grads is not None else None
                saved.append(p.grad)
                if grad is not None:
                    p.grad = grad.detach().to(p.dtype).div_(scale)
        try:
            super().step()
        finally:
            params = [p for group in groups for p in group["params"]]
            for p, grad in zip(params, saved):
                p.grad = grad
        for group, outputs in zip(groups, outputs_per_group):
            pairs = [(out, p) for out, p in zip(outputs or [], group["params"]) if out is not None]
            if pairs:
                _torch_compat.foreach_copy_([o for o, _ in pairs], [p for _, p in pairs])
        return loss
