"""O1/O4: Apex's "casts around functions" on native autocast, with Apex's scope.

Apex O1 monkey-patched torch for the whole process from ``initialize`` on, so a loss computed outside
``forward`` also ran ``cross_entropy`` in FP32. ampcompat reproduces that scope with autocast's
thread-local state instead of patching torch:

* :class:`O1Scope` (Apex's ``AmpHandle``, see ``legacy_handle``) turns autocast on for the model's device type in the
  thread that called
  ``initialize`` (outside ``forward`` the weight-cast cache is off, so nothing stale can be served);
* every model's ``forward`` runs inside a ``torch.autocast`` region entered by a forward pre-hook, so the
  cast cache is used within one forward and cleared when the outermost forward returns (this also makes
  models called from other threads, ``DataParallel`` replicas included, autocast);
* :meth:`O1Scope._disable_casts` turns autocast off for a block (``amp.disable_casts``, the backward
  inside ``scale_loss``, ``optimizer.step``), and registered half/float/promote functions cast their
  inputs and run with autocast off.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch

from .. import _torch_compat
from . import process_state
from .o1_op_lists import BannedFunctions, OpLists, floating_tensors
from .process_state import _amp_state

_HALF, _FLOAT, _PROMOTE = "half", "float", "promote"

_tls = threading.local()


def _casts_disabled_here() -> bool:
    return getattr(_tls, "disabled_depth", 0) > 0


def active_handle() -> Optional["O1Scope"]:
    """The O1 handle if O1 casting applies in this thread right now, else None."""
    handle = getattr(_amp_state, "handle", None)
    if isinstance(handle, O1Scope) and handle._is_active and not _casts_disabled_here():
        return handle
    return None


class O1Scope:
    """O1's autocast scope: the base of ``_amp_state.handle`` (Apex's ``AmpHandle``), with Apex's private methods.

    Args:
        device_type: the autocast device type (``"cuda"``, ``"cpu"``, ...), taken from the model.
        dtype: ``torch.float16`` (O1) or ``torch.bfloat16`` (O4).
        enable_caching: kept for Apex's signature; autocast caches weight casts within one forward.
        verbose: Apex printed every cast; native autocast casts inside ATen, so this only records it.
        allow_banned: run Apex's banned functions (``F.binary_cross_entropy``) in FP32 instead of raising.
    """

    def __init__(self, device_type: str, dtype: torch.dtype, enable_caching: bool = True,
                 verbose: bool = False, allow_banned: bool = False) -> None:
        self._device_type = device_type
        self._dtype = dtype
        self._enable_caching = enable_caching
        self._verbose = verbose
        self._cache: dict = {}
        self._is_active = True
        self._hook_handles: List[Any] = []
        self._patched: List[Tuple[Any, str, Any]] = []
        self._saved_tls = (
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled(),
        )
        torch.set_autocast_dtype(device_type, dtype)
        torch.set_autocast_enabled(device_type, True)
        torch.set_autocast_cache_enabled(False)
        self._apex_lists = _ApexLists(device_type, dtype, allow_banned)

    # --- Apex's surface ---------------------------------------------------------------------------

    def is_active(self) -> bool:
        return self._is_active

    @property
    def has_cache(self) -> bool:
        return self._enable_caching

    @property
    def cache(self) -> dict:
        return self._cache

    @property
    def verbose(self) -> bool:
        return self._verbose

    def remove_cache(self, param: torch.Tensor) -> None:
        """Apex dropped one cached cast; autocast's cache lives for one forward, so there is nothing to drop."""
        torch.clear_autocast_cache()

    def _clear_cache(self) -> None:
        torch.clear_autocast_cache()

    def _disable_casts(self) -> "_CastsOff":
        """Run the block with autocast off for this handle's device (and no O1 forward regions)."""
        return _CastsOff(self._device_type)

    def _deactivate(self) -> None:
        """Undo everything this handle did: autocast state, model hooks, patched functions."""
        if not self._is_active:
            return
        self._is_active = False
        enabled, dtype, cache = self._saved_tls
        torch.set_autocast_enabled(self._device_type, enabled)
        torch.set_autocast_dtype(self._device_type, dtype)
        torch.set_autocast_cache_enabled(cache)
        torch.clear_autocast_cache()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        for module, name, original in reversed(self._patched):
            setattr(module, name, original)
        self._patched.clear()
        self._apex_lists.remove()

    # --- ampcompat's wiring -----------------------------------------------------------------------

    def attach_model(self, model: torch.nn.Module) -> None:
        """Make ``model.forward`` an autocast region (pre-hook enters it, an always-called hook exits)."""
        self._hook_handles.append(model.register_forward_pre_hook(_enter_forward_region))
        self._hook_handles.append(model.register_forward_hook(_exit_forward_region, always_call=True))

    def patch_registered_functions(self) -> None:
        """Wrap every registered ``module.name`` with its cast, then clear the registry (as Apex)."""
        registry = process_state.cast_registry
        for module, name, kind in sorted(registry, key=lambda entry: (id(entry[0]), entry[1], entry[2])):
            original = getattr(module, name)
            self._patched.append((module, name, original))
            setattr(module, name, _casting_wrapper(original, kind))
        registry.clear()


class _CastsOff:
    """The context manager of :meth:`O1Scope._disable_casts`."""

    __slots__ = ("_device_type", "_was_enabled")

    def __init__(self, device_type: str) -> None:
        self._device_type = device_type

    def __enter__(self) -> None:
        self._was_enabled = casts_off(self._device_type)

    def __exit__(self, *exc_info: Any) -> None:
        casts_back(self._device_type, self._was_enabled)


def casts_off(device_type: str) -> bool:
    """Turn autocast off for ``device_type`` in this thread, and O1's forward regions with it.

    The backward inside ``scale_loss`` and ``optimizer.step`` call this pair directly (no context
    manager object: they run on every training step). Returns what :func:`casts_back` restores.
    """
    _tls.disabled_depth = getattr(_tls, "disabled_depth", 0) + 1
    was_enabled = torch.is_autocast_enabled(device_type)
    torch.set_autocast_enabled(device_type, False)
    return was_enabled


def casts_back(device_type: str, was_enabled: bool) -> None:
    """Undo :func:`casts_off`."""
    torch.set_autocast_enabled(device_type, was_enabled)
    _tls.disabled_depth -= 1


# --- Apex's op lists where native autocast differs (see o1_op_lists) ------------------------------

class _ApexLists:
    """The autocast kernels and banned-function wrappers one O1 scope adds (see ``o1_op_lists``)."""

    def __init__(self, device_type: str, dtype: torch.dtype, allow_banned: bool) -> None:
        self.op_lists = OpLists(device_type, dtype)
        self.banned = BannedFunctions(device_type, allow_banned, lambda: active_handle() is not None)

    def remove(self) -> None:
        self.banned.remove()
        self.op_lists.remove()


# --- forward regions --------------------------------------------------------------------------------

def _enter_forward_region(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        return  # traced code runs under the thread's autocast state, which dynamo records and guards on
    handle = active_handle()
    stack = getattr(_tls, "regions", None)
    if stack is None:
        stack = _tls.regions = []
    if handle is None:
        stack.append(None)
    elif _torch_compat.is_torch_function_mode_enabled():  # e.g. torch.export: autocast must be seen entering
        region = torch.autocast(handle._device_type, dtype=handle._dtype, cache_enabled=handle._enable_caching)
        region.__enter__()
        stack.append(region)
    else:
        # What torch.autocast(...).__enter__ does, in C calls only: this runs on every forward, and the
        # public context manager costs 7 Python calls more per forward (measured with benchmarks/_counts.py:
        # 8 for torch.autocast(...).__enter__/__exit__, 1 for this pair of hooks), which would put O1's
        # step above the native autocast loop's in tests/test_host_overhead.py.
        device = handle._device_type
        stack.append((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                      torch.is_autocast_cache_enabled()))
        torch.set_autocast_enabled(device, True)
        torch.set_autocast_dtype(device, handle._dtype)
        torch.autocast_increment_nesting()
        torch.set_autocast_cache_enabled(handle._enable_caching)


def _exit_forward_region(module: torch.nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = getattr(_tls, "regions", None)
    if not stack:
        return
    region = stack.pop()
    if type(region) is tuple:
        device, enabled, dtype, cache_enabled = region
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)
        torch.set_autocast_cache_enabled(cache_enabled)
    elif region is not None:
        region.__exit__(None, None, None)


def _reset_in_forked_child() -> None:
    # A forked DataLoader worker inherits the parent's thread state; it must not run under O1.
    handle = getattr(_amp_state, "handle", None)
    if isinstance(handle, O1Scope):
        torch.set_autocast_enabled(handle._device_type, False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_forked_child)


# --- registered and decorated functions -------------------------------------------------------------

def register(module: Any, name: str, kind: str) -> None:
    """Record ``module.name`` for casting at the next O1 ``initialize`` (Apex's registry rules)."""
    if not hasattr(module, name):
        raise ValueError("No function named {} in module {}.".format(name, module))
    process_state.cast_registry.add((module, name, kind))


def _cast_leaf(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type:
        return value.to(dtype)
    return value


def _cast_arg(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, torch.Tensor) and v.is_floating_point() for v in value
    ):
        return type(value)(_cast_leaf(v, device_type, dtype) for v in value)
    return _cast_leaf(value, device_type, dtype)


def _target_dtype(kind: str, handle: O1Scope, args: Tuple[Any, ...], kwargs: dict) -> Optional[torch.dtype]:
    if kind == _HALF:
        return handle._dtype
    if kind == _FLOAT:
        return torch.float32
    dtypes = {t.dtype for t in floating_tensors(args, kwargs) if t.device.type == handle._device_type}
    if len(dtypes) <= 1:
        return None
    return functools.reduce(torch.promote_types, dtypes)


def _casting_wrapper(fn: Callable, kind: str) -> Callable:
    """Wrap ``fn`` so that under active O1 its floating inputs are cast and it runs with autocast off."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handle = active_handle()
        if handle is None:
            return fn(*args, **kwargs)
        dtype = _target_dtype(kind, handle, args, kwargs)
        if dtype is not None:
            args = tuple(_cast_arg(a, handle._device_type, dtype) for a in args)
            kwargs = {k: _cast_arg(v, handle._device_type, dtype) for k, v in kwargs.items()}
        with torch.autocast(handle._device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def half_function(fn: Callable) -> Callable:
    """Decorator: under O1, cast ``fn``'s floating inputs to the O1 dtype and run it with autocast off."""
    return _casting_wrapper(fn, _HALF)


def float_function(fn: Callable) -> Callable:
    """Decorator: under O1, cast ``fn``'s floating inputs to FP32 and run it with autocast off."""
    return _casting_wrapper(fn, _FLOAT)


def promote_function(fn: Callable) -> Callable:
    """Decorator: under O1, cast ``fn``'s floating inputs to their widest dtype and run it with autocast off."""
    return _casting_wrapper(fn, _PROMOTE)


def register_half_function(module: Any, name: str) -> None:
    """Cast ``module.name``'s inputs to half under O1. Call before ``amp.initialize``."""
    register(module, name, _HALF)


def register_float_function(module: Any, name: str) -> None:
    """Cast ``module.name``'s inputs to FP32 under O1. Call before ``amp.initialize``."""
    register(module, name, _FLOAT)


def register_promote_function(module: Any, name: str) -> None:
    """Cast ``module.name``'s inputs to their widest type under O1. Call before ``amp.initialize``."""
    register(module, name, _PROMOTE)

