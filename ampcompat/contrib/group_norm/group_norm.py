"""``apex.contrib.group_norm.GroupNorm``: group norm with an optional fused SiLU, on ``F.group_norm``.

Apex's NHWC kernels computed in FP32 for any mix of input and parameter dtypes and returned the
input's dtype; this does the same (``F.group_norm`` on FP32 copies; FP64 stays FP64), for every memory
format and every number of groups and channels. Like the kernel, it ignores autocast: the input's
dtype decides.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn import init
from torch.nn.parameter import Parameter

__all__ = ["GroupNorm"]

_ACTIVATIONS = (None, "", "silu", "swish")


def _group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float, act: Optional[str]) -> torch.Tensor:
    dtypes = {x.dtype} | {t.dtype for t in (weight, bias) if t is not None}
    work = torch.float64 if torch.float64 in dtypes else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        y = F.group_norm(x.to(work), num_groups, None if weight is None else weight.to(work),
                         None if bias is None else bias.to(work), eps)
        if act in ("silu", "swish"):
            y = F.silu(y)
    return y.to(x.dtype)


class GroupNorm(torch.nn.Module):
    """Apex contrib's ``GroupNorm`` (``torch.nn.GroupNorm``'s parameters, plus ``act``).

    Args:
        num_groups: number of groups the channels are split into.
        num_channels: channels (dimension 1 of the input).
        eps: added to the variance.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0).
        device, dtype: of the parameters.
        act: ``None``/``""`` or ``"silu"``/``"swish"`` (SiLU after the normalisation).

    Raises:
        ValueError: if ``num_channels`` is not divisible by ``num_groups`` (Apex's message), or for another
            ``act`` (Apex silently ignored it).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 act: Optional[str] = None) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError("num_channels must be divisible by num_groups")
        act = act.lower() if act else act
        if act not in _ACTIVATIONS:
            raise ValueError(f"GroupNorm: act must be None, 'silu' or 'swish'; got {act!r}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.act = act
        if affine:
            self.weight = Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.act)

    def extra_repr(self) -> str:
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        return text + (f", act={self.act}" if self.act else "")
