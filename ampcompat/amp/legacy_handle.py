"""Apex's pre-2019 API: ``amp.init()`` returning a handle, and ``handle.wrap_optimizer``.

Old detectors (maskrcnn-benchmark's test script) still call ``amp.init(enabled=..., verbose=...)``,
and Apex's own cast tests use ``amp.init(enabled=True)`` + ``handle._deactivate()``. ``init`` turns
O1 casting on (autocast on the default device) without models or optimizers.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Union

import torch

from .model_gradients import set_aside, unscale_and_add_back
from .o1_autocast import O1Scope
from .scaler import LossScaler
from . import process_state
from .process_state import maybe_print


def init(enabled: bool = True, loss_scale: Union[str, float] = "dynamic", enable_caching: bool = True,
         verbose: bool = False, allow_banned: bool = False) -> Any:
    """Turn on O1 casting for the current thread and return the handle (Apex's old ``amp.init``).

    Args:
        enabled: False returns a handle whose methods all pass through.
        loss_scale: the scale used by ``handle.wrap_optimizer`` wrappers.
        enable_caching: cache weight casts within one forward.
        verbose: recorded on the handle (native autocast does not print casts).
        allow_banned: run Apex's banned functions (``F.binary_cross_entropy``, ``nn.BCELoss``) in FP32 instead
            of raising ``NotImplementedError`` on fp16 inputs.

    Returns:
        An ``AmpHandle`` (also stored as ``amp._amp_state.handle``), or a ``NoOpHandle``.
    """
    if not enabled:
        handle: Any = NoOpHandle()
        process_state.install_handle(handle)
        return handle
    process_state.remove_handle()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    handle = AmpHandle(device_type, torch.float16, enable_caching=enable_caching, verbose=verbose,
                       allow_banned=allow_banned)
    handle._loss_scale = loss_scale
    handle.patch_registered_functions()
    process_state.install_handle(handle)
    return handle


_OLD_API_MESSAGE = (
    "The old Amp API is no longer supported.  Please move to the new API, documented here:  "
    "https://nvidia.github.io/apex/amp.html.  Transition guide:  "
    "https://nvidia.github.io/apex/amp.html#transition-guide-for-old-api-users"
)


class AmpHandle(O1Scope):
    """Apex's ``AmpHandle`` (``_amp_state.handle`` under O1/O4): the O1 scope plus the old API's methods."""

    def scale_loss(self, loss: Any, optimizer: Any) -> None:
        raise RuntimeError(_OLD_API_MESSAGE)

    def wrap_optimizer(self, optimizer: Any, num_loss: int = 1) -> Any:
        return OptimWrapper(optimizer, self, num_loss)


class NoOpHandle:
    """What ``amp.init(enabled=False)`` returns: every method passes through."""

    def is_active(self) -> bool:
        return False

    @contextlib.contextmanager
    def _disable_casts(self) -> Iterator[None]:
        yield

    def wrap_optimizer(self, optimizer: Any, num_loss: int = 1) -> Any:
        return OptimWrapper(optimizer, self, num_loss)

    def _deactivate(self) -> None:
        pass

    def _clear_cache(self) -> None:
        pass

    @property
    def has_cache(self) -> bool:
        return False

    @property
    def verbose(self) -> bool:
        return False


class OptimWrapper:
    """The old API's optimizer wrapper: per-loss dynamic scalers, ``scale_loss(loss)`` and ``step()``."""

    def __init__(self, optimizer: Any, amp_handle: Any, num_loss: int) -> None:
        self._optimizer = optimizer
        self._amp_handle = amp_handle
        self._num_loss = num_loss
        self._loss_idx = 0
        self._skip_next = [False] * num_loss
        loss_scale = getattr(amp_handle, "_loss_scale", "dynamic")
        self._loss_scaler = [LossScaler(loss_scale) for _ in range(num_loss)]

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    @contextlib.contextmanager
    def scale_loss(self, loss: torch.Tensor) -> Iterator[torch.Tensor]:
        if not self._amp_handle.is_active():
            yield loss
            return
        if self._loss_idx >= self._num_loss:
            raise RuntimeError("Too many loss calls: wrap_optimizer was given num_loss={}.".format(self._num_loss))
        scaler = self._loss_scaler[self._loss_idx]
        params = self._params()
        stashed = set_aside(params)
        with self._amp_handle._disable_casts():
            yield loss.float() * scaler.loss_scale()
        scaler.clear_overflow_state()
        unscale_and_add_back(scaler, params, stashed)
        self._skip_next[self._loss_idx] = scaler.update_scale()
        self._loss_idx += 1
        torch.clear_autocast_cache()

    def step(self, closure: Any = None) -> Any:
        if not self._amp_handle.is_active():
            return self._optimizer.step(closure=closure)
        self._loss_idx = 0
        if closure is not None:
            raise NotImplementedError("The `closure` argument is unsupported by the amp optimizer wrapper.")
        if any(self._skip_next):
            maybe_print("Gradient overflow, skipping update")
            self._skip_next = [False] * self._num_loss
            return None
        return self._optimizer.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def state_dict(self) -> Any:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        return self._optimizer.load_state_dict(state_dict)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return self._optimizer.zero_grad(*args, **kwargs)

    def add_param_group(self, param_group: Any) -> None:
        return self._optimizer.add_param_group(param_group)
