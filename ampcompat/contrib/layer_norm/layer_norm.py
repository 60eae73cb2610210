"""``apex.contrib.layer_norm.FastLayerNorm``: layer norm over the last dimension, output in the weight's dtype.

Apex's kernel computed in FP32 and returned the weight's dtype; under autocast it cast the input and
the parameters to the autocast dtype first. ``ampcompat.normalization``'s mixed-dtype rule is exactly
that, so this module is a thin front for it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import init

from ampcompat.normalization.fused_layer_norm import mixed_dtype_fused_layer_norm_affine

__all__ = ["FastLayerNorm", "FastLayerNormFN"]


class FastLayerNormFN:
    """``FastLayerNormFN.apply(x, gamma, beta, epsilon, memory_efficient=False)``: Apex's functional form."""

    @staticmethod
    def apply(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, epsilon: float,
              memory_efficient: bool = False) -> torch.Tensor:
        if gamma.shape != beta.shape or gamma.dim() != 1 or x.size(-1) != gamma.numel():
            raise RuntimeError(f"FastLayerNorm: weight and bias must be 1-D of the input's last size {x.size(-1)}; "
                               f"got {tuple(gamma.shape)} and {tuple(beta.shape)}")
        if gamma.dtype != beta.dtype:
            raise RuntimeError(f"FastLayerNorm: weight and bias dtypes differ ({gamma.dtype}, {beta.dtype})")
        return mixed_dtype_fused_layer_norm_affine(x, gamma, beta, (gamma.numel(),), epsilon)


class FastLayerNorm(torch.nn.Module):
    """Apex's ``FastLayerNorm``: ``weight``/``bias`` of ``hidden_size``, normalising the last dimension.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the variance.
        memory_efficient: accepted; what autograd saves is torch's business here.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, memory_efficient: bool = False) -> None:
        super().__init__()
        self.epsilon = eps
        self.memory_efficient = memory_efficient
        self.weight = torch.nn.Parameter(torch.empty(hidden_size))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> Any:
        return FastLayerNormFN.apply(x, self.weight, self.bias, self.epsilon, self.memory_efficient)
