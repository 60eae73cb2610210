"""``FusedNovoGrad``: Apex's NovoGrad optimizer (Adam-like with a per-tensor second moment)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import _torch_compat

from .._multi_tensor import update_rules
from ._base import FusedOptimizerBase, copy_state_dict
from .._multi_tensor.tensor_lists import LOW_PRECISION, Fp32Work, group_indices, pick, stack_scalars

_NORM_MESSAGE = "FusedNovoGrad only support l2/inf norm now."


class FusedNovoGrad(FusedOptimizerBase):
    """Apex's ``FusedNovoGrad`` (Apex's arithmetic; torch has no NovoGrad), written with ``torch._foreach_*``.

    The second moment is one number per tensor: the gradient norm (L2 for ``norm_type=2``, max-abs for
    ``norm_type=0``) blended over steps, ``v = sqrt(b2*v^2 + (1-b2)*||g||^2)`` (L2) or
    ``v = b2*v + (1-b2)*||g||`` (inf). It starts at 0 with ``init_zero``, else at the first norm. See
    :func:`ampcompat._multi_tensor.update_rules.novograd_` for the update. No host synchronisation per step.

    State: ``step`` per param group (as Apex); per parameter ``exp_avg`` (FP32 for FP16/BF16
    parameters) and ``exp_avg_sq``, a 0-dim FP32 tensor. Apex kept the per-tensor norms as two tensors
    in the param group (one per dtype), which broke when the set of parameters with gradients changed;
    Apex checkpoints are converted on ``load_state_dict``.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate.
        bias_correction: apply bias corrections (``sqrt(1 - b2^t)`` for the norm).
        betas: coefficients of the running averages of the gradient and its norm.
        eps: added to the denominator.
        weight_decay: weight decay factor.
        amsgrad: not supported (raises, as Apex).
        reg_inside_moment: apply the normalisation and decay inside the first moment (the paper's
            form) instead of on the update.
        grad_averaging: scale the new gradient by ``1 - beta1`` in the first moment.
        norm_type: 2 (L2) or 0 (infinity norm).
        init_zero: start the norm average at 0 instead of the first step's norm.
        set_grad_none: ``zero_grad()`` sets gradients to None (else zeros them).

    Raises:
        RuntimeError: Apex's messages for ``amsgrad=True`` and (at ``step``) a ``norm_type`` other than
            0 or 2.
    """

    _fp32_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, reg_inside_moment: bool = False, grad_averaging: bool = True,
                 norm_type: int = 2, init_zero: bool = False, set_grad_none: bool = True) -> None:
        if amsgrad:
            raise RuntimeError("FusedNovoGrad does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, norm_type=norm_type, init_zero=init_zero)
        super().__init__(params, defaults, set_grad_none)
        self.moment_mode = 0 if reg_inside_moment else 1

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: Apex's message if a group's ``norm_type`` is neither 2 nor 0.
        """
        if any(group["norm_type"] not in (0, 2) for group in self.param_groups):
            raise RuntimeError(_NORM_MESSAGE)
        return super().step(closure)

    def _step_groups(self, groups: List[Tuple[Dict[str, Any], List[torch.Tensor]]]) -> None:
        for group, params in groups:
            group["step"] = group.get("step", 0) + 1
            if params:
                self._update_group(group, params)

    def _update_group(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        step = group["step"]
        if group["bias_correction"]:
            bc1, bc2 = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
        else:
            bc1 = bc2 = 1.0
        order = 2 if group["norm_type"] == 2 else math.inf
        for indices in group_indices(params).values():
            members = pick(params, indices)
            device = members[0].device
            grads = Fp32Work([p.grad for p in members]).values
            norms = stack_scalars(_torch_compat.foreach_norm(grads, order), device)
            states = [self._init_state(p, norm, group["init_zero"]) for p, norm in zip(members, norms.unbind())]
            averages = [s["exp_avg_sq"] for s in states]
            blended = update_rules.blend_grad_norms(stack_scalars(averages, device), norms, beta2, group["norm_type"])
            _torch_compat.foreach_copy_(averages, list(blended.unbind()))
            weights = Fp32Work(members)
            update_rules.novograd_(
                weights.values, grads, [s["exp_avg"] for s in states], blended,
                lr=group["lr"], beta1=beta1, beta3=1 - beta1 if group["grad_averaging"] else 1.0,
                eps=group["eps"], weight_decay=group["weight_decay"], reg_inside_moment=self.moment_mode == 0,
                bias_correction1=bc1, bias_correction2=bc2)
            weights.write_back()

    def _init_state(self, p: torch.Tensor, first_norm: torch.Tensor, init_zero: bool) -> Dict[str, torch.Tensor]:
        state = self._fp32_state(p)
        if len(state) == 0:
            dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(first_norm) if init_zero else first_norm.clone()
        return state

    def _from_apex_format(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Apex kept ``exp_avg_sq = [fp16 norms, fp32 norms]`` in each group; move them to the parameters.

        Apex's lists followed the group's parameter order among those that had state, split by dtype
        (of ``exp_avg``, which had the parameter's dtype).

        Raises:
            ValueError: if a group's norms do not match its parameters with state.
        """
        if not any(isinstance(g.get("exp_avg_sq"), (list, tuple)) for g in state_dict["param_groups"]):
            return state_dict
        converted = copy_state_dict(state_dict)
        for group in converted["param_groups"]:
            per_dtype = group.pop("exp_avg_sq", None)
            if per_dtype is None:
                continue
            with_state = [i for i in group["params"] if "exp_avg" in converted["state"].get(i, {})]
            half = [i for i in with_state if converted["state"][i]["exp_avg"].dtype == torch.float16]
            full = [i for i in with_state if converted["state"][i]["exp_avg"].dtype != torch.float16]
            for ids, norms in zip((half, full), per_dtype):
                count = 0 if norms is None else norms.numel()
                if count != len(ids):
                    raise ValueError(
                        "FusedNovoGrad state_dict: a param group holds {} per-tensor norms for {} parameters "
                        "with state; the checkpoint does not match this optimizer's parameters.".format(
                            count, len(ids)))
                for param_id, norm in zip(ids, [] if norms is None else norms.float().reshape(-1).unbind()):
                    converted["state"][param_id]["exp_avg_sq"] = norm.clone()
        return converted
