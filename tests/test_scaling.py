"""scale_loss and LossScaler: skip-on-overflow, closed-form scale sequence, accumulation, state."""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import ampcompat
from ampcompat import _torch_compat, amp
from ampcompat.amp.scaler import LossScaler

from _models import batches, make_mlp, params_of


def _train(model, opt, data, level_loss=None, poison_at=(), step_hook=None):
    """One scale_loss + step per batch; ``poison_at`` steps get an inf gradient in fc1.weight."""
    state = {"i": 0}
    hook = model.fc1.weight.register_hook(
        lambda g: torch.full_like(g, float("inf")) if state["i"] in poison_at else g)
    for i, (x, y) in enumerate(data):
        state["i"] = i
        loss = F.cross_entropy(model(x), y)
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        if step_hook:
            step_hook(i)
        opt.step()
        opt.zero_grad()
    hook.remove()


def test_inf_at_step_k_skips_step_with_apex_message(device, capsys):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp.initialize(model, opt, opt_level="O1")
    capsys.readouterr()
    snapshots = {}
    scales = []

    def before_step(i):
        snapshots[i] = (params_of(model), opt._amp_stash.already_patched)
        scales.append(amp._amp_state.loss_scalers[0].loss_scale())

    data = batches(6, device)
    _train(model, opt, data[:3], poison_at=(2,), step_hook=before_step)
    after = params_of(model)
    assert snapshots[2][1] is True  # the pending skip is visible as Apex's already_patched
    assert opt._amp_stash.already_patched is False
    for p, q in zip(after, snapshots[2][0]):
        assert torch.equal(p, q)  # step 2 skipped: params untouched
    assert scales == [2.0 ** 16, 2.0 ** 16, 2.0 ** 15]
    out = capsys.readouterr().out
    assert out == "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 32768.0\n"
    _train(model, opt, data[3:])
    assert not torch.equal(params_of(model)[0], after[0])  # training resumes
    assert amp._amp_state.loss_scalers[0]._unskipped == 3


def test_growth_after_exactly_2000_clean_backward_passes():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    amp.initialize(model, opt, opt_level="O1", verbosity=0, max_loss_scale=2.0 ** 17)
    scaler = amp._amp_state.loss_scalers[0]
    scaler._loss_scale = 2.0 ** 10  # legacy code pokes this private field; it must take effect
    x = torch.randn(4, 2)
    seen = []
    for _ in range(4001):
        with amp.scale_loss(model(x).float().mean(), opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        seen.append(scaler.loss_scale())
    assert seen[1998] == 2.0 ** 10 and seen[1999] == 2.0 ** 11  # doubled on the 2000th clean pass
    assert seen[3998] == 2.0 ** 11 and seen[3999] == 2.0 ** 12
    assert scaler._unskipped == 1


def test_scale_sequence_closed_form_and_bounds():
    s = LossScaler("dynamic", min_loss_scale=2.0 ** 14, max_loss_scale=2.0 ** 17)
    assert s.loss_scale() == 2.0 ** 16
    for expected in (2.0 ** 15, 2.0 ** 14, 2.0 ** 14):  # halves, floored at min_loss_scale
        s._has_overflow = True
        assert s.update_scale() is True
        assert s.loss_scale() == expected and s._unskipped == 0
    for _ in range(3 * 2000):
        s._has_overflow = False
        assert s.update_scale() is False
    assert s.loss_scale() == 2.0 ** 17  # doubled three times, capped at max_loss_scale
    unbounded = LossScaler("dynamic")
    for k in range(1, 20):
        unbounded._has_overflow = True
        unbounded.update_scale()
        assert unbounded.loss_scale() == 2.0 ** (16 - k)


def _apex_rules(scale, unskipped, overflowed, dynamic=True, factor=2.0, window=3, floor=None, ceiling=2.0 ** 24):
    """Apex's update_scale written out in plain Python, for comparison (the library has no such copy)."""
    if overflowed and dynamic:
        scale, unskipped = scale / factor, 0
        scale = max(floor, scale) if floor else scale
    elif overflowed:
        unskipped = 0
    else:
        unskipped += 1
    if unskipped == window and dynamic:
        scale, unskipped = min(ceiling, scale * factor), 0
    return scale, unskipped


# Overflow patterns: halvings to the floor, growth past the ceiling (window 3), interleaved.
PATTERN = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("dynamic", [True, False])
def test_one_policy_serves_both_paths_and_follows_apexs_rules(monkeypatch, dynamic, device):
    """Every scale change goes through LossScaler._update_scale_policy, from the host path (update_scale,
    one read) and from the device path (update_scale_on_device, read back later); both give Apex's
    sequence, and the same one."""
    calls = []
    policy = LossScaler._update_scale_policy

    def spy(self, found_inf):
        calls.append(self)
        return policy(self, found_inf)

    monkeypatch.setattr(LossScaler, "_update_scale_policy", spy)
    kwargs = dict(scale_window=3, min_loss_scale=2.0 ** 14, max_loss_scale=2.0 ** 17)
    host = LossScaler("dynamic" if dynamic else 2.0 ** 16, **kwargs)
    deferred = LossScaler("dynamic" if dynamic else 2.0 ** 16, **kwargs)
    for scaler in (host, deferred):
        scaler.bind_device(device)
        assert scaler._scale_t.device.type == device  # the authority lives with the gradients
    expected = (2.0 ** 16, 0)
    for overflowed in PATTERN:
        expected = _apex_rules(*expected, overflowed, dynamic=dynamic, floor=2.0 ** 14, ceiling=2.0 ** 17)
        for scaler in (host, deferred):
            scaler.clear_overflow_state()
            scaler.unscale_([torch.tensor([float("inf") if overflowed else 1.0], device=device)])
        assert host.update_scale() is bool(overflowed)
        deferred.update_scale_on_device()
        deferred.resolve()
        assert (host.loss_scale(), host._unskipped) == expected
        assert (deferred.loss_scale(), deferred._unskipped) == expected  # the device/host agreement check
    assert calls == [host, deferred] * len(PATTERN)


def test_scale_below_one_warns_once():
    s = LossScaler("dynamic", init_scale=2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            s._has_overflow = True
            s.update_scale()
    below = [w for w in caught if "fell below 1" in str(w.message)]
    assert len(below) == 1 and s.loss_scale() == 2.0 ** -3


def test_static_scale_above_one_detects_overflow_and_skips(capsys):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", loss_scale=128.0)
    capsys.readouterr()
    before = params_of(model)
    _train(model, opt, batches(1), poison_at=(0,))
    assert all(torch.equal(p, q) for p, q in zip(params_of(model), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert amp._amp_state.loss_scalers[0].loss_scale() == 128.0  # static: unchanged
    assert "Gradient overflow.  Skipping step, loss scaler 0" in capsys.readouterr().out


def test_static_scale_one_short_circuits():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", loss_scale=1.0, verbosity=0)
    loss = F.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1])
    with amp.scale_loss(loss, opt) as scaled:
        assert scaled is loss  # an FP32 loss: .float() is the same object
        scaled.backward()
    assert opt._amp_stash.lazy_init_called is False  # nothing stashed, nothing unscaled


@pytest.mark.parametrize("loss_scale", [1.0, "dynamic"])
def test_o0_equals_plain_fp32_training_bitwise(device, loss_scale):
    data = batches(10, device)
    ref = make_mlp(device)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp.initialize(model, opt, opt_level="O0", loss_scale=loss_scale, verbosity=0)
    _train(model, opt, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def _fp32_reference_grads(device, data):
    ref = make_mlp(device)
    for x, y in data:
        F.cross_entropy(ref(x), y).backward()
    return [p.grad.clone() for p in ref.parameters()]


@pytest.mark.parametrize("pattern", ["accumulate", "delay_unscale", "preexisting"])
def test_accumulation_gives_fp32_reference_grads(device, pattern):
    data = batches(3, device)
    expected = _fp32_reference_grads(device, data)
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O0", loss_scale="dynamic", verbosity=0)
    for i, (x, y) in enumerate(data):
        loss = F.cross_entropy(model(x), y)
        if pattern == "preexisting" and i == 0:
            loss.backward()  # grads already present before the first scale_loss are kept and added to
            continue
        delay = pattern == "delay_unscale" and i < len(data) - 1
        with amp.scale_loss(loss, opt, delay_unscale=delay) as scaled:
            scaled.backward()
        if delay:
            assert opt._amp_stash.params_have_scaled_gradients
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


def test_delay_unscale_leaves_grads_scaled():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O0", loss_scale="dynamic", verbosity=0)
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(x), y), opt, delay_unscale=True) as scaled:
        scaled.backward()
    ref = make_mlp()
    F.cross_entropy(ref(x), y).backward()
    torch.testing.assert_close(model.fc1.weight.grad, ref.fc1.weight.grad * 2.0 ** 16)
    assert amp._amp_state.loss_scalers[0]._unskipped == 0  # no scale update for a delayed pass


def test_o1_accumulation_close_to_fp32(device):
    data = batches(3, device)
    expected = _fp32_reference_grads(device, data)
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0, max_loss_scale=2.0 ** 10)
    for x, y in data:
        with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
            scaled.backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=2e-3)


def test_num_losses_and_loss_id_use_independent_scalers(capsys):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", num_losses=2)
    capsys.readouterr()
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(x), y), opt, loss_id=0) as scaled:
        scaled.backward()
    with amp.scale_loss(F.cross_entropy(model(x), y) * float("inf"), opt, loss_id=1) as scaled:
        scaled.backward()
    opt.step()
    s0, s1 = amp._amp_state.loss_scalers
    assert (s0.loss_scale(), s0._unskipped) == (2.0 ** 16, 1)
    assert (s1.loss_scale(), s1._unskipped) == (2.0 ** 15, 0)
    assert capsys.readouterr().out == (
        "Gradient overflow.  Skipping step, loss scaler 1 reducing loss scale to 32768.0\n")
    with pytest.raises(IndexError):
        with amp.scale_loss(F.cross_entropy(model(x), y), opt, loss_id=2):
            pass


def test_list_of_optimizers_and_unpatched_optimizer():
    model = make_mlp()
    opt_a = torch.optim.SGD(list(model.fc1.parameters()) + list(model.bn.parameters()), lr=0.1)
    opt_b = torch.optim.Adam(list(model.ln.parameters()) + list(model.fc2.parameters()), lr=0.01)
    amp.initialize(model, [opt_a, opt_b], opt_level="O1", verbosity=0, max_loss_scale=2.0 ** 8)
    before = params_of(model)
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(x), y), [opt_a, opt_b]) as scaled:
        scaled.backward()
    opt_a.step()
    opt_b.step()
    assert all(not torch.equal(p, q) for p, q in zip(params_of(model), before))
    stranger = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(AttributeError, match="_amp_stash"):
        with amp.scale_loss(F.cross_entropy(model(x), y), stranger) as scaled:
            scaled.backward()


def test_delay_overflow_check_leaves_update_to_caller():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(x), y) * float("inf"), opt, delay_overflow_check=True) as scaled:
        scaled.backward()
    scaler = amp._amp_state.loss_scalers[0]
    assert scaler.loss_scale() == 2.0 ** 16 and not opt._amp_stash.already_patched
    assert scaler.update_scale() is True  # the BERT pattern: the caller decides
    assert scaler.loss_scale() == 2.0 ** 15


def test_one_host_sync_per_scale_loss_exit(monkeypatch):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()  # pre-existing grads: the stash-and-add path too
    calls = {"reads": 0, "unscale": 0}
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
    real_unscale = _torch_compat.amp_foreach_non_finite_check_and_unscale_

    def counting_item(self):
        calls["reads"] += 1
        return real_item(self)

    def counting_tolist(self):
        calls["reads"] += 1
        return real_tolist(self)

    def counting_unscale(*args):
        calls["unscale"] += 1
        return real_unscale(*args)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(_torch_compat, "amp_foreach_non_finite_check_and_unscale_", counting_unscale)
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        scaled.backward()
    assert calls == {"reads": 1, "unscale": 1}  # all grads fp32 on one device: one fused launch, one read


def test_amp_state_dict_round_trip_weights_only():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", num_losses=2, verbosity=0)
    amp._amp_state.loss_scalers[0]._loss_scale = 1024.0
    amp._amp_state.loss_scalers[1]._unskipped = 7
    saved = amp.state_dict()
    assert list(saved) == ["loss_scaler0", "loss_scaler1"]
    assert saved["loss_scaler0"] == {"loss_scale": 1024.0, "unskipped": 0}
    assert saved["loss_scaler1"] == {"loss_scale": 65536.0, "unskipped": 7}
    buf = io.BytesIO()
    torch.save({"amp": saved}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["amp"]
    ampcompat.reset()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", num_losses=2, verbosity=0)
    amp.load_state_dict(loaded)
    assert amp.state_dict() == saved


def test_load_state_dict_partial_surplus_and_unexpected(capsys):
    model = make_mlp()
    amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O1", num_losses=1, verbosity=1)
    capsys.readouterr()
    amp.load_state_dict({"loss_scaler5": {"loss_scale": 8.0, "unskipped": 3},
                         "loss_scaler0": {"loss_scale": 4.0, "unskipped": 1},
                         "junk": 1})
    out = capsys.readouterr().out
    assert out == ("Warning: state_dict contains 3 entries, while 1 loss_scalers are used\n"
                   "Skipping loss_scaler[1], since num_losses was set to 1\n")
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 8.0, "unskipped": 3}  # positional
    with pytest.raises(RuntimeError) as err:
        amp.load_state_dict({"loss_scaler0": {"loss_scale": 2.0, "unskipped": 0}, "x": 1, "y": 2})
    assert str(err.value) == 'Error(s) in loading state_dict. Unexpected key(s) in state_dict: "x", "y". '
    ampcompat.reset()
    with pytest.raises(AttributeError, match="called before amp.initialize"):  # Apex's type, kept
        amp.state_dict()


def test_grad_scaler_state_conversion_round_trip():
    amp_state = {"loss_scaler0": {"loss_scale": 4096.0, "unskipped": 123}}
    gs_state = ampcompat.amp_state_to_grad_scaler(amp_state)
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(gs_state)
    assert scaler.get_scale() == 4096.0 and scaler._get_growth_tracker() == 123
    assert ampcompat.grad_scaler_to_amp_state(scaler.state_dict()) == amp_state
    with pytest.raises(ValueError, match="disabled GradScaler"):
        ampcompat.grad_scaler_to_amp_state({})
    with pytest.raises(KeyError):
        ampcompat.amp_state_to_grad_scaler(amp_state, loss_id=1)


def test_loss_scaler_pickles_and_legacy_private_fields():
    import pickle

    s = LossScaler("dynamic")
    s.bind_device("cpu")
    s._unskipped = 5
    t = pickle.loads(pickle.dumps(s))
    assert (t.loss_scale(), t._unskipped, t.dynamic) == (65536.0, 5, True)
    legacy = LossScaler.__new__(LossScaler)
    legacy.__setstate__({"_loss_scale": 128.0, "dynamic": False, "_unskipped": 2})  # an Apex-era pickle
    assert legacy.loss_scale() == 128.0 and legacy._scale_seq_len == 2000 and legacy.update_scale() is False


def test_dynamic_scaling_of_bf16_grads(device):
    """A bf16 model with a dynamic scale: the check has no bf16 kernel on CUDA, so FP32 copies are used."""
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O3", cast_model_type=torch.bfloat16, loss_scale="dynamic", verbosity=0)
    (x, y), = batches(1, device)
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        scaled.backward()
    grad = model.fc1.weight.grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    assert grad.abs().max() < 100  # unscaled: a 2**16-scaled gradient would be far larger
    with amp.scale_loss(F.cross_entropy(model(x), y) * float("inf"), opt) as scaled:
        scaled.backward()
    assert amp._amp_state.loss_scalers[0].loss_scale() == 2.0 ** 15
