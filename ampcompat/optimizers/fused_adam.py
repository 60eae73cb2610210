"""``FusedAdam``: Apex's Adam/AdamW optimizer, computed by torch's fused (or foreach) Adam kernels."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import _torch_compat

from . import _native
from .._multi_tensor import update_rules
from ._legacy_adam import legacy_adam_step
from ._base import FusedOptimizerBase, copy_state_dict, place_steps, scaler_tensors, step_tensor
from .._multi_tensor.tensor_lists import (LOW_PRECISION, Fp32Work, capturable_supported, fused_kernels_supported,
                            group_indices, pick)



class FusedAdam(FusedOptimizerBase):
    """Apex's ``FusedAdam``: AdamW by default (``adam_w_mode=True``), Adam with L2 decay otherwise.

    FP32/FP64 parameters with bias correction run torch's own Adam/AdamW kernel (``fused=True`` where
    torch has a fused kernel for every parameter's device and dtype, else ``foreach``), with Apex's
    defaults passed explicitly (note ``weight_decay=0``, not AdamW's 0.01). FP16/BF16 parameters keep
    FP32 moments and update in FP32 as Apex's kernel did; ``bias_correction=False`` and
    ``master_weights`` use the same foreach implementation of Apex's formula.

    State is torch's format: per parameter ``step`` (0-dim tensor), ``exp_avg``, ``exp_avg_sq``
    (+ ``master_param`` with ``master_weights``). Apex kept one ``step`` per param group; Apex
    checkpoints are converted on ``load_state_dict``.

    The API of Apex before September 2019 works too: the keywords ``eps_inside_sqrt`` and
    ``max_grad_norm``, and ``step(closure, grads, output_params, scale, grad_norms)`` as
    ``apex.optimizers.FP16_Optimizer`` calls it. An optimizer built with either keyword, and every
    ``step`` given one of those arguments, uses that era's arithmetic (see ``_legacy_adam``: ``eps`` is
    not bias-corrected and the weight decay is scaled by the bias-corrected step size; with
    ``bias_correction=False`` it equals today's AdamW mode).

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate.
        bias_correction: apply Adam's bias corrections.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        adam_w_mode: decoupled weight decay (AdamW) if True, L2 added to the gradient if False.
        weight_decay: weight decay factor.
        amsgrad: not supported (raises, as Apex).
        set_grad_none: ``zero_grad()`` sets gradients to None (else zeros them).
        capturable: use torch's graph-capturable implementation where the device supports it; also makes
            ``step`` accept ``grad_scaler`` from ``torch.amp.GradScaler.step`` (unscale + skip inside).
        master_weights: keep FP32 master copies of FP16/BF16 parameters (requires ``capturable``).
        eps_inside_sqrt: (2019 API) ``sqrt(v + eps)`` instead of ``sqrt(v) + eps``.
        max_grad_norm: (2019 API) clip the gradients of each param group to this L2 norm (0: no clipping).

    Raises:
        RuntimeError: with Apex's messages for ``amsgrad=True`` and ``master_weights`` without
            ``capturable``.
        ValueError: for a 2019 keyword with ``adam_w_mode=False``, ``capturable`` or ``master_weights``,
            which that era's arithmetic does not have.
    """

    _fp32_state_keys = ("exp_avg", "exp_avg_sq", "master_param")

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adam_w_mode: bool = True,
                 weight_decay: float = 0.0, amsgrad: bool = False, set_grad_none: bool = True,
                 capturable: bool = False, master_weights: bool = False, eps_inside_sqrt: bool = False,
                 max_grad_norm: float = 0.0) -> None:
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        if master_weights and not capturable:
            raise RuntimeError("Master weights is currently only supported with the capturable version.")
        self._legacy_math = bool(eps_inside_sqrt) or max_grad_norm != 0
        if self._legacy_math and (not adam_w_mode or capturable or master_weights):
            raise ValueError("FusedAdam: eps_inside_sqrt/max_grad_norm (the 2019 API) cannot be combined with "
                             "adam_w_mode=False, capturable or master_weights (today's API)")
        if max_grad_norm < 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        if self._legacy_math:
            defaults["max_grad_norm"] = max_grad_norm
        super().__init__(params, defaults, set_grad_none)
        self.eps_mode = 0 if eps_inside_sqrt else 1  # Apex's 2019 attribute
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.capturable = capturable
        self.master_weights = master_weights
        if capturable:
            setattr(self, _torch_compat.STEP_SUPPORTS_AMP_SCALING, True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, grads: Any = None, output_params: Any = None,
             scale: Any = None, grad_norms: Any = None, grad_scaler: Any = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss.
            grads: (2019 API) gradients to use instead of ``.grad``: a list per param group (or one
                flat list for one group); typically FP16 and multiplied by ``scale``.
            output_params: (2019 API) tensors (per group, like ``grads``) that receive a copy of the
                updated parameters, e.g. the FP16 model weights.
            scale: (2019 API) divide the gradients by this (the loss scale); default 1.
            grad_norms: (2019 API) per param group, the L2 norm of the still-scaled gradients, used for
                ``max_grad_norm`` clipping (computed here when absent).
            grad_scaler: a ``torch.amp.GradScaler`` whose scale is divided out of the gradients here and
                whose inf/NaN check skips the step (passed by ``GradScaler.step`` when ``capturable``).
                Without it, ``grad_scale``/``found_inf`` attributes set on the optimizer (torch's newer
                protocol) are honoured the same way.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: for a sparse gradient (Apex's message).
            ValueError: for 2019 arguments that do not match the param groups, or combined with
                ``grad_scaler`` / ``capturable``.
        """
        legacy_args = any(arg is not None for arg in (grads, output_params, scale, grad_norms))
        if legacy_args or getattr(self, "_legacy_math", False):
            if grad_scaler is not None or self.capturable:
                raise ValueError("FusedAdam.step: grads/output_params/scale/grad_norms (the 2019 API) cannot be "
                                 "combined with a GradScaler or capturable=True")
            loss = self._closure_loss(closure)
            legacy_adam_step(self, grads=grads, output_params=output_params, scale=1.0 if scale is None else scale,
                             grad_norms=grad_norms, eps_inside_sqrt=getattr(self, "eps_mode", 1) == 0)
            return loss
        loss = self._closure_loss(closure)
        if grad_scaler is not None:
            grad_scale, found_inf = scaler_tensors(self, grad_scaler)
        else:  # torch's newer protocol: GradScaler (or amp) sets these attributes around step()
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = self._params_with_grads(group)
            if not params:
                continue
            native = [p for p in params if self._runs_natively(group, p, grad_scale)]
            native_ids = {id(p) for p in native}
            own = [p for p in params if id(p) not in native_ids]
            if native:
                self._native_step(group, native, grad_scale, found_inf)
            if own:
                self._own_step(group, own, grad_scale, found_inf)
        return loss

    def _fused_o2_rule(self) -> Any:
        """The fused O2 step's answer for this optimizer (``ampcompat.amp.fused_o2.coverage.update_rule``):
        its Adam/AdamW update where it runs torch's own arithmetic (bias correction, no 2019 API, no
        ``capturable``/``master_weights``, this class's ``step``), else why not."""
        from ..amp.fused_o2.coverage import UpdateRule  # noqa: PLC0415 - asked only by amp.initialize at O2

        if inspect.unwrap(type(self).step) is not inspect.unwrap(FusedAdam.step):
            return f"{type(self).__name__} replaces FusedAdam.step"
        if getattr(self, "_legacy_math", False):
            return "FusedAdam uses the 2019 API's arithmetic (eps_inside_sqrt or max_grad_norm)"
        if self.capturable or self.master_weights:
            return "FusedAdam is capturable or keeps its own master weights"
        if not all(group["bias_correction"] for group in self.param_groups):
            return "FusedAdam without bias correction"
        return UpdateRule("adam", bool(self.adam_w_mode))

    @property
    def _fused_op(self) -> str:
        return "_fused_adamw_" if self.adam_w_mode else "_fused_adam_"

    def _runs_natively(self, group: Dict[str, Any], p: torch.Tensor, grad_scale: Optional[torch.Tensor]) -> bool:
        if not group["bias_correction"] or p.dtype in LOW_PRECISION:
            return False
        return grad_scale is None or fused_kernels_supported([p], self._fused_op)

    def _native_step(self, group: Dict[str, Any], params: List[torch.Tensor],
                     grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        fused = fused_kernels_supported(params, self._fused_op)
        capturable = self.capturable and capturable_supported(params)
        steps_on_device = fused or capturable
        states = [self._init_state(p, on_device=steps_on_device) for p in params]
        devices = [p.device if steps_on_device else torch.device("cpu") for p in params]
        beta1, beta2 = group["betas"]
        _native.adam(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], place_steps(states, devices),
            capturable=capturable, differentiable=False, has_complex=False,
            grad_scale=grad_scale, found_inf=found_inf, decoupled_weight_decay=bool(self.adam_w_mode),
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False, **_native.implementation(fused))

    def _own_step(self, group: Dict[str, Any], params: List[torch.Tensor],
                  grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        states = [self._init_state(p, on_device=False) for p in params]
        if found_inf is not None and bool(found_inf):
            return  # GradScaler found inf/NaN: skip, as Apex's capturable kernel did
        steps = place_steps(states, [torch.device("cpu")] * len(params))
        _torch_compat.foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        buckets = group_indices(params, key=lambda p: (p.device, p.dtype))
        for indices in buckets.values():
            for step_value, members in _by_step(steps, indices).items():
                self._own_update(group, pick(params, members), pick(states, members), step_value,
                                 beta1, beta2, grad_scale)

    def _own_update(self, group: Dict[str, Any], params: List[torch.Tensor], states: List[Dict[str, Any]],
                    step: float, beta1: float, beta2: float, grad_scale: Optional[torch.Tensor]) -> None:
        masters = [s.get("master_param") for s in states]
        weights = Fp32Work([m if m is not None else p for m, p in zip(masters, params)])
        grads = Fp32Work([p.grad for p in params]).values
        if grad_scale is not None:
            grads = _torch_compat.foreach_div(grads, grad_scale.to(params[0].device).reshape(()))
        if group["bias_correction"]:
            bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        else:
            bc1 = bc2 = 1.0
        update_rules.adam_(weights.values, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                          lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"], adam_w_mode=bool(self.adam_w_mode),
                          bias_correction1=bc1, bias_correction2=bc2)
        weights.write_back()
        with_master = [i for i, m in enumerate(masters) if m is not None]
        if with_master:
            _torch_compat.foreach_copy_(pick(params, with_master), pick(masters, with_master))

    def _init_state(self, p: torch.Tensor, on_device: bool) -> Dict[str, Any]:
        state = self._fp32_state(p)
        if len(state) == 0:
            moment_dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
            state["step"] = step_tensor(0, p.device if on_device else torch.device("cpu"))
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        if self.master_weights and p.dtype in LOW_PRECISION and "master_param" not in state:
            state["master_param"] = p.detach().float()
        return state

    def _from_apex_format(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Apex kept ``step`` in each param group; give each parameter's state that step instead."""
        if not any("step" in g for g in state_dict["param_groups"]):
            return state_dict
        converted = copy_state_dict(state_dict)
        for group in converted["param_groups"]:
            group_step = group.pop("step", None)
            if group_step is None:
                continue
            for param_id in group["params"]:
                param_state = converted["state"].get(param_id)
                if param_state is not None and "step" not in param_state:
                    param_state["step"] = step_tensor(float(group_step), torch.device("cpu"))
        return converted


def _by_step(steps: List[torch.Tensor], indices: List[int]) -> Dict[float, List[int]]:
    """Indices grouped by their (CPU) step count: bias corrections are per step value."""
    groups: Dict[float, List[int]] = {}
    for i in indices:
        groups.setdefault(float(steps[i]), []).append(i)
    return groups

