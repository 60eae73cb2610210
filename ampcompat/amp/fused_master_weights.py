"""The O2/O5 gradient strategy with the fused step: no FP32 master gradients unless user code reads them.

Where ``fused_o2.coverage`` says the device and the optimizer are covered (CUDA with Triton; torch's
Adam/AdamW/SGD, ampcompat's FusedAdam/FusedSGD), ``amp.initialize`` gives an O2/O5 optimizer this
strategy instead of :class:`~.master_weights.MasterWeights`. A ``scale_loss`` block's exit then leaves
the half gradients where backward put them: it takes the inverse of the scale they carry (before the
scale policy updates the scale), checks them for inf/NaN into the loss scaler's overflow flag with a
read-only kernel, and unscales the FP32 parameters' gradients in place as the unfused path does. The
scale update that follows is unchanged (on the device for torch's fused optimizers, no host sync). At
``step()`` one fused launch per (gradient dtype, param group) unscales each half gradient, updates the
master and the optimizer's own state tensors, and writes the half weight: the optimizer's own ``step``
and the master -> model copy do not run. Skips, Apex's messages, LR schedulers and the optimizer's
``state`` are those of the unfused path.

Each exit's path is explicit: ``unscale_paths["fused"]`` counts the fused exits and ``unfused_reason``
says why an exit was not fused. Whatever needs FP32 master gradients takes the unfused path for that
step, the gradients being materialised from the half ones first (same bits as the unfused exit would
have made): user code reading them through ``amp.master_params`` or Apex's master lists, a second
``scale_loss`` block before the step, a block after ``delay_unscale``, ``delay_overflow_check``, step
hooks, a first step (torch creates its state), sparse or missing gradients, a changed param group or
state dict. A kernel that cannot compile or launch turns the fused step off for the process, with one
warning, and the step it failed in takes the unfused path.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from .. import _torch_compat
from .fused_o2 import coverage
from .fused_o2.optimizer_plans import OptimizerPlans
from .master_weights import MasterWeights
from .optimizer_lifecycle import OptState
from .scaler import LossScaler, check_and_scale_

_SCALED, _OVERFLOW_ON_DEVICE = OptState.SCALED, OptState.OVERFLOW_ON_DEVICE
_HOOKS = "optimizer step hooks are registered (the fused step would not run them)"
_GENERAL = "the exit adds onto gradients of an earlier block, or spans several devices or dtypes"
_NOT_THIS_BLOCK = "the block follows delay_unscale or uses delay_overflow_check"


class _FusedStep:
    """The fused step's state for one optimizer (one field of the lifecycle, so the field list stays short)."""

    def __init__(self) -> None:
        self.plans: Optional[OptimizerPlans] = None  # the launch tables, built once torch made its state
        self.plans_for: Any = None  # the MasterWeightsPlan they were built from
        self.refused_for: Any = None  # (lists, state, its size) the last failed build saw: not retried until changed
        self.refusal: Optional[str] = None
        self.may_fuse = False  # the running block's exit may take the fused path
        self.inv_scale: Optional[torch.Tensor] = None  # an update waits for step(): 1/scale its gradients carry
        self.wrote_model = False  # the last update wrote the half weights itself

    def __getstate__(self) -> dict:
        # The tables hold the addresses of this optimizer's tensors, not of a copy's: a copy (deepcopy, pickle)
        # starts without them and builds its own. (A waiting update was materialised before copying.)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def master_weights_for(optimizer: Any) -> MasterWeights:
    """The O2/O5 strategy for ``optimizer``: the fused step where it applies, else the unfused one.

    Decided once, at ``amp.initialize``: the switch (``AMPCOMPAT_FUSED_O2``, ``fused_o2.set_enabled``), the
    parameters' device (CUDA with Triton), the optimizer's class and options. The unfused strategy's
    ``unfused_reason`` says why.
    """
    reason = coverage.switched_off_reason()
    if reason is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        reason = coverage.unavailable_reason(params[0].device) if params else "the optimizer has no parameters"
    if reason is None:
        rule = coverage.update_rule(optimizer)
        if isinstance(rule, str):
            reason = rule
    if reason is None:
        return FusedMasterWeights(optimizer)
    lifecycle = MasterWeights(optimizer)
    lifecycle.unfused_reason = reason
    return lifecycle


class FusedMasterWeights(MasterWeights):
    """The lifecycle of an O2/O5 optimizer whose step the fused kernels compute (see the module docstring)."""

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer)
        self._fused = _FusedStep()
        self.unscale_paths.update(fused=0, materialised=0)

    # --- entering a block ---------------------------------------------------------------------------

    def enter(self, set_aside: bool, may_fuse: bool = True) -> None:
        fused = self._fused
        if fused.inv_scale is not None:  # a second block before the step accumulates onto master gradients
            self._materialise()
        super().enter(set_aside, may_fuse)
        fused.may_fuse = may_fuse = may_fuse and self._state is not _SCALED
        # Until the exit says otherwise: the general path (which never asks the fused one) or this block's options.
        self.unfused_reason = _GENERAL if may_fuse else _NOT_THIS_BLOCK

    # --- leaving it ---------------------------------------------------------------------------------

    def _unscale_fast(self, scaler: LossScaler) -> Optional[bool]:
        if self._fused.may_fuse and self._in_block:  # (Apex's _post_amp_backward called by hand: unfused)
            produced = self._fused_exit(scaler)
            if produced is not None:
                return produced
        return super()._unscale_fast(scaler)

    def _fused_exit(self, scaler: LossScaler) -> Optional[bool]:
        """The exit without master gradients; None (and ``unfused_reason`` set) where it does not apply."""
        fused = self._fused
        optimizer = self._optimizer
        lists = self._plan
        for master in lists.masters:
            if master.grad is not None:
                self.unfused_reason = _GENERAL
                return None
        failure = coverage.failure_reason()
        if failure is not None:  # a kernel failed in this process: off for every optimizer
            self._drop_plans(failure)
            return None
        if _torch_compat.optimizer_step_hooks_registered(optimizer):
            self.unfused_reason = _HOOKS
            return None
        plans = fused.plans
        if plans is None or fused.plans_for is not lists or not plans.is_current(optimizer):
            plans = self._build_plans()
            if isinstance(plans, str):
                self.unfused_reason = plans
                return None
        reason = plans.set_grads()
        if reason is not None:
            self.unfused_reason = reason
            return None
        device = plans.device
        inv_scale = scaler.inverse_scale_snapshot(device)
        try:
            scaler.check_overflow_(device, plans.check_, inv_scale)
        except Exception as error:  # noqa: BLE001 - any kernel failure: the unfused path, one warning
            coverage.disable_after_failure(error)
            self._drop_plans(coverage.switched_off_reason())
            return None
        if lists.fp32:  # unscaled in place, as the unfused path does (user code may read them)
            scaler.unscale_groups_(([p.grad for p in lists.fp32],))  # (set_grads saw every one)
        fused.inv_scale = inv_scale
        self.unscale_paths["fused"] += 1
        self.unfused_reason = None
        return True

    def _build_plans(self) -> Any:
        """The fused step's tables for the current lists and state, or why not (remembered until they change)."""
        fused = self._fused
        optimizer = self._optimizer
        lists = self._plan
        seen = (lists, optimizer.state, len(optimizer.state))
        refused = fused.refused_for
        if refused is not None and refused[0] is lists and refused[1] is seen[1] and refused[2] == seen[2]:
            return fused.refusal
        rule = coverage.update_rule(optimizer)
        plans = rule if isinstance(rule, str) else OptimizerPlans.build(
            optimizer, rule, lists.fp16_groups, lists.fp32_from_fp16_groups, lists.fp32_from_fp32_groups)
        if isinstance(plans, str):
            fused.plans, fused.refused_for, fused.refusal = None, seen, plans
        else:
            fused.plans, fused.plans_for, fused.refused_for = plans, lists, None
        return plans

    def _drop_plans(self, reason: Optional[str]) -> None:
        fused = self._fused
        if fused.plans is not None:
            fused.plans.release_grads()
        fused.plans = fused.plans_for = None
        self.unfused_reason = reason

    # --- master gradients, where user code needs them -------------------------------------------------

    def materialise_master_grads(self) -> None:
        if self._fused.inv_scale is not None:
            self._materialise()

    def _materialise(self) -> None:
        """The waiting update's half gradients into FP32 master gradients, unscaled (bitwise the unfused
        exit's); the step then takes the unfused path."""
        fused = self._fused
        inv_scale, fused.inv_scale = fused.inv_scale, None
        plans = fused.plans
        grads16 = plans.half_grads()
        plans.release_grads()
        self.unscale_paths["materialised"] += 1
        if not grads16:
            return
        masters = fused.plans_for.masters
        fresh = [torch.empty_like(m) for m in masters]
        _torch_compat.foreach_copy_(fresh, grads16)
        check_and_scale_(fresh, torch.zeros(1, dtype=torch.float32, device=fresh[0].device), inv_scale)
        for master, grad in zip(masters, fresh):
            master.grad = grad

    @property
    def fp32_from_fp16_groups(self) -> List[List[torch.Tensor]]:
        self.materialise_master_grads()
        return super().fp32_from_fp16_groups

    @property
    def all_fp32_from_fp16_params(self) -> List[torch.Tensor]:
        self.materialise_master_grads()
        return super().all_fp32_from_fp16_params

    # --- the step -------------------------------------------------------------------------------------

    def _own_update(self, closure: Any) -> Any:
        """``step``'s update: the fused launches when this step's gradients took the fused exit, else the
        optimizer's own ``step`` (``closure`` is always None: amp refuses closures with masters)."""
        if self._fused.inv_scale is not None:
            return self._fused_update()
        original, optimizer = self._original_step, self._optimizer
        return type(optimizer).step(optimizer) if original is None else original()

    def _fused_update(self) -> None:
        fused = self._fused
        optimizer = self._optimizer
        plans = fused.plans
        found_inf = self._deferred_records[-1].found_inf if self._state is _OVERFLOW_ON_DEVICE else None
        if (not plans.made_for(optimizer) or self._plan is not fused.plans_for
                or _torch_compat.optimizer_step_hooks_registered(optimizer)
                or (found_inf is not None and not plans.takes_device_verdict)):
            # Changed since the exit (a state dict loaded, a param group added, a hook registered): unfused.
            self._materialise()
            self._drop_plans("the optimizer changed between the scale_loss exit and step()")
            return self._own_update(None)
        inv_scale = fused.inv_scale
        groups = optimizer.param_groups
        for index in range(plans.plan_count):
            try:
                plans.step_plan(index, groups, inv_scale, found_inf)
            except Exception as error:  # noqa: BLE001 - nothing of plan `index` ran: the unfused step does it
                return self._unfused_after_failure(index, error)
        fused.inv_scale = None
        plans.release_grads()
        fused.wrote_model = True
        return None

    def _unfused_after_failure(self, index: int, error: Exception) -> Any:
        """Plan ``index`` refused or failed to compile (plans before it ran): the optimizer's own step
        updates what is left, from master gradients made for the half parameters if their plan failed."""
        if isinstance(error, ValueError):  # arguments the kernels do not take (a param group changed)
            reason = f"the fused step refused this step's arguments ({error})"
        else:
            coverage.disable_after_failure(error)
            reason = coverage.switched_off_reason()
        if index == 0:
            self._materialise()
        else:
            self._fused.inv_scale = None
        self._drop_plans(reason)
        return self._own_update(None)

    def _after_step(self) -> None:
        fused = self._fused
        if fused.wrote_model:  # the kernels wrote the half weights; no master gradient exists
            fused.wrote_model = False
            return
        super()._after_step()

    def _after_skip(self) -> None:
        self._drop_update()
        super()._after_skip()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._drop_update()
        super().zero_grad(set_to_none)

    def _drop_update(self) -> None:
        fused = self._fused
        if fused.inv_scale is not None:
            fused.inv_scale = None
            fused.plans.release_grads()
