"""The sync-free path: fused optimizers skip overflowing steps in their kernel, the scale updates on device."""
import pytest
import torch
import torch.nn.functional as F

from ampcompat import _torch_compat, amp

from _models import batches, make_mlp, params_of


def _poison(model, state, steps):
    return model.fc1.weight.register_hook(
        lambda g: torch.full_like(g, float("inf")) if state["i"] in steps else g)


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_fused_adamw_twin_with_overflow_matches_host_path(device, opt_level, capsys):
    """Same run twice: fused AdamW (device-side skip) and foreach AdamW (host-side skip)."""
    results = {}
    for fused in (True, False):
        amp._amp_state.__dict__.pop("loss_scalers", None)
        model = make_mlp(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=not fused)
        amp.initialize(model, opt, opt_level=opt_level, verbosity=1 if fused else 0)
        capsys.readouterr()
        state = {"i": 0}
        hook = _poison(model, state, steps=(2, 3))
        seen_skip = []
        for i, (x, y) in enumerate(batches(8, device)):
            state["i"] = i
            with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
                scaled.backward()
            seen_skip.append(opt._amp_stash.already_patched)
            opt.step()
            opt.zero_grad()
        hook.remove()
        amp.state_dict()  # reading host-visible state brings everything up to date
        opt._amp_stash.report_deferred_skips()
        results[fused] = (params_of(model), amp.state_dict(), seen_skip, opt.state_dict(), capsys.readouterr().out)
    fused_params, fused_amp, fused_skips, fused_opt, fused_out = results[True]
    host_params, host_amp, host_skips, host_opt, _ = results[False]
    assert fused_skips == host_skips == [False, False, True, True, False, False, False, False]
    assert fused_amp == host_amp == {"loss_scaler0": {"loss_scale": 2.0 ** 14, "unskipped": 4}}
    # fused and foreach AdamW kernels round differently; Adam's normalised update turns that into up to
    # ~lr per element on near-zero gradients, so the twin is tight on CPU and within lr on CUDA.
    tol = dict(rtol=1e-3, atol=1e-3) if device == "cpu" else dict(rtol=0, atol=2e-2)
    for p, q in zip(fused_params, host_params):
        torch.testing.assert_close(p, q, **tol)
    steps = [s["step"] for s in fused_opt["state"].values()]
    assert all(float(s) == 6.0 for s in steps)  # the two skipped steps did not count
    assert fused_out == ("Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 32768.0\n"
                         "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 16384.0\n")


def test_fused_path_needs_no_host_read(device, monkeypatch):
    model = make_mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    amp.initialize(model, opt, opt_level="O2", verbosity=0)
    data = batches(3, device)
    calls = {"item": 0, "update": 0}
    real_item, real_update = torch.Tensor.item, _torch_compat.amp_update_scale_

    def counting_item(self):
        calls["item"] += 1
        return real_item(self)

    def counting_update(*args):
        calls["update"] += 1
        return real_update(*args)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(_torch_compat, "amp_update_scale_", counting_update)
    for x, y in data:
        with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
    assert calls == {"item": 0, "update": 3}
    scaler = amp._amp_state.loss_scalers[0]
    assert scaler.loss_scale() == 2.0 ** 16 and scaler._unskipped == 3  # exact when read


def test_setting_private_scale_reaches_the_device():
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    amp.initialize(model, opt, opt_level="O0", loss_scale="dynamic", verbosity=0)
    x, y = batches(1)[0]
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        scaled.backward()
    opt.step()
    amp._amp_state.loss_scalers[0]._loss_scale = 2.0 ** 20  # the BERT recipe, after the device took over
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        assert scaled.item() == pytest.approx(F.cross_entropy(model(x), y).item() * 2.0 ** 20, rel=1e-3)
        scaled.backward()
    assert amp._amp_state.loss_scalers[0].loss_scale() == 2.0 ** 20


def test_training_loop_never_waits_for_the_device(monkeypatch):
    """With fused optimizers nothing in scale_loss/step may block on an unfinished on-device update."""
    from ampcompat.amp import scaler as scaler_module

    def not_yet(self):
        return False

    def must_not_block(self):
        raise AssertionError("a blocking read of the overflow flag inside the training loop")

    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    amp.initialize(model, opt, opt_level="O2", verbosity=0)
    data = batches(4)
    monkeypatch.setattr(scaler_module._ScaleRecord, "ready", not_yet)
    monkeypatch.setattr(scaler_module._ScaleRecord, "values", must_not_block)
    for x, y in data:
        with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
            scaled.backward()
        torch.nn.utils.clip_grad_norm_(amp.master_params(opt), 1.0)
        opt.step()
        opt.zero_grad()
    monkeypatch.undo()
    assert amp._amp_state.loss_scalers[0]._unskipped == 4  # and everything is exact once read
