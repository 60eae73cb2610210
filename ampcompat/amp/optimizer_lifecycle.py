"""The lifecycle of one amp optimizer: its states between steps, the one table of moves, and their effects.

A training loop drives each optimizer through ``amp.scale_loss`` blocks and ``step()`` calls. What the
next call may do depends on where the optimizer is: a step after an overflow is skipped, a second step
after a skipped one is refused, a nested block is refused. :data:`TRANSITIONS` lists every move and
:data:`REFUSALS` every misuse, with its message; :class:`OptimizerLifecycle` (``optimizer._amp_stash``)
holds the state and, in :meth:`~OptimizerLifecycle.enter`, :meth:`~OptimizerLifecycle.exit`,
:meth:`~OptimizerLifecycle.abort` and :meth:`~OptimizerLifecycle.step`, looks each move up in the table
and performs its effects. Every effect of leaving a block with an overflow is in
:meth:`~OptimizerLifecycle.exit_with_overflow`.

How gradients reach the optimizer's update is a strategy, given by the subclass: ``model_gradients``
unscales the model's own gradients in place (O0/O1/O3/O4), ``master_weights`` materialises FP32 master
gradients (O2/O5). The lifecycle calls its hooks (``_lazy_init``, ``_set_aside_grads``,
``_unscale_grads``, ``_restore_grads``, ``_after_step``, ``_after_skip``) at the moments the table names;
a new strategy (a fused optimizer step, say) is a new subclass.

A block's exit (and its abort) is looked up from the state the block was entered in: inside a block the
optimizer is :attr:`OptState.IN_SCALE_LOSS` and keeps its verdict state, because an earlier block's
verdict (a pending skip, a device flag) outlives the blocks that follow it until ``step()``.

Apex's ``_amp_stash`` attributes (``lazy_init_called``, ``already_patched``,
``params_have_scaled_gradients``, the parameter lists and gradient stashes) are properties computed
from this one object.
"""
from __future__ import annotations

import enum
import operator
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import torch

from .. import _torch_compat
from .o1_autocast import O1Scope, casts_back, casts_off
from .process_state import _amp_state, maybe_print

class OptState(enum.Enum):
    """Where one optimizer stands in the training loop."""

    # Members are singletons: identity hashing, a C slot. Enum's own __hash__ is a Python function, and the
    # step path hashes states and events looking moves up: without this line (here and in Event) an O1 or
    # O2 step makes 6 Python calls more (tests/test_host_overhead.py), above the native loop's count.
    __hash__ = object.__hash__

    READY = "ready"  # set up by amp.initialize; no scale_loss block or step yet
    IN_SCALE_LOSS = "inside scale_loss"
    SCALED = "grads scaled, awaiting unscale"  # a delay_unscale block ended
    UNSCALED = "grads unscaled"  # checked and finite, or the check left to the caller (delay_overflow_check)
    NO_GRADS = "last block made no grads"  # a step now must not find gradients made outside any block
    OVERFLOW_ON_DEVICE = "overflow pending on device"  # the fused step reads the flag and skips in its kernel
    SKIP_PENDING = "skip pending"  # the host saw an overflow: the next step is skipped (Apex's already_patched)
    SKIPPED = "skipped"
    STEPPED = "stepped"
    STEPPED_ON_DEVICE = "stepped or skipped on device"  # a fused step ran with the flag; the host has not read it


class Event(enum.Enum):
    """What the patched optimizer or ``scale_loss`` just did."""

    __hash__ = object.__hash__  # as OptState's

    ENTER = "scale_loss entered"
    ABORT = "scale_loss block raised"
    EXIT_DELAYED = "scale_loss exit with delay_unscale"
    EXIT_NO_GRADS = "scale_loss exit, no gradient produced"
    EXIT_CLEAN = "scale_loss exit, gradients unscaled and finite (or unchecked)"
    EXIT_ON_DEVICE = "scale_loss exit, overflow flag left on the device"
    EXIT_OVERFLOW = "scale_loss exit, overflow seen on the host"
    STEP = "step()"
    STEP_WITH_STRAY_GRADS = "step() finding gradients made outside scale_loss"
    STEP_AFTER_KERNEL_SKIP = "step() after a fused step that skipped in its kernel"


NESTED = (
    "amp.scale_loss blocks cannot be nested for the same optimizer: finish the first block (call "
    "scaled_loss.backward() inside it) before opening another one."
)
STEP_AFTER_SKIP = (
    "optimizer.step() was called again after a step skipped for gradient overflow, with no amp.scale_loss "
    "backward pass in between: the gradients still hold inf/NaN. Call optimizer.zero_grad() and compute new "
    "gradients inside `with amp.scale_loss(...)` first."
)
GRADS_OUTSIDE_SCALE_LOSS = (
    "optimizer.step() found gradients that were not produced inside `with amp.scale_loss(...)`: the last "
    "scale_loss block ended without a backward pass, so these gradients are still multiplied by the loss "
    "scale. Call scaled_loss.backward() inside the with block."
)

S, E = OptState, Event
_EXITS = (E.EXIT_DELAYED, E.EXIT_NO_GRADS, E.EXIT_CLEAN, E.EXIT_ON_DEVICE, E.EXIT_OVERFLOW)
_AFTER_ANY = (S.SCALED, S.NO_GRADS, S.UNSCALED, S.OVERFLOW_ON_DEVICE, S.SKIP_PENDING)

# The state after a block, by the state it was entered in; one column per event of _EXITS. A verdict
# still pending outlives later blocks: the host's overflow until the step, a device flag unless the host
# sees an overflow (the step is skipped anyway) or the last block made no gradient.
_AFTER_BLOCK: Dict[OptState, Tuple[OptState, ...]] = {
    #                      delayed               no grads    clean
    S.OVERFLOW_ON_DEVICE: (S.OVERFLOW_ON_DEVICE, S.NO_GRADS, S.OVERFLOW_ON_DEVICE,
                           # on device           overflow
                           S.OVERFLOW_ON_DEVICE, S.SKIP_PENDING),
    S.SKIP_PENDING: (S.SKIP_PENDING,) * len(_EXITS),
    **{state: _AFTER_ANY for state in (S.READY, S.SCALED, S.UNSCALED, S.NO_GRADS, S.SKIPPED, S.STEPPED,
                                       S.STEPPED_ON_DEVICE)},
}

# What step() does from each state: the state it leaves the optimizer in.
_AFTER_STEP: Dict[OptState, OptState] = {
    S.READY: S.STEPPED,
    S.IN_SCALE_LOSS: S.IN_SCALE_LOSS,  # a plain step; the block's exit still applies (Apex allowed it)
    S.SCALED: S.STEPPED,  # Apex steps delayed, still-scaled gradients as they are
    S.UNSCALED: S.STEPPED,
    S.NO_GRADS: S.NO_GRADS,  # nothing amp produced to step; stray gradients stay refused
    S.OVERFLOW_ON_DEVICE: S.STEPPED_ON_DEVICE,
    S.SKIP_PENDING: S.SKIPPED,
    S.STEPPED: S.STEPPED,
    S.STEPPED_ON_DEVICE: S.STEPPED,  # the flag was read and was clear
}

#: Every legal move: (state, event) -> next state. Exit and abort rows are keyed by the state the
#: block was entered in.
TRANSITIONS: Dict[Tuple[OptState, Event], OptState] = {
    **{(state, E.ENTER): S.IN_SCALE_LOSS for state in _AFTER_BLOCK},
    **{(state, E.ABORT): state for state in _AFTER_BLOCK},
    **{(state, event): after for state, row in _AFTER_BLOCK.items() for event, after in zip(_EXITS, row)},
    **{(state, E.STEP): after for state, after in _AFTER_STEP.items()},
}

#: Every misuse: (state, event) -> the message of the RuntimeError that refuses it.
REFUSALS: Dict[Tuple[OptState, Event], str] = {
    (S.IN_SCALE_LOSS, E.ENTER): NESTED,
    (S.SKIPPED, E.STEP): STEP_AFTER_SKIP,
    (S.STEPPED_ON_DEVICE, E.STEP_AFTER_KERNEL_SKIP): STEP_AFTER_SKIP,
    (S.NO_GRADS, E.STEP_WITH_STRAY_GRADS): GRADS_OUTSIDE_SCALE_LOSS,
}


def next_state(state: OptState, event: Event) -> OptState:
    """The state ``event`` moves an optimizer to from ``state`` (for exits: the state its block began in).

    Args:
        state: the optimizer's state.
        event: what just happened.

    Returns:
        The next state.

    Raises:
        RuntimeError: with the misuse's message if the transition is refused, or saying the pair cannot
            occur (an ampcompat bug) if the table has no row for it.
    """
    after: Optional[OptState] = TRANSITIONS.get((state, event))
    if after is not None:
        return after
    message = REFUSALS.get((state, event))
    if message is None:
        message = "ampcompat internal error: no optimizer transition from {!r} on {!r}.".format(
            state.value, event.value)
    raise RuntimeError(message)


_CLOSURE_MESSAGE = "Currently, Amp does not support closure use with optimizers."
_GROUP_PARAMS = operator.itemgetter("params")
_LOOKS_BEFORE_STEP = (S.NO_GRADS, S.STEPPED_ON_DEVICE)  # step states where the event needs a closer look
_FLAG_STATES = (S.OVERFLOW_ON_DEVICE, S.STEPPED_ON_DEVICE)  # states whose verdict is an on-device flag


def param_counts(optimizer: Any) -> List[int]:
    """The size of each of ``optimizer``'s param groups."""
    return list(map(len, map(_GROUP_PARAMS, optimizer.param_groups)))


class OptimizerLifecycle:
    """``optimizer._amp_stash``: one optimizer's amp state, and what each move of the lifecycle does.

    Every field is declared here (a subclass adds those of its gradient strategy in its own
    ``__init__``). Apex's ``_amp_stash`` attributes are properties over them.

    Args:
        optimizer: the optimizer ``amp.initialize`` patches.
    """

    #: Whether the optimizer steps FP32 master weights in place of the model's half parameters (O2/O5).
    HOLDS_MASTERS = False
    #: A strategy that performs the update itself (a fused O2 kernel, say) defines this as a method
    #: ``(closure) -> step's return value``; ``step`` then calls it in place of the optimizer's own ``step``,
    #: between the same effects. None: the optimizer's own step runs (a class attribute: no call to ask).
    _own_update: Optional[Any] = None

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        self._state = OptState.READY  # the verdict; inside a block, the state the block was entered in
        self._in_block = False  # inside a scale_loss block (the state then reads IN_SCALE_LOSS)
        self._skip_loss_id = 0  # SKIP_PENDING: the loss whose overflow the skip message names
        # OVERFLOW_ON_DEVICE: the scale updates behind the verdict (the last one's found_inf is the flag the
        # next fused step skips on); STEPPED_ON_DEVICE: those the last fused step used.
        self._deferred_records: list = []
        self._pending_steps: Deque[list] = deque()  # fused steps whose skip message waits for the host copy
        self._original_step = optimizer.__dict__.get("step")  # e.g. an LR scheduler's wrapper
        self._plan: Any = None  # the parameter lists, worked out at lazy init (strategy-specific)
        self._set_aside: Any = None  # gradients the running block put aside (accumulation, abort)
        self.unscale_paths: Dict[str, int] = {"fast": 0, "general": 0}  # debug: how exits unscaled

    # --- the state and Apex's flags, as views ---------------------------------------------------------

    @property
    def state(self) -> OptState:
        """Where the optimizer stands (:attr:`OptState.IN_SCALE_LOSS` inside a block)."""
        return OptState.IN_SCALE_LOSS if self._in_block else self._state

    @property
    def lazy_init_called(self) -> bool:
        """Apex's flag: whether the parameter lists (and masters) exist. Legacy code that runs the lazy
        init by hand sets it True (NVIDIA's BERT); setting it runs the (idempotent) lazy init."""
        return self._plan is not None

    @lazy_init_called.setter
    def lazy_init_called(self, value: bool) -> None:
        if value:
            self._lazy_init()

    @property
    def already_patched(self) -> bool:
        """Whether the next ``step()`` will be skipped (reads any on-device overflow flag: a host sync)."""
        return self._state is S.SKIP_PENDING or (
            self._state is S.OVERFLOW_ON_DEVICE and any(r.values()[0] for r in self._deferred_records))

    @property
    def params_have_scaled_gradients(self) -> bool:
        """Whether a ``delay_unscale`` block left the gradients multiplied by the loss scale."""
        return self._state is S.SCALED

    # --- the moves ------------------------------------------------------------------------------------

    def check_enter(self) -> None:
        """Raise the error entering a block now would raise (nesting, edited param groups), changing nothing."""
        if self._in_block or (self._state, E.ENTER) not in TRANSITIONS:
            next_state(self.state, E.ENTER)
        plan = self._plan
        if plan is not None and param_counts(self._optimizer) != plan.param_count:
            raise RuntimeError(
                "The parameters of this optimizer changed after amp set it up (param group sizes {} became {}). "
                "Add parameters with optimizer.add_param_group(...), which amp handles, instead of editing "
                "optimizer.param_groups directly.".format(plan.param_count, param_counts(self._optimizer)))

    def enter(self, set_aside: bool, may_fuse: bool = True) -> None:
        """ENTER: the block begins; with ``set_aside``, gradients already there are put aside so only this
        pass's get unscaled (not after a ``delay_unscale`` block: its scaled gradients are this pass's too).
        ``may_fuse`` False: the block's exit must materialise what the optimizer steps (``delay_overflow_check``
        leaves the verdict to code that reads the gradients); only a fused strategy's exit can do otherwise.

        Raises:
            RuntimeError: for a nested block, or param groups edited by hand (nothing is changed).
        """
        plan = self._plan
        if self._in_block or (self._state, E.ENTER) not in TRANSITIONS or (
                plan is not None and list(map(len, map(_GROUP_PARAMS, self._optimizer.param_groups)))
                != plan.param_count):
            self.check_enter()
        if set_aside and self._state is not S.SCALED:
            self._set_aside_grads()
        self._in_block = True

    def abort(self) -> None:
        """ABORT: the block raised; the gradients are put back as they were before it, the state too."""
        if self._in_block:
            next_state(self._state, E.ABORT)
            self._restore_grads()
            self._in_block = False

    def exit(self, event: Event, loss_id: int = 0, record: Any = None) -> None:
        """Leave the block with ``event`` (one of the EXIT_* events), after :meth:`_unscale_grads` ran.

        Args:
            event: how the block ended (the scaler's verdict, or no gradients, or ``delay_unscale``).
            loss_id: the loss the block scaled (named in an overflow's skip message).
            record: for ``EXIT_ON_DEVICE``, the scale update whose flag the next fused step skips on.
        """
        if event is E.EXIT_OVERFLOW:
            self.exit_with_overflow(loss_id)
            return
        before = self._state
        try:
            after = TRANSITIONS[before, event]
        except KeyError:
            after = next_state(before, event)
        self._in_block = False
        if event is E.EXIT_ON_DEVICE and after is S.OVERFLOW_ON_DEVICE:
            if before is S.OVERFLOW_ON_DEVICE:
                # Either pass's overflow skips the step. torch's fused kernels skip only where found_inf is
                # exactly 1.0 (2.0 would step and corrupt the step counts they restore by subtracting it).
                record.found_inf = torch.maximum(self._deferred_records[-1].found_inf, record.found_inf)
                self._deferred_records.append(record)
            else:
                self._deferred_records = [record]
        elif after not in _FLAG_STATES and self._deferred_records:
            self._deferred_records = []  # the flag has no use in the new state
        self._state = after

    def exit_with_overflow(self, loss_id: int) -> None:
        """EXIT_OVERFLOW: every effect of leaving a block with an overflow the host saw (the scaler already
        backed off). The next ``step()`` is skipped (SKIP_PENDING) and its message names this loss, unless
        an earlier block's overflow is already pending (the first one is named); an on-device flag left
        by an earlier block is dropped, the host's skip covers it. The overflowed master gradients are
        dropped when the skipped step is taken (:meth:`_after_skip`), as in Apex."""
        before = self._state
        try:
            after = TRANSITIONS[before, E.EXIT_OVERFLOW]
        except KeyError:
            after = next_state(before, E.EXIT_OVERFLOW)
        self._in_block = False
        if before is not S.SKIP_PENDING:
            self._skip_loss_id = loss_id
        self._deferred_records = []
        self._state = after

    def skips_in_kernel(self) -> bool:
        """Whether ``step`` honours a ``found_inf`` flag in its kernel (torch's fused optimizers), so a block
        may leave its overflow verdict on the device."""
        optimizer = self._optimizer
        if not getattr(optimizer, _torch_compat.STEP_SUPPORTS_AMP_SCALING, False) or \
                self._state is S.SKIP_PENDING:
            return False
        # Fused SGD allocates momentum buffers with empty_like on its first step and leaves them unwritten
        # when found_inf skips that step: take the host-synced path until every buffer exists.
        return not any(group.get("momentum", 0) and "momentum_buffer" not in optimizer.state.get(p, {})
                       for group in optimizer.param_groups if "dampening" in group for p in group["params"])

    def step(self, closure: Any = None) -> Any:
        """STEP (the patched ``optimizer.step``): skip after an overflow, else step with O1's casts off
        (handing a device verdict to a fused kernel), then the strategy's :meth:`_after_step`."""
        optimizer = self._optimizer
        optimizer.__dict__[_torch_compat.OPT_CALLED] = True  # an LR scheduler's wrapper records it (a store)
        before = S.IN_SCALE_LOSS if self._in_block else self._state
        if closure is not None and (self.HOLDS_MASTERS or before is S.SKIP_PENDING):
            raise RuntimeError(_CLOSURE_MESSAGE)
        event = self._step_event(before) if before in _LOOKS_BEFORE_STEP else E.STEP
        try:
            after = TRANSITIONS[before, event]
        except KeyError:
            after = next_state(before, event)
        if before is S.SKIP_PENDING:
            self._skip_step()
            self._state = after
            return None
        if self.HOLDS_MASTERS and self._plan is None:
            self._lazy_init()  # the optimizer must step the masters
        found_inf = self._deferred_records[-1].found_inf if before is S.OVERFLOW_ON_DEVICE else None
        if found_inf is not None:
            optimizer.found_inf = found_inf.reshape(())  # the fused kernel leaves params and state alone where set
        handle = getattr(_amp_state, "handle", None)
        casts_device = handle._device_type if isinstance(handle, O1Scope) and handle._is_active else None
        if casts_device is not None:
            casts_were_on = casts_off(casts_device)
        try:
            own_update, original = self._own_update, self._original_step
            if own_update is not None:
                retval = own_update(closure)
            elif original is None:
                retval = type(optimizer).step(optimizer) if closure is None else type(optimizer).step(optimizer, closure)
            else:
                retval = original() if closure is None else original(closure)
        finally:
            if casts_device is not None:
                casts_back(casts_device, casts_were_on)
            if found_inf is not None:
                del optimizer.found_inf
        if self.HOLDS_MASTERS:
            self._after_step()
        if found_inf is not None:
            self._pending_steps.append(list(self._deferred_records))  # its skip message, once the flag is read
        elif self._deferred_records:
            self._deferred_records = []
        if after is not S.IN_SCALE_LOSS:
            self._state = after
        if self._pending_steps:
            self.report_deferred_skips(block=False)
        return retval

    def _step_event(self, state: OptState) -> Event:
        """What this ``step()`` call is, where the state alone cannot say."""
        if state is S.NO_GRADS and any(p.grad is not None for p in self._plan.model_side):
            return E.STEP_WITH_STRAY_GRADS
        if state is S.STEPPED_ON_DEVICE and bool(self._deferred_records[-1].found_inf):
            return E.STEP_AFTER_KERNEL_SKIP  # the flag is read (one sync) only on this suspicious second step
        return E.STEP

    def _skip_step(self) -> None:
        loss_id = self._skip_loss_id
        scaler = _amp_state.loss_scalers[loss_id]
        if scaler.dynamic:
            maybe_print("Gradient overflow.  Skipping step, loss scaler {} reducing loss scale to {}".format(
                loss_id, scaler.loss_scale()))
        else:
            maybe_print("Gradient overflow.  Skipping step, loss scaler {} keeps its static loss scale {}".format(
                loss_id, scaler.loss_scale()))
        self._after_skip()

    def report_deferred_skips(self, block: bool = True) -> None:
        """Print Apex's overflow message for steps a fused kernel skipped, once their flags are on the host
        (only those already copied back unless ``block``)."""
        pending = self._pending_steps
        while pending:
            records = pending[0]
            if not block and not all(r.ready() for r in records):
                return
            pending.popleft()
            overflowed = [r for r in records if r.values()[0]]
            if overflowed:
                loss_id = overflowed[0].loss_id
                scale = [r for r in records if r.loss_id == loss_id][-1].values()[1]
                maybe_print("Gradient overflow.  Skipping step, loss scaler {} reducing loss scale to {}".format(
                    loss_id, scale))

    # LR schedulers wrap ``optimizer.step`` to notice calls; this one records them itself (``_opt_called``).
    setattr(step, _torch_compat.WRAPPED_BY_LR_SCHED, True)

    # --- the gradient strategy's hooks (see model_gradients and master_weights) -----------------------

    def _lazy_init(self) -> None:
        """Work out the parameter lists (``_plan``) once; idempotent (Apex's ``_lazy_init_maybe_master_weights``)."""
        raise NotImplementedError

    def _set_aside_grads(self) -> None:
        """At ENTER: put aside the gradients that must not be unscaled again (Apex's ``_prepare_amp_backward``)."""
        raise NotImplementedError

    def _unscale_grads(self, scaler: Any) -> bool:
        """Before EXIT: unscale this pass's gradients into what the optimizer steps, checking them for
        inf/NaN in ``scaler``'s flag, and add back what was put aside (Apex's ``_post_amp_backward``).
        Returns whether the pass produced any gradient."""
        raise NotImplementedError

    def _restore_grads(self) -> None:
        """At ABORT: the gradients as they were before the block."""
        raise NotImplementedError

    def _after_step(self) -> None:
        """After a step that ran (``HOLDS_MASTERS`` strategies): the masters reach the model."""

    def _admit(self, params: List[Any]) -> Any:
        """``add_param_group``, before the optimizer takes the group: check (and, with masters, replace) its
        parameters; raises before anything changes."""
        raise NotImplementedError

    def _admitted(self, admitted: Any) -> None:
        """``add_param_group``, after the optimizer took the group: its parameters join the lists."""
        raise NotImplementedError

    def _lists(self, name: str) -> Any:
        """The plan, for Apex's list attributes; as in Apex they exist only after lazy init."""
        if self._plan is None:
            raise AttributeError("'{}' object has no attribute '{}' before amp's lazy init (the first scale_loss, "
                                 "zero_grad or add_param_group)".format(type(self).__name__, name))
        return self._plan

    def _after_skip(self) -> None:
        """After a skipped step: drop what the overflowed pass left for the update."""
