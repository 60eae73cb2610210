"""O1/O4 on autocast: twin run against torch.autocast + GradScaler, Apex's scope, casts, registry."""
import threading

import pytest
import torch
import torch.nn.functional as F

import ampcompat
from ampcompat import amp

from _models import batches, layer_norm_in_fp32, make_mlp


def _make_optimizer(model, kind):
    if kind == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _native_run(device, steps, kind="sgd"):
    model = layer_norm_in_fp32(make_mlp(device))
    opt = _make_optimizer(model, kind)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 16)
    losses, scales = [], []
    for x, y in batches(steps, device):
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, losses, scales


def _amp_run(device, steps, opt_level="O1", kind="sgd"):
    model = make_mlp(device)
    opt = _make_optimizer(model, kind)
    model, opt = amp.initialize(model, opt, opt_level=opt_level, verbosity=0)
    losses, scales = [], []
    for x, y in batches(steps, device):
        loss = F.cross_entropy(model(x), y)  # computed outside forward: autocast applies, as Apex's O1
        scales.append(amp._amp_state.loss_scalers[0].loss_scale())
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, losses, scales


@pytest.mark.parametrize("kind", ["sgd", "adamw_fused"])
def test_o1_twin_run_equals_native_autocast_and_grad_scaler(device, kind):
    """SGD takes the host-sync path, fused AdamW the on-device one; both equal GradScaler bitwise."""
    ref_model, ref_losses, ref_scales = _native_run(device, 20, kind)
    model, losses, scales = _amp_run(device, 20, kind=kind)
    assert scales == ref_scales
    for a, b in zip(losses, ref_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for b1, b2 in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(b1, b2, rtol=0, atol=0)


def test_o1_twin_run_with_overflow_matches_grad_scaler_scale_sequence(device):
    """An injected inf at step 3: both skip the step and halve the scale."""
    def poison(model, step):
        def hook(grad):
            return torch.full_like(grad, float("inf")) if step["i"] == 3 else grad
        model.fc1.weight.register_hook(hook)

    step = {"i": 0}
    native = layer_norm_in_fp32(make_mlp(device))
    poison(native, step)
    opt_n = torch.optim.SGD(native.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device)
    model = make_mlp(device)
    poison(model, step)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    for i, (x, y) in enumerate(batches(6, device)):
        step["i"] = i
        with amp.disable_casts():
            with torch.autocast(device, dtype=torch.float16):
                loss_n = F.cross_entropy(native(x), y)
        scaler.scale(loss_n).backward()
        scaler.step(opt_n)
        scaler.update()
        opt_n.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        assert amp._amp_state.loss_scalers[0].loss_scale() == scaler.get_scale()
    assert scaler.get_scale() == 2.0 ** 15
    for p, q in zip(model.parameters(), native.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_loss_outside_forward_runs_fp32_list_ops_in_fp32(device):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    x, y = batches(1, device)[0]
    logits = model(x)
    assert logits.dtype == torch.float16
    assert F.cross_entropy(logits, y).dtype == torch.float32
    ops = {
        "cross_entropy": lambda t: F.cross_entropy(t, y),
        "log_softmax": lambda t: F.log_softmax(t, dim=-1),
        "softmax": lambda t: F.softmax(t, dim=-1),
        "exp": torch.exp,
        "sum": torch.sum,
        "matmul": lambda t: t @ t.t(),
    }
    ours = {name: op(logits).dtype for name, op in ops.items()}
    # Apex's O1 lists on every device (native CPU autocast alone would leave softmax/exp/sum in fp16)
    assert ours == dict.fromkeys(ours, torch.float32) | {"matmul": torch.float16}
    if device == "cuda":
        with amp.disable_casts(), torch.autocast(device, dtype=torch.float16):
            assert ours == {name: op(logits).dtype for name, op in ops.items()}  # = native CUDA autocast


def test_o4_runs_bf16(device):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O4", verbosity=0)
    x, y = batches(1, device)[0]
    out = model(x)
    assert out.dtype == torch.bfloat16
    loss = F.cross_entropy(out, y)
    with amp.scale_loss(loss, opt) as scaled:
        assert scaled is not None and scaled.dtype == torch.float32
        scaled.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_in_place_weight_update_outside_optimizer_is_seen_by_next_forward(device):
    model = torch.nn.Linear(8, 8, bias=False).to(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    x = torch.randn(4, 8, device=device)
    first = model(x)
    with torch.no_grad():
        model.weight.mul_(2.0)  # e.g. an EMA update or a manual edit
    second = model(x)
    torch.testing.assert_close(second.float(), (x @ model.weight.t()).half().float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(second.float(), 2 * first.float(), rtol=2e-3, atol=2e-3)
    # and outside forward: a weight used directly is never served from a stale cache
    y1 = x @ model.weight.t()
    with torch.no_grad():
        model.weight.zero_()
    assert torch.count_nonzero(x @ model.weight.t()) == 0 and torch.count_nonzero(y1) > 0


def test_load_state_dict_updates_are_seen(device):
    model = torch.nn.Linear(8, 8).to(device)
    other = torch.nn.Linear(8, 8).to(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    x = torch.randn(4, 8, device=device)
    model(x)
    model.load_state_dict(other.state_dict())
    with amp.disable_casts():
        expected = other(x.half().float())
    torch.testing.assert_close(model(x).float(), expected, rtol=5e-3, atol=5e-3)


def test_backward_and_step_run_with_autocast_off(device):
    model = make_mlp(device)
    seen = {}

    class Probe(torch.optim.SGD):
        def step(self, closure=None):
            seen["step"] = torch.is_autocast_enabled(device)
            return super().step(closure)

    opt = Probe(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    x, y = batches(1, device)[0]
    loss = F.cross_entropy(model(x), y)

    def grad_hook(grad):
        seen["backward"] = torch.is_autocast_enabled(device)
        return grad

    loss.register_hook(grad_hook)
    with amp.scale_loss(loss, opt) as scaled:
        assert not torch.is_autocast_enabled(device)
        scaled.backward()
    assert torch.is_autocast_enabled(device)  # back on after the block
    opt.step()
    assert seen == {"backward": False, "step": False}
    assert torch.is_autocast_enabled(device)


def test_disable_casts_block(device):
    model = make_mlp(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    a = torch.randn(4, 4, device=device)
    with amp.disable_casts():
        assert torch.mm(a, a).dtype == torch.float32
        assert model(torch.randn(2, 8, device=device)).dtype == torch.float32
    assert torch.mm(a, a).dtype == torch.float16


def test_disable_casts_without_o1_raises_attribute_error():
    model = make_mlp()
    amp.initialize(model, opt_level="O2", verbosity=0)
    with pytest.raises(AttributeError, match="handle"):
        with amp.disable_casts():
            pass


def test_not_leaking_into_other_threads(device):
    model = make_mlp(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    seen = {}

    def worker():
        a = torch.randn(4, 4, device=device)
        seen["mm"] = torch.mm(a, a).dtype
        seen["model"] = model(torch.randn(2, 8, device=device)).dtype

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["mm"] == torch.float32  # a thread the user started elsewhere is not under O1
    assert seen["model"] == torch.float16  # but the model itself keeps O1 wherever it is called


def test_registered_functions_cast_and_run_with_autocast_off(device):
    class Ops:
        @staticmethod
        def probe(a, b):
            return a.dtype, b.dtype, torch.is_autocast_enabled(device), torch.mm(a, a).dtype

    ops = Ops()
    amp.register_float_function(ops, "probe")
    amp.register_half_function(torch, "bilinear")  # registry accepts torch functions too
    model = make_mlp(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    a = torch.randn(3, 3, device=device, dtype=torch.float16)
    assert ops.probe(a, [a, a][0]) == (torch.float32, torch.float32, False, torch.float32)
    with amp.disable_casts():
        assert ops.probe(a, a)[0] == torch.float16  # pass-through when casts are disabled
    ampcompat.reset()
    assert ops.probe(a, a)[:3] == (torch.float16, torch.float16, False)  # original restored
    assert torch.bilinear.__module__ != "ampcompat.amp.o1_autocast"


def test_register_errors():
    with pytest.raises(ValueError) as err:
        amp.register_half_function(torch, "no_such_fn")
    assert str(err.value) == "No function named no_such_fn in module {}.".format(torch)

    class Unhashable:
        __hash__ = None
        fn = staticmethod(lambda: None)

    with pytest.raises(TypeError, match="unhashable"):
        amp.register_float_function(Unhashable(), "fn")


def test_promote_and_decorators(device):
    @amp.promote_function
    def widest(a, b):
        return a.dtype, b.dtype

    @amp.half_function
    def halves(a):
        return a.dtype

    a16 = torch.randn(2, device=device, dtype=torch.float16)
    a32 = torch.randn(2, device=device)
    assert widest(a16, a32) == (torch.float16, torch.float32)  # inactive: pass-through
    assert halves(a32) == torch.float32
    amp.initialize(make_mlp(device), opt_level="O1", verbosity=0)
    assert widest(a16, a32) == (torch.float32, torch.float32)
    assert halves(a32) == torch.float16


def test_old_init_handle():
    handle = amp.init(enabled=True)
    assert handle is amp._amp_state.handle and handle.is_active()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(4, 4, device=device)
    assert torch.mm(a, a).dtype == torch.float16
    with pytest.raises(RuntimeError, match="The old Amp API is no longer supported."):
        handle.scale_loss(torch.ones(()), None)
    handle._deactivate()
    assert torch.mm(a, a).dtype == torch.float32
    noop = amp.init(enabled=False)
    assert not noop.is_active()


def test_old_wrap_optimizer_skips_on_overflow(capsys):
    handle = amp.init()
    model = torch.nn.Linear(4, 1)
    opt = handle.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    loss = model(torch.randn(2, 4)).sum() * float("inf")
    with opt.scale_loss(loss) as scaled:
        scaled.backward()
    opt.step()
    assert "Gradient overflow, skipping update" in capsys.readouterr().out
    assert torch.equal(model.weight, before)
    for _ in range(3):  # a sum loss's grad of 2**16 overflows fp16 at first, as in Apex: scale backs off
        opt.zero_grad()
        loss = model(torch.randn(2, 4)).sum()
        with opt.scale_loss(loss) as scaled:
            scaled.backward()
        opt.step()
    assert not torch.equal(model.weight, before)


def test_data_parallel_replicas_keep_o1_on_cpu_fallback(device):
    # DataParallel on a machine without several GPUs runs the module directly; the hooks still apply.
    model = make_mlp(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    dp = torch.nn.DataParallel(model)
    out = dp(torch.randn(4, 8, device=device))
    assert out.dtype == torch.float16


def test_model_in_worker_thread_trains(device):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level="O1", verbosity=0)
    result = {}

    def train():
        for x, y in batches(3, device):
            loss = F.cross_entropy(model(x), y)
            with amp.scale_loss(loss, opt) as scaled:
                scaled.backward()
            opt.step()
            opt.zero_grad()
        result["loss"] = float(loss.detach())
        result["dtype"] = model(batches(1, device)[0][0]).dtype

    t = threading.Thread(target=train)
    t.start()
    t.join()
    assert result["dtype"] == torch.float16 and result["loss"] == result["loss"]
