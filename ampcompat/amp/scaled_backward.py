"""``amp.scale_loss`` and ``amp.disable_casts``: the per-backward state machine (spec §6).

Entering ``scale_loss`` stashes gradients that already exist (so only the new ones get unscaled) and
yields ``loss.float() * scale``; leaving it unscales the new gradients into FP32 (adding the stashed
ones back), checks them for inf/NaN, updates the scale and, on overflow, makes the next
``optimizer.step()`` a skip. Under O1 the backward inside the block runs with autocast off.

With optimizers whose fused kernel can skip a step itself (``fused=True`` Adam/AdamW/SGD), the scale
is updated on the device and the skip happens in the kernel, so a training step needs no host sync;
Apex's host-side fields (``_loss_scale``, ``_unskipped``, ``already_patched``) are brought up to date
whenever they are read. Otherwise the overflow flag is read once per ``scale_loss`` exit.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional

import torch

from .o1_autocast import active_handle
from .master_weights import (
    begin_backward,
    check_param_groups_unchanged,
    defer_skip,
    mark_skip,
    restore_amp_backward,
    skips_on_device,
)
from .process_state import _amp_state

_NOT_INITIALIZED = (
    "Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  "
    "model, optimizer = amp.initialize(model, optimizer, opt_level=...) must be called before "
    "`with amp.scale_loss`."
)


_NESTED = (
    "amp.scale_loss blocks cannot be nested for the same optimizer: finish the first block (call "
    "scaled_loss.backward() inside it) before opening another one."
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


def _as_list(optimizers: Any) -> Any:
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "_amp_stash"):
        return [optimizers]
    return optimizers


def _casts_off() -> contextlib.AbstractContextManager:
    handle = active_handle()
    return handle._disable_casts() if handle is not None else contextlib.nullcontext()


def _clear_cast_cache() -> None:
    if getattr(_amp_state, "handle", None) is not None:
        torch.clear_autocast_cache()


@contextlib.contextmanager
def scale_loss(loss: torch.Tensor, optimizers: Any, loss_id: int = 0, model: Optional[torch.nn.Module] = None,
               delay_unscale: bool = False, delay_overflow_check: bool = False) -> Iterator[torch.Tensor]:
    """Yield the scaled loss for ``backward()``; on exit, unscale, check and update (Apex's sequence).

    Args:
        loss: the loss tensor.
        optimizers: every optimizer owning parameters that receive gradients (one or a list).
        loss_id: which loss scaler to use (``0 <= loss_id < num_losses``).
        model: unused, as in Apex.
        delay_unscale: leave gradients scaled (accumulate several backward passes; no step between).
        delay_overflow_check: unscale but leave ``update_scale()`` (and the skip) to the caller.

    Yields:
        ``loss.float() * loss_scale``.

    Raises:
        RuntimeError: if ``amp.initialize`` was never called.
    """
    props = getattr(_amp_state, "opt_properties", None)
    if props is None:
        raise RuntimeError(_NOT_INITIALIZED)
    if not props.enabled:
        yield loss
        return
    _check_loss(loss)
    _check_loss_id(loss_id)
    optimizers = _as_list(optimizers)
    loss_scaler = _amp_state.loss_scalers[loss_id]
    # A dynamic scale is never read on the host here: reading it would wait for the GPU.
    if not props.master_weights and not loss_scaler.dynamic and loss_scaler.loss_scale() == 1.0:
        with _casts_off():
            yield loss.float()
        _clear_cast_cache()
        return

    prepared = _prepare(optimizers, delay_unscale)
    try:
        with _casts_off():
            yield loss_scaler.scaled(loss)
    except BaseException:
        for optimizer in prepared:
            restore_amp_backward(optimizer)
        raise
    finally:
        for optimizer in optimizers:
            optimizer._amp_stash._in_scale_loss = False

    if delay_unscale:
        for optimizer in optimizers:
            optimizer._amp_stash.params_have_scaled_gradients = True
    else:
        _unscale_and_update(loss_scaler, optimizers, loss_id, delay_overflow_check)
    _clear_cast_cache()


def _prepare(optimizers: List[Any], delay_unscale: bool) -> List[Any]:
    """Check every optimizer, then stash their existing grads; returns the ones whose grads were stashed.

    Every optimizer is checked before any is changed (Apex's AttributeError for one that skipped
    ``initialize``), so a refused call leaves them all as they were.
    """
    stashes = [optimizer._amp_stash for optimizer in optimizers]
    if any(stash._in_scale_loss for stash in stashes):
        raise RuntimeError(_NESTED)
    for optimizer in optimizers:
        check_param_groups_unchanged(optimizer)
    prepared = []
    if not delay_unscale and isinstance(optimizers, list):
        for optimizer in optimizers:
            if not optimizer._amp_stash.params_have_scaled_gradients:
                optimizer._prepare_amp_backward()
                prepared.append(optimizer)
    for stash in stashes:
        begin_backward(stash)
    return prepared


def _unscale_and_update(loss_scaler: Any, optimizers: List[Any], loss_id: int, delay_overflow_check: bool) -> None:
    """Leaving the block: unscale the new grads, then update the scale and arrange the skip on overflow."""
    loss_scaler.clear_overflow_state()
    for optimizer in optimizers:
        optimizer._post_amp_backward(loss_scaler)
        optimizer._amp_stash.params_have_scaled_gradients = False
    empty = not any(optimizer._amp_stash._produced_grads for optimizer in optimizers)
    for optimizer in optimizers:
        optimizer._amp_stash._empty_exit = empty
    if delay_overflow_check:
        return
    if loss_scaler.can_defer() and all(skips_on_device(o) for o in optimizers):
        # Fused optimizers skip an overflowing step inside their kernel: no host sync needed here.
        record = loss_scaler.update_scale_on_device()
        for optimizer in optimizers:
            defer_skip(optimizer, loss_scaler._overflow_buf, record)
        loss_scaler.resolve(block=False)
    elif loss_scaler.update_scale():
        for optimizer in optimizers:
            mark_skip(optimizer, loss_id)


def disable_casts() -> contextlib.AbstractContextManager:
    """Run a block without O1's casts. Needs an O1 ``initialize`` (Apex raised AttributeError otherwise)."""
    return _amp_state.handle._disable_casts()
