"""``FusedSGD``: Apex's SGD optimizer, computed by torch's fused (or foreach) SGD kernels."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim.optimizer import required

from . import _native
from .._multi_tensor import update_rules
from ._base import FusedOptimizerBase
from .._multi_tensor.tensor_lists import Fp32Work, fused_kernels_supported, group_indices, pick, split


class FusedSGD(FusedOptimizerBase):
    """Apex's ``FusedSGD``: ``v = momentum*v + (1-dampening)*g; p -= lr*v`` (torch's formulation).

    Runs torch's own SGD kernel (``fused=True`` where torch has one for every parameter's device and
    dtype, else ``foreach``; sparse gradients take torch's per-tensor path). ``wd_after_momentum=True``
    (weight decay added after the momentum) has no torch equivalent and uses a foreach implementation
    of Apex's kernel. State is torch's: ``momentum_buffer`` per parameter, created on the first step and
    only when ``momentum != 0`` (Apex also created zero buffers for ``momentum == 0``).

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (required).
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
        wd_after_momentum: add the weight decay after the momentum instead of to the gradient.
        materialize_master_grads: accepted for compatibility; amp always materializes FP32 master
            gradients here (Apex could fuse the unscale into this optimizer's kernel instead).
        set_grad_none: ``zero_grad()`` sets gradients to None (else zeros them).

    Raises:
        ValueError: Apex's messages for a negative lr, momentum or weight decay, and for Nesterov
            without momentum or with dampening.
    """

    def __init__(self, params: Iterable, lr: float = required, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, wd_after_momentum: bool = False,
                 materialize_master_grads: bool = True, set_grad_none: bool = False) -> None:
        if lr is not required and lr < 0.0:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if momentum < 0.0:
            raise ValueError("Invalid momentum value: {}".format(momentum))
        if weight_decay < 0.0:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, set_grad_none)
        self.wd_after_momentum = wd_after_momentum
        self.materialize_master_grads = materialize_master_grads
        # Read and reset by amp's skipped-step logic in Apex; kept so code touching them still works.
        self.most_recent_scale = 1.0
        self.scale_set_by_backward = False

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    _allows_sparse = True

    def _fused_o2_rule(self) -> Any:
        """The fused O2 step's answer for this optimizer (``ampcompat.amp.fused_o2.coverage.update_rule``):
        torch's SGD update where this class runs it (not ``wd_after_momentum`` with weight decay, this
        class's ``step``), else why not."""
        from ..amp.fused_o2.coverage import UpdateRule  # noqa: PLC0415 - asked only by amp.initialize at O2

        if inspect.unwrap(type(self).step) is not inspect.unwrap(FusedSGD.step):
            return f"{type(self).__name__} replaces FusedSGD.step"
        if self.wd_after_momentum and any(group["weight_decay"] for group in self.param_groups):
            return "FusedSGD adds its weight decay after the momentum (wd_after_momentum=True)"
        return UpdateRule("sgd")

    def _step_groups(self, groups: List[Tuple[Dict[str, Any], List[torch.Tensor]]]) -> None:
        for group, params in groups:
            # Parameters seeing their first gradient start their momentum from it; keep them apart so
            # each call has one consistent notion of "first step".
            for members in split(params, lambda p: "momentum_buffer" in self.state[p]):
                if members:
                    self._update(group, members)

    def _update(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        if self.wd_after_momentum and group["weight_decay"] != 0:
            self._own_update(group, params)
        else:
            self._native_update(group, params)

    def _native_update(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        buffers: List[Optional[torch.Tensor]] = [self.state[p].get("momentum_buffer") for p in params]
        sparse = any(p.grad.is_sparse for p in params)
        implementation = ({"fused": False, "foreach": False} if sparse
                          else _native.implementation(fused_kernels_supported(params, "_fused_sgd_")))
        _native.sgd(params, [p.grad for p in params], buffers, has_sparse_grad=sparse,
                    grad_scale=None, found_inf=None, weight_decay=group["weight_decay"],
                    momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                    nesterov=group["nesterov"], maximize=False, **implementation)
        if group["momentum"] != 0:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer

    def _own_update(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        momentum = group["momentum"]
        first_run = momentum != 0 and "momentum_buffer" not in self.state[params[0]]
        if first_run:
            for p in params:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for indices in group_indices(params).values():
            members = pick(params, indices)
            weights = Fp32Work(members)
            buffers = Fp32Work([self.state[p]["momentum_buffer"] for p in members] if momentum != 0 else [])
            update_rules.sgd_(weights.values, Fp32Work([p.grad for p in members]).values, buffers.values,
                             lr=group["lr"], weight_decay=group["weight_decay"], momentum=momentum,
                             dampening=group["dampening"], nesterov=group["nesterov"],
                             wd_after_momentum=True, first_run=first_run)
            weights.write_back()
            buffers.write_back()
