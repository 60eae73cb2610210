"""Every private PyTorch API ampcompat uses, in one place, each looked up once against the running torch.

PyTorch may rename or remove an underscored name in any release. Nothing else in ``ampcompat`` touches
one (``tests/test_architecture.py`` refuses it): modules import the shims below, so a torch release
that breaks one breaks it here, where ``tests/test_torch_compat.py`` exercises each shim against a
public-API reference and fails naming it. A shim whose API is missing is not an import error (the
``doctor`` command must still run): it is listed in :data:`MISSING` and raises, when used, a
``RuntimeError`` that names the API and the torch version.

Each private API is kept for a reason given beside it: either there is no public equivalent, or
the public one costs measurably more host work on the training step. Counts are Python function
calls and aten ops per step, from ``benchmarks/_counts.py`` on the 4-layer MLP of
``tests/test_host_overhead.py`` (8 parameters), torch 2.13 on CPU.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Iterable, List

import torch
import torch.optim.optimizer as torch_optimizer_module  # not an attribute of torch.optim: imported by name

#: ``"torch.<name>"`` of every private API this torch lacks (empty on a supported torch).
MISSING: List[str] = []
#: ``"torch.<name>"`` of private APIs this torch lacks and that have a fallback (older releases).
FALLBACKS: List[str] = []


def _missing(qualified: str) -> Callable[..., Any]:
    MISSING.append(qualified)

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "ampcompat needs {}, which torch {} does not have; install a torch release ampcompat supports "
            "(see README.md).".format(qualified, torch.__version__))

    return unavailable


def _private(owner: Any, path: str, fallback: Any = None) -> Any:
    """``owner.<path>`` (dotted); where this torch lacks it, ``fallback`` if given, else a stand-in that
    raises on use."""
    found = owner
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            qualified = "torch." + path if owner is torch else "{}.{}".format(owner.__name__, path)
            if fallback is not None:
                FALLBACKS.append(qualified)
                return fallback
            return _missing(qualified)
    return found


# --- multi-tensor kernels ----------------------------------------------------------------------------
# No public multi-tensor API exists: the public equivalent is a Python loop of per-tensor ops, one aten
# op (and one kernel launch) per tensor. Measured: O2 with AdamW does 3 foreach ops per step (zero the
# grads, copy the fp16 grads into the master grads, copy the masters back) where per-tensor loops do 24.

foreach_add = _private(torch, "_foreach_add")
foreach_add_ = _private(torch, "_foreach_add_")
foreach_addcmul_ = _private(torch, "_foreach_addcmul_")
foreach_copy_ = _private(torch, "_foreach_copy_")
foreach_div = _private(torch, "_foreach_div")
foreach_div_ = _private(torch, "_foreach_div_")
foreach_mul = _private(torch, "_foreach_mul")
foreach_mul_ = _private(torch, "_foreach_mul_")
foreach_norm = _private(torch, "_foreach_norm")
foreach_sqrt = _private(torch, "_foreach_sqrt")
foreach_sqrt_ = _private(torch, "_foreach_sqrt_")
foreach_sub_ = _private(torch, "_foreach_sub_")
foreach_zero_ = _private(torch, "_foreach_zero_")

# --- the fused AMP kernels torch.amp.GradScaler is built on --------------------------------------------
# No public function: GradScaler calls them internally. Unscale-and-check is one launch per (device, dtype)
# (with public ops, a check and a multiply per tensor, then a reduction of the flags); the scale update is
# one kernel that reads the overflow flag on the device, so the fused-optimizer path needs no host sync.

amp_foreach_non_finite_check_and_unscale_ = _private(torch, "_amp_foreach_non_finite_check_and_unscale_")
amp_update_scale_ = _private(torch, "_amp_update_scale_")

# --- grad mode and dispatch state ----------------------------------------------------------------------

#: ``torch._C._set_grad_enabled``: the master -> model copy after every O2 step runs with grad mode off.
#: Measured: 1 Python call per step, against 8 for ``with torch.no_grad():`` and 3 for
#: ``torch.set_grad_enabled(False)`` (a class whose constructor is Python).
set_grad_enabled = _private(torch, "_C._set_grad_enabled")

#: ``torch._C._is_torch_function_mode_enabled``: O1's forward region sets autocast's thread state with
#: C calls (measured: 1 Python call per forward, against 8 for ``torch.autocast(...).__enter__/__exit__``)
#: and must take ``torch.autocast`` itself where a torch-function mode (``torch.export``) watches.
is_torch_function_mode_enabled = _private(torch, "_C._is_torch_function_mode_enabled")

#: ``torch._C._dispatch_has_kernel_for_dispatch_key(qualified_op, key_name)``: whether native autocast
#: (or a backend) already has a kernel for an op. No public query exists.
has_kernel_for_dispatch_key = _private(torch, "_C._dispatch_has_kernel_for_dispatch_key")

_dispatch_keys = _private(torch, "_C.DispatchKey")
_privateuse1_backend_name = _private(torch, "_C._get_privateuse1_backend_name")


def dispatch_key_exists(name: str) -> bool:
    """Whether this torch has the dispatch key ``name`` (e.g. ``"AutocastXPU"``). No public query exists."""
    return getattr(_dispatch_keys, name, None) is not None


def dispatch_key_name(device_type: str) -> str:
    """The backend dispatch key name of ``device_type`` (``"CUDA"``, ``"CPU"``, ``"PrivateUse1"``...)."""
    return "PrivateUse1" if device_type == _privateuse1_backend_name() else device_type.upper()


def destroy_library(library: Any) -> None:
    """Deregister every kernel of a ``torch.library.Library`` now (``Library._destroy``).

    The public way is to drop the last reference and let its finalizer run, which a traceback or any
    other lingering reference postpones; O1's added autocast kernels must be gone when O1 is turned off.
    """
    _library_destroy(library)


_library_destroy = _private(torch, "library.Library._destroy")

# --- module classes and tensor internals ---------------------------------------------------------------

#: ``torch.nn.modules.batchnorm._BatchNorm``: Apex's O2 rule keeps every affine ``_BatchNorm`` (user
#: subclasses and SyncBatchNorm included) in FP32; torch has no public base class of the batch norms.
BatchNormBase = _private(torch, "nn.modules.batchnorm._BatchNorm")

#: ``torch.nn.modules._functions.SyncBatchNorm``: the autograd function behind ``torch.nn.SyncBatchNorm``'s
#: fused kernels, used by Apex's SyncBatchNorm class (a ``_BatchNorm``, which torch's module is not).
SyncBatchNormFunction = _private(torch, "nn.modules._functions.SyncBatchNorm")

#: ``torch._utils._flatten_dense_tensors`` / ``_unflatten_dense_tensors``: the functions Apex's ``apex_C``
#: bound; their public equivalent is ``torch.cat`` of flattened views and manual slicing.
flatten_dense_tensors = _private(torch, "_utils._flatten_dense_tensors")
unflatten_dense_tensors = _private(torch, "_utils._unflatten_dense_tensors")

#: ``tensor._version`` (no public accessor), read without a Python call (``list(map(tensor_version, grads))``):
#: O2 recognises gradients its own ``zero_grad`` zeroed and nothing wrote since, so it need not put them aside
#: (measured, the host-work test's MLP with BatchNorm, O2 AdamW, in-place ``zero_grad``: 735 calls and 142
#: aten ops per step, where putting them aside took 802 and 143).
tensor_version = operator.attrgetter("_version")


def fused_optimizer_devices() -> Iterable[str]:
    """Device types torch's ``fused=True`` optimizers support (``torch.utils._foreach_utils``)."""
    return _fused_devices()


def capturable_optimizer_devices() -> Iterable[str]:
    """Device types torch's ``capturable=True`` optimizers support (``torch.optim.optimizer``)."""
    return _capturable_devices()


def _cuda_only() -> List[str]:
    return ["cuda"]  # before torch knew other devices, fused and capturable optimizers were CUDA only


_fused_devices = _private(torch, "utils._foreach_utils._get_fused_kernels_supported_devices", _cuda_only)
_capturable_devices = _private(torch_optimizer_module, "_get_capturable_supported_devices", _cuda_only)

# --- torch.amp.GradScaler's internals, for Apex's FusedAdam(step(grad_scaler=...)) ---------------------
# A GradScaler hands itself to a fused optimizer's step; the optimizer reads the scaler's per-device
# overflow flags and its scale as torch's own fused optimizers do (no public accessor exists).


def grad_scaler_found_inf_per_device(grad_scaler: Any, optimizer: Any) -> Dict[Any, torch.Tensor]:
    """``{device: found_inf}`` of ``optimizer``'s gradients (``GradScaler._check_inf_per_device``).

    Raises ``NotImplementedError`` where torch's check kernel has no version for the gradients' dtype
    (BFloat16 on CUDA); the check runs with an inverse scale of 1, so no gradient was changed by then.
    """
    return grad_scaler._check_inf_per_device(optimizer)


def grad_scaler_record_found_inf(grad_scaler: Any, optimizer: Any, found_per_device: Dict[Any, torch.Tensor]) -> None:
    """Store ``{device: found_inf}`` where ``GradScaler.update`` reads it (``_per_optimizer_states``), as
    ``_check_inf_per_device`` does."""
    grad_scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = found_per_device


def grad_scaler_unscaled(grad_scaler: Any, optimizer: Any) -> bool:
    """Whether ``grad_scaler.unscale_(optimizer)`` already ran this step (``_per_optimizer_states``)."""
    stage = grad_scaler._per_optimizer_states[id(optimizer)].get("stage")
    return getattr(stage, "name", None) == "UNSCALED"


def grad_scaler_scale(grad_scaler: Any) -> torch.Tensor:
    """The scale as a device tensor, without a host sync (``GradScaler._get_scale_async``)."""
    return grad_scaler._get_scale_async()


# --- optimizer step hooks ------------------------------------------------------------------------------
# The fused O2 step replaces an optimizer's own ``step``, whose torch wrapper runs the step hooks: it must
# know whether any is registered. torch registers them publicly (``register_step_pre_hook``,
# ``register_optimizer_step_pre_hook``...) but has no public query.

_global_step_pre_hooks = _private(torch_optimizer_module, "_global_optimizer_pre_hooks")
_global_step_post_hooks = _private(torch_optimizer_module, "_global_optimizer_post_hooks")


def optimizer_step_hooks_registered(optimizer: Any) -> bool:
    """Whether a step pre- or post-hook is registered on ``optimizer`` or for every optimizer."""
    return bool(_global_step_pre_hooks or _global_step_post_hooks
                or getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None))


# --- attribute protocols of torch.optim ----------------------------------------------------------------

#: Set (True) on optimizers whose ``step`` takes ``grad_scale``/``found_inf`` and skips in its kernel
#: (torch's ``fused=True`` optimizers); ``torch.amp.GradScaler`` reads it.
STEP_SUPPORTS_AMP_SCALING = "_step_supports_amp_scaling"
#: Set by an LR scheduler's ``step`` wrapper on the optimizer when it steps; the scheduler warns without it.
OPT_CALLED = "_opt_called"
#: Marks a ``step`` an LR scheduler must not wrap again.
WRAPPED_BY_LR_SCHED = "_wrapped_by_lr_sched"
