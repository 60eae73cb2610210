"""``apex.normalization.fused_layer_norm`` on ``torch.nn.functional.layer_norm`` / ``rms_norm``.

Apex's CUDA kernels had their own output-dtype rules, which legacy code relies on:

* ``Fused*`` (and the ``fused_*`` functions): under autocast, the input and the parameters are cast to
  the autocast dtype and the op runs with autocast off, so the output has the autocast dtype (where
  ``nn.LayerNorm`` under autocast returns FP32). Otherwise the output has the input's dtype.
* ``MixedFused*`` (and ``mixed_dtype_*``): the output has the parameters' dtype (e.g. BF16 input with
  FP32 weights gives FP32); under autocast, as above, since the parameters are cast first.

Apex applied these rules on CUDA only; here they hold on every device (autocast of the input's device
type). When input and parameters differ in dtype, the normalisation runs in FP32 and the result is
cast to the output dtype. ``memory_efficient`` (what Apex saved for backward) is accepted and has no
effect: autograd of the native ops decides what is saved.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._autocast_utils import autocast_cast, autocast_dtype

__all__ = [
    "FusedLayerNorm", "FusedRMSNorm", "MixedFusedLayerNorm", "MixedFusedRMSNorm",
    "fused_layer_norm", "fused_layer_norm_affine", "mixed_dtype_fused_layer_norm_affine",
    "fused_rms_norm", "fused_rms_norm_affine", "mixed_dtype_fused_rms_norm_affine", "manual_rms_norm",
    "FusedLayerNormAffineFunction", "FusedLayerNormFunction", "FusedLayerNormAffineMixedDtypesFunction",
    "FusedRMSNormAffineFunction", "FusedRMSNormFunction", "FusedRMSNormAffineMixedDtypesFunction",
]

ShapeLike = Union[int, Sequence[int], torch.Size]


# --- dtype rules -------------------------------------------------------------------------------------

def _normalize(op: Any, input: torch.Tensor, params: List[Optional[torch.Tensor]], out_dtype: torch.dtype,
               *args: Any) -> torch.Tensor:
    """``op(input, *args, *params)`` in one dtype (FP32 when dtypes are mixed), returned as ``out_dtype``."""
    dtypes = {input.dtype} | {p.dtype for p in params if p is not None}
    if len(dtypes) > 1:
        work = torch.float64 if torch.float64 in dtypes else torch.float32
        input = input.to(work)
        params = [p.to(work) if p is not None else None for p in params]
    return op(input, *args, *params).to(out_dtype)


def _apply(op: Any, input: torch.Tensor, params: List[Optional[torch.Tensor]], normalized_shape: ShapeLike,
           eps: float, *, output_in_param_dtype: bool, cast_for_autocast: bool) -> torch.Tensor:
    """Run ``op(input, normalized_shape, eps, *params)`` with Apex's dtype rules (see module docstring).

    Args:
        output_in_param_dtype: the Mixed* rule (output in the weight's dtype) instead of the input's.
        cast_for_autocast: cast input and parameters to the active autocast dtype first (the ``fused_*``
            functions and modules do; Apex's ``*Function.apply`` did not).
    """
    device_type = input.device.type
    cast_to = autocast_dtype(device_type)
    if cast_for_autocast and cast_to is not None:
        input = autocast_cast(input, cast_to, device_type)
        params = [autocast_cast(p, cast_to, device_type) for p in params]
    weight = params[0]
    out_dtype = weight.dtype if output_in_param_dtype and weight is not None else input.dtype
    off = torch.autocast(device_type, enabled=False) if cast_to is not None else contextlib.nullcontext()
    with off:
        return _normalize(op, input, params, out_dtype, _shape(normalized_shape), eps)


def _fused_rule(op: Any, input: torch.Tensor, params: List[Optional[torch.Tensor]], normalized_shape: ShapeLike,
                eps: float) -> torch.Tensor:
    """``Fused*``: autocast cast, output in the input's dtype."""
    return _apply(op, input, params, normalized_shape, eps, output_in_param_dtype=False, cast_for_autocast=True)


def _mixed_rule(op: Any, input: torch.Tensor, params: List[Optional[torch.Tensor]], normalized_shape: ShapeLike,
                eps: float) -> torch.Tensor:
    """``MixedFused*``: autocast cast, output in the parameters' dtype."""
    return _apply(op, input, params, normalized_shape, eps, output_in_param_dtype=True, cast_for_autocast=True)


def _layer_norm(input: torch.Tensor, normalized_shape: Sequence[int], eps: float,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(input, tuple(normalized_shape), weight, bias, eps)


def _rms_norm(input: torch.Tensor, normalized_shape: Sequence[int], eps: float,
              weight: Optional[torch.Tensor]) -> torch.Tensor:
    if hasattr(F, "rms_norm"):
        return F.rms_norm(input, tuple(normalized_shape), weight, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    out = input * torch.rsqrt(input.float().pow(2).mean(dims, keepdim=True) + eps).to(input.dtype)
    return out * weight if weight is not None else out


# --- Apex's functional API (eps defaults to 1e-6 there, unlike the modules' 1e-5) ---------------------

def fused_layer_norm_affine(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            normalized_shape: ShapeLike, eps: float = 1e-6,
                            memory_efficient: bool = False) -> torch.Tensor:
    """Affine layer norm; output in the input's (or autocast's) dtype."""
    return _fused_rule(_layer_norm, input, [weight, bias], normalized_shape, eps)


def fused_layer_norm(input: torch.Tensor, normalized_shape: ShapeLike, eps: float = 1e-6,
                     memory_efficient: bool = False) -> torch.Tensor:
    """Layer norm without affine parameters; output in the input's (or autocast's) dtype."""
    return _fused_rule(_layer_norm, input, [None, None], normalized_shape, eps)


def mixed_dtype_fused_layer_norm_affine(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                        normalized_shape: ShapeLike, eps: float = 1e-6,
                                        memory_efficient: bool = False) -> torch.Tensor:
    """Affine layer norm; output in the parameters' (or autocast's) dtype."""
    return _mixed_rule(_layer_norm, input, [weight, bias], normalized_shape, eps)


def fused_rms_norm_affine(input: torch.Tensor, weight: torch.Tensor, normalized_shape: ShapeLike,
                          eps: float = 1e-6, memory_efficient: bool = False) -> torch.Tensor:
    """Affine RMS norm; output in the input's (or autocast's) dtype."""
    return _fused_rule(_rms_norm, input, [weight], normalized_shape, eps)


def fused_rms_norm(input: torch.Tensor, normalized_shape: ShapeLike, eps: float = 1e-6,
                   memory_efficient: bool = False) -> torch.Tensor:
    """RMS norm without a weight; output in the input's (or autocast's) dtype."""
    return _fused_rule(_rms_norm, input, [None], normalized_shape, eps)


def mixed_dtype_fused_rms_norm_affine(input: torch.Tensor, weight: torch.Tensor, normalized_shape: ShapeLike,
                                      eps: float = 1e-6, memory_efficient: bool = False) -> torch.Tensor:
    """Affine RMS norm; output in the weight's (or autocast's) dtype."""
    return _mixed_rule(_rms_norm, input, [weight], normalized_shape, eps)


def manual_rms_norm(input: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor],
                    eps: float) -> torch.Tensor:
    """Apex's reference RMS norm: FP32 statistics; the result is cast to the weight's dtype if it is half."""
    dims = tuple(range(-len(_shape(normalized_shape)), 0))
    variance = input.to(torch.float32).pow(2).mean(dims, keepdim=True)
    normalized = input * torch.rsqrt(variance + eps)
    if weight is None:
        return normalized
    if weight.dtype in (torch.float16, torch.bfloat16):
        normalized = normalized.to(weight.dtype)
    return weight * normalized


class _ApplyOnly:
    """Apex's ``torch.autograd.Function`` names: ``.apply(...)`` runs the native op (autograd is its own).

    As Apex's ``Function.apply`` (called without the autocast cast of the ``fused_*`` wrappers), the
    input is not cast; autocast is turned off inside, and the class's output-dtype rule applies.
    Arguments: ``(input, *params, normalized_shape, eps, memory_efficient=False)`` with ``params`` the
    class's affine parameters (none, ``weight``, or ``weight, bias``).
    """

    _op: Any = None
    _slots = 2  # parameters the op takes: 2 (layer norm: weight, bias) or 1 (RMS norm: weight)
    _given = 0  # parameters apply() receives
    _mixed = False

    @classmethod
    def apply(cls, input: torch.Tensor, *args: Any) -> torch.Tensor:
        params = list(args[:cls._given]) + [None] * (cls._slots - cls._given)
        normalized_shape, eps = args[cls._given], args[cls._given + 1]
        return _apply(cls._op, input, params, normalized_shape, eps, output_in_param_dtype=cls._mixed,
                      cast_for_autocast=False)


class FusedLayerNormAffineFunction(_ApplyOnly):
    """``apply(input, weight, bias, normalized_shape, eps, memory_efficient=False)``."""
    _op, _given = staticmethod(_layer_norm), 2


class FusedLayerNormAffineMixedDtypesFunction(_ApplyOnly):
    """``apply(input, weight, bias, normalized_shape, eps, memory_efficient=False)``; output in weight dtype."""
    _op, _given, _mixed = staticmethod(_layer_norm), 2, True


class FusedLayerNormFunction(_ApplyOnly):
    """``apply(input, normalized_shape, eps, memory_efficient=False)``."""
    _op = staticmethod(_layer_norm)


class FusedRMSNormAffineFunction(_ApplyOnly):
    """``apply(input, weight, normalized_shape, eps, memory_efficient=False)``."""
    _op, _slots, _given = staticmethod(_rms_norm), 1, 1


class FusedRMSNormAffineMixedDtypesFunction(_ApplyOnly):
    """``apply(input, weight, normalized_shape, eps, memory_efficient=False)``; output in weight dtype."""
    _op, _slots, _given, _mixed = staticmethod(_rms_norm), 1, 1, True


class FusedRMSNormFunction(_ApplyOnly):
    """``apply(input, normalized_shape, eps, memory_efficient=False)``."""
    _op, _slots = staticmethod(_rms_norm), 1


def _shape(normalized_shape: ShapeLike) -> torch.Size:
    if isinstance(normalized_shape, numbers.Integral):
        return torch.Size((int(normalized_shape),))
    return torch.Size(normalized_shape)


# --- modules -------------------------------------------------------------------------------------------

class FusedLayerNorm(torch.nn.LayerNorm):
    """Apex's ``FusedLayerNorm``: an ``nn.LayerNorm`` (same parameters and state dict) with Apex's dtypes.

    Args:
        normalized_shape: trailing shape to normalise over.
        eps: added to the variance.
        elementwise_affine: learn ``weight`` (ones) and ``bias`` (zeros).
        memory_efficient: accepted for compatibility; no effect.
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, elementwise_affine: bool = True,
                 memory_efficient: bool = False) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine)
        self.normalized_shape = _shape(normalized_shape)
        self.memory_efficient = memory_efficient

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return fused_layer_norm(input, self.normalized_shape, self.eps)
        return fused_layer_norm_affine(input, self.weight, self.bias, self.normalized_shape, self.eps)

    def extra_repr(self) -> str:
        return "{}, eps={}, elementwise_affine={}".format(self.normalized_shape, self.eps, self.elementwise_affine)


class MixedFusedLayerNorm(FusedLayerNorm):
    """Apex's ``MixedFusedLayerNorm``: always affine; output in the parameters' dtype.

    Raises:
        RuntimeError: Apex's message for ``elementwise_affine=False`` (any ``elementwise_affine``
            argument also warns, as Apex).
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, *, memory_efficient: bool = False,
                 **kwargs: Any) -> None:
        _reject_non_affine("MixedFusedLayerNorm", kwargs)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, memory_efficient=memory_efficient)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return mixed_dtype_fused_layer_norm_affine(input, self.weight, self.bias, self.normalized_shape, self.eps)


class FusedRMSNorm(torch.nn.RMSNorm):
    """Apex's ``FusedRMSNorm``: an ``nn.RMSNorm`` with Apex's ``eps=1e-5`` default and dtypes.

    (``nn.RMSNorm``'s own default eps is ``None``, i.e. ``finfo(dtype).eps``: it is passed explicitly.)

    Args:
        normalized_shape: trailing shape to normalise over.
        eps: added to the mean square.
        elementwise_affine: learn ``weight`` (ones).
        memory_efficient: accepted for compatibility; no effect.
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, elementwise_affine: bool = True,
                 memory_efficient: bool = False) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine)
        self.normalized_shape = _shape(normalized_shape)
        self.memory_efficient = memory_efficient

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return fused_rms_norm(input, self.normalized_shape, self.eps)
        return fused_rms_norm_affine(input, self.weight, self.normalized_shape, self.eps)


class MixedFusedRMSNorm(FusedRMSNorm):
    """Apex's ``MixedFusedRMSNorm``: always affine; output in the weight's dtype.

    Raises:
        RuntimeError: Apex's message for ``elementwise_affine=False`` (any ``elementwise_affine``
            argument also warns, as Apex).
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, *, memory_efficient: bool = False,
                 **kwargs: Any) -> None:
        _reject_non_affine("MixedFusedRMSNorm", kwargs)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, memory_efficient=memory_efficient)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return mixed_dtype_fused_rms_norm_affine(input, self.weight, self.normalized_shape, self.eps)


def _reject_non_affine(name: str, kwargs: dict) -> None:
    """Apex's handling of ``elementwise_affine`` on the Mixed* norms (other extra kwargs are ignored)."""
    if "elementwise_affine" in kwargs:
        warnings.warn("{} does not support `elementwise_affine` argument".format(name))
        if not kwargs.pop("elementwise_affine"):
            raise RuntimeError("{} does not support `elementwise_affine = False`".format(name))
