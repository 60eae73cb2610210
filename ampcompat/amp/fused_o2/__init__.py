"""The fused O2 step: from half gradients to updated FP32 masters, optimizer state and half weights in one pass.

On CUDA, with Triton, an O2 step can read each half gradient once to check it for inf/NaN
(:func:`check_finite_`) and once more in a kernel that unscales it, updates the FP32 master and the
optimizer's own ``state`` tensors (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) and writes
the half model weight (:func:`fused_adam_step`, :func:`fused_sgd_step`): no FP32 master gradient exists.
The arithmetic is that of torch's fused Adam/AdamW and SGD kernels. :func:`unavailable_reason`,
:func:`update_rule` (:func:`adam_not_covered`, :func:`sgd_not_covered`) say when the caller must take the
unfused path. ``amp.initialize`` gives an O2/O5 optimizer the fused step where they allow it
(``ampcompat.amp.fused_master_weights``); ``AMPCOMPAT_FUSED_O2=0`` or :func:`set_enabled` with False
turns it off.

Usage, per optimizer and (device, gradient dtype)::

    plan = FusedPlan([AdamTensors(masters, exp_avgs, exp_avg_sqs, steps, model_weights)], torch.float16)
    # every step:
    if plan.set_grads([grads]) is None:          # else: the unfused path for this step
        found_inf.zero_()
        check_finite_(plan, inv_scale, found_inf)
        fused_adam_step(plan, optimizer.param_groups, decoupled=True, inv_scale=inv_scale, found_inf=found_inf)
"""
from .coverage import (ENV_VAR, UpdateRule, adam_not_covered, decoupled_weight_decay, set_enabled, sgd_not_covered,
                       unavailable_reason, update_rule)
from .launch import check_finite_, fused_adam_step, fused_sgd_step
from .plan import AdamTensors, FusedPlan, SGDTensors

__all__ = [
    "AdamTensors", "ENV_VAR", "FusedPlan", "SGDTensors", "UpdateRule", "adam_not_covered", "check_finite_",
    "decoupled_weight_decay", "fused_adam_step", "fused_sgd_step", "set_enabled", "sgd_not_covered",
    "unavailable_reason", "update_rule",
]
