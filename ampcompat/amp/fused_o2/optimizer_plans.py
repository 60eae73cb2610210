"""One optimizer's fused O2 step: its plans, built from the optimizer's own state, and their launches.

:class:`OptimizerPlans` maps an optimizer whose update :func:`~.coverage.update_rule` names onto
:class:`~.plan.FusedPlan` tables: one plan for the FP32 masters of its half parameters (which writes the
half weights), one for its FP32 parameters stepped in place (BatchNorm under O2), param group by param
group in ``param_groups`` order. The tables point into the optimizer's own ``state`` tensors (``step``,
``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), so the state stays torch's: checkpoints, LR schedulers
and code reading the state see what the optimizer's own ``step`` would have left.

Plans are built only once torch has created that state (after the optimizer's first step of every
parameter): the fused step never invents state, so a first step, a new param group or a freshly loaded
checkpoint without it take the unfused path once.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch

from ... import _torch_compat
from .coverage import UpdateRule
from .launch import check_finite_, fused_adam_step, fused_sgd_step
from .plan import AdamTensors, FusedPlan, SGDTensors

_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


class OptimizerPlans:
    """The fused step's tables for one optimizer; see :meth:`build`.

    Attributes:
        device: the device every tensor of the step lives on.
        takes_device_verdict: whether the launches can skip on an overflow flag on the device (step counts
            the kernel advances); else the verdict must be clean on the host before :meth:`step_plan`.
        plan_count: how many plans :meth:`step_plan` launches, the half parameters' first.
    """

    def __init__(self, optimizer: Any, rule: UpdateRule, plans: List[FusedPlan], params: List[List[List[Any]]],
                 device: torch.device) -> None:
        self.rule = rule
        self.device = device
        self._state = optimizer.state  # torch's load_state_dict replaces it: the tables would be stale
        self._plans = plans
        self._params = params  # per plan, per param group: the parameters whose .grad the plan reads
        self.plan_count = len(plans)
        self.takes_device_verdict = rule.kind == "sgd" or all(plan.device_steps for plan in plans)
        self._ones = torch.ones(1, dtype=torch.float32, device=device)  # the scale of already unscaled grads
        self._grads: Optional[List[List[List[Any]]]] = None

    @classmethod
    def build(cls, optimizer: Any, rule: UpdateRule, half_groups: Sequence[Sequence[torch.Tensor]],
              master_groups: Sequence[Sequence[torch.Tensor]],
              fp32_groups: Sequence[Sequence[torch.Tensor]]) -> Union["OptimizerPlans", str]:
        """The plans for ``optimizer``'s param groups, or why the fused step cannot take them now.

        Args:
            optimizer: the optimizer, its ``state`` created by its own first step.
            rule: its update (:func:`~.coverage.update_rule`).
            half_groups: per param group, the model's half parameters (the half weights the step writes).
            master_groups: per param group, their FP32 masters (what the optimizer steps), in the same order.
            fp32_groups: per param group, the FP32 parameters the optimizer steps in place.

        Returns:
            The plans; or one sentence saying why not (the state is not there yet, the tensors span several
            devices or half dtypes, or a tensor's layout differs from its master's).
        """
        tensors = [t for group in master_groups for t in group] + [t for group in fp32_groups for t in group]
        if not tensors:
            return "the optimizer steps no trainable parameter"
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            return "the parameters span several devices"
        device = devices.pop()
        half_dtypes = {p.dtype for group in half_groups for p in group}
        if len(half_dtypes) > 1:
            return "the model's parameters mix float16 and bfloat16"
        reason = _state_missing(optimizer, rule, master_groups, fp32_groups)
        if reason is not None:
            return reason
        # Triton's interpreter runs on the CPU, where a step count's device says nothing: the default Adam
        # advances its counts on the host, the fused one (which skips on the device) in its kernel.
        steps_on_host = None if device.type != "cpu" else not getattr(
            optimizer, _torch_compat.STEP_SUPPORTS_AMP_SCALING, False)
        plans, params = [], []
        try:
            for grad_dtype, groups, models in ((half_dtypes.pop() if half_dtypes else None, master_groups, half_groups),
                                               (torch.float32, fp32_groups, None)):
                if grad_dtype is None or not any(groups):
                    continue
                tensors = [_tensors(optimizer, rule, optimizer.param_groups[g], masters,
                                    models[g] if models is not None else None) for g, masters in enumerate(groups)]
                plans.append(FusedPlan(tensors, grad_dtype, steps_on_host=steps_on_host if rule.kind == "adam" else None))
                params.append([list(g) for g in (models if models is not None else groups)])
        except ValueError as error:
            return str(error)
        return cls(optimizer, rule, plans, params, device)

    def made_for(self, optimizer: Any) -> bool:
        """Whether ``optimizer.state`` is still the mapping the tables were built from (one identity test)."""
        return optimizer.state is self._state

    def is_current(self, optimizer: Any) -> bool:
        """Whether the tables still point at the optimizer's state and parameters (a loaded state dict or a
        moved tensor makes them stale)."""
        if optimizer.state is not self._state:
            return False
        for plan in self._plans:
            if not plan.is_current():
                return False
        return True

    def set_grads(self) -> Optional[str]:
        """Point the tables at the parameters' gradients now, and keep those gradients alive until
        :meth:`release_grads`. Returns None, or why the kernels cannot read them (the unfused path then)."""
        grads = []
        for plan, params in zip(self._plans, self._params):
            plan_grads = [[p.grad for p in group] for group in params]
            reason = plan.set_grads(plan_grads)
            if reason is not None:
                return reason
            grads.append(plan_grads)
        self._grads = grads
        return None

    def half_grads(self) -> List[torch.Tensor]:
        """The half parameters' gradients :meth:`set_grads` took, flat, in param group order."""
        if self._grads is None or self._plans[0].grad_dtype == torch.float32:
            return []
        return [g for group in self._grads[0] for g in group]

    def release_grads(self) -> None:
        self._grads = None

    def check_(self, inv_scale: torch.Tensor, flag: torch.Tensor) -> None:
        """Set ``flag`` where a half gradient times ``inv_scale`` is inf/NaN (read-only; FP32 parameters'
        gradients are unscaled and checked by the loss scaler, in place, as on the unfused path)."""
        plan = self._plans[0]
        if plan.grad_dtype != torch.float32:
            check_finite_(plan, inv_scale, flag)

    def step_plan(self, index: int, param_groups: Sequence[Any], inv_scale: torch.Tensor,
                  found_inf: Optional[torch.Tensor]) -> None:
        """Launch plan ``index``'s update of every param group (hyper-parameters read from ``param_groups``
        now, so LR schedulers apply). The half parameters' plan (index 0 when there is one) reads gradients
        that carry the scale, ``inv_scale``; the FP32 parameters' plan reads gradients already unscaled.

        Raises:
            ValueError: for launch arguments the kernels refuse (nothing of this plan was launched).
            Exception: whatever Triton raises when a kernel cannot compile or load (nothing launched).
        """
        plan = self._plans[index]
        scale = inv_scale if plan.grad_dtype != torch.float32 else self._ones
        if self.rule.kind == "adam":
            fused_adam_step(plan, param_groups, decoupled=self.rule.decoupled, inv_scale=scale, found_inf=found_inf)
        else:
            fused_sgd_step(plan, param_groups, inv_scale=scale, found_inf=found_inf)

    def plan_params(self, index: int) -> List[Any]:
        """The parameters plan ``index`` steps (the half model parameters, or the FP32 ones), flat."""
        return [p for group in self._params[index] for p in group]


def _state_missing(optimizer: Any, rule: UpdateRule, master_groups, fp32_groups) -> Optional[str]:
    state = optimizer.state
    for g, group in enumerate(optimizer.param_groups):
        needed = _ADAM_STATE if rule.kind == "adam" else ("momentum_buffer",) if group.get("momentum", 0) else ()
        if not needed:
            continue
        for p in list(master_groups[g]) + list(fp32_groups[g]):
            entry = state.get(p)
            if entry is None or any(key not in entry for key in needed):
                return "the optimizer has not created its state for every parameter yet (its own first step does)"
    return None


def _tensors(optimizer: Any, rule: UpdateRule, group: dict, masters: Sequence[torch.Tensor],
             models: Optional[Sequence[torch.Tensor]]) -> Union[AdamTensors, SGDTensors]:
    states = [optimizer.state[m] for m in masters]
    models = list(models) if models is not None else None
    if rule.kind == "adam":
        return AdamTensors(list(masters), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                           [s["step"] for s in states], models)
    buffers = [s["momentum_buffer"] for s in states] if group.get("momentum", 0) else None
    return SGDTensors(list(masters), buffers, models)
