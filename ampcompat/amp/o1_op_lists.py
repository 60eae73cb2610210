"""O1/O4: the parts of Apex's O1 op lists that native autocast lacks on a device, added while O1 is on.

Native autocast decides per device which ops run in FP32. CUDA's list is close to Apex's; CPU's leaves
``softmax``, ``log_softmax``, ``exp``, ``sum``, ``layer_norm``... in the low-precision dtype, so the same
O1 script would compute its loss differently on CPU. While an O1 scope is on, this module adds, at the
O1 device's autocast dispatch key (``AutocastCPU``, ``AutocastCUDA``...), a kernel for every op of
Apex's lists that has no autocast kernel there:

* FP32 list: low-precision floating inputs are cast to FP32 and the op runs below autocast (native
  autocast's ``fp32`` policy);
* FP16 list (``addmv``, ``addr``, ``mv`` and the RNN cells on CPU): FP32 inputs are cast to the O1 dtype.

Ops that already have an autocast kernel on the device are left to it, so nothing native is
overridden and no Python runs for them. The kernels live in a ``torch.library.Library`` destroyed when
the scope is deactivated: plain ``torch.autocast`` outside O1 never meets them.

In-place FP32-list ops (``half.exp_()``), which Apex refused, run as under native autocast: refused at
the dispatcher, they would also fail PyTorch's own internal in-place ops (CPU ``logsumexp`` calls
``exp_`` on its intermediate). See migration_guide.md.

Apex's banned function, ``F.binary_cross_entropy`` (and so ``nn.BCELoss``), is handled by
:class:`BannedFunctions`: under O1 an fp16 input raises Apex's ``NotImplementedError`` pointing to
``BCEWithLogitsLoss``; with ``allow_banned=True``, or with no fp16 input, it runs in FP32 with autocast
off (native CUDA autocast would otherwise refuse it with a ``RuntimeError``, even for FP32 inputs).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _torch_compat

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Apex's FP32 list (``torch``, ``Tensor`` and ``torch.nn.functional``), as the aten overloads those
#: functions reach first. Composite overloads that decompose into listed ones (``std.dim``,
#: ``upsample_*.vec``, ``cross_entropy_loss``, ``nll_loss_nd``) are covered through them; Python-level
#: compositions (``softmin``, ``normalize``, ``local_response_norm``, ``multilabel_soft_margin_loss``)
#: end in listed ops. ``gelu`` is deliberately absent: it runs in the input dtype as under native
#: autocast (see migration_guide.md).
FP32_OPS: Tuple[str, ...] = (
    # torch / Tensor: pointwise, other math, reductions, misc
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "cumprod", "cumsum", "dist",
    "norm.Scalar", "norm.ScalarOpt_dim", "linalg_vector_norm", "prod", "prod.dim_int", "std.correction",
    "var.correction", "sum", "sum.dim_IntList", "renorm",
    # torch.nn.functional: interpolation, pointwise, normalisation
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
    "grid_sampler", "softplus", "softmax.int", "log_softmax.int", "layer_norm", "native_layer_norm",
    "group_norm", "cosine_similarity",
    # torch.nn.functional: losses
    "poisson_nll_loss", "cosine_embedding_loss", "hinge_embedding_loss", "kl_div", "l1_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "nll_loss2d",
    "binary_cross_entropy_with_logits", "smooth_l1_loss", "soft_margin_loss", "triplet_margin_loss",
    "ctc_loss.IntList", "ctc_loss.Tensor",
)

#: Apex's FP16 list as aten overloads (most have native kernels on every device).
HALF_OPS: Tuple[str, ...] = (
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
    "conv_tbc", "linear", "prelu", "addmm", "addmv", "addr", "matmul", "mm", "mv", "bmm", "baddbmm",
    "addbmm", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
)

def _autocast_key(device_type: str) -> Optional[str]:
    """The name of ``device_type``'s autocast dispatch key (``"AutocastCPU"``), or None if torch has none."""
    name = "Autocast" + {"cuda": "CUDA", "cpu": "CPU", "xpu": "XPU", "hpu": "HPU", "mps": "MPS",
                         "privateuseone": "PrivateUse1"}.get(device_type, device_type.upper())
    return name if _torch_compat.dispatch_key_exists(name) else None


def _overload(qualified: str) -> Any:
    name, _, overload = qualified.partition(".")
    return getattr(getattr(torch.ops.aten, name), overload or "default")


def _has_autocast_kernel(qualified: str, key_name: str) -> bool:
    return _torch_compat.has_kernel_for_dispatch_key("aten::" + qualified, key_name)


def _cast(values: Tuple[Any, ...], device_type: str, from_dtypes: Tuple[torch.dtype, ...],
          to_dtype: torch.dtype) -> Tuple[Any, ...]:
    """``values`` with every tensor of ``device_type`` whose dtype is in ``from_dtypes`` cast to ``to_dtype``."""
    cast = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dtype in from_dtypes and value.device.type == device_type:
            value = value.to(to_dtype)
        cast.append(value)
    return tuple(cast)


class OpLists:
    """The autocast kernels O1 adds for one device; :meth:`remove` takes them all away again.

    The kernels apply to every autocast region of the device while they exist, including the
    recomputation of activation-checkpointed blocks during backward (which re-enters the forward's
    autocast state): a gate on ``amp.disable_casts`` would run those recomputations in other dtypes.

    Args:
        device_type: the O1 device type.
        dtype: the O1 low-precision dtype (FP16-list ops are cast to it).
    """

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self._library: Optional[torch.library.Library] = None
        self.registered: List[str] = []
        key_name = _autocast_key(device_type)
        if key_name is None:
            return
        to_fp32 = (device_type, _LOW_PRECISION, torch.float32)
        to_low = (device_type, (torch.float32,), dtype)
        kernels = ([(name, _casting_kernel(_overload(name), to_fp32)) for name in FP32_OPS]
                   + [(name, _casting_kernel(_overload(name), to_low)) for name in HALF_OPS])
        for name, kernel in kernels:
            if hasattr(torch.ops.aten, name.partition(".")[0]) and not _has_autocast_kernel(name, key_name):
                if self._library is None:
                    self._library = torch.library.Library("aten", "IMPL", key_name)
                self._library.impl(name, kernel, key_name)
                self.registered.append(name)

    def remove(self) -> None:
        """Deregister every kernel (the dispatcher falls back to native autocast's behaviour)."""
        if self._library is not None:
            _torch_compat.destroy_library(self._library)
            self._library = None
        self.registered = []


def _casting_kernel(op: Any, cast: Tuple[str, Tuple[torch.dtype, ...], torch.dtype]) -> Callable[..., Any]:
    """Native autocast's cast policies: cast the inputs (``cast`` = ``(device_type, from_dtypes, to_dtype)``),
    then run the op with the device's autocast off (so it dispatches below this key, as native autocast's
    kernels do). The body is flat on purpose: it runs on every call of the op under O1, as one Python frame."""
    device_type, from_dtypes, to_dtype = cast
    run = getattr(op, "_op", op)  # the C++ callable behind OpOverload.__call__: one Python frame less

    def kernel(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        for i, value in enumerate(args):
            if isinstance(value, torch.Tensor):
                if value.dtype in from_dtypes and value.device.type == device_type:
                    args[i] = value.to(to_dtype)
            elif isinstance(value, (list, tuple)):  # Tensor[] arguments (the RNN cells' hidden state)
                args[i] = type(value)(_cast(tuple(value), *cast))
        if kwargs:
            kwargs = dict(zip(kwargs, _cast(tuple(kwargs.values()), *cast)))
        # This kernel runs only while autocast is on for the device: it is turned back on, not restored.
        torch.set_autocast_enabled(device_type, False)
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_autocast_enabled(device_type, True)

    return kernel


# --- banned functions ---------------------------------------------------------------------------------

BANNED_MESSAGE = (
    "\namp does not work out-of-the-box with `F.binary_cross_entropy` or `torch.nn.BCELoss.` "
    "It requires that the output of the previous function be already a FloatTensor. \n\n"
    "Most models have a Sigmoid right before BCELoss. In that case, you can use\n"
    "    torch.nn.BCEWithLogitsLoss\nto combine Sigmoid+BCELoss into a single layer "
    "that is compatible with amp.\nAnother option is to add\n"
    "    amp.register_float_function(torch, 'sigmoid')\nbefore calling `amp.init()`.\n"
    "If you _really_ know what you are doing, you can disable this warning by passing "
    "allow_banned=True to `amp.init()`."
)

#: ``(module, name)`` of the functions Apex's O1 banned.
BANNED_FUNCTIONS: Tuple[Tuple[Any, str], ...] = ((F, "binary_cross_entropy"),)


def floating_tensors(args: Tuple[Any, ...], kwargs: dict) -> List[torch.Tensor]:
    """The floating-point tensors among a call's arguments (and inside its list/tuple arguments)."""
    found = []
    for value in list(args) + list(kwargs.values()):
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                found.append(item)
    return found


class BannedFunctions:
    """Wraps Apex's banned functions while O1 is on; :meth:`remove` puts the originals back.

    Args:
        device_type: the O1 device type.
        allow_banned: Apex's ``amp.init(allow_banned=True)``: run them in FP32 instead of raising.
        applies: True where O1 casting is on in this thread.
    """

    def __init__(self, device_type: str, allow_banned: bool, applies: Callable[[], bool]) -> None:
        self._originals: List[Tuple[Any, str, Any]] = []
        for module, name in BANNED_FUNCTIONS:
            original = getattr(module, name)
            self._originals.append((module, name, original))
            setattr(module, name, _banned_wrapper(original, device_type, allow_banned, applies))

    def remove(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals = []


def _banned_wrapper(fn: Callable[..., Any], device_type: str, allow_banned: bool,
                    applies: Callable[[], bool]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not (torch.is_autocast_enabled(device_type) and applies()):
            return fn(*args, **kwargs)
        if not allow_banned and any(t.dtype == torch.float16 for t in floating_tensors(args, kwargs)):
            raise NotImplementedError(BANNED_MESSAGE)
        args = _cast(args, device_type, _LOW_PRECISION, torch.float32)
        kwargs = dict(zip(kwargs, _cast(tuple(kwargs.values()), device_type, _LOW_PRECISION, torch.float32)))
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
