"""LARC (layer-wise adaptive rate control, You et al. 2017, arXiv:1708.03888) as Apex's optimizer wrapper.

``apex.parallel.LARC`` is this module and ``apex.parallel.LARC.LARC`` the class, as in Apex.
"""
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import _torch_compat
from .._multi_tensor.tensor_lists import group_indices, pick

__all__ = ["LARC"]


class LARC:
    """Wrap any ``torch.optim`` optimizer so each parameter's step uses a LARC-adapted learning rate.

    For every parameter with a gradient, ``local = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)``.
    With ``clip=True`` the effective rate is ``min(local, lr)``, otherwise ``local * lr``. It is applied by
    rewriting the gradient before the wrapped optimizer steps, ``g <- (g + weight_decay * p) * factor``
    with ``factor = min(local / lr, 1)`` (clip) or ``local`` (scale); the group's ``weight_decay`` is set to
    0 during the wrapped step because it is already in the gradient. Parameters whose weight or gradient
    norm is zero are stepped unchanged and without weight decay (Apex's behaviour).

    The wrapper forwards ``state``, ``param_groups``, ``defaults``, ``state_dict()``,
    ``load_state_dict()``, ``zero_grad()`` and ``add_param_group()`` to the wrapped optimizer, and
    ``amp.initialize`` accepts it as a single optimizer.

    Args:
        optimizer: the optimizer to wrap.
        trust_coefficient: LARC's trust coefficient ``eta``.
        clip: ``True`` caps each parameter's rate at the group's ``lr``; ``False`` scales ``lr``.
        eps: added to the denominator of the local rate.

    Example::

        optimizer = LARC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.02, clip: bool = True,
                 eps: float = 1e-8) -> None:
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip

    # Pickling keeps the wrapper itself (Apex forwarded these to the inner optimizer, which made
    # pickle.loads / copy.deepcopy of a LARC fail with an AttributeError).
    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return repr(self.optim)

    @property
    def state(self):
        return self.optim.state

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optim.param_groups = value

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.optim.defaults

    def state_dict(self) -> Dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        """Clear the gradients through the wrapped optimizer (its own ``set_to_none`` default if omitted)."""
        if set_to_none is None:
            self.optim.zero_grad()
        else:
            self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optim.add_param_group(param_group)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Rescale the gradients by LARC's local rates, then step the wrapped optimizer.

        Args:
            closure: optional; re-evaluates the model and returns the loss. It runs once, before the
                gradients are rescaled, and its loss is returned.

        Returns:
            The closure's loss, or the wrapped optimizer's return value when there is no closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved_decays: List[Tuple[Dict[str, Any], bool, Any]] = []
        try:
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                saved_decays.append((group, "weight_decay" in group, weight_decay))
                group["weight_decay"] = 0
                self._rescale_grads(group, weight_decay)
            result = self.optim.step()
        finally:
            for group, had_decay, weight_decay in saved_decays:
                if had_decay:
                    group["weight_decay"] = weight_decay
                else:
                    del group["weight_decay"]
        return loss if closure is not None else result

    @torch.no_grad()
    def _rescale_grads(self, group: Dict[str, Any], weight_decay: float) -> None:
        """Fold weight decay into and apply LARC's factor to the gradients of one param group, in place."""
        with_grads = [p for p in group["params"] if p.grad is not None]
        for indices in group_indices(with_grads).values():  # one launch per (device, dtype)
            params = pick(with_grads, indices)
            grads = [p.grad for p in params]
            param_norms = torch.stack(_torch_compat.foreach_norm(params)).float()
            grad_norms = torch.stack(_torch_compat.foreach_norm(grads)).float()
            local_rate = self.trust_coefficient * param_norms / (grad_norms + param_norms * weight_decay + self.eps)
            if self.clip:
                local_rate = torch.clamp(local_rate / group["lr"], max=1.0)
            adapted = (param_norms != 0) & (grad_norms != 0)
            if weight_decay != 0:
                decay = torch.where(adapted, weight_decay, 0.0)
                _torch_compat.foreach_add_(grads, _torch_compat.foreach_mul(params, list(decay.unbind(0))))
            factors = torch.where(adapted, local_rate, 1.0)
            _torch_compat.foreach_mul_(grads, list(factors.unbind(0)))
