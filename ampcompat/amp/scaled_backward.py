"""``amp.scale_loss`` and ``amp.disable_casts``: what happens around one backward pass.

Entering ``scale_loss`` stashes gradients that already exist (so only the new ones get unscaled) and
yields ``loss.float() * scale``; leaving it unscales the new gradients into FP32 (adding the stashed
ones back), checks them for inf/NaN, updates the scale and, on overflow, makes the next
``optimizer.step()`` a skip (each optimizer's lifecycle: ``optimizer_lifecycle``). Under O1 the
backward inside the block runs with autocast off.

With optimizers whose fused kernel can skip a step itself (``fused=True`` Adam/AdamW/SGD), the scale
is updated on the device and the skip happens in the kernel, so a training step needs no host sync;
Apex's host-side fields (``_loss_scale``, ``_unskipped``, ``already_patched``) are brought up to date
whenever they are read. Otherwise the overflow flag is read once per ``scale_loss`` exit.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, List, Optional

import torch

from .. import _torch_compat
from .o1_autocast import O1Scope, casts_back, casts_off
from .optimizer_lifecycle import Event
from .process_state import _amp_state

_NOT_INITIALIZED = (
    "Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  "
    "model, optimizer = amp.initialize(model, optimizer, opt_level=...) must be called before "
    "`with amp.scale_loss`."
)


_NO_OPTIMIZERS = (
    "amp.scale_loss(loss, optimizers) got optimizers=None: pass the optimizer (or the list of optimizers) "
    "that amp.initialize returned, as in `with amp.scale_loss(loss, optimizer) as scaled_loss:`; if "
    "amp.initialize was called without optimizers, pass them to it first."
)


def _check_loss(loss: Any) -> None:
    if not (isinstance(loss, torch.Tensor) and loss.is_floating_point()):
        got = "a tensor of dtype {}".format(loss.dtype) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError("amp.scale_loss needs a floating-point loss tensor, got {}.".format(got))


def _check_loss_id(loss_id: int) -> None:
    num_losses = len(_amp_state.loss_scalers)
    if not 0 <= loss_id < num_losses:
        raise IndexError(
            "loss_id {} is out of range: amp.initialize was called with num_losses={}, so loss_id must be "
            "between 0 and {}.".format(loss_id, num_losses, num_losses - 1))


_PASS_THROUGH, _UNSCALED, _SCALED = range(3)  # what a block does: amp disabled / static scale 1 / scaling


class scale_loss:  # noqa: N801 - Apex's function name; a class so entering and leaving cost few calls
    """``with amp.scale_loss(loss, optimizer) as scaled_loss:`` yields the scaled loss for ``backward()``;
    leaving the block unscales, checks and updates (Apex's sequence).

    Args:
        loss: the loss tensor.
        optimizers: every optimizer owning parameters that receive gradients (one or a list).
        loss_id: which loss scaler to use (``0 <= loss_id < num_losses``).
        model: unused, as in Apex.
        delay_unscale: leave gradients scaled (accumulate several backward passes; no step between).
        delay_overflow_check: unscale but leave ``update_scale()`` (and the skip) to the caller.

    Entering returns ``loss.float() * loss_scale``.

    Raises:
        RuntimeError: on entering, if ``amp.initialize`` was never called.
        TypeError: on entering, for a loss that is not a floating-point tensor, or ``optimizers=None``
            where the loss is scaled.
    """

    def __init__(self, loss: torch.Tensor, optimizers: Any, loss_id: int = 0,
                 model: Optional[torch.nn.Module] = None, delay_unscale: bool = False,
                 delay_overflow_check: bool = False) -> None:
        self._loss = loss
        self._optimizers = optimizers
        self._loss_id = loss_id
        self._delay_unscale = delay_unscale
        self._delay_overflow_check = delay_overflow_check

    def __enter__(self) -> torch.Tensor:
        props = getattr(_amp_state, "opt_properties", None)
        if props is None:
            raise RuntimeError(_NOT_INITIALIZED)
        loss = self._loss
        if not props.options["enabled"]:
            self._kind = _PASS_THROUGH
            return loss
        if not (isinstance(loss, torch.Tensor) and loss.is_floating_point()):
            _check_loss(loss)
        loss_id = self._loss_id
        if not 0 <= loss_id < len(_amp_state.loss_scalers):
            _check_loss_id(loss_id)
        optimizers = self._optimizers
        several = not (isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "_amp_stash"))
        if not several:
            optimizers = [optimizers]
        self._optimizers = optimizers
        self._scaler = scaler = _amp_state.loss_scalers[loss_id]
        # A dynamic scale is never read on the host here: reading it would wait for the GPU.
        if not props.options["master_weights"] and not scaler.dynamic and scaler.loss_scale() == 1.0:
            self._kind = _UNSCALED
        else:
            if optimizers is None:
                raise TypeError(_NO_OPTIMIZERS)
            self._kind = _SCALED
            set_aside = not self._delay_unscale and isinstance(optimizers, list)
            if several:  # all are checked before any is changed: a refusal leaves them as they were
                for optimizer in optimizers:
                    optimizer._amp_stash.check_enter()
            may_fuse = not self._delay_overflow_check
            for optimizer in optimizers:
                optimizer._amp_stash.enter(set_aside, may_fuse)
        # The backward inside the block runs without O1's casts.
        handle = getattr(_amp_state, "handle", None)
        if isinstance(handle, O1Scope) and handle._is_active:
            self._casts_device = handle._device_type
            self._casts_were_on = casts_off(self._casts_device)
        else:
            self._casts_device = None
        try:
            return loss.float() if self._kind == _UNSCALED else scaler.scaled(loss)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        kind = self._kind
        if kind == _PASS_THROUGH:
            return False
        if self._casts_device is not None:
            casts_back(self._casts_device, self._casts_were_on)
        if kind == _SCALED:
            if exc_type is not None:
                self._abort()
                return False
            try:
                self._leave()
            except BaseException:
                self._abort()
                raise
        if getattr(_amp_state, "handle", None) is not None:
            torch.clear_autocast_cache()
        return False

    def _abort(self) -> None:
        for optimizer in self._optimizers:
            optimizer._amp_stash.abort()

    def _leave(self) -> None:
        """Leaving the block: unscale the new grads, update the scale, and tell each optimizer how it ended."""
        optimizers = self._optimizers
        if self._delay_unscale:
            for optimizer in optimizers:
                optimizer._amp_stash.exit(Event.EXIT_DELAYED)
            return
        scaler = self._scaler
        scaler.clear_overflow_state()
        produced = False
        for optimizer in optimizers:
            produced = optimizer._post_amp_backward(scaler) or produced
        record = None
        if self._delay_overflow_check:
            event = Event.EXIT_CLEAN
        else:
            # Fused optimizers skip an overflowing step inside their kernel: no host sync needed here. (The
            # attribute test spares other optimizers a call to skips_in_kernel, which makes it too.)
            on_device = True
            for optimizer in optimizers:
                if not (getattr(optimizer, _torch_compat.STEP_SUPPORTS_AMP_SCALING, False)
                        and optimizer._amp_stash.skips_in_kernel()):
                    on_device = False
                    break
            if on_device and scaler.can_defer():
                record = scaler.update_scale_on_device()
                event = Event.EXIT_ON_DEVICE
            else:
                event = Event.EXIT_OVERFLOW if scaler.update_scale() else Event.EXIT_CLEAN
        loss_id = self._loss_id
        if event is Event.EXIT_OVERFLOW:
            for optimizer in optimizers:
                optimizer._amp_stash.exit_with_overflow(loss_id)
            return
        if not produced:
            event = Event.EXIT_NO_GRADS
        for optimizer in optimizers:
            optimizer._amp_stash.exit(event, loss_id, record)
        if record is not None:
            scaler.resolve(block=False)


def disable_casts() -> contextlib.AbstractContextManager:
    """Run a block without O1's casts. Needs an O1 ``initialize`` (Apex raised AttributeError otherwise)."""
    return _amp_state.handle._disable_casts()
