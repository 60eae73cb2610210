"""``FusedAdagrad``: Apex's Adagrad optimizer, computed by torch's fused (or foreach) Adagrad kernels."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch

from .. import _torch_compat

from . import _native
from .._multi_tensor import update_rules
from ._base import FusedOptimizerBase, copy_state_dict, place_steps, step_tensor
from .._multi_tensor.tensor_lists import Fp32Work, fused_kernels_supported, group_indices, pick


class FusedAdagrad(FusedOptimizerBase):
    """Apex's ``FusedAdagrad``: ``h += g*g; p -= lr * g / (sqrt(h) + eps)``.

    With ``adagrad_w_mode=False`` (default; L2 decay added to the gradient) this is torch's Adagrad with
    ``lr_decay=0`` and ``initial_accumulator_value=0`` and runs torch's kernel (``fused=True`` where
    torch has one for every parameter, else ``foreach``). ``adagrad_w_mode=True`` (decay added to the
    update, AdamW-style) uses a foreach implementation of Apex's kernel. State is torch's format: per
    parameter ``step`` and ``sum`` (Apex kept only ``sum``; Apex checkpoints load).

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate.
        eps: added to the denominator.
        weight_decay: weight decay factor.
        set_grad_none: ``zero_grad()`` sets gradients to None (else zeros them).
        adagrad_w_mode: decoupled weight decay if True, L2 added to the gradient if False.
    """

    _sparse_message = "{name} does not support sparse gradients"

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0,
                 set_grad_none: bool = True, adagrad_w_mode: bool = False) -> None:
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, set_grad_none)
        self.adagrad_w_mode = 1 if adagrad_w_mode else 0

    def _step_groups(self, groups: List[Tuple[Dict[str, Any], List[torch.Tensor]]]) -> None:
        for group, params in groups:
            if not params:
                continue
            if self.adagrad_w_mode:
                self._own_step(group, params)
            else:
                self._native_step(group, params)

    def _init_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = step_tensor(0, torch.device("cpu"))
            state["sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _native_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        fused = fused_kernels_supported(params, "_fused_adagrad_")
        states = [self._init_state(p) for p in params]
        devices = [p.device if fused else torch.device("cpu") for p in params]
        _native.adagrad(params, [p.grad for p in params], [s["sum"] for s in states], place_steps(states, devices),
                        grad_scale=None, found_inf=None, has_sparse_grad=False, differentiable=False,
                        has_complex=False, lr=group["lr"], weight_decay=group["weight_decay"], lr_decay=0.0,
                        eps=group["eps"], maximize=False, **_native.implementation(fused))

    def _own_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        states = [self._init_state(p) for p in params]
        steps = place_steps(states, [torch.device("cpu")] * len(params))
        _torch_compat.foreach_add_(steps, 1)
        for indices in group_indices(params).values():
            members = pick(params, indices)
            weights = Fp32Work(members)
            sums = Fp32Work([s["sum"] for s in pick(states, indices)])
            update_rules.adagrad_(weights.values, Fp32Work([p.grad for p in members]).values, sums.values,
                                 lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                                 adagrad_w_mode=True)
            weights.write_back()
            sums.write_back()

    def _from_apex_format(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Apex's state had no step counter (it did not need one): start each at 0."""
        if all("step" in s for s in state_dict["state"].values()):
            return state_dict
        converted = copy_state_dict(state_dict)
        for param_state in converted["state"].values():
            param_state.setdefault("step", step_tensor(0, torch.device("cpu")))
        return converted
