"""``apex.contrib.layer_norm.FastLayerNorm``: layer norm over the last dimension, output in the weight's dtype.

Apex's kernel computed in FP32 (the parameters' gradients too) and returned the weight's dtype;
under autocast it cast the input and the parameters to the autocast dtype first. Same here, with
``torch.nn.functional.layer_norm`` on FP32 copies (FP64 stays FP64).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import init

import torch.nn.functional as F

from ampcompat._autocast_utils import cast_if_autocast_enabled

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
        (x, gamma, beta), autocast_off = cast_if_autocast_enabled(x, gamma, beta)
        work = torch.float64 if torch.float64 in (x.dtype, gamma.dtype) else torch.float32
        with autocast_off:
            return F.layer_norm(x.to(work), (gamma.numel(),), gamma.to(work), beta.to(work), epsilon).to(gamma.dtype)


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
