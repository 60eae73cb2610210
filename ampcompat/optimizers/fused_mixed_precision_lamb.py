"""``FusedMixedPrecisionLamb``: Apex's LAMB for FP16/BF16 parameters, with FP32 master copies and state."""
from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import _torch_compat
from .._multi_tensor import lamb_math
from ._base import scaler_tensors
from .._multi_tensor.tensor_lists import group_indices, pick

_TENSOR_DEFAULTS = ("lr", "step")


class FusedMixedPrecisionLamb(torch.optim.Optimizer):
    """Apex's ``FusedMixedPrecisionLamb``: LAMB (see :class:`~ampcompat.optimizers.FusedLAMB`) for models kept
    in reduced precision, stepped by ``torch.amp.GradScaler`` without unscaling first.

    What is kept where, as in Apex:

    * Each param group's ``lr`` (0-dim FP32) and ``step`` (shape ``(1,)``, int32) are tensors on the
      parameters' device; LR schedulers update ``lr`` in place.
    * Parameters of ``reduced_precision_dtype`` get an FP32 master copy (made at their first step, so a
      model synchronised after the optimizer was built is copied as synchronised) and FP32 moments
      ``exp_avg``/``exp_avg_sq``; LAMB updates the master, which is then copied into the parameter.
      Other parameters are updated in place and their moments have their own dtype.
    * Per step: the L2 norm of all gradients (every group) is computed on the still-scaled gradients and
      compared with ``max_grad_norm`` times the loss scale; the gradients are unscaled inside the update.
      As Apex's kernel did, the update (before the trust ratio) is written into each ``.grad``, in the
      gradient's dtype, and applied as written.
    * A step with inf/NaN gradients (found by the ``GradScaler``, or in the gradient norm) changes
      nothing: no parameter, moment or ``step`` count.

    The loss scale comes from ``step(grad_scaler=scaler)`` (how ``GradScaler.step`` calls optimizers that
    set ``_step_supports_amp_scaling``, as Apex's did) or from the ``grad_scale``/``found_inf`` attributes
    PyTorch's newer ``GradScaler`` protocol sets. One host synchronisation per step reads whether to skip
    (Apex's kernels decided on the device).

    ``optimizer.state_dict()`` is Apex's, plus each master copy under ``master_param`` in its parameter's
    state, so a resumed run continues from the FP32 masters; Apex checkpoints (without them) load, and
    the masters are then copied from the loaded parameters.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate.
        step: the step count to start from (bias correction).
        bias_correction: apply Adam's bias corrections.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: weight decay factor.
        amsgrad: not supported (raises, as Apex).
        adam_w_mode: decay added to the update (True) or to the gradient (False).
        grad_averaging: scale the new gradient by ``1 - beta1`` in the first moment.
        max_grad_norm: global gradient-norm clipping threshold (of the unscaled gradients).
        use_nvlamb: apply the trust ratio to parameters without weight decay too.
        reduced_precision_dtype: the dtype (``torch.float16``/``torch.bfloat16``) of parameters that get
            FP32 master copies; None: none do.

    Raises:
        RuntimeError: Apex's message for ``amsgrad=True``.
        TypeError: if ``reduced_precision_dtype`` is not a floating-point ``torch.dtype`` (or None).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, step: int = 0, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 amsgrad: bool = False, adam_w_mode: bool = True, grad_averaging: bool = True,
                 max_grad_norm: float = 1.0, use_nvlamb: bool = False,
                 reduced_precision_dtype: Optional[torch.dtype] = None) -> None:
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        if reduced_precision_dtype is not None and not (
                isinstance(reduced_precision_dtype, torch.dtype) and reduced_precision_dtype.is_floating_point):
            raise TypeError("FusedMixedPrecisionLamb: reduced_precision_dtype must be a floating-point torch.dtype "
                            f"(torch.float16 or torch.bfloat16) or None, not {reduced_precision_dtype!r}")
        defaults = dict(lr=torch.tensor(lr, dtype=torch.float32), step=torch.tensor([step], dtype=torch.int32),
                        bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device
        self._dummy_overflow_buf = torch.zeros(1, dtype=torch.int32, device=device)
        self.reduced_precision_dtype = reduced_precision_dtype
        setattr(self, _torch_compat.STEP_SUPPORTS_AMP_SCALING, True)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.use_nvlamb = use_nvlamb

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group; its ``lr`` and ``step`` become its own tensors on its parameters' device."""
        super().add_param_group(param_group)
        self._place_group_tensors(self.param_groups[-1])

    def _place_group_tensors(self, group: Dict[str, Any]) -> None:
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        lr, step = group["lr"], group["step"]
        lr = lr.clone() if lr is self.defaults["lr"] else torch.as_tensor(lr)
        step = step.clone() if step is self.defaults["step"] else torch.as_tensor(step)
        group["lr"] = lr.to(device=device, dtype=torch.float32).reshape(())
        group["step"] = step.to(device=device, dtype=torch.int32).reshape(1)

    @property
    def param_groups_full_precision(self) -> List[Dict[str, List[Optional[torch.Tensor]]]]:
        """Apex's view of the FP32 master copies: per group, ``{"params": [master or None per parameter]}``."""
        return [{"params": [self.state[p].get("master_param") if p in self.state else None for p in group["params"]]}
                for group in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler: Any = None) -> Any:
        """Perform one optimization step (skipped, changing nothing, when the gradients hold inf/NaN).

        Args:
            closure: re-evaluates the model and returns the loss.
            grad_scaler: a ``torch.amp.GradScaler`` whose scale is divided out of the gradients here and
                whose inf/NaN finding skips the step (``GradScaler.step`` passes itself). Without it, the
                ``grad_scale``/``found_inf`` attributes of PyTorch's newer protocol are honoured.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: for a sparse gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, self._params_with_grads(group)) for group in self.param_groups]
        stepped = [p for _, params in groups for p in params]
        if not stepped:
            return loss
        if grad_scaler is not None:
            grad_scale, found_inf = scaler_tensors(self, grad_scaler)
        else:
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        device = stepped[0].device
        scale = torch.ones((), device=device) if grad_scale is None else grad_scale.to(device).float().reshape(())
        inv_scale = scale.double().reciprocal().float()
        grad_norm = lamb_math.global_grad_norm(stepped)
        clip_divisor = lamb_math.clip_divisor(grad_norm, self.defaults["max_grad_norm"] * scale)
        skip = ~torch.isfinite(grad_norm)
        if found_inf is not None:
            skip = skip | (found_inf.to(device).reshape(()) > 0)
        self._dummy_overflow_buf.copy_(skip)
        if bool(skip):
            return loss
        for group, params in groups:
            group["step"] += 1
            if params:
                self._update_group(group, params, clip_divisor, inv_scale)
        return loss

    def _update_group(self, group: Dict[str, Any], params: List[torch.Tensor], clip_divisor: torch.Tensor,
                      inv_scale: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        for indices in group_indices(params).values():
            members = pick(params, indices)
            device = members[0].device
            step = group["step"].to(device=device, dtype=torch.float32).reshape(())
            bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
            states = [self._init_state(p) for p in members]
            masters = [s.get("master_param") for s in states]
            with_masters = masters[0] is not None
            lamb_math.lamb_mixed_precision_(
                [p.grad for p in members], masters if with_masters else members,
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                members if with_masters else None, lr=group["lr"].to(device), beta1=beta1, beta2=beta2,
                beta3=1 - beta1 if group["grad_averaging"] else 1.0, eps=group["eps"],
                weight_decay=group["weight_decay"], adam_w_mode=bool(self.adam_w_mode), bias_correction1=bc1,
                bias_correction2=bc2, grad_clip_divisor=clip_divisor, inv_scale=inv_scale,
                use_nvlamb=self.use_nvlamb)

    def _init_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = self.state[p]
        reduced = self.reduced_precision_dtype is not None and p.dtype == self.reduced_precision_dtype
        if reduced and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        if "exp_avg" not in state:
            dtype = torch.float32 if reduced else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        return state

    def _params_with_grads(self, group: Dict[str, Any]) -> List[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("FusedMixedPrecisionLamb does not support sparse gradients")
        return params

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load state saved by this class or by Apex's: every state tensor keeps the dtype it was saved in
        (FP32 moments and masters of half parameters stay FP32), moved to its parameter's device."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for group in self.param_groups:
            group["lr"], group["step"] = torch.as_tensor(group["lr"]).clone(), torch.as_tensor(group["step"]).clone()
            self._place_group_tensors(group)
