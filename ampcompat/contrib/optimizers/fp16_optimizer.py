"""``apex.contrib.optimizers.FP16_Optimizer``: FP32 masters (one per parameter) and loss scaling around
``apex.contrib.optimizers.FusedAdam`` / ``FusedSGD``. See ``ampcompat.optimizers._fused_fp16_optimizer``."""
from __future__ import annotations

from typing import List, Optional

import torch

from ampcompat.optimizers._fused_fp16_optimizer import FusedFP16OptimizerBase

__all__ = ["FP16_Optimizer"]


class FP16_Optimizer(FusedFP16OptimizerBase):
    """Per-parameter FP32 master weights and loss scaling around a fused contrib optimizer.

    Every parameter of the wrapped optimizer gets an FP32 master that replaces it in ``param_groups``;
    ``optimizer.backward(loss)`` scales the loss; ``step()`` skips on inf/NaN or lets the optimizer
    update the masters from the scaled FP16 gradients and write the FP16 weights.
    ``state_dict()["fp32_groups"]`` holds the masters per group.

    Args:
        init_optimizer: the optimizer over the (FP16) model's parameters.
        static_loss_scale: the loss scale when not dynamic.
        dynamic_loss_scale: start at 2**16, halve on overflow, double after 1000 clean iterations.
        dynamic_loss_args: not supported (raises ``SystemError``, as in Apex).
        verbose: print the overflow lines of dynamic scaling.

    Raises:
        SystemError: ``dynamic_loss_args`` with ``dynamic_loss_scale`` (Apex's exception).
        TypeError: for a non-optimizer.
    """

    _banner = ("\nThis fp16_optimizer is designed to only work with apex.contrib.optimizers.*",
               "To update, use updated optimizers with AMP.")
    _masters_key = "fp32_groups"

    def _make_masters(self) -> None:
        self.fp32_groups: List[List[torch.Tensor]] = []
        for group in self.optimizer.param_groups:
            params = list(group["params"])
            masters = [p.detach().clone().float().requires_grad_(True) for p in params]
            self.fp16_groups.append(params)
            self.fp32_groups.append(masters)
            group["params"] = masters

    def _step_lists(self, fp16_grads: List[List[Optional[torch.Tensor]]]):
        return fp16_grads, self.fp16_groups
