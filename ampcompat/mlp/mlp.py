"""``apex.mlp.MLP``: Apex's fused multi-layer perceptron, as ``linear`` + activation per layer."""
from __future__ import annotations

import math
from copy import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._autocast_utils import cast_if_autocast_enabled

__all__ = ["MLP", "mlp_function"]

_ACTIVATIONS = {"none": 0, "relu": 1, "sigmoid": 2}


def mlp_function(bias: int, activation: int, *args: torch.Tensor) -> torch.Tensor:
    """Apex's functional MLP: ``args`` are the input, then every weight, then every bias (if ``bias``).

    The activation (0 none, 1 ReLU, 2 sigmoid) follows every layer, the last one included, as in Apex.
    Under autocast the tensors are cast to the autocast dtype and the layers run with autocast off.

    Raises:
        ValueError: if the number of weights and biases does not match ``bias``.
    """
    (input, *params), autocast_off = cast_if_autocast_enabled(*args)
    if bias:
        if len(params) % 2:
            raise ValueError(f"mlp_function with bias needs as many biases as weights; got {len(params)} tensors")
        weights, biases = params[: len(params) // 2], params[len(params) // 2:]
    else:
        weights, biases = params, [None] * len(params)
    with autocast_off:
        out = input
        for weight, b in zip(weights, biases):
            out = F.linear(out, weight, b)
            if activation == 1:
                out = torch.relu(out)
            elif activation == 2:
                out = torch.sigmoid(out)
        return out


class MLP(nn.Module):
    """Apex's ``MLP``: ``len(mlp_sizes) - 1`` linear layers, each followed by the activation.

    Parameters are ``weight_i`` (``[mlp_sizes[i+1], mlp_sizes[i]]``) and ``bias_i``, also listed in
    ``self.weights`` / ``self.biases``, with Apex's initialisation, so state dicts load both ways.

    Args:
        mlp_sizes: layer widths, input first (``[1024, 1024, 1024]`` is two 1024x1024 layers).
        bias: give every layer a bias.
        activation: ``"relu"``, ``"sigmoid"`` or ``"none"``.

    Raises:
        TypeError: for another activation (Apex's exception type).
    """

    def __init__(self, mlp_sizes: Sequence[int], bias: bool = True, activation: str = "relu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise TypeError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}")
        self.num_layers = len(mlp_sizes) - 1
        self.mlp_sizes = copy(mlp_sizes)
        self.bias = 1 if bias else 0
        self.activation = _ACTIVATIONS[activation]
        self.weights: List[nn.Parameter] = []
        self.biases: List[nn.Parameter] = []
        for i in range(self.num_layers):
            weight = nn.Parameter(torch.empty(mlp_sizes[i + 1], mlp_sizes[i]))
            self.weights.append(weight)
            setattr(self, f"weight_{i}", weight)
            if self.bias:
                b = nn.Parameter(torch.empty(mlp_sizes[i + 1]))
                self.biases.append(b)
                setattr(self, f"bias_{i}", b)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Apex's initialisation: normal weights with std ``sqrt(2 / (fan_in + fan_out))``, biases ``sqrt(1/n)``."""
        for weight in self.weights:
            nn.init.normal_(weight, 0.0, math.sqrt(2.0 / float(weight.size(0) + weight.size(1))))
        for b in self.biases:
            nn.init.normal_(b, 0.0, math.sqrt(1.0 / float(b.size(0))))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return mlp_function(self.bias, self.activation, input, *self.weights, *self.biases)

    def extra_repr(self) -> str:
        return f"MLP sizes: {self.mlp_sizes}, Bias={self.bias}, activation={self.activation}"
