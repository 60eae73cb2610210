"""The lifecycle of one amp optimizer between two steps, as states and one table of transitions.

A training loop drives each optimizer through ``amp.scale_loss`` blocks and ``step()`` calls. What the
next call may do depends on where the optimizer is: a step after an overflow is skipped, a second step
after a skipped one is refused, a nested block is refused. :data:`TRANSITIONS` lists every move the
patched optimizer makes and :data:`REFUSALS` every misuse, with its message; :func:`next_state` is the
one place that looks them up, so each misuse error is raised where the illegal transition is seen.

A block's exit (and its abort, when the block raises) is looked up from the state the block was
entered in: inside the block the optimizer is :attr:`OptState.IN_SCALE_LOSS` and remembers that state,
because an earlier block's verdict (a pending skip, a device flag) outlives the blocks that follow it
until ``step()``.

Apex's attributes ``_amp_stash.already_patched`` and ``params_have_scaled_gradients`` are read-only
views of the state (see ``master_weights.AmpOptimizerState``).
"""
from __future__ import annotations

import enum
from typing import Dict, Optional, Tuple


class OptState(enum.Enum):
    """Where one optimizer stands in the training loop."""

    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code on the step path

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

    __hash__ = object.__hash__

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
