"""The process-wide ``_amp_state`` and its owner: defaults, reset, snapshot/restore, handle replacement."""
from __future__ import annotations

import torch

import ampcompat
from ampcompat import amp
from ampcompat.amp import process_state

from _models import make_mlp


def test_reset_returns_to_apexs_defaults_after_an_initialize():
    fresh = process_state.snapshot()
    assert fresh == process_state.DEFAULTS  # the fixture reset the state: nothing else is there
    model = make_mlp()
    amp.register_float_function(torch, "tanh")
    amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O1", verbosity=0,
                   min_loss_scale=1.0)
    assert set(process_state.SET_BY_INITIALIZE) <= set(process_state.snapshot())
    assert torch.is_autocast_enabled("cpu")
    ampcompat.reset()  # the package's reset is the owner's
    assert process_state.snapshot() == fresh
    assert not torch.is_autocast_enabled("cpu") and not process_state.cast_registry
    assert not hasattr(amp._amp_state, "loss_scalers")  # absent, as before any initialize (Apex's hasattr checks)


def test_restore_puts_back_named_attributes_and_removes_new_ones():
    saved = process_state.snapshot()
    process_state.begin_initialize("options", 0)
    process_state.set_loss_scale_bounds(1.0, 2.0)
    process_state.restore(saved, ("opt_properties", "verbosity", "min_loss_scale"))
    assert not hasattr(amp._amp_state, "opt_properties") and amp._amp_state.verbosity == 1
    assert amp._amp_state.max_loss_scale == 2.0  # not named: left as it is
    process_state.restore(saved)
    assert process_state.snapshot() == saved


def test_a_refused_initialize_leaves_the_previous_state():
    model = make_mlp()
    amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O2", verbosity=0)
    before = process_state.snapshot()
    other = make_mlp()
    try:
        amp.initialize(other, torch.optim.SGD(other.parameters(), lr=0.1), opt_level="O7", verbosity=0)
    except RuntimeError:
        pass
    assert process_state.snapshot() == before


def test_installing_a_handle_turns_off_the_one_it_replaces():
    first = amp.init(enabled=True)
    assert first.is_active() and amp._amp_state.handle is first
    second = amp.init(enabled=True)
    assert not first.is_active() and second.is_active() and amp._amp_state.handle is second
    disabled = amp.init(enabled=False)
    assert not second.is_active() and amp._amp_state.handle is disabled
    process_state.remove_handle()
    assert not hasattr(amp._amp_state, "handle")
