"""``FusedLAMB``: Apex's LAMB optimizer (global-norm clipping, Adam moments, per-tensor trust ratio)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch

from .._multi_tensor import lamb_math
from ._base import FusedOptimizerBase
from .._multi_tensor.tensor_lists import LOW_PRECISION, Fp32Work, group_indices, pick


class FusedLAMB(FusedOptimizerBase):
    """Apex's ``FusedLAMB`` (Apex's arithmetic; torch has no LAMB), written with ``torch._foreach_*``.

    Per step: the L2 norm of *all* gradients (every group) is computed; gradients are divided by
    ``norm / max_grad_norm`` when the norm exceeds ``max_grad_norm`` (the constructor's value, as in
    Apex); then per group the Adam-style update ``u`` and ``p -= lr * (||p|| / ||u||) * u`` for tensors
    with nonzero weight decay (all tensors with ``use_nvlamb``). See :func:`.lamb_math.lamb_`.

    State is Apex's format: ``step`` per param group, ``exp_avg``/``exp_avg_sq`` per parameter (kept in
    FP32 for FP16/BF16 parameters; Apex kept them in the parameter's dtype but did the math in FP32).
    No host synchronisation per step.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate.
        bias_correction: apply Adam's bias corrections.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: weight decay factor.
        amsgrad: not supported (raises, as Apex).
        adam_w_mode: decay added to the update (True) or to the gradient (False).
        grad_averaging: scale the new gradient by ``1 - beta1`` in the first moment.
        set_grad_none: ``zero_grad()`` sets gradients to None (else zeros them).
        max_grad_norm: global gradient-norm clipping threshold.
        use_nvlamb: apply the trust ratio to parameters without weight decay too.

    Raises:
        RuntimeError: Apex's message for ``amsgrad=True``.
    """

    _fp32_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 amsgrad: bool = False, adam_w_mode: bool = True, grad_averaging: bool = True,
                 set_grad_none: bool = True, max_grad_norm: float = 1.0, use_nvlamb: bool = False) -> None:
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults, set_grad_none)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.use_nvlamb = use_nvlamb

    def _step_groups(self, groups: List[Tuple[Dict[str, Any], List[torch.Tensor]]]) -> None:
        all_params = [p for _, params in groups for p in params]
        clip_divisor = (lamb_math.clip_divisor(lamb_math.global_grad_norm(all_params), self.defaults["max_grad_norm"])
                        if all_params else None)
        for group, params in groups:
            group["step"] = group.get("step", 0) + 1
            if params:
                self._update_group(group, params, clip_divisor)

    def _update_group(self, group: Dict[str, Any], params: List[torch.Tensor], clip_divisor: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        step = group["step"]
        if group["bias_correction"]:
            bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        else:
            bc1 = bc2 = 1.0
        for indices in group_indices(params).values():
            members = pick(params, indices)
            states = [self._init_state(p) for p in members]
            weights = Fp32Work(members)
            lamb_math.lamb_(
                weights.values, Fp32Work([p.grad for p in members]).values,
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, beta3=1 - beta1 if group["grad_averaging"] else 1.0,
                eps=group["eps"], weight_decay=group["weight_decay"], adam_w_mode=bool(self.adam_w_mode),
                bias_correction1=bc1, bias_correction2=bc2, grad_clip_divisor=clip_divisor,
                use_nvlamb=self.use_nvlamb)
            weights.write_back()

    def _init_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = self._fp32_state(p)
        if len(state) == 0:
            dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

