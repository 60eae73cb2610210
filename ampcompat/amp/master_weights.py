"""Optimizer patching: Apex's ``_amp_stash``, FP32 master weights, gradient transfer and step skipping.

``patch_optimizer`` gives an optimizer Apex's private methods (``_prepare_amp_backward``,
``_post_amp_backward``, ``_lazy_init_maybe_master_weights`` ...) and replaces ``step`` (skip after an
overflow, autocast off, master -> model copy). With master weights (O2/O5) the half parameters inside
``param_groups`` are replaced, lazily, by FP32 masters, so LR schedulers, ``amp.master_params`` and the
optimizer's own state all see the masters. All gradient work is multi-tensor: a fixed number of kernel
launches per backward pass whatever the number of parameters.
"""
from __future__ import annotations

import operator
import types
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional

import torch

from .. import _torch_compat
from .o1_autocast import O1Scope, casts_back, casts_off
from .optimizer_lifecycle import TRANSITIONS, Event, OptState, next_state
from .process_state import _amp_state, maybe_print
from .scaler import LossScaler

_CLOSURE_MESSAGE = "Currently, Amp does not support closure use with optimizers."
_PRIVATE_METHODS = (
    "_lazy_init_maybe_master_weights",
    "_master_params_to_model_params",
    "_prepare_amp_backward",
    "_post_amp_backward",
    "_amp_lazy_init",
)
_HALF_TYPES = (torch.float16, torch.bfloat16)
MASTERS_KEY = "amp_master_params"


class AmpOptimizerState:
    """``optimizer._amp_stash``: Apex's per-optimizer bookkeeping, under Apex's attribute names.

    Where the optimizer stands between steps is one :class:`OptState` (``_state``), moved only through
    ``optimizer_lifecycle``'s table; Apex's flags ``already_patched`` and ``params_have_scaled_gradients``
    are read-only views of it.
    """

    def __init__(self) -> None:
        self.lazy_init_called = False  # written by legacy code that runs the lazy init itself (BERT)
        self._state = OptState.READY
        self._entered_from: Optional[OptState] = None  # inside a scale_loss block: the state before it
        self._skip_loss_id = 0  # SKIP_PENDING: the loss whose overflow the skip message names
        # OVERFLOW_ON_DEVICE: the flag the next fused step skips on, and the scale updates behind it;
        # STEPPED_ON_DEVICE: the flag the last fused step used.
        self._found_inf: Optional[torch.Tensor] = None
        self._deferred_records: list = []
        self._pending_steps: Deque[list] = deque()  # fused steps whose skip message waits for the host copy
        self._initialised = False  # lazy init done (masters built / params classified)
        self._param_count: Optional[List[int]] = None  # group sizes amp knows about
        self._refresh_masters_from_model = False  # loaded a checkpoint without masters
        self._grads_stashed = False  # the running block found grads already there (accumulation)
        self._model_side: List[torch.Tensor] = []  # the rest is set by _plan at lazy init
        self._frozen_half: List[torch.Tensor] = []
        self._one_group = True

    def _verdict(self) -> OptState:
        """The state that decides the next step (inside a block: the state the block was entered in)."""
        return self._entered_from if self._state is OptState.IN_SCALE_LOSS else self._state

    @property
    def already_patched(self) -> bool:
        """Whether the next ``step()`` will be skipped (reads any on-device overflow flag: a host sync)."""
        verdict = self._verdict()
        return verdict is OptState.SKIP_PENDING or (
            verdict is OptState.OVERFLOW_ON_DEVICE and any(r.values()[0] for r in self._deferred_records))

    @property
    def params_have_scaled_gradients(self) -> bool:
        """Whether a ``delay_unscale`` block left the gradients multiplied by the loss scale."""
        return self._verdict() is OptState.SCALED


def check_optimizer(optimizer: Any) -> None:
    """Raise Apex's errors for an optimizer that already went through ``amp.initialize``."""
    if hasattr(optimizer, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    for name in _PRIVATE_METHODS:
        if hasattr(optimizer, name):
            raise RuntimeError("Incoming optimizer already has {} defined.".format(name))


def _type_error(param: torch.Tensor) -> TypeError:
    return TypeError(
        "Optimizer's parameters must be either torch.cuda.FloatTensor or torch.cuda.HalfTensor. "
        "Received {}".format(param.type())
    )


def _all_params(optimizer: Any) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _class_method(optimizer: Any, name: str) -> Any:
    """The optimizer class's own method, bound — bypassing the instance attributes amp installs."""
    return getattr(type(optimizer), name).__get__(optimizer, type(optimizer))


# --- lazy initialisation ----------------------------------------------------------------------------

def _lazy_init_maybe_master_weights(self: Any) -> None:
    stash = self._amp_stash
    if stash._initialised:
        return  # idempotent: legacy code calls this by hand after amp already did
    if stash._master_weights:
        _build_masters(self)
    else:
        stash.all_fp16_params, stash.all_fp32_params = [], []
        for p in _all_params(self):
            if p.dtype in _HALF_TYPES:
                stash.all_fp16_params.append(p)
            elif p.dtype == torch.float32:
                stash.all_fp32_params.append(p)
            else:
                raise _type_error(p)
        stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
        stash.all_fp32_grad_stash = [None] * len(stash.all_fp32_params)
        _plan(stash)
    stash._param_count = _param_counts(self)
    stash._initialised = True


def _plan(stash: AmpOptimizerState, frozen_half: Optional[List[torch.Tensor]] = None) -> None:
    """Work out once (at lazy init, and when the parameters change) what every backward pass needs.

    ``_model_side``: the parameters backward writes gradients to. ``_unscaled``: with masters, the FP32
    tensors whose gradients get unscaled (masters, then FP32 params); without, the params themselves.
    ``_one_group``: those all share one (device, dtype), so a clean pass unscales them with one launch
    without grouping. ``_frozen_half``: half params left out of the masters because they were frozen.
    """
    if stash._master_weights:
        stash._model_side = stash.all_fp16_params + stash.all_fp32_from_fp32_params
        unscaled = stash.all_fp32_from_fp16_params + stash.all_fp32_from_fp32_params
        stash._frozen_half = frozen_half or []
    else:
        stash._model_side = unscaled = stash.all_fp16_params + stash.all_fp32_params
    stash._one_group = len({(p.device, p.dtype) for p in unscaled}) <= 1


_GROUP_PARAMS = operator.itemgetter("params")


def _param_counts(optimizer: Any) -> List[int]:
    return list(map(len, map(_GROUP_PARAMS, optimizer.param_groups)))


def check_param_groups_unchanged(optimizer: Any) -> None:
    """Raise if ``param_groups`` were edited by hand after amp's lazy init (amp would not see the new params)."""
    expected = optimizer._amp_stash._param_count
    if expected is not None and _param_counts(optimizer) != expected:
        raise RuntimeError(
            "The parameters of this optimizer changed after amp set it up (param group sizes {} became {}). "
            "Add parameters with optimizer.add_param_group(...), which amp handles, instead of editing "
            "optimizer.param_groups directly.".format(expected, _param_counts(optimizer)))


def _build_masters(self: Any, known: Optional[Dict[int, torch.Tensor]] = None) -> None:
    """Put FP32 masters in place of the trainable half params of every group, and record them in the stash.

    ``known`` (``id(master) -> model param``) lets a rebuild keep the masters that already exist.
    """
    stash = self._amp_stash
    groups = [_replace_with_masters(self, group["params"], known) for group in self.param_groups]
    stash.fp16_groups = [fp16 for fp16, _, _ in groups]
    stash.fp32_from_fp16_groups = [masters for _, masters, _ in groups]
    stash.fp32_from_fp32_groups = [fp32 for _, _, fp32 in groups]
    stash.all_fp16_params = [p for g in stash.fp16_groups for p in g]
    stash.all_fp32_from_fp16_params = [p for g in stash.fp32_from_fp16_groups for p in g]
    stash.all_fp32_from_fp32_params = [p for g in stash.fp32_from_fp32_groups for p in g]
    stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
    stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    _plan(stash, [p for group in self.param_groups for p in group["params"] if p.dtype in _HALF_TYPES])
    if self.state:
        # Re-cast state moved onto the masters (e.g. momentum created for half params) to FP32.
        _class_method(self, "load_state_dict")(_class_method(self, "state_dict")())


def _replace_with_masters(self: Any, params: List[torch.Tensor], known: Optional[Dict[int, torch.Tensor]] = None):
    """Swap each trainable half param in ``params`` (in place) for an FP32 master; move its state.

    ``known`` maps ``id(master)`` to its model param for masters already in ``params`` (a rebuild).
    """
    known = known or {}
    fp16, masters, fp32 = [], [], []
    for i, p in enumerate(params):
        if id(p) in known:
            fp16.append(known[id(p)])
            masters.append(p)
            continue
        if not p.requires_grad:
            continue
        if p.dtype in _HALF_TYPES:
            master = p.detach().clone().float().requires_grad_(True)
            params[i] = master
            if p in self.state:
                self.state[master] = self.state.pop(p)
            fp16.append(p)
            masters.append(master)
        elif p.dtype == torch.float32:
            fp32.append(p)
        else:
            raise _type_error(p)
    return fp16, masters, fp32


def _masters_for_unfrozen_params(self: Any) -> None:
    """Give FP32 masters to half params that were frozen at lazy init and have been unfrozen since.

    Without this the optimizer would step the half param itself, with its still-scaled gradient.
    """
    stash = self._amp_stash
    known = {id(m): p for g16, g32 in zip(stash.fp16_groups, stash.fp32_from_fp16_groups) for p, m in zip(g16, g32)}
    _build_masters(self, known)


def _amp_lazy_init(self: Any) -> None:
    if not self._amp_stash.lazy_init_called:
        self._lazy_init_maybe_master_weights()
        self._amp_stash.lazy_init_called = True


# --- per-backward gradient work ---------------------------------------------------------------------

def _stash_and_clear(params: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    stashed = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stashed


def _prepare_amp_backward(self: Any) -> None:
    stash = self._amp_stash
    if not stash.lazy_init_called:
        self._amp_lazy_init()
    if stash._master_weights:
        for p in stash._frozen_half:
            if p.requires_grad:
                _masters_for_unfrozen_params(self)
                break
        if stash._refresh_masters_from_model:
            refresh_stale_masters(self)
        # The model's half grads are dropped (as Apex): the masters' grads carry any accumulation.
        stash._fp16_grads_before = [p.grad for p in stash.all_fp16_params]
        for p in stash.all_fp16_params:
            p.grad = None
        if stash.all_fp32_from_fp32_params:
            stash.all_fp32_from_fp32_grad_stash = _stash_and_clear(stash.all_fp32_from_fp32_params)
            stash._grads_stashed = False
            for grad in stash.all_fp32_from_fp32_grad_stash:  # not .count(None): that runs tensor == None
                if grad is not None:
                    stash._grads_stashed = True
                    break
    else:
        for p in stash._model_side:
            if p.grad is not None:  # accumulating onto existing grads: only the new ones get unscaled
                stash.all_fp16_grad_stash = _stash_and_clear(stash.all_fp16_params)
                stash.all_fp32_grad_stash = _stash_and_clear(stash.all_fp32_params)
                stash._grads_stashed = True
                break


def restore_amp_backward(self: Any) -> None:
    """Undo :func:`_prepare_amp_backward` after the ``scale_loss`` block raised: grads as before the block."""
    stash = self._amp_stash
    if stash._master_weights:
        pairs = [(stash.all_fp16_params, stash._fp16_grads_before),
                 (stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash)]
        stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    else:
        pairs = [(stash.all_fp16_params, stash.all_fp16_grad_stash),
                 (stash.all_fp32_params, stash.all_fp32_grad_stash)]
        stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
        stash.all_fp32_grad_stash = [None] * len(stash.all_fp32_params)
    for params, stashed in pairs:
        for p, old in zip(params, stashed):
            p.grad = old
    stash._grads_stashed = False


def _coalesce_sparse(params: List[torch.Tensor]) -> None:
    # Duplicate indices are summed in the grad's dtype when coalescing: do it before the inf/NaN
    # check (an FP16 sum can overflow), as torch.amp.GradScaler does.
    for p in params:
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()


def _split_new_grads(params: List[torch.Tensor], stashed: List[Optional[torch.Tensor]]):
    """Sort a backward pass's gradients: all new ones, and the (new, stashed) pairs to add up.

    A parameter that got no new gradient gets its stashed one back.
    """
    _coalesce_sparse(params)
    new, accumulating, previous = [], [], []
    for p, old in zip(params, stashed):
        if p.grad is not None:
            new.append(p.grad)
            if old is not None:
                accumulating.append(p.grad)
                previous.append(old)
        elif old is not None:
            p.grad = old
    return new, accumulating, previous


def _unscale_with_stash(scaler: LossScaler, params: List[torch.Tensor], stashed: List[Optional[torch.Tensor]]) -> None:
    """New grads are divided by the scale; where a grad was stashed before backward it is added back."""
    new, accumulating, previous = _split_new_grads(params, stashed)
    scaler.unscale_(new)
    if accumulating:
        _torch_compat.foreach_add_(accumulating, previous)




def _post_amp_backward(self: Any, scaler: LossScaler) -> bool:
    """Unscale (and check) the gradients this backward pass produced; add back the stashed ones.

    Returns:
        Whether the pass produced any gradient for this optimizer.
    """
    stash = self._amp_stash
    if not stash.lazy_init_called:
        self._amp_lazy_init()
    if stash._master_weights:
        produced = _unscale_fast_into_masters(stash, scaler)
        if produced is None:
            produced = _unscale_into_masters(stash, scaler)
        stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    else:
        produced = None
        if not stash._grads_stashed and stash._one_group:
            grads = [g for p in stash._model_side if (g := p.grad) is not None and not g.is_sparse]
            if len(grads) == len(stash._model_side):  # every param got a dense grad: the usual pass
                scaler.unscale_groups_((grads,))
                produced = bool(grads)
        if produced is None:
            produced = _unscale_with_stashes(stash, scaler)
    stash._grads_stashed = False
    return produced


def _unscale_fast_into_masters(stash: AmpOptimizerState, scaler: LossScaler) -> Optional[bool]:
    """The usual O2 pass in a few multi-tensor calls; None when it does not apply (see below).

    It applies when every half param got a dense grad, no master has a grad yet (no accumulation),
    no FP32 param had a grad stashed, and masters and FP32 params share one device.
    """
    masters = stash.all_fp32_from_fp16_params
    if stash._grads_stashed or not stash._one_group:
        return None
    grads16 = [p.grad for p in stash.all_fp16_params]
    grads32 = [g for p in stash.all_fp32_from_fp32_params if (g := p.grad) is not None]
    # Plain loops of identity tests: ``None in grads`` / ``.count(None)`` compare tensors with ``==``
    # (~15 us each) and generator expressions add a Python call per item.
    for grad in grads16:
        if grad is None or grad.is_sparse:
            return None
    for master in masters:
        if master.grad is not None:
            return None
    for grad in grads32:
        if grad.is_sparse:
            return None
    fresh = [torch.empty_like(m) for m in masters]
    if fresh:
        _torch_compat.foreach_copy_(fresh, grads16)
        for master, grad in zip(masters, fresh):
            master.grad = grad
    grads = fresh + grads32
    scaler.unscale_groups_((grads,))
    return bool(grads)


def _unscale_into_masters(stash: AmpOptimizerState, scaler: LossScaler) -> bool:
    """Any O2 pass: half grads into new or accumulating master grads, sparse ones too; FP32 params'
    grads unscaled with their stashed grads added back."""
    _coalesce_sparse(stash.all_fp16_params)
    fresh_dst, fresh_src, acc_dst, acc_src, sparse = [], [], [], [], []
    for model_p, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
        grad = model_p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            sparse.append((master, grad.float()))
        elif master.grad is None:
            master.grad = torch.empty_like(master)
            fresh_dst.append(master.grad)
            fresh_src.append(grad)
        else:
            acc_dst.append(master.grad)
            acc_src.append(grad)
    if fresh_dst:
        # Copy, then unscale below with the FP32 params' grads. Unscaling each large FP16 grad into
        # its master in one pass saves bytes but costs a launch per tensor: no faster on an H100.
        _torch_compat.foreach_copy_(fresh_dst, fresh_src)
    new, accumulating, previous = _split_new_grads(
        stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash)
    scaler.unscale_(fresh_dst + new + [g for _, g in sparse])  # one launch per (device, dtype)
    if accumulating:
        _torch_compat.foreach_add_(accumulating, previous)
    scaler.unscale_add_(acc_dst, acc_src)
    for master, grad in sparse:
        master.grad = grad if master.grad is None else master.grad + grad
    return bool(fresh_dst or acc_dst or sparse or new)


def _unscale_with_stashes(stash: AmpOptimizerState, scaler: LossScaler) -> bool:
    """Any O1/O0 pass: the new grads unscaled, the stashed ones added back."""
    new16, acc16, prev16 = _split_new_grads(stash.all_fp16_params, stash.all_fp16_grad_stash)
    new32, acc32, prev32 = _split_new_grads(stash.all_fp32_params, stash.all_fp32_grad_stash)
    scaler.unscale_(new16 + new32)
    if acc16 or acc32:
        _torch_compat.foreach_add_(acc16 + acc32, prev16 + prev32)
    stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
    stash.all_fp32_grad_stash = [None] * len(stash.all_fp32_params)
    return bool(new16 or new32)


def _master_params_to_model_params(self: Any) -> None:
    _copy_masters_to_model(self._amp_stash)


def _copy_masters_to_model(stash: AmpOptimizerState) -> None:
    if stash.all_fp16_params:
        grad_was_enabled = torch.is_grad_enabled()  # torch.no_grad() without its Python context manager
        _torch_compat.set_grad_enabled(False)
        try:
            _torch_compat.foreach_copy_(stash.all_fp16_params, stash.all_fp32_from_fp16_params)
        finally:
            _torch_compat.set_grad_enabled(grad_was_enabled)


def refresh_stale_masters(optimizer: Any) -> None:
    """After loading a checkpoint without masters, re-derive the masters the model disagrees with.

    A master that rounds to its model weight is kept (it may be a more precise value the user restored,
    as NVIDIA's BERT recipe does); one that does not is stale and is rebuilt from the model. Runs once
    per such load, with one host read.
    """
    stash = optimizer._amp_stash
    if not stash._refresh_masters_from_model:
        return
    stash._refresh_masters_from_model = False
    pairs = list(zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params))
    if not pairs:
        return
    with torch.no_grad():
        differs = torch.stack([(m.to(p.dtype) != p).any().cpu() for p, m in pairs]).tolist()
        stale = [(p, m) for (p, m), d in zip(pairs, differs) if d]
        if stale:
            _torch_compat.foreach_copy_([m for _, m in stale], [p for p, _ in stale])


def _clear_master_grads(stash: AmpOptimizerState) -> None:
    for p in getattr(stash, "all_fp32_from_fp16_params", ()):
        p.grad = None


# --- the lifecycle: scale_loss blocks and steps -------------------------------------------------------
# The hot paths look the table up directly (TRANSITIONS[...]); a missing row means a refused or
# impossible move, and next_state raises its error.

def enter_blocks(optimizers: List[Any], prepare: bool) -> List[Any]:
    """Move every optimizer into a ``scale_loss`` block, stashing existing grads if ``prepare``.

    All are checked before any is changed (Apex's AttributeError for one that skipped ``initialize``,
    the nesting and param-group errors), so a refused call leaves them all as they were.

    Returns:
        The optimizers whose gradients were stashed (not those still holding delayed, scaled ones).
    """
    for optimizer in optimizers:
        stash = optimizer._amp_stash
        if (stash._state, Event.ENTER) not in TRANSITIONS:
            next_state(stash._state, Event.ENTER)
        expected = stash._param_count
        if expected is not None and list(map(len, map(_GROUP_PARAMS, optimizer.param_groups))) != expected:
            check_param_groups_unchanged(optimizer)
    prepared = []
    for optimizer in optimizers:
        stash = optimizer._amp_stash
        if prepare and stash._state is not OptState.SCALED:
            optimizer._prepare_amp_backward()
            prepared.append(optimizer)
        stash._entered_from, stash._state = stash._state, OptState.IN_SCALE_LOSS
    return prepared


def abort_blocks(optimizers: List[Any]) -> None:
    """Return the optimizers still inside a block that raised to the state they entered it in."""
    for optimizer in optimizers:
        if optimizer._amp_stash._state is OptState.IN_SCALE_LOSS:
            end_block(optimizer, Event.ABORT)


def end_block(optimizer: Any, event: Event, loss_id: int = 0, record: Any = None) -> None:
    """Leave the ``scale_loss`` block with ``event`` (``ABORT`` after :func:`restore_amp_backward`).

    For ``EXIT_ON_DEVICE``, ``record`` is this pass's scale update and its overflow flag:
    the next step hands the flag to its fused kernel. For ``EXIT_OVERFLOW``, ``loss_id`` names the loss
    in the skip message.
    """
    stash = optimizer._amp_stash
    before = stash._entered_from
    try:
        after = TRANSITIONS[before, event]
    except KeyError:
        after = next_state(before, event)
    if after is OptState.SKIP_PENDING and before is not OptState.SKIP_PENDING:
        stash._skip_loss_id = loss_id
    if event is Event.EXIT_ON_DEVICE and after is OptState.OVERFLOW_ON_DEVICE:
        if before is OptState.OVERFLOW_ON_DEVICE:
            # torch's fused kernels skip only where found_inf == 1.0 exactly (2.0 would step and corrupt
            # the step counts they restore by subtracting found_inf).
            stash._found_inf = torch.maximum(stash._found_inf, record.found_inf)
        else:
            stash._found_inf, stash._deferred_records = record.found_inf, []
        stash._deferred_records.append(record)
    elif after not in _FLAG_STATES and stash._found_inf is not None:
        stash._found_inf, stash._deferred_records = None, []  # the flag has no use in the new state
    stash._state, stash._entered_from = after, None


_FLAG_STATES = (OptState.OVERFLOW_ON_DEVICE, OptState.STEPPED_ON_DEVICE)


def skips_on_device(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` flag in its kernel (torch's fused optimizers)."""
    if not getattr(optimizer, _torch_compat.STEP_SUPPORTS_AMP_SCALING, False) or \
            optimizer._amp_stash._verdict() is OptState.SKIP_PENDING:
        return False
    # Fused SGD allocates momentum buffers with empty_like on its first step and leaves them unwritten
    # when found_inf skips that step: take the host-synced path until every buffer exists.
    return not any(group.get("momentum", 0) and "momentum_buffer" not in optimizer.state.get(p, {})
                   for group in optimizer.param_groups if "dampening" in group for p in group["params"])


def _step_event(stash: AmpOptimizerState, state: OptState) -> Event:
    """What this ``step()`` call is, where the state alone cannot say."""
    if state is OptState.NO_GRADS and any(p.grad is not None for p in stash._model_side):
        return Event.STEP_WITH_STRAY_GRADS
    if state is OptState.STEPPED_ON_DEVICE and bool(stash._found_inf):
        return Event.STEP_AFTER_KERNEL_SKIP  # the flag is read (one sync) only on this suspicious second step
    return Event.STEP


# --- the patched public methods ---------------------------------------------------------------------

def _amp_step(self: Any, closure: Any = None) -> Any:
    stash = self._amp_stash
    self.__dict__[_torch_compat.OPT_CALLED] = True  # what an LR scheduler's step wrapper records (a store: no call)
    before = stash._state
    if closure is not None and (stash._master_weights or before is OptState.SKIP_PENDING):
        raise RuntimeError(_CLOSURE_MESSAGE)
    event = _step_event(stash, before) if before in _LOOKS_BEFORE_STEP else Event.STEP
    try:
        after = TRANSITIONS[before, event]
    except KeyError:
        after = next_state(before, event)
    if before is OptState.SKIP_PENDING:
        _skip_step(self)
        stash._state = after
        return None
    if stash._master_weights and not stash.lazy_init_called:
        self._amp_lazy_init()
    found_inf = stash._found_inf if before is OptState.OVERFLOW_ON_DEVICE else None
    if found_inf is not None:
        self.found_inf = found_inf.reshape(())  # the fused kernel leaves params and state alone where it is set
    handle = getattr(_amp_state, "handle", None)
    casts_device = handle._device_type if isinstance(handle, O1Scope) and handle._is_active else None
    if casts_device is not None:
        casts_were_on = casts_off(casts_device)
    try:
        original = stash._original_step  # e.g. an LR scheduler's wrapper; else the class's own step
        if original is None:
            retval = type(self).step(self) if closure is None else type(self).step(self, closure)
        else:
            retval = original() if closure is None else original(closure)
    finally:
        if casts_device is not None:
            casts_back(casts_device, casts_were_on)
        if found_inf is not None:
            del self.found_inf
    if stash._master_weights:
        _copy_masters_to_model(stash)
        for p in stash.all_fp32_from_fp16_params:
            p.grad = None
    if found_inf is not None:
        stash._pending_steps.append(stash._deferred_records)
        stash._deferred_records = []
    elif stash._found_inf is not None:
        stash._found_inf, stash._deferred_records = None, []
    stash._state = after
    if stash._pending_steps:
        report_deferred_skips(self, block=False)
    return retval


_LOOKS_BEFORE_STEP = (OptState.NO_GRADS, OptState.STEPPED_ON_DEVICE)


# LR schedulers wrap ``optimizer.step`` to notice calls; ours records them itself (``_opt_called``).
setattr(_amp_step, _torch_compat.WRAPPED_BY_LR_SCHED, True)


def _skip_step(self: Any) -> None:
    stash = self._amp_stash
    loss_id = stash._skip_loss_id
    scaler = _amp_state.loss_scalers[loss_id]
    if scaler.dynamic:
        maybe_print("Gradient overflow.  Skipping step, loss scaler {} reducing loss scale to {}".format(
            loss_id, scaler.loss_scale()))
    else:
        maybe_print("Gradient overflow.  Skipping step, loss scaler {} keeps its static loss scale {}".format(
            loss_id, scaler.loss_scale()))
    _clear_master_grads(stash)


def report_deferred_skips(optimizer: Any, block: bool = True) -> None:
    """Print Apex's overflow message for steps the fused kernel skipped, once their flags are on the host."""
    stash = optimizer._amp_stash
    while stash._pending_steps:
        records = stash._pending_steps[0]
        if not block and not all(r.ready() for r in records):
            return
        stash._pending_steps.popleft()
        overflowed = [r for r in records if r.values()[0]]
        if overflowed:
            loss_id = overflowed[0].loss_id
            scale = [r for r in records if r.loss_id == loss_id][-1].values()[1]
            maybe_print("Gradient overflow.  Skipping step, loss scaler {} reducing loss scale to {}".format(
                loss_id, scale))


def _amp_zero_grad(self: Any, set_to_none: bool = False) -> None:
    """Apex's default zeroes the model grads in place; ``set_to_none=True`` drops them. Master grads: None."""
    stash = self._amp_stash
    if not stash.lazy_init_called:
        self._amp_lazy_init()
    if set_to_none:
        for p in stash._model_side:
            p.grad = None
    else:
        grads = [g for p in stash._model_side if (g := p.grad) is not None]
        for g in grads:
            if g.grad_fn is not None:
                g.detach_()
            elif g.requires_grad:
                g.requires_grad_(False)
        if grads:
            _torch_compat.foreach_zero_(grads)
    for p in stash.all_fp32_from_fp16_params:
        p.grad = None


def _amp_add_param_group(self: Any, param_group: Dict[str, Any]) -> None:
    self._amp_lazy_init()
    assert isinstance(param_group, dict), "param group must be a dict"
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
            "in sets will change between runs. Please use a list instead."
        )
    else:
        params = list(params)
    stash = self._amp_stash
    known = {id(p) for p in _all_params(self)} | {id(p) for p in getattr(stash, "all_fp16_params", ())}
    if any(id(p) in known for p in params) or len({id(p) for p in params}) != len(params):
        raise ValueError("some parameters appear in more than one parameter group")
    group = dict(param_group)
    group["params"] = params
    if stash._master_weights:
        fp16, masters, fp32 = _replace_with_masters(self, params)
    else:
        for p in params:
            if p.dtype not in _HALF_TYPES and p.dtype != torch.float32:
                raise _type_error(p)
    _class_method(self, "add_param_group")(group)
    # Only now that the optimizer accepted the group does the stash learn about it.
    if stash._master_weights:
        stash.fp16_groups.append(fp16)
        stash.fp32_from_fp16_groups.append(masters)
        stash.fp32_from_fp32_groups.append(fp32)
        stash.all_fp16_params += fp16
        stash.all_fp32_from_fp16_params += masters
        stash.all_fp32_from_fp32_params += fp32
        stash.all_fp16_grad_stash += [None] * len(fp16)
        stash.all_fp32_from_fp32_grad_stash += [None] * len(fp32)
    else:
        for p in params:
            if p.dtype in _HALF_TYPES:
                stash.all_fp16_params.append(p)
                stash.all_fp16_grad_stash.append(None)
            else:
                stash.all_fp32_params.append(p)
                stash.all_fp32_grad_stash.append(None)
    _plan(stash, stash._frozen_half + [p for p in params if p.dtype in _HALF_TYPES])
    stash._param_count = _param_counts(self)


def _amp_state_dict(self: Any) -> Dict[str, Any]:
    """The optimizer's state dict plus its FP32 masters, so resuming is bitwise exact."""
    self._amp_lazy_init()
    refresh_stale_masters(self)
    state = _class_method(self, "state_dict")()
    state[MASTERS_KEY] = [m.detach() for m in self._amp_stash.all_fp32_from_fp16_params]
    return state


def _amp_load_state_dict(self: Any, state_dict: Dict[str, Any]) -> None:
    """Load a state dict; restore saved masters, or rebuild them from the model at the next backward."""
    masters = state_dict.get(MASTERS_KEY)
    plain = {k: v for k, v in state_dict.items() if k != MASTERS_KEY}
    self._amp_lazy_init()
    stash = self._amp_stash
    if masters is not None and len(masters) != len(stash.all_fp32_from_fp16_params):
        raise ValueError(
            "The optimizer state_dict holds {} FP32 master weights but this optimizer has {}; it was saved "
            "from a different model or opt_level.".format(len(masters), len(stash.all_fp32_from_fp16_params))
        )
    _class_method(self, "load_state_dict")(plain)
    if masters is None:
        stash._refresh_masters_from_model = True  # an Apex-era checkpoint: masters come from the model
    elif masters:
        with torch.no_grad():
            device = stash.all_fp32_from_fp16_params[0].device
            _torch_compat.foreach_copy_(stash.all_fp32_from_fp16_params, [m.to(device) for m in masters])
        stash._refresh_masters_from_model = False


def _amp_getstate(self: Any) -> Dict[str, Any]:
    """What deepcopy/pickle keep of an amp optimizer: torch's state, the stash, and a re-binder.

    torch.optim.Optimizer.__getstate__ keeps only defaults/state/param_groups, which would make the copy
    a plain optimizer; the bound methods themselves do not pickle, so they are re-bound instead.
    """
    state = dict(_class_method(self, "__getstate__")())
    state["_amp_stash"] = self._amp_stash
    state["_amp_rebind"] = _Rebind(self)
    return state


class _Rebind:
    """Unpickles (and deep-copies) into a call that re-binds amp's methods on the optimizer's copy."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def __reduce__(self):
        return (_rebind, (self.optimizer, self.optimizer._amp_stash._master_weights))


def _rebind(optimizer: Any, master_weights: bool) -> None:
    _bind_amp_methods(optimizer, master_weights)


def patch_optimizer(optimizer: Any, master_weights: bool) -> None:
    """Give ``optimizer`` amp's stash and methods in place (call :func:`check_optimizer` first)."""
    stash = AmpOptimizerState()
    stash._master_weights = bool(master_weights)
    stash._skip_loss_id = 0
    stash._original_step = optimizer.__dict__.get("step")  # e.g. an LR scheduler's wrapper
    optimizer._amp_stash = stash
    _bind_amp_methods(optimizer, bool(master_weights))


def _bind_amp_methods(optimizer: Any, master_weights: bool) -> None:
    bind = lambda fn: types.MethodType(fn, optimizer)  # noqa: E731
    optimizer.__getstate__ = bind(_amp_getstate)
    optimizer._lazy_init_maybe_master_weights = bind(_lazy_init_maybe_master_weights)
    optimizer._prepare_amp_backward = bind(_prepare_amp_backward)
    optimizer._post_amp_backward = bind(_post_amp_backward)
    optimizer._amp_lazy_init = bind(_amp_lazy_init)
    optimizer.add_param_group = bind(_amp_add_param_group)
    optimizer.step = bind(_amp_step)
    if master_weights:
        optimizer._master_params_to_model_params = bind(_master_params_to_model_params)
        optimizer.zero_grad = bind(_amp_zero_grad)
        optimizer.state_dict = bind(_amp_state_dict)
        optimizer.load_state_dict = bind(_amp_load_state_dict)


def master_params(optimizer: Any) -> Iterator[torch.Tensor]:
    """Yield the parameters an amp optimizer actually steps: the FP32 masters under O2/O5.

    Use it for gradient clipping: ``clip_grad_norm_(amp.master_params(optimizer), max_norm)``.

    Args:
        optimizer: an optimizer returned by ``amp.initialize`` (or any object with ``param_groups``).

    Yields:
        Each parameter of every param group, in order.
    """
    stash = getattr(optimizer, "_amp_stash", None)
    if stash is not None and stash._refresh_masters_from_model:
        refresh_stale_masters(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p
