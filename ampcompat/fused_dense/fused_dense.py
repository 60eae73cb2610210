"""``apex.fused_dense``: Apex's cuBLASLt GEMM+bias(+GELU) modules, as ``torch.nn.functional`` ops.

``FusedDenseGeluDense``'s GELU is the tanh approximation (cuBLASLt's GELU epilogue, which Apex used).
Under autocast the inputs are cast to the autocast dtype and the ops run with autocast off (Apex's rule).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._autocast_utils import cast_if_autocast_enabled

__all__ = ["FusedDense", "FusedDenseGeluDense", "fused_dense_function", "dense_no_bias_function",
           "fused_dense_gelu_dense_function"]


def fused_dense_function(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``input @ weight.T + bias`` with Apex's autocast rule."""
    (input, weight, bias), autocast_off = cast_if_autocast_enabled(input, weight, bias)
    with autocast_off:
        return F.linear(input, weight, bias)


def dense_no_bias_function(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``input @ weight.T`` with Apex's autocast rule."""
    (input, weight), autocast_off = cast_if_autocast_enabled(input, weight)
    with autocast_off:
        return F.linear(input, weight)


def fused_dense_gelu_dense_function(input: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                                    weight2: torch.Tensor, bias2: torch.Tensor) -> torch.Tensor:
    """``linear(gelu_tanh(linear(input, weight1, bias1)), weight2, bias2)`` with Apex's autocast rule."""
    args, autocast_off = cast_if_autocast_enabled(input, weight1, bias1, weight2, bias2)
    input, weight1, bias1, weight2, bias2 = args
    with autocast_off:
        return F.linear(F.gelu(F.linear(input, weight1, bias1), approximate="tanh"), weight2, bias2)


class FusedDense(nn.Module):
    """Apex's ``FusedDense``: ``torch.nn.Linear``'s math and parameter names (``weight``, ``bias``).

    As in Apex, the parameters are left uninitialised (``torch.empty``): load weights or initialise them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias: Optional[nn.Parameter]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return fused_dense_function(input, self.weight, self.bias)
        return dense_no_bias_function(input, self.weight)


class FusedDenseGeluDense(nn.Module):
    """Apex's ``FusedDenseGeluDense``: Linear -> GELU (tanh approximation) -> Linear.

    Parameters ``weight1``/``bias1`` (``[intermediate, in]``) and ``weight2``/``bias2`` (``[out, intermediate]``),
    uninitialised as in Apex.

    Raises:
        ValueError: for ``bias=False`` (Apex asserted it: the fused kernel needs biases).
    """

    def __init__(self, in_features: int, intermediate_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if not bias:
            raise ValueError("FusedDenseGeluDense without bias is not supported (as in Apex); use two FusedDense "
                             "modules with bias=False around torch.nn.functional.gelu(approximate='tanh')")
        self.in_features = in_features
        self.intermediate_features = intermediate_features
        self.out_features = out_features
        self.weight1 = nn.Parameter(torch.empty(intermediate_features, in_features))
        self.bias1 = nn.Parameter(torch.empty(intermediate_features))
        self.weight2 = nn.Parameter(torch.empty(out_features, intermediate_features))
        self.bias2 = nn.Parameter(torch.empty(out_features))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_dense_gelu_dense_function(input, self.weight1, self.bias1, self.weight2, self.bias2)
