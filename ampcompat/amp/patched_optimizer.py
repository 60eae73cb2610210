"""What ``amp.initialize`` installs on a user's optimizer: its lifecycle as ``_amp_stash``, and Apex's methods.

The optimizer object stays the caller's. ``patch_optimizer`` gives it ``_amp_stash`` (the lifecycle of
``optimizer_lifecycle``, of the gradient strategy the opt level asks for) and binds, as instance
attributes, Apex's private methods (``_prepare_amp_backward``, ``_post_amp_backward``,
``_lazy_init_maybe_master_weights``, ``_amp_lazy_init``, ``_master_params_to_model_params``) and the
patched ``step`` / ``zero_grad`` to the lifecycle's own methods. ``add_param_group``, and with master
weights ``state_dict`` / ``load_state_dict`` (which carry the FP32 masters, so a resumed run is bitwise
the uninterrupted one), are wrapped here; so is pickling, which keeps the lifecycle and re-binds the
methods on the copy.
"""
from __future__ import annotations

import types
from typing import Any, Dict

import torch

from .fused_master_weights import master_weights_for
from .master_weights import MasterWeights
from .model_gradients import ModelGradients, all_params
from .optimizer_lifecycle import OptimizerLifecycle

_PRIVATE_METHODS = (
    "_lazy_init_maybe_master_weights",
    "_master_params_to_model_params",
    "_prepare_amp_backward",
    "_post_amp_backward",
    "_amp_lazy_init",
)
MASTERS_KEY = "amp_master_params"


def check_optimizer(optimizer: Any) -> None:
    """Raise Apex's errors for an optimizer that already went through ``amp.initialize``."""
    if hasattr(optimizer, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    for name in _PRIVATE_METHODS:
        if hasattr(optimizer, name):
            raise RuntimeError("Incoming optimizer already has {} defined.".format(name))


def patch_optimizer(optimizer: Any, master_weights: bool) -> None:
    """Give ``optimizer`` amp's lifecycle and methods in place (call :func:`check_optimizer` first).

    Args:
        optimizer: the optimizer to patch.
        master_weights: whether it steps FP32 masters (O2/O5: the fused step's strategy where it applies,
            see ``fused_master_weights``) or the model's own parameters.
    """
    lifecycle = master_weights_for(optimizer) if master_weights else ModelGradients(optimizer)
    optimizer._amp_stash = lifecycle
    _bind_amp_methods(optimizer, lifecycle)


def _bind_amp_methods(optimizer: Any, lifecycle: OptimizerLifecycle) -> None:
    bind = lambda fn: types.MethodType(fn, optimizer)  # noqa: E731
    optimizer.__getstate__ = bind(_amp_getstate)
    optimizer._lazy_init_maybe_master_weights = lifecycle._lazy_init
    optimizer._amp_lazy_init = lifecycle._lazy_init
    optimizer._prepare_amp_backward = lifecycle._set_aside_grads
    optimizer._post_amp_backward = lifecycle._unscale_grads
    optimizer.add_param_group = bind(_amp_add_param_group)
    optimizer.step = lifecycle.step
    if isinstance(lifecycle, MasterWeights):
        optimizer._master_params_to_model_params = lifecycle.copy_masters_to_model
        optimizer.zero_grad = lifecycle.zero_grad
        optimizer.state_dict = bind(_amp_state_dict)
        optimizer.load_state_dict = bind(_amp_load_state_dict)


def _class_method(optimizer: Any, name: str) -> Any:
    """The optimizer class's own method, bound — bypassing the instance attributes amp installs."""
    return getattr(type(optimizer), name).__get__(optimizer, type(optimizer))


def _amp_add_param_group(self: Any, param_group: Dict[str, Any]) -> None:
    if not isinstance(param_group, dict):
        raise AssertionError("param group must be a dict")  # Apex's type and words; kept under python -O
    lifecycle: OptimizerLifecycle = self._amp_stash
    lifecycle._lazy_init()
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
            "in sets will change between runs. Please use a list instead."
        )
    else:
        params = list(params)
    known = {id(p) for p in all_params(self)} | {id(p) for p in lifecycle._plan.half}
    if any(id(p) in known for p in params) or len({id(p) for p in params}) != len(params):
        raise ValueError("some parameters appear in more than one parameter group")
    group = dict(param_group)
    group["params"] = params
    admitted = lifecycle._admit(params)
    _class_method(self, "add_param_group")(group)
    lifecycle._admitted(admitted)  # only now that the optimizer took the group do amp's lists learn of it


def _amp_state_dict(self: Any) -> Dict[str, Any]:
    """The optimizer's state dict plus its FP32 masters, so resuming is bitwise exact."""
    masters = self._amp_stash.saved_masters()
    state = _class_method(self, "state_dict")()
    state[MASTERS_KEY] = masters
    return state


def _amp_load_state_dict(self: Any, state_dict: Dict[str, Any]) -> None:
    """Load a state dict; restore saved masters, or rebuild them from the model at the next backward."""
    lifecycle: MasterWeights = self._amp_stash
    masters = state_dict.get(MASTERS_KEY)
    plain = {k: v for k, v in state_dict.items() if k != MASTERS_KEY}
    lifecycle._lazy_init()
    lifecycle.check_saved_masters(masters)
    _class_method(self, "load_state_dict")(plain)
    lifecycle.restore_masters(masters)


def _amp_getstate(self: Any) -> Dict[str, Any]:
    """What deepcopy/pickle keep of an amp optimizer: torch's state, the lifecycle, and a re-binder.

    torch.optim.Optimizer.__getstate__ keeps only defaults/state/param_groups, which would make the copy
    a plain optimizer; the bound methods themselves do not pickle, so they are re-bound instead.
    """
    stash = self._amp_stash
    if isinstance(stash, MasterWeights):
        stash.materialise_master_grads()  # a fused update waiting for step() becomes master gradients the copy has
    state = dict(_class_method(self, "__getstate__")())
    state["_amp_stash"] = stash
    state["_amp_rebind"] = _Rebind(self)
    return state


class _Rebind:
    """Unpickles (and deep-copies) into a call that re-binds amp's methods on the optimizer's copy."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def __reduce__(self):
        # The copy's lifecycle is passed along: the copy's own attributes are not set yet when this runs.
        return (_bind_amp_methods, (self.optimizer, self.optimizer._amp_stash))
