"""Where the fused O2 step applies: the switch, the device, Triton, and the optimizer options its kernels compute.

Each function answers with None when the fused step covers the case, else one sentence saying why not;
the caller then takes the unfused path (master gradients, ``GradScaler``-style unscale, the optimizer's
own ``step``). Triton is imported by the first :func:`unavailable_reason` call for a CUDA device, never
by ``import ampcompat``.

The fused step is on by default where it applies. ``AMPCOMPAT_FUSED_O2=0`` in the environment, or
:func:`set_enabled` with False, turns it off for the optimizers ``amp.initialize`` patches from then on;
a kernel that fails to compile or launch turns it off for the whole process (:func:`disable_after_failure`,
one warning).
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, NamedTuple, Optional, Union

import torch

#: ``AMPCOMPAT_FUSED_O2=0`` turns the fused O2 step off (read by each ``amp.initialize``).
ENV_VAR = "AMPCOMPAT_FUSED_O2"
_switch: Optional[bool] = None  # set_enabled's choice; None: the environment decides
_failure: Optional[str] = None  # why a kernel could not run in this process; the fused step is off since

_triton_error: Optional[str] = None
_triton_checked = False

#: The oldest Triton the fused kernels are verified with (their twin tests: Triton 3.2 and 3.8 under the
#: interpreter, 3.6 on an H200). Triton 3.0 (torch 2.4's) computes wrong updates under its interpreter.
MIN_TRITON = "3.2"


def _triton_import_error() -> Optional[str]:
    global _triton_checked, _triton_error
    if not _triton_checked:
        _triton_checked = True
        try:
            from .launch import kernels  # noqa: PLC0415 - imports Triton

            kernels()
        except Exception as error:  # ImportError, or a Triton that does not match this torch
            _triton_error = f"Triton could not be imported ({type(error).__name__}: {error})"
        else:
            _triton_error = triton_version_error()
    return _triton_error


def triton_version_error() -> Optional[str]:
    """Why the importable Triton is too old for the fused kernels (None when it is recent enough)."""
    import triton  # noqa: PLC0415 - only after the kernels imported it
    from packaging.version import InvalidVersion, Version  # noqa: PLC0415

    try:
        too_old = Version(triton.__version__) < Version(MIN_TRITON)
    except InvalidVersion:
        return None
    if too_old:
        return (f"Triton {triton.__version__} is older than {MIN_TRITON}, the oldest the fused O2 kernels are "
                f"verified with; upgrade torch (its Triton comes with it) for the fused step")
    return None


def set_enabled(enabled: Optional[bool]) -> None:
    """Turn the fused O2 step on or off for the optimizers ``amp.initialize`` patches from now on.

    Optimizers already patched keep the path they were given. The Python form of ``AMPCOMPAT_FUSED_O2``.

    Args:
        enabled: False: every O2/O5 optimizer takes the unfused path (FP32 master gradients, the optimizer's
            own ``step``, the copy back); True: the fused step where it applies, whatever the environment
            says; None: follow ``AMPCOMPAT_FUSED_O2`` again (on unless it is ``0``).
    """
    global _switch
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_enabled takes True, False or None, not {type(enabled).__name__}.")
    _switch = enabled


def switched_off_reason() -> Optional[str]:
    """Why the fused O2 step is off for every optimizer (the switch, the environment, an earlier failure),
    or None."""
    if _failure is not None:
        return _failure
    if _switch is False:
        return "turned off by ampcompat.amp.fused_o2.set_enabled(False)"
    if _switch is None and os.environ.get(ENV_VAR, "1").strip() == "0":
        return f"turned off by {ENV_VAR}=0"
    return None


def failure_reason() -> Optional[str]:
    """Why the fused step is off for this process after a kernel failed (None if none did)."""
    return _failure


def disable_after_failure(error: BaseException) -> None:
    """A fused kernel could not compile or launch: turn the fused step off for this process, warning once.

    The caller has already taken the unfused path for the step that failed.
    """
    global _failure
    if _failure is not None:
        return
    _failure = f"a fused O2 kernel failed on this machine ({type(error).__name__}: {error})"
    warnings.warn(
        f"ampcompat: {_failure}. O2 continues on its unfused path (FP32 master gradients and the optimizer's "
        f"own step), with the same results; set {ENV_VAR}=0 to skip the fused step from the start.",
        RuntimeWarning, stacklevel=3)


def unavailable_reason(device: Any) -> Optional[str]:
    """Why the fused kernels cannot run on ``device`` (None when they can).

    They run on CUDA devices of compute capability 7.0 and newer with Triton importable, and on the CPU
    only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
    """
    if _failure is not None:
        return _failure
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "the fused O2 kernels are verified on NVIDIA GPUs only, not on ROCm"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device)[0] < 7:
            return "Triton needs a GPU of compute capability 7.0 or newer"
    elif device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"the fused O2 kernels run on CUDA devices, not on {device.type}"
    return _triton_import_error()


_ADAM_FLAGS = ("amsgrad", "capturable", "differentiable")
_SGD_FLAGS = ("differentiable",)


def _device_tensor_option(group: dict, keys) -> Optional[str]:
    for key in keys:
        values = group.get(key)
        for value in values if isinstance(values, (tuple, list)) else (values,):
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                return f"{key} is a tensor on {value.device}"
    return None


def adam_not_covered(optimizer: Any) -> Optional[str]:
    """Why the fused kernel cannot step this optimizer (None for ``torch.optim.Adam``/``AdamW`` it covers).

    Covered: every form (for-loop, ``foreach``, ``fused``), ``weight_decay``, ``maximize``, Adam's L2
    decay and AdamW's decoupled decay, scalar or CPU-tensor hyper-parameters. Not covered: ``amsgrad``,
    ``capturable``, ``differentiable``, hyper-parameters given as device tensors, subclasses that replace
    ``step``, and any other optimizer class.
    """
    # AdamW subclasses Adam in recent torch releases; in older ones it is a class with its own step.
    if not any(isinstance(optimizer, cls) and _own_step(optimizer, cls)
               for cls in (torch.optim.Adam, torch.optim.AdamW)):
        return f"{type(optimizer).__name__} is not torch.optim.Adam or AdamW"
    return _group_options(optimizer, _ADAM_FLAGS, ("lr", "betas", "eps", "weight_decay"))


def sgd_not_covered(optimizer: Any) -> Optional[str]:
    """Why the fused kernel cannot step this optimizer (None for the ``torch.optim.SGD`` it covers).

    Covered: every form, momentum, dampening, Nesterov, weight decay, maximize. Not covered:
    ``differentiable``, hyper-parameters given as device tensors, subclasses that replace ``step``.
    """
    if not isinstance(optimizer, torch.optim.SGD) or not _own_step(optimizer, torch.optim.SGD):
        return f"{type(optimizer).__name__} is not torch.optim.SGD"
    return _group_options(optimizer, _SGD_FLAGS, ("lr", "momentum", "dampening", "weight_decay"))


def _own_step(optimizer: Any, cls: type) -> bool:
    """Whether ``optimizer`` steps with ``cls.step`` (torch wraps each class's ``step`` in a profiling hook
    when its first instance is built, so the functions are compared unwrapped)."""
    return inspect.unwrap(type(optimizer).step) is inspect.unwrap(cls.step)


def _group_options(optimizer: Any, flags, scalars) -> Optional[str]:
    for group in optimizer.param_groups:
        for flag in flags:
            if group.get(flag):
                return f"{flag}=True"
        reason = _device_tensor_option(group, scalars)
        if reason is not None:
            return reason
    return None


def decoupled_weight_decay(optimizer: Any, group: dict) -> bool:
    """Whether ``group`` of a covered Adam optimizer decays weights AdamW's way."""
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))


class UpdateRule(NamedTuple):
    """The update a fused step computes for an optimizer: ``"adam"`` (``decoupled``: AdamW's weight decay)
    or ``"sgd"``, with the optimizer's ``param_groups`` as hyper-parameters."""

    kind: str
    decoupled: bool = False


#: The method an optimizer class outside torch defines to say which fused update computes its step
#: (ampcompat's ``FusedAdam`` and ``FusedSGD``): ``() -> UpdateRule``, or a reason string when none does.
RULE_METHOD = "_fused_o2_rule"


def update_rule(optimizer: Any) -> Union[UpdateRule, str]:
    """The fused update that computes ``optimizer``'s step, or why none does.

    torch's ``Adam``/``AdamW`` and ``SGD`` as :func:`adam_not_covered` and :func:`sgd_not_covered` say
    (Adam's param groups must agree on the kind of weight decay: one launch covers them all); any other
    class through its ``_fused_o2_rule`` method (ampcompat's ``FusedAdam``, ``FusedSGD``).
    """
    own = getattr(optimizer, RULE_METHOD, None)
    if own is not None:
        return own()
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        reason = adam_not_covered(optimizer)
        if reason is not None:
            return reason
        kinds = {decoupled_weight_decay(optimizer, group) for group in optimizer.param_groups}
        if len(kinds) > 1:
            return "param groups mix Adam's and AdamW's weight decay"
        return UpdateRule("adam", kinds.pop() if kinds else False)
    if isinstance(optimizer, torch.optim.SGD):
        reason = sgd_not_covered(optimizer)
        return reason if reason is not None else UpdateRule("sgd")
    return (f"{type(optimizer).__name__} is not an optimizer the fused O2 step covers (torch.optim.Adam, AdamW "
            "and SGD; ampcompat's FusedAdam and FusedSGD)")
