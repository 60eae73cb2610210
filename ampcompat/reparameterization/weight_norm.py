"""``WeightNorm``: ``w = g * v / ||v||`` (Salimans & Kingma, https://arxiv.org/abs/1602.07868), Apex's way.

The weight ``name`` is replaced by ``name_g`` (its norm: the magnitude) and ``name_v`` (its direction, the
weight itself at the start), the names Apex and ``torch.nn.utils.weight_norm`` give them in ``state_dict``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.nn.parameter import Parameter

from .reparameterization import Reparameterization

__all__ = ["WeightNorm"]

_HALF = (torch.float16, torch.bfloat16)


def _norm(p: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """L2 norm of ``p`` over every dimension but ``dim``, kept broadcastable to ``p`` (``None``: all, 0-dim).

    Raises:
        IndexError: if ``dim`` is not a dimension of ``p``.
    """
    if dim is None:
        return torch.linalg.vector_norm(p)
    if not -p.dim() <= dim < p.dim():
        raise IndexError(f"weight norm dim {dim} is out of range for a weight with {p.dim()} dimensions")
    kept = dim % p.dim()
    return torch.linalg.vector_norm(p, dim=[d for d in range(p.dim()) if d != kept], keepdim=True)


def _normalized(v: torch.Tensor, g: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """``g * v / ||v||`` (norm over every dimension but ``dim``), differentiable in ``v`` and ``g``.

    FP16/BF16 inputs are computed in FP32 and the result rounded to ``v``'s dtype, as Apex's fused
    kernel did.
    """
    compute = torch.float32 if v.dtype in _HALF else v.dtype
    v_work = v.to(compute)
    return (v_work * (g.to(compute) / _norm(v_work, dim))).to(v.dtype)


class WeightNorm(Reparameterization):
    """Weight normalization as a :class:`Reparameterization`.

    ``dim=0`` (the default) normalizes each output channel/row separately; ``dim=None`` the whole
    tensor (``name_g`` is then a scalar); any other dimension, negative ones included, keeps that
    dimension's entries apart.
    """

    def compute_weight(self, module: Optional[torch.nn.Module] = None, name: Optional[str] = None) -> torch.Tensor:
        """``name_g * name_v / ||name_v||`` of ``module`` (defaults: the hook's module and name).

        Returns:
            The weight, in ``name_v``'s dtype.
        """
        module = self.module if module is None else module
        name = self.name if name is None else name
        owner, local_name = Reparameterization.get_module_and_name(module, name)
        return _normalized(getattr(owner, local_name + "_v"), getattr(owner, local_name + "_g"), self.dim)

    def reparameterize(self, name: str, weight: torch.Tensor, dim: Optional[int]
                       ) -> Tuple[List[str], List[Parameter]]:
        """``name_g`` (the norm of ``weight``, in its dtype) and ``name_v`` (``weight``'s storage itself).

        Raises:
            IndexError: if ``dim`` is not a dimension of ``weight``.
        """
        with torch.no_grad():
            magnitude = _norm(weight.detach().to(torch.float32 if weight.dtype in _HALF else weight.dtype), dim)
        requires_grad = weight.requires_grad
        return ([name + "_g", name + "_v"],
                [Parameter(magnitude.to(weight.dtype), requires_grad=requires_grad),
                 Parameter(weight.detach(), requires_grad=requires_grad)])
