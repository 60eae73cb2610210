"""Optimizer patching: Apex's ``_amp_stash``, FP32 master weights, gradient transfer and step skipping.

``patch_optimizer`` gives an optimizer Apex's private methods (``_prepare_amp_backward``,
``_post_amp_backward``, ``_lazy_init_maybe_master_weights`` ...) and replaces ``step`` (skip after an
overflow, autocast off, master -> model copy). With master weights (O2/O5) the half parameters inside
``param_groups`` are replaced, lazily, by FP32 masters, so LR schedulers, ``amp.master_params`` and the
optimizer's own state all see the masters. All gradient work is multi-tensor: a fixed number of kernel
launches per backward pass whatever the number of parameters.
"""
from __future__ import annotations

import contextlib
import types
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional

import torch

from .o1_autocast import active_handle
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
    """``optimizer._amp_stash``: Apex's per-optimizer bookkeeping, under Apex's attribute names."""

    def __init__(self) -> None:
        self.lazy_init_called = False
        self._already_patched = False
        self.params_have_scaled_gradients = False
        self._found_inf = None  # on-device overflow flags of the backward passes since the last step
        self._deferred_records: list = []
        self._pending_steps: Deque[list] = deque()
        self._initialised = False  # lazy init done (masters built / params classified)
        self._param_count: Optional[List[int]] = None  # group sizes amp knows about
        self._refresh_masters_from_model = False  # loaded a checkpoint without masters
        self._in_scale_loss = False
        self._stale_overflow_grads = False  # the last step was skipped and nothing new was computed since
        self._last_found_inf = None  # the flag the last fused step skipped on
        self._empty_exit = False  # the last scale_loss block produced no gradient
        self._produced_grads = False

    @property
    def already_patched(self) -> bool:
        """Whether the next ``step()`` will be skipped (reads any on-device overflow flag: a host sync)."""
        return self._already_patched or any(r.values()[0] for r in self._deferred_records)

    @already_patched.setter
    def already_patched(self, value: bool) -> None:
        self._already_patched = value


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
    stash._param_count = _param_counts(self)
    stash._initialised = True


def _param_counts(optimizer: Any) -> List[int]:
    return [len(group["params"]) for group in optimizer.param_groups]


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
    seen = {id(p) for g in stash.fp32_from_fp16_groups for p in g}
    seen.update(id(p) for g in stash.fp32_from_fp32_groups for p in g)
    if not any(p.requires_grad and p.dtype in _HALF_TYPES and id(p) not in seen
               for group in self.param_groups for p in group["params"]):
        return
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
    self._amp_lazy_init()
    stash = self._amp_stash
    if stash._master_weights:
        _masters_for_unfrozen_params(self)
        refresh_stale_masters(self)
        stash._fp16_grads_before = [p.grad for p in stash.all_fp16_params]
        for p in stash.all_fp16_params:
            p.grad = None
        stash.all_fp32_from_fp32_grad_stash = _stash_and_clear(stash.all_fp32_from_fp32_params)
    else:
        stash.all_fp16_grad_stash = _stash_and_clear(stash.all_fp16_params)
        stash.all_fp32_grad_stash = _stash_and_clear(stash.all_fp32_params)


def begin_backward(stash: AmpOptimizerState) -> None:
    """Mark the start of a ``scale_loss`` block (for the nesting, stale-gradient and empty-block checks)."""
    stash._in_scale_loss = True
    stash._stale_overflow_grads = False
    stash._last_found_inf = None
    stash._empty_exit = False


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
        torch._foreach_add_(accumulating, previous)




def _post_amp_backward(self: Any, scaler: LossScaler) -> None:
    self._amp_lazy_init()
    stash = self._amp_stash
    if stash._master_weights:
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
            torch._foreach_copy_(fresh_dst, fresh_src)
        new, accumulating, previous = _split_new_grads(
            stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash)
        scaler.unscale_(fresh_dst + new + [g for _, g in sparse])  # one launch per (device, dtype)
        if accumulating:
            torch._foreach_add_(accumulating, previous)
        scaler.unscale_add_(acc_dst, acc_src)
        for master, grad in sparse:
            master.grad = grad if master.grad is None else master.grad + grad
        produced = bool(fresh_dst or acc_dst or sparse or new)
        stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    else:
        new16, acc16, prev16 = _split_new_grads(stash.all_fp16_params, stash.all_fp16_grad_stash)
        new32, acc32, prev32 = _split_new_grads(stash.all_fp32_params, stash.all_fp32_grad_stash)
        scaler.unscale_(new16 + new32)
        produced = bool(new16 or new32)
        if acc16 or acc32:
            torch._foreach_add_(acc16 + acc32, prev16 + prev32)
        stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
        stash.all_fp32_grad_stash = [None] * len(stash.all_fp32_params)
    stash._produced_grads = produced


def _master_params_to_model_params(self: Any) -> None:
    stash = self._amp_stash
    if stash.all_fp16_params:
        with torch.no_grad():
            torch._foreach_copy_(stash.all_fp16_params, stash.all_fp32_from_fp16_params)


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
            torch._foreach_copy_([m for _, m in stale], [p for p, _ in stale])


def _clear_master_grads(stash: AmpOptimizerState) -> None:
    for p in getattr(stash, "all_fp32_from_fp16_params", ()):
        p.grad = None


# --- the patched public methods ---------------------------------------------------------------------

def _amp_step(self: Any, closure: Any = None) -> Any:
    stash = self._amp_stash
    self._opt_called = True  # what an LR scheduler's step wrapper would have recorded
    if stash._already_patched:
        if closure is not None:
            raise RuntimeError(_CLOSURE_MESSAGE)
        _skip_step(self)
        return None
    if closure is not None and stash._master_weights:
        raise RuntimeError(_CLOSURE_MESSAGE)
    last_found_inf = stash._last_found_inf
    if stash._stale_overflow_grads or (
            last_found_inf is not None and stash._found_inf is None and bool(last_found_inf)):
        # The fused path's flag is read (one sync) only on this suspicious second step.
        raise RuntimeError(_STEP_AFTER_SKIP)
    if stash._empty_exit and any(p.grad is not None for p in _model_side_params(stash)):
        raise RuntimeError(_GRADS_OUTSIDE_SCALE_LOSS)
    handle = active_handle()
    if stash._master_weights:
        self._amp_lazy_init()
    original = stash._original_step or _class_method(self, "step")
    found_inf = stash._found_inf
    if found_inf is not None:
        self.found_inf = found_inf.reshape(())  # the fused kernel leaves params and state alone where it is set
    try:
        with handle._disable_casts() if handle is not None else contextlib.nullcontext():
            retval = original() if closure is None else original(closure)
    finally:
        if found_inf is not None:
            del self.found_inf
    if stash._master_weights:
        self._master_params_to_model_params()
        _clear_master_grads(stash)
    stash._last_found_inf = found_inf
    if found_inf is not None:
        stash._found_inf = None
        stash._pending_steps.append(stash._deferred_records)
        stash._deferred_records = []
    report_deferred_skips(self, block=False)
    return retval


# LR schedulers wrap ``optimizer.step`` to notice calls; ours records them itself (``_opt_called``).
_amp_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


_STEP_AFTER_SKIP = (
    "optimizer.step() was called again after a step skipped for gradient overflow, with no amp.scale_loss "
    "backward pass in between: the gradients still hold inf/NaN. Call optimizer.zero_grad() and compute new "
    "gradients inside `with amp.scale_loss(...)` first."
)
_GRADS_OUTSIDE_SCALE_LOSS = (
    "optimizer.step() found gradients that were not produced inside `with amp.scale_loss(...)`: the last "
    "scale_loss block ended without a backward pass, so these gradients are still multiplied by the loss "
    "scale. Call scaled_loss.backward() inside the with block."
)


def _model_side_params(stash: AmpOptimizerState) -> List[torch.Tensor]:
    if stash._master_weights:
        return stash.all_fp16_params + stash.all_fp32_from_fp32_params
    return stash.all_fp16_params + stash.all_fp32_params


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
    stash._already_patched = False
    stash._stale_overflow_grads = True


def skips_on_device(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` flag in its kernel (torch's fused optimizers)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or optimizer._amp_stash._already_patched:
        return False
    # Fused SGD allocates momentum buffers with empty_like on its first step and leaves them unwritten
    # when found_inf skips that step: take the host-synced path until every buffer exists.
    return not any(group.get("momentum", 0) and "momentum_buffer" not in optimizer.state.get(p, {})
                   for group in optimizer.param_groups if "dampening" in group for p in group["params"])


def defer_skip(optimizer: Any, overflow_buf: torch.Tensor, record: Any) -> None:
    """Let the next ``step()`` skip on the device if this backward pass overflowed."""
    stash = optimizer._amp_stash
    if stash._found_inf is None:
        stash._found_inf = overflow_buf.clamp(max=1.0)
    else:
        # torch's fused kernels skip only where found_inf == 1.0 exactly (2.0 would step and corrupt
        # the step counts they restore by subtracting found_inf).
        torch.maximum(stash._found_inf, overflow_buf, out=stash._found_inf)
    stash._deferred_records.append(record)


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


def mark_skip(optimizer: Any, loss_id: int) -> None:
    """Make the next ``optimizer.step()`` a skip (Apex's one-shot ``skip_step`` patch)."""
    stash = optimizer._amp_stash
    if not stash._already_patched:
        stash._already_patched = True
        stash._skip_loss_id = loss_id


def _amp_zero_grad(self: Any, set_to_none: bool = False) -> None:
    """Apex's default zeroes the model grads in place; ``set_to_none=True`` drops them. Master grads: None."""
    self._amp_lazy_init()
    stash = self._amp_stash
    model_params = stash.all_fp16_params + stash.all_fp32_from_fp32_params
    if set_to_none:
        for p in model_params:
            p.grad = None
    else:
        grads = [p.grad for p in model_params if p.grad is not None]
        for g in grads:
            if g.grad_fn is not None:
                g.detach_()
            else:
                g.requires_grad_(False)
        if grads:
            torch._foreach_zero_(grads)
    _clear_master_grads(stash)


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
            torch._foreach_copy_(stash.all_fp32_from_fp16_params, [m.to(stash.all_fp32_from_fp16_params[0].device) for m in masters])
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
