"""``apex.optimizers.FP16_Optimizer``: the wrapper for the 2019 ``FusedAdam`` (flat FP32 masters per group).

Not ``apex.fp16_utils.FP16_Optimizer`` (amp's O2-style wrapper, ``ampcompat.fp16_utils``): this one is the
cut-down version Apex shipped with its fused optimizers until September 2019, used by
pytorch-pretrained-BERT 0.6 and the research code built on it::

    model.half()
    optimizer = FusedAdam(params, lr=5e-5, bias_correction=False, max_grad_norm=1.0)
    optimizer = FP16_Optimizer(optimizer, dynamic_loss_scale=True)
    optimizer.backward(loss)
    optimizer.step()

Each param group's parameters (all of one dtype) become views into one flat buffer, and the group's
FP32 master is one flat tensor, which is what the wrapped optimizer's ``param_groups``, its state and
``state_dict()["fp32_groups_flat"]`` hold (as in Apex, so checkpoints keep their layout).
See ``_fused_fp16_optimizer`` for the loss scaling and the step.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from .. import _torch_compat

from ._fused_fp16_optimizer import FusedFP16OptimizerBase

__all__ = ["FP16_Optimizer"]


class FP16_Optimizer(FusedFP16OptimizerBase):
    """Flat FP32 master weights and loss scaling around a 2019-style ``FusedAdam``.

    Args:
        init_optimizer: the optimizer over the FP16 model's parameters (its param groups are rewritten
            to hold one flat FP32 master each).
        static_loss_scale: the loss scale when not dynamic.
        dynamic_loss_scale: start at 2**16, halve on overflow, double after 1000 clean iterations.
        dynamic_loss_args: not supported (raises ``SystemError``, as in Apex).
        verbose: print the overflow lines of dynamic scaling.

    Raises:
        SystemError: ``dynamic_loss_args`` with ``dynamic_loss_scale`` (Apex's exception).
        TypeError: a param group mixing dtypes or devices, or a non-optimizer.

    A parameter without a gradient at ``step`` counts as a zero gradient in its group's flat gradient
    (Apex failed on it).
    """

    _banner = ("\nfp16_optimizer is designed to only work with apex.optimizers, and will be removed in future",
               "To update, use updated optimizers with AMP.")
    _masters_key = "fp32_groups_flat"

    def _make_masters(self) -> None:
        self.fp16_groups_flat: List[torch.Tensor] = []
        self.fp32_groups_flat: List[torch.Tensor] = []
        for index, group in enumerate(self.optimizer.param_groups):
            params = list(group["params"])
            kinds = {(p.dtype, p.device) for p in params}
            if len(kinds) > 1:
                raise TypeError(f"FP16_Optimizer: param group {index} mixes dtypes/devices {sorted(map(str, kinds))};"
                                " the flat master of a group needs one dtype and device")
        for group in self.optimizer.param_groups:
            params = list(group["params"])
            self.fp16_groups.append(params)
            if not params:
                self.fp16_groups_flat.append(torch.empty(0))
                self.fp32_groups_flat.append(torch.empty(0, requires_grad=True))
                group["params"] = []
                continue
            flat = _torch_compat.flatten_dense_tensors([p.detach().clone() for p in params])
            self.fp16_groups_flat.append(flat)
            master = flat.detach().clone().float().requires_grad_(True)
            self.fp32_groups_flat.append(master)
            group["params"] = [master]
        self._point_params_at_flat_buffers()

    def _point_params_at_flat_buffers(self) -> None:
        for params, flat in zip(self.fp16_groups, self.fp16_groups_flat):
            if params:
                for p, view in zip(params, _torch_compat.unflatten_dense_tensors(flat, params)):
                    p.data = view

    def _masters(self) -> List[List[torch.Tensor]]:
        return [[m] if params else [] for m, params in zip(self.fp32_groups_flat, self.fp16_groups)]

    def _step_lists(self, fp16_grads: List[List[Optional[torch.Tensor]]]):
        grads, outputs = [], []
        for params, group_grads, flat in zip(self.fp16_groups, fp16_grads, self.fp16_groups_flat):
            if not params:
                grads.append([])
                outputs.append([])
                continue
            filled = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, group_grads)]
            grads.append([_torch_compat.flatten_dense_tensors(filled)])
            outputs.append([flat])
        return grads, outputs

    def _after_step(self) -> None:
        self._point_params_at_flat_buffers()

    def _saved_masters(self) -> Any:
        return self.fp32_groups_flat

    def _flat_saved_masters(self, saved: Any) -> List[torch.Tensor]:
        return [t for t, params in zip(saved, self.fp16_groups) if params]
