"""The gradient strategy without master weights (O0, O1, O3, O4): the model's own gradients, unscaled in place.

The optimizer steps the model's parameters. At each ``scale_loss`` entry gradients already there are put
aside, so only the new ones are unscaled at the exit, and then added back (gradient accumulation); a pass
that finds none put aside and a dense gradient everywhere unscales all of them with one launch per
(device, dtype), grouped once at lazy init. The helpers for putting gradients aside and adding them back
are shared with ``master_weights`` (its FP32 parameters) and the old API's ``OptimWrapper``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from .. import _torch_compat
from .optimizer_lifecycle import OptimizerLifecycle, param_counts
from .scaler import LossScaler

HALF_TYPES = (torch.float16, torch.bfloat16)


def param_type_error(param: torch.Tensor) -> TypeError:
    """Apex's error for a parameter that is neither FP32 nor half."""
    return TypeError(
        "Optimizer's parameters must be either torch.cuda.FloatTensor or torch.cuda.HalfTensor. "
        "Received {}".format(param.type())
    )


def all_params(optimizer: Any) -> List[torch.Tensor]:
    """Every parameter of every param group, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def set_aside(params: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Take the parameters' gradients off them (returned, in order; None where there was none)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def coalesce_sparse(params: Sequence[torch.Tensor]) -> None:
    """Coalesce uncoalesced sparse gradients before the inf/NaN check: duplicate indices are summed in the
    gradient's dtype (an FP16 sum can overflow), as torch.amp.GradScaler does."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()


def split_new_grads(params: Sequence[torch.Tensor], aside: Sequence[Optional[torch.Tensor]]):
    """Sort a backward pass's gradients: ``(all new ones, new ones with one set aside, those set aside)``.

    A parameter that got no new gradient gets the one set aside back.
    """
    coalesce_sparse(params)
    new, accumulating, previous = [], [], []
    for p, old in zip(params, aside):
        if p.grad is not None:
            new.append(p.grad)
            if old is not None:
                accumulating.append(p.grad)
                previous.append(old)
        elif old is not None:
            p.grad = old
    return new, accumulating, previous


def unscale_and_add_back(scaler: LossScaler, params: Sequence[torch.Tensor],
                         aside: Sequence[Optional[torch.Tensor]]) -> bool:
    """New gradients are divided by the scale (and checked); where one was set aside it is added back.

    Returns:
        Whether any parameter got a new gradient.
    """
    new, accumulating, previous = split_new_grads(params, aside)
    scaler.unscale_(new)
    if accumulating:
        _torch_compat.foreach_add_(accumulating, previous)
    return bool(new)


class ModelGradientsPlan:
    """The lists a no-master optimizer works with, decided at lazy init (Apex's ``all_fp16_params`` and
    ``all_fp32_params``).

    Args:
        half: the FP16/BF16 parameters, in param-group order.
        fp32: the FP32 parameters, in param-group order.
        param_count: the param groups' sizes these lists were made from.
    """

    def __init__(self, half: List[torch.Tensor], fp32: List[torch.Tensor], param_count: List[int]) -> None:
        self.half = half
        self.fp32 = fp32
        self.model_side = half + fp32  # the parameters backward writes gradients to
        # One (device, dtype) for all: a clean pass unscales them with one launch, without grouping.
        self.one_group = len({(p.device, p.dtype) for p in self.model_side}) <= 1
        self.param_count = param_count


def classify(params: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(half params, FP32 params)``; Apex's TypeError for any other dtype."""
    half, fp32 = [], []
    for p in params:
        if p.dtype in HALF_TYPES:
            half.append(p)
        elif p.dtype == torch.float32:
            fp32.append(p)
        else:
            raise param_type_error(p)
    return half, fp32


class ModelGradients(OptimizerLifecycle):
    """The lifecycle of an optimizer that steps the model's own parameters (O0, O1, O3, O4)."""

    def _lazy_init(self) -> None:
        if self._plan is None:
            self._plan = ModelGradientsPlan(*classify(all_params(self._optimizer)), param_counts(self._optimizer))

    def _set_aside_grads(self) -> None:
        if self._plan is None:
            self._lazy_init()
        for p in self._plan.model_side:
            if p.grad is not None:  # accumulating onto existing grads: only the new ones get unscaled
                self._set_aside = set_aside(self._plan.model_side)
                return

    def _unscale_grads(self, scaler: LossScaler) -> bool:
        plan = self._plan
        if plan is None:
            self._lazy_init()
            plan = self._plan
        aside, self._set_aside = self._set_aside, None
        if aside is None and plan.one_group:
            grads = [g for p in plan.model_side if (g := p.grad) is not None and not g.is_sparse]
            if len(grads) == len(plan.model_side):  # every param got a dense grad: the usual pass
                self.unscale_paths["fast"] += 1
                scaler.unscale_groups_((grads,))
                return bool(grads)
        self.unscale_paths["general"] += 1
        return unscale_and_add_back(scaler, plan.model_side, aside or [None] * len(plan.model_side))

    def _admit(self, params: List[torch.Tensor]) -> Any:
        """Check a param group's parameters before the optimizer takes it (Apex's TypeError)."""
        return classify(params)

    def _admitted(self, admitted: Any) -> None:
        """The optimizer took the group :meth:`_admit` checked: its parameters join the lists."""
        half, fp32 = admitted
        plan = self._plan
        self._plan = ModelGradientsPlan(plan.half + half, plan.fp32 + fp32, param_counts(self._optimizer))

    def _restore_grads(self) -> None:
        aside, self._set_aside = self._set_aside, None
        if aside is not None:
            for p, old in zip(self._plan.model_side, aside):
                p.grad = old

    # Apex's names for the lists and the gradient stashes.

    @property
    def all_fp16_params(self) -> List[torch.Tensor]:
        return self._lists("all_fp16_params").half

    @property
    def all_fp32_params(self) -> List[torch.Tensor]:
        return self._lists("all_fp32_params").fp32

    @property
    def all_fp16_grad_stash(self) -> List[Optional[torch.Tensor]]:
        return self._stash_view(0, len(self._lists("all_fp16_grad_stash").half))

    @property
    def all_fp32_grad_stash(self) -> List[Optional[torch.Tensor]]:
        plan = self._lists("all_fp32_grad_stash")
        return self._stash_view(len(plan.half), len(plan.model_side))

    def _stash_view(self, start: int, stop: int) -> List[Optional[torch.Tensor]]:
        aside = self._set_aside
        return list(aside[start:stop]) if aside is not None else [None] * (stop - start)
