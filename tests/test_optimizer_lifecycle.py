"""The optimizer lifecycle table, walked with real training calls: every legal and every refused move.

For each row of ``optimizer_lifecycle.TRANSITIONS`` and ``REFUSALS`` a fused AdamW under O2 is driven
into the row's state by real ``scale_loss`` blocks and ``step()`` calls, the row's event is made to
happen the way a training loop makes it happen, and the optimizer must end in the state the table
names, or the call must raise the table's message and leave the state as it was. Apex's flags
(``already_patched``, ``params_have_scaled_gradients``) are checked against the state they view.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from ampcompat import amp
from ampcompat.amp.optimizer_lifecycle import REFUSALS, TRANSITIONS, Event, OptState, next_state

from _models import batches, make_mlp

S, E = OptState, Event


def _setup():
    model = make_mlp(d_hidden=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # can skip an overflow in its kernel
    amp.initialize(model, opt, opt_level="O2", loss_scale="dynamic", verbosity=0)
    return model, opt


def _loss(model, inf=False):
    (x, y), = batches(1)
    loss = F.cross_entropy(model(x), y)
    return loss * float("inf") if inf else loss


@contextlib.contextmanager
def _checked_on_host(opt):
    """Make the overflow check of the next block happen on the host, as for a non-fused optimizer."""
    fused, opt._step_supports_amp_scaling = opt._step_supports_amp_scaling, False
    try:
        yield
    finally:
        opt._step_supports_amp_scaling = fused


def _block(model, opt, backward=True, inf=False, host=False, **kw):
    with _checked_on_host(opt) if host else contextlib.nullcontext():
        with amp.scale_loss(_loss(model, inf), opt, **kw) as scaled:
            if backward:
                scaled.backward()


# How a training loop reaches each state from a fresh optimizer.
REACH: Dict[OptState, Callable] = {
    S.READY: lambda m, o: None,
    S.SCALED: lambda m, o: _block(m, o, delay_unscale=True),
    S.UNSCALED: lambda m, o: _block(m, o, host=True),
    S.NO_GRADS: lambda m, o: _block(m, o, backward=False),
    S.OVERFLOW_ON_DEVICE: lambda m, o: _block(m, o),
    S.SKIP_PENDING: lambda m, o: _block(m, o, inf=True, host=True),
    S.SKIPPED: lambda m, o: (_block(m, o, inf=True, host=True), o.step()),
    S.STEPPED: lambda m, o: (_block(m, o, host=True), o.step()),
    S.STEPPED_ON_DEVICE: lambda m, o: (_block(m, o), o.step()),
}


def _step_with_stray_grads(m, o):
    _loss(m).backward()  # outside any block: still scaled, says amp
    o.step()


# How a training loop makes each event happen (on an optimizer not inside a block).
FIRE: Dict[Event, Callable] = {
    E.EXIT_DELAYED: lambda m, o: _block(m, o, delay_unscale=True),
    E.EXIT_NO_GRADS: lambda m, o: _block(m, o, backward=False),
    E.EXIT_CLEAN: lambda m, o: _block(m, o, host=True),
    E.EXIT_ON_DEVICE: lambda m, o: _block(m, o),
    E.EXIT_OVERFLOW: lambda m, o: _block(m, o, inf=True, host=True),
    E.STEP: lambda m, o: o.step(),
    E.STEP_WITH_STRAY_GRADS: _step_with_stray_grads,
    E.STEP_AFTER_KERNEL_SKIP: lambda m, o: o.step(),
}

# Rows no real loop can reach: the host-side skip is already pending, so the block's overflow check is
# never left on the device (master_weights.skips_on_device).
UNREACHABLE = {(S.SKIP_PENDING, E.EXIT_ON_DEVICE)}


# Rows that need the state reached another way.
REACH_FOR_ROW = {
    # The fused kernel skipped this time.
    (S.STEPPED_ON_DEVICE, E.STEP_AFTER_KERNEL_SKIP): lambda m, o: (_block(m, o, inf=True), o.step()),
    # Delayed gradients count as the next block's own, so that block ends without any only if there are none.
    (S.SCALED, E.EXIT_NO_GRADS): lambda m, o: _block(m, o, backward=False, delay_unscale=True),
}


def _reach(state: OptState, event: Event):
    model, opt = _setup()
    REACH_FOR_ROW.get((state, event), REACH[state])(model, opt)
    assert opt._amp_stash.state is state
    return model, opt


def _rows(table) -> List[Tuple[OptState, Event]]:
    return sorted(table, key=lambda key: (list(OptState).index(key[0]), list(Event).index(key[1])))


def _id(row) -> str:
    return "{}-{}".format(row[0].name, row[1].name)


def _inside_block(model, opt, body: Callable) -> None:
    """Run ``body`` inside a block entered from the optimizer's state, then leave the block cleanly."""
    with amp.scale_loss(_loss(model), opt) as scaled:
        scaled.backward()
        assert opt._amp_stash.state is S.IN_SCALE_LOSS
        body()


@pytest.mark.parametrize("row", _rows(TRANSITIONS), ids=_id)
def test_every_legal_transition_happens_as_the_table_says(row):
    state, event = row
    after = TRANSITIONS[row]
    if row in UNREACHABLE:
        assert next_state(state, event) is after
        return
    if state is S.IN_SCALE_LOSS:  # only step() is legal inside a block
        model, opt = _setup()
        _inside_block(model, opt, lambda: (opt.step(), _assert_state(opt, after)))
        return
    model, opt = _reach(state, event)
    if event is E.ENTER:
        _inside_block(model, opt, lambda: _assert_state(opt, after))
    elif event is E.ABORT:
        with pytest.raises(ZeroDivisionError):
            with amp.scale_loss(_loss(model), opt) as scaled:
                scaled.backward()
                raise ZeroDivisionError
        _assert_state(opt, after)
    else:
        FIRE[event](model, opt)
        _assert_state(opt, after)


def _assert_state(opt, expected: OptState) -> None:
    stash = opt._amp_stash
    assert stash.state is expected
    if expected is not S.IN_SCALE_LOSS:
        assert stash.params_have_scaled_gradients is (expected is S.SCALED)
        assert stash.already_patched is (expected is S.SKIP_PENDING)  # no device flag overflowed here


@pytest.mark.parametrize("row", _rows(REFUSALS), ids=_id)
def test_every_refused_transition_raises_its_message_and_changes_nothing(row):
    state, event = row
    if state is S.IN_SCALE_LOSS:
        model, opt = _setup()

        def nested():
            with pytest.raises(RuntimeError) as err:
                with amp.scale_loss(_loss(model), opt):
                    pass
            assert str(err.value) == REFUSALS[row]
            assert opt._amp_stash.state is S.IN_SCALE_LOSS

        _inside_block(model, opt, nested)
        return
    model, opt = _reach(state, event)
    params = [p.detach().clone() for p in amp.master_params(opt)]
    with pytest.raises(RuntimeError) as err:
        FIRE[event](model, opt)
    assert str(err.value) == REFUSALS[row]
    assert opt._amp_stash.state is state
    assert all(torch.equal(a, b) for a, b in zip(params, amp.master_params(opt)))


def test_refusals_are_the_messages_the_misuse_catalogue_expects():
    fragments = {
        (S.IN_SCALE_LOSS, E.ENTER): "amp.scale_loss blocks cannot be nested for the same optimizer",
        (S.SKIPPED, E.STEP): "called again after a step skipped for gradient overflow",
        (S.STEPPED_ON_DEVICE, E.STEP_AFTER_KERNEL_SKIP): "called again after a step skipped for gradient overflow",
        (S.NO_GRADS, E.STEP_WITH_STRAY_GRADS): "not produced inside `with amp.scale_loss",
    }
    assert fragments.keys() == REFUSALS.keys()
    for row, fragment in fragments.items():
        assert fragment in REFUSALS[row]
        with pytest.raises(RuntimeError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
            next_state(*row)


def test_table_covers_every_state_and_no_move_is_both_legal_and_refused():
    assert not TRANSITIONS.keys() & REFUSALS.keys()
    outside_a_block = [s for s in OptState if s is not S.IN_SCALE_LOSS]
    for state in outside_a_block:
        for event in (E.ENTER, E.ABORT, E.EXIT_DELAYED, E.EXIT_NO_GRADS, E.EXIT_CLEAN, E.EXIT_ON_DEVICE,
                      E.EXIT_OVERFLOW):
            assert (state, event) in TRANSITIONS, (state, event)
    for state in OptState:
        assert (state, E.STEP) in TRANSITIONS or (state, E.STEP) in REFUSALS, state
    with pytest.raises(RuntimeError, match="internal error"):
        next_state(S.READY, E.STEP_WITH_STRAY_GRADS)


def test_a_device_flag_that_overflowed_shows_as_already_patched_and_skips_in_the_kernel():
    model, opt = _setup()
    _block(model, opt, inf=True)
    assert opt._amp_stash.state is S.OVERFLOW_ON_DEVICE and opt._amp_stash.already_patched
    params = [p.detach().clone() for p in amp.master_params(opt)]
    opt.step()
    assert opt._amp_stash.state is S.STEPPED_ON_DEVICE
    assert all(torch.equal(a, b) for a, b in zip(params, amp.master_params(opt)))


def test_a_pending_verdict_outlives_later_blocks_until_the_step():
    """Two losses: the first overflows (on the host), the second is clean; the step is still skipped."""
    model, opt = _setup()
    _block(model, opt, inf=True, host=True)
    _block(model, opt, host=True)
    _block(model, opt)  # a clean pass checked on the device cannot cancel the host's verdict either
    assert opt._amp_stash.state is S.SKIP_PENDING and opt._amp_stash.already_patched
    params = [p.detach().clone() for p in amp.master_params(opt)]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, amp.master_params(opt)))


# --- one owner: every field declared in __init__, at most twelve ------------------------------------

LIFECYCLE_FIELDS = ["_optimizer", "_state", "_in_block", "_skip_loss_id", "_deferred_records", "_pending_steps",
                    "_original_step", "_plan", "_set_aside", "unscale_paths"]
STRATEGY_FIELDS = {"O1": [], "O2": ["_zeroed", "_refresh_from_model", "unfused_reason"],
                   "O2 fused": ["_zeroed", "_refresh_from_model", "unfused_reason", "_fused"]}


@pytest.mark.parametrize("level", ["O1", "O2", "O2 fused"])
def test_the_per_optimizer_state_is_the_fields_init_declares(level, monkeypatch):
    """A run through every kind of move (fused and host-checked exits, an overflow skip, delay_unscale, an
    aborted block, add_param_group, zero_grad, a checkpoint round trip) adds no field to the lifecycle.
    "O2 fused": the fused O2 step's strategy, its kernels stubbed out (``_fused_o2_stub.py``)."""
    import _fused_o2_stub
    from ampcompat.amp.fused_o2 import coverage

    if level == "O2 fused":
        _fused_o2_stub.install(monkeypatch)
    else:  # the unfused strategy, even where the fused step would apply (CUDA, Triton's interpreter)
        monkeypatch.setattr(coverage, "_switch", False)
    model = make_mlp(d_hidden=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    amp.initialize(model, opt, opt_level=level.split()[0], loss_scale="dynamic", verbosity=0)
    stash = opt._amp_stash
    declared = list(vars(stash))
    assert declared == LIFECYCLE_FIELDS + STRATEGY_FIELDS[level] and len(declared) <= 14
    _block(model, opt)
    opt.step()
    opt.zero_grad()
    _block(model, opt)  # (fused: its update at the step)
    opt.step()
    _block(model, opt, inf=True, host=True)
    opt.step()
    _block(model, opt, delay_unscale=True)
    _block(model, opt, host=True)
    with pytest.raises(ZeroDivisionError):
        with amp.scale_loss(_loss(model), opt) as scaled:
            scaled.backward()
            raise ZeroDivisionError
    opt.zero_grad()
    extra = torch.nn.Linear(4, 4)
    opt.add_param_group({"params": list(extra.parameters())})
    opt.load_state_dict(opt.state_dict())
    assert list(vars(stash)) == declared
    assert stash.lazy_init_called and sum(stash.unscale_paths.get(k, 0) for k in ("fast", "general", "fused")) == 4
    assert stash.unscale_paths.get("fused", 0) == (1 if level == "O2 fused" else 0)


def test_a_strategy_that_updates_itself_runs_between_the_same_effects():
    """The slot a fused O2 step fills: _own_update replaces the optimizer's own step; skipping, O1's casts,
    the masters' copy back and the state moves stay the lifecycle's."""
    from ampcompat.amp.master_weights import MasterWeights

    calls = []

    class OwnUpdate(MasterWeights):
        def _own_update(self, closure):
            calls.append(closure)
            return "updated"

    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O2", verbosity=0)
    opt._amp_stash.__class__ = OwnUpdate
    _block(model, opt)  # SGD: checked on the host
    masters = [m.detach().clone() for m in opt._amp_stash.all_fp32_from_fp16_params]
    assert opt.step() == "updated" and calls == [None]
    assert opt._amp_stash.state is S.STEPPED  # the table's move
    assert all(torch.equal(a, b) for a, b in zip(masters, opt._amp_stash.all_fp32_from_fp16_params))  # SGD did not run
    assert all(m.grad is None for m in opt._amp_stash.all_fp32_from_fp16_params)  # the after-step effect ran
    _block(model, opt, inf=True)
    assert opt.step() is None and calls == [None]  # a skip never reaches the update
