"""What every Apex fused optimizer shares: ``set_grad_none`` zeroing, gradient checks, state loading."""
from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .. import _torch_compat
from .._multi_tensor.tensor_lists import LOW_PRECISION, group_indices, non_finite, pick


class FusedOptimizerBase(torch.optim.Optimizer):
    """Base class of ampcompat's ``Fused*`` optimizers.

    Subclasses set ``_fp32_state_keys``: per-parameter state that is kept in FP32 for FP16/BF16
    parameters (as Apex did). ``torch.optim.Optimizer.load_state_dict`` casts all floating state to the
    parameter's dtype; this class restores those entries in FP32 from the loaded values afterwards, so
    a checkpoint round trip loses nothing.
    """

    _fp32_state_keys: Tuple[str, ...] = ()
    _sparse_message = "{name} does not support sparse gradients, please consider SparseAdam instead"

    def __init__(self, params: Iterable, defaults: Dict[str, Any], set_grad_none: bool) -> None:
        super().__init__(params, defaults)
        self.set_grad_none = set_grad_none

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        """Clear gradients: to ``None`` if ``set_grad_none`` (Apex's no-argument form), else to zeros.

        Args:
            set_to_none: overrides ``set_grad_none`` for this call (torch's keyword).
        """
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else bool(set_to_none))

    #: Whether ``step`` accepts sparse gradients (Apex's FusedSGD did; the others raise).
    _allows_sparse = False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = self._closure_loss(closure)
        groups = [(group, self._params_with_grads(group, self._allows_sparse)) for group in self.param_groups]
        self._step_groups(groups)
        return loss

    def _step_groups(self, groups: List[Tuple[Dict[str, Any], List[torch.Tensor]]]) -> None:
        """Update every ``(param_group, params that have a gradient)`` pair; the subclass's algorithm."""
        raise NotImplementedError

    @staticmethod
    def _closure_loss(closure: Optional[Callable[[], Any]]) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _params_with_grads(self, group: Mapping[str, Any], allow_sparse: bool = False) -> List[torch.Tensor]:
        """The group's parameters that have a gradient, after Apex's checks on them."""
        params = [p for p in group["params"] if p.grad is not None]
        name = type(self).__name__
        for p in params:
            if p.grad.is_sparse and not allow_sparse:
                raise RuntimeError(self._sparse_message.format(name=name))
            if not p.is_floating_point() or p.is_complex():
                raise RuntimeError("{} only support fp16 and fp32.".format(name))
        return params

    def _fp32_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``self.state[p]``, with any ``_fp32_state_keys`` entry of a half parameter in FP32."""
        state = self.state[p]
        if p.dtype in LOW_PRECISION:
            for key in self._fp32_state_keys:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.dtype != torch.float32:
                    state[key] = value.float()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load state saved by this class, or by Apex's class of the same name (see ``_from_apex_format``)."""
        state_dict = self._from_apex_format(state_dict)
        super().load_state_dict(state_dict)
        self._restore_fp32_state(state_dict)

    def _from_apex_format(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Convert an Apex-format state dict to this class's format (default: nothing to convert)."""
        return state_dict

    def _restore_fp32_state(self, state_dict: Mapping[str, Any]) -> None:
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None or p.dtype not in LOW_PRECISION:
                continue
            for key in self._fp32_state_keys:
                value = saved.get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


def copy_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``state_dict`` whose top level, ``state`` entries and group dicts can be edited freely."""
    return {
        **state_dict,
        "state": {k: dict(v) for k, v in state_dict["state"].items()},
        "param_groups": [dict(g) for g in state_dict["param_groups"]],
    }


def step_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A per-parameter step counter as torch's optimizers keep it (0-dim FP32)."""
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def place_steps(states: List[Dict[str, torch.Tensor]], devices: List[torch.device]) -> List[torch.Tensor]:
    """The states' ``step`` tensors, each moved to its target device first if it is elsewhere."""
    steps = []
    for state, device in zip(states, devices):
        step = state["step"]
        if step.device != device or step.dtype != torch.float32:
            step = state["step"] = step.to(device=device, dtype=torch.float32)
        steps.append(step)
    return steps


def _found_inf_per_device(optimizer: torch.optim.Optimizer) -> Dict[torch.device, torch.Tensor]:
    """``{device: found_inf}`` (0-dim float32, 1.0 where a gradient holds inf/NaN), as ``GradScaler`` keeps it."""
    grads = [g.coalesce().values() if g.is_sparse else g
             for group in optimizer.param_groups for g in (p.grad for p in group["params"]) if g is not None]
    return {device: non_finite(pick(grads, indices)).float()
            for device, indices in group_indices(grads, key=lambda g: g.device).items()}


def scaler_tensors(optimizer: torch.optim.Optimizer,
                   grad_scaler: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_scale, found_inf)`` from a ``GradScaler`` handing itself to ``step`` (its older protocol).

    ``grad_scale`` is None when the scaler already unscaled this optimizer's gradients (``unscale_``);
    ``found_inf`` sums the scaler's inf/NaN findings over devices (checking the gradients if it has not).
    """
    try:
        found_per_device = _torch_compat.grad_scaler_found_inf_per_device(grad_scaler, optimizer)
    except NotImplementedError:  # torch's CUDA check kernel has no BF16 version: check those gradients here
        found_per_device = _found_inf_per_device(optimizer)
        _torch_compat.grad_scaler_record_found_inf(grad_scaler, optimizer, found_per_device)
    device = next(iter(found_per_device.values())).device if found_per_device else None
    found_inf = sum(v.to(device) for v in found_per_device.values()) if found_per_device else None
    if _torch_compat.grad_scaler_unscaled(grad_scaler, optimizer):
        return None, found_inf
    grad_scale = _torch_compat.grad_scaler_scale(grad_scaler)
    return grad_scale, found_inf
