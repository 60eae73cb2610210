"""O2/O3/O5 master weights and loss scaling.

The O2 runs are checked against a hand-written reference of Apex's algorithm: a half model, FP32 master
copies, loss x scale, ``master.grad = model.grad.float() / scale``, an inf/NaN check that skips the step
and halves the scale, the optimizer on the masters, masters copied back into the model. The reference
performs the same floating-point operations as ampcompat (division by a power of two equals
multiplication by its exact reciprocal), so results are compared bitwise unless a test says otherwise.

Every test here runs the unfused O2 pipeline (FP32 master gradients, the optimizer's own step, the copy
back), the fused O2 step switched off: on CUDA it would otherwise take over, matching these references
within FP32 rounding rather than bitwise (its twins are in test_o2_fused_step.py).
"""
import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ampcompat import _torch_compat, amp
from ampcompat.amp import fused_o2

from _sampling import each_value

INIT_SCALE = 2.0 ** 16
OVERFLOW_MESSAGE = "Gradient overflow.  Skipping step, loss scaler {} reducing loss scale to {}"
CLOSURE_MESSAGE = "Currently, Amp does not support closure use with optimizers."
SPIKE = 300.0  # targets this large overflow FP16 gradients at the initial loss scale
SMALL_LOSS = 0.125  # loss weight keeping two accumulated scaled backward passes inside FP16's range


@pytest.fixture(autouse=True)
def _unfused_o2_step():
    fused_o2.set_enabled(False)
    yield
    fused_o2.set_enabled(None)


# --- models, data, runs -----------------------------------------------------------------------------

def make_net(device, depth=2, seed=0):
    """Linear -> BatchNorm (FP32 under O2) -> ReLU -> (depth - 2) x [Linear, Tanh] -> Linear."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(16, 3))
    return torch.nn.Sequential(*layers).to(device)


def batch(step, device, spike=1.0):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g) * spike
    return x.to(device), y.to(device)


def amp_model_and_optimizer(device, make_optimizer, opt_level="O2", depth=2, verbosity=0, **kwargs):
    model = make_net(device, depth)
    optimizer = make_optimizer(model.parameters())
    return amp.initialize(model, optimizer, opt_level=opt_level, verbosity=verbosity, **kwargs)


def amp_train_step(model, optimizer, x, y):
    loss = F.mse_loss(model(x), y)
    with amp.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
    optimizer.step()
    optimizer.zero_grad()


def scale_of(loss_id=0):
    return amp._amp_state.loss_scalers[loss_id].loss_scale()


class ReferenceO2:
    """Apex's O2 algorithm written out by hand on plain PyTorch (the twin of every O2 run here)."""

    def __init__(self, fp32_model, make_optimizer, half=torch.float16, loss_weight=1.0, scale=INIT_SCALE):
        self.half = half
        self.loss_weight = loss_weight
        self.model = fp32_model
        for module in fp32_model.modules():
            if isinstance(module, _BatchNorm) and module.affine:
                continue  # keep_batchnorm_fp32
            for p in module.parameters(recurse=False):
                p.data = p.data.to(half)
            for b in module.buffers(recurse=False):
                if b.is_floating_point():
                    b.data = b.data.to(half)
        self.params = list(fp32_model.parameters())
        self.masters = [p.detach().float().clone().requires_grad_(True) if p.dtype == half else p
                        for p in self.params]
        self.optimizer = make_optimizer(self.masters)
        self.scale = scale
        self.scales = []

    def loss(self, x, y):
        return F.mse_loss(self.model(x.to(self.half)).float(), y) * self.loss_weight

    def clear_grads(self):
        for p in self.params + self.masters:
            p.grad = None

    def scaled_grads(self, loss):
        """Gradients of ``loss x scale`` in the model's dtypes (autograd.grad: no ``.grad`` side effects)."""
        return list(torch.autograd.grad(loss.float() * self.scale, self.params))

    def unscale(self, grads):
        return [g.float() / self.scale for g in grads]

    def backward(self, loss):
        """One scaled backward; returns the unscaled FP32 gradients."""
        return self.unscale(self.scaled_grads(loss))

    def accumulate(self, grads):
        for master, g in zip(self.masters, grads):
            master.grad = g if master.grad is None else master.grad + g

    def finite(self, grads):
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def step(self):
        self.optimizer.step()
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                if p is not master:
                    p.copy_(master)
        self.clear_grads()

    def train_step(self, x, y):
        self.clear_grads()
        grads = self.backward(self.loss(x, y))
        if not self.finite(grads):
            self.scale /= 2.0
            self.scales.append(self.scale)
            self.clear_grads()
            return False
        self.accumulate(grads)
        self.scales.append(self.scale)
        self.step()
        return True


def assert_bitwise(actual, expected, what):
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a, e), "{} #{} differs".format(what, i)


def snapshot_optimizer_state(optimizer):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in optimizer.state.items()}


def assert_optimizer_state_equal(optimizer, snapshot):
    assert {id(p) for p in optimizer.state} == set(snapshot)
    for p, state in optimizer.state.items():
        before = snapshot[id(p)]
        assert set(state) == set(before)
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(value, before[key]), key
            else:
                assert value == before[key], key


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
}


# --- 2. twin run against the hand-written reference --------------------------------------------------

@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_o2_twenty_steps_equal_the_hand_written_reference(optimizer_name, device):
    make_optimizer = OPTIMIZERS[optimizer_name]
    model, optimizer = amp_model_and_optimizer(device, make_optimizer)
    reference = ReferenceO2(make_net(device), make_optimizer)
    amp_scales = []

    for step in range(20):
        x, y = batch(step, device, spike=SPIKE if step in (0, 13) else 1.0)
        amp_train_step(model, optimizer, x, y)
        amp_scales.append(scale_of())
        reference.train_step(x, y)

    # Both overflow paths (steps 0 and 13) really ran: the scale halved twice, in both runs.
    assert amp_scales == reference.scales
    assert amp_scales[0] == INIT_SCALE / 2 and amp_scales[-1] == INIT_SCALE / 4
    # Identical operations on identical values: masters, model weights and optimizer state are bitwise equal.
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")
    assert_bitwise(model.parameters(), reference.params, "model param")
    assert_bitwise(model.buffers(), reference.model.buffers(), "buffer")
    for amp_master, ref_master in zip(amp.master_params(optimizer), reference.masters):
        amp_state, ref_state = optimizer.state[amp_master], reference.optimizer.state[ref_master]
        assert set(amp_state) == set(ref_state)
        for key in amp_state:
            assert torch.equal(amp_state[key], ref_state[key]), key


def make_wide_net(device, seed=0):
    """A net with one weight of 2**20 elements (multi-tensor kernels split such tensors into many chunks)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                               torch.nn.Tanh(), torch.nn.Linear(1024, 3)).to(device)


@pytest.mark.parametrize("optimizer_name, value", each_value(  # a 2**20-element weight: each value once by default
    [pytest.param(name, value, id=f"{name}-{value}") for name in ("sgd_momentum", "adamw_fused")
     for value in (float("inf"), float("nan"))], axes=lambda name, value: (name, str(value))))
def test_o2_with_a_large_weight_equals_the_reference_and_skips_its_overflow(optimizer_name, value, device):
    """Same bits as the reference with a large weight, and an inf/NaN that only one element of the large
    weight's gradient holds still skips the step."""
    make_optimizer = OPTIMIZERS[optimizer_name]
    model = make_wide_net(device)
    optimizer = make_optimizer(model.parameters())
    # A modest scale, so the wide net's gradients overflow only where the hook puts inf/NaN.
    model, optimizer = amp.initialize(model, optimizer, opt_level="O2", verbosity=0, max_loss_scale=128.0)
    reference = ReferenceO2(make_wide_net(device), make_optimizer, scale=128.0)
    armed = {"on": False}
    for m in (model[2], reference.model[2]):
        m.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([5], device=g.device), value)
                               if armed["on"] else g)
    amp_scales = []
    for step in range(8):
        armed["on"] = step == 4
        x, y = batch(step, device)
        amp_train_step(model, optimizer, x, y)
        amp_scales.append(scale_of())
        reference.train_step(x, y)
    assert amp_scales == reference.scales
    assert amp_scales == [128.0] * 4 + [64.0] * 4
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")
    assert_bitwise(model.parameters(), reference.params, "model param")


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw_foreach"])
def test_o5_twenty_steps_equal_the_hand_written_bf16_reference(optimizer_name, device):
    """O5: bf16 model, FP32 masters, static loss scale 1.0 (nothing to unscale, nothing skipped)."""
    make_optimizer = OPTIMIZERS[optimizer_name]
    model, optimizer = amp_model_and_optimizer(device, make_optimizer, opt_level="O5")
    reference = ReferenceO2(make_net(device), make_optimizer, half=torch.bfloat16, scale=1.0)

    for step in range(20):
        x, y = batch(step, device)
        amp_train_step(model, optimizer, x, y)
        reference.train_step(x, y)

    assert scale_of() == 1.0 and reference.scales == [1.0] * 20
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")
    assert_bitwise(model.parameters(), reference.params, "model param")


# --- 3. fault injection: a skipped step leaves everything untouched ----------------------------------

def _inject_into(param, value, armed):
    """Replace ``param``'s gradient by ``value`` while ``armed[0]`` is set."""
    param.register_hook(lambda g: torch.full_like(g, value) if armed[0] else g)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw_foreach"])
def test_overflow_skips_the_step_and_leaves_everything_untouched(optimizer_name, value, device, capsys):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS[optimizer_name], verbosity=1)
    reference = ReferenceO2(make_net(device), OPTIMIZERS[optimizer_name])
    armed = [False]
    _inject_into(model[3].weight, value, armed)
    for step in range(3):
        amp_train_step(model, optimizer, *batch(step, device))
        reference.train_step(*batch(step, device))
    assert scale_of() == INIT_SCALE  # precondition: the clean steps did not overflow
    capsys.readouterr()
    masters = [m.detach().clone() for m in amp.master_params(optimizer)]
    weights = [p.detach().clone() for p in model.parameters()]
    state = snapshot_optimizer_state(optimizer)

    x, y = batch(3, device)
    armed[0] = True
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()
    armed[0] = False
    assert optimizer._amp_stash.already_patched and capsys.readouterr().out == ""  # announced by step()
    optimizer.step()

    assert capsys.readouterr().out == OVERFLOW_MESSAGE.format(0, 32768.0) + "\n"
    assert scale_of() == 32768.0
    assert_bitwise(amp.master_params(optimizer), masters, "master")
    assert_bitwise(model.parameters(), weights, "model param")
    assert_optimizer_state_equal(optimizer, state)
    assert not optimizer._amp_stash.already_patched
    assert all(m.grad is None for m in optimizer._amp_stash.all_fp32_from_fp16_params)

    # The next step proceeds as if the overflowing batch had never been seen.
    optimizer.zero_grad()
    x, y = batch(4, device)
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()
    optimizer.step()
    reference.scale /= 2.0
    reference.train_step(x, y)

    assert capsys.readouterr().out == ""
    assert scale_of() == 32768.0
    assert all(not torch.equal(a, b) for a, b in zip(amp.master_params(optimizer), masters))
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")
    assert_bitwise(model.parameters(), reference.params, "model param")


def test_overflow_message_names_the_loss_scaler_of_the_overflowing_loss(device, capsys):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"], num_losses=2, verbosity=1)
    armed = [False]
    _inject_into(model[3].weight, float("inf"), armed)
    x, y = batch(0, device)
    weights = [p.detach().clone() for p in model.parameters()]

    with amp.scale_loss(F.mse_loss(model(x), y), optimizer, loss_id=0) as scaled:
        scaled.backward()
    armed[0] = True
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer, loss_id=1) as scaled:
        scaled.backward()
    armed[0] = False
    capsys.readouterr()
    optimizer.step()

    assert capsys.readouterr().out == OVERFLOW_MESSAGE.format(1, 32768.0) + "\n"
    assert scale_of(0) == INIT_SCALE and scale_of(1) == 32768.0
    assert_bitwise(model.parameters(), weights, "model param")


# --- 6. master-weight mechanics ---------------------------------------------------------------------

def _two_group_optimizer(model):
    """Group 0: first Linear + BatchNorm (mixed half/FP32 under O2); group 1: last Linear."""
    return torch.optim.SGD([
        {"params": list(model[0].parameters()) + list(model[1].parameters())},
        {"params": list(model[3].parameters()), "lr": 0.01},
    ], lr=0.05, momentum=0.9)


def test_param_groups_hold_fp32_masters_after_the_first_scale_loss(device):
    model = make_net(device)
    optimizer = _two_group_optimizer(model)
    amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    linear0, bn, linear3 = model[0], model[1], model[3]
    # Before lazy init amp.master_params() yields the model's own params, as Apex's did.
    assert [id(p) for p in amp.master_params(optimizer)] == [
        id(p) for p in (linear0.weight, linear0.bias, bn.weight, bn.bias, linear3.weight, linear3.bias)]

    x, y = batch(0, device)
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()

    group0, group1 = (g["params"] for g in optimizer.param_groups)
    half_params = [linear0.weight, linear0.bias, linear3.weight, linear3.bias]
    masters = [group0[0], group0[1], group1[0], group1[1]]
    for master, half in zip(masters, half_params):
        assert master is not half and not isinstance(master, torch.nn.Parameter)
        assert master.dtype == torch.float32 and half.dtype == torch.float16
        assert master.requires_grad and master.is_leaf
        assert torch.equal(master, half.float())
        assert master.grad is not None and master.grad.dtype == torch.float32
    assert group0[2] is bn.weight and group0[3] is bn.bias  # FP32 batchnorm params stay the originals
    assert [id(p) for p in amp.master_params(optimizer)] == [id(p) for p in group0 + group1]
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.01]


def test_amp_stash_has_apexs_attributes(device):
    model = make_net(device)
    optimizer = _two_group_optimizer(model)
    amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    stash = optimizer._amp_stash
    assert (stash.lazy_init_called, stash.already_patched, stash.params_have_scaled_gradients) == (
        False, False, False)

    x, y = batch(0, device)
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()

    for name in ("all_fp16_grad_stash", "all_fp16_params", "all_fp32_from_fp16_params",
                 "all_fp32_from_fp32_grad_stash", "all_fp32_from_fp32_params", "already_patched",
                 "fp16_groups", "fp32_from_fp16_groups", "fp32_from_fp32_groups", "lazy_init_called",
                 "params_have_scaled_gradients"):
        assert hasattr(stash, name), name
    for name in ("_lazy_init_maybe_master_weights", "_master_params_to_model_params", "_prepare_amp_backward",
                 "_post_amp_backward", "_amp_lazy_init"):
        assert callable(getattr(optimizer, name)), name
    assert stash.lazy_init_called is True and stash.already_patched is False
    assert stash.params_have_scaled_gradients is False
    ids = lambda tensors: [id(t) for t in tensors]  # noqa: E731
    assert [ids(g) for g in stash.fp16_groups] == [ids([model[0].weight, model[0].bias]),
                                                   ids([model[3].weight, model[3].bias])]
    group0, group1 = (g["params"] for g in optimizer.param_groups)
    assert [ids(g) for g in stash.fp32_from_fp16_groups] == [ids(group0[:2]), ids(group1)]
    assert [ids(g) for g in stash.fp32_from_fp32_groups] == [ids([model[1].weight, model[1].bias]), []]
    assert ids(stash.all_fp16_params) == ids(p for g in stash.fp16_groups for p in g)
    assert ids(stash.all_fp32_from_fp16_params) == ids(p for g in stash.fp32_from_fp16_groups for p in g)
    assert ids(stash.all_fp32_from_fp32_params) == ids(p for g in stash.fp32_from_fp32_groups for p in g)
    assert len(stash.all_fp16_grad_stash) == 4 and len(stash.all_fp32_from_fp32_grad_stash) == 2


def _populate_grads(model, optimizer, device):
    x, y = batch(0, device)
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()
    stash = optimizer._amp_stash
    model_grads = [p.grad for p in stash.all_fp16_params + stash.all_fp32_from_fp32_params]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in model_grads)
    assert all(m.grad is not None for m in stash.all_fp32_from_fp16_params)
    return model_grads


def test_zero_grad_keep_tensors_zeroes_model_grads_in_place_and_drops_master_grads(device):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    model_grads = _populate_grads(model, optimizer, device)
    stash = optimizer._amp_stash

    optimizer.zero_grad(set_to_none=False)

    for p, before in zip(stash.all_fp16_params + stash.all_fp32_from_fp32_params, model_grads):
        assert p.grad is before and not bool(p.grad.any())
    assert all(m.grad is None for m in stash.all_fp32_from_fp16_params)


def test_zero_grad_default_clears_every_gradient(device):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    _populate_grads(model, optimizer, device)
    stash = optimizer._amp_stash

    optimizer.zero_grad()

    for p in stash.all_fp16_params + stash.all_fp32_from_fp32_params:
        assert p.grad is None or not bool(p.grad.any())
    assert all(m.grad is None for m in stash.all_fp32_from_fp16_params)
    # Nothing stale reaches the next step: it equals a fresh reference step.
    reference = ReferenceO2(make_net(device), OPTIMIZERS["sgd_momentum"])
    reference.clear_grads()
    x, y = batch(1, device)
    amp_train_step(model, optimizer, x, y)
    reference.train_step(x, y)
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")


def test_add_param_group_with_a_new_half_linear_adds_fp32_masters_that_train(device):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    head = torch.nn.Linear(3, 2).to(device).half()
    head_before = [p.detach().clone() for p in head.parameters()]

    optimizer.add_param_group({"params": head.parameters(), "lr": 0.1})

    new_group = optimizer.param_groups[-1]
    assert len(new_group["params"]) == 2 and new_group["lr"] == 0.1
    for master, p in zip(new_group["params"], head.parameters()):
        assert master is not p and master.dtype == torch.float32 and torch.equal(master, p.float())
    assert [id(p) for p in optimizer._amp_stash.all_fp16_params[-2:]] == [id(p) for p in head.parameters()]

    for step in range(3):
        x, y = batch(step, device)
        loss = F.mse_loss(head(model(x).half()).float(), y[:, :2])
        with amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()
        optimizer.step()
        optimizer.zero_grad()

    for master, p, before in zip(new_group["params"], head.parameters(), head_before):
        assert not torch.equal(p, before)
        assert p.dtype == torch.float16 and torch.equal(p, master.half())
        assert "momentum_buffer" in optimizer.state[master]




@pytest.mark.parametrize("opt_level", [
    "O2",
    "O3",
])
def test_add_param_group_rejects_a_param_already_in_the_optimizer(opt_level, device):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"], opt_level=opt_level)
    optimizer.zero_grad()
    optimizer._amp_lazy_init()  # the masters (O2) or the half/FP32 lists (O3) exist
    groups_before = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    stash_before = {name: len(value) for name, value in vars(optimizer._amp_stash).items()
                    if isinstance(value, list)}

    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        optimizer.add_param_group({"params": list(model[0].parameters())})

    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == groups_before
    assert {name: len(value) for name, value in vars(optimizer._amp_stash).items()
            if isinstance(value, list)} == stash_before


def test_step_with_a_closure_raises_apexs_error(device):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    x, y = batch(0, device)
    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()
    weights = [p.detach().clone() for p in model.parameters()]

    with pytest.raises(RuntimeError) as error:
        optimizer.step(lambda: F.mse_loss(model(x), y))

    assert str(error.value) == CLOSURE_MESSAGE
    assert_bitwise(model.parameters(), weights, "model param")


@pytest.mark.parametrize("created", ["before_initialize", "after_initialize"])
def test_step_lr_scheduler_drives_the_masters_learning_rate_without_warnings(created, device):
    model = make_net(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = None
    if created == "before_initialize":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    if created == "after_initialize":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = batch(step, device)
            with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
                scaled.backward()
            masters = list(amp.master_params(optimizer))
            before = [m.detach().clone() for m in masters]
            grads = [m.grad.clone() for m in masters]
            lr = optimizer.param_groups[0]["lr"]
            assert lr == 0.1 * 0.5 ** step
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            # Plain SGD on the masters at the scheduled LR.
            for master, b, g in zip(masters, before, grads):
                assert torch.equal(master, b.add(g, alpha=-lr))

    assert [str(w.message) for w in caught] == []
    assert optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    assert all(m.dtype == torch.float32 for m in optimizer.param_groups[0]["params"])


def _accumulated_reference(device, steps_of_losses, delay_first=False):
    """Reference O2 with several backward passes per step (separately unscaled, or delayed)."""
    reference = ReferenceO2(make_net(device), OPTIMIZERS["sgd_momentum"], loss_weight=SMALL_LOSS)
    for step_batches in steps_of_losses:
        reference.clear_grads()
        if delay_first:
            # Half grads accumulate scaled across both backward passes (in the model's dtype); unscaled once.
            raw = [reference.scaled_grads(reference.loss(x, y)) for x, y in step_batches]
            reference.accumulate(reference.unscale([a + b for a, b in zip(*raw)]))
        else:
            for x, y in step_batches:
                reference.accumulate(reference.backward(reference.loss(x, y)))
        reference.step()
    return reference


def _amp_accumulated(device, steps_of_losses, delay_first=False):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    for step_batches in steps_of_losses:
        for i, (x, y) in enumerate(step_batches):
            loss = F.mse_loss(model(x), y) * SMALL_LOSS
            with amp.scale_loss(loss, optimizer, delay_unscale=delay_first and i == 0) as s:
                s.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _amp_summed_loss(device, steps_of_losses):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    for step_batches in steps_of_losses:
        loss = sum(F.mse_loss(model(x), y) * SMALL_LOSS for x, y in step_batches)
        with amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("delay_first", [False, True], ids=["two_scale_loss", "delay_unscale_first"])
def test_accumulating_two_backward_passes_before_one_step(delay_first, device):
    steps = [[batch(2 * s, device), batch(2 * s + 1, device)] for s in range(3)]

    model, optimizer = _amp_accumulated(device, steps, delay_first)
    reference = _accumulated_reference(device, steps, delay_first)
    assert scale_of() == INIT_SCALE and not optimizer._amp_stash.already_patched
    # The second pass of a step accumulates onto the first's master gradients: the general path. A pass
    # after delay_unscale has nothing to add to: the fast path.
    assert optimizer._amp_stash.unscale_paths == ({"fast": 3, "general": 0} if delay_first else
                                                  {"fast": 3, "general": 3})

    # Same operations as Apex's accumulation (stash-and-add, or one delayed unscale): bitwise.
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")
    assert_bitwise(model.parameters(), reference.params, "model param")
    # And the same training as one backward pass on the summed loss, up to FP16 gradient rounding.
    accumulated_masters = [m.detach().clone() for m in amp.master_params(optimizer)]
    import ampcompat

    ampcompat.reset()
    _, summed_optimizer = _amp_summed_loss(device, steps)
    assert scale_of() == INIT_SCALE
    for a, b in zip(accumulated_masters, amp.master_params(summed_optimizer)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_clipping_master_grads_right_after_the_block_clips_unscaled_grads(device):
    max_norm = 0.05
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    reference = ReferenceO2(make_net(device), OPTIMIZERS["sgd_momentum"])

    for step in range(3):
        x, y = batch(step, device)
        with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
            scaled.backward()
        total = torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), max_norm)
        optimizer.step()
        optimizer.zero_grad()

        reference.clear_grads()
        reference.accumulate(reference.backward(reference.loss(x, y)))
        expected_total = torch.nn.utils.clip_grad_norm_(reference.masters, max_norm)
        reference.step()

        assert total > max_norm  # clipping really happened (an unclipped run would differ)
        assert torch.equal(total, expected_total)
    assert_bitwise(amp.master_params(optimizer), reference.masters, "master")


# --- 7. O3: no masters ------------------------------------------------------------------------------

def _half_twin(device):
    """A plain half model with the same initial weights as ``make_net`` (O3's cast)."""
    return make_net(device).half()


def test_o3_default_short_circuits_without_scaling_or_unscaling(device, monkeypatch):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"], opt_level="O3")
    twin = _half_twin(device)
    calls = _count_calls(monkeypatch, ["amp_foreach_non_finite_check_and_unscale_"])
    items = _count_items(monkeypatch)
    x, y = batch(0, device)

    loss = F.mse_loss(model(x), y)
    with amp.scale_loss(loss, optimizer) as scaled:
        assert scaled is loss  # loss.float() of an FP32 loss
        scaled.backward()
    F.mse_loss(twin(x.half()).float(), y).backward()

    assert calls["amp_foreach_non_finite_check_and_unscale_"] == 0 and items[0] == 0
    assert_bitwise((p.grad for p in model.parameters()), (p.grad for p in twin.parameters()), "grad")
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.parameters())


def test_o3_default_never_skips_even_on_inf(device, capsys):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"], opt_level="O3", verbosity=1)
    armed = [True]
    _inject_into(model[3].weight, float("inf"), armed)
    capsys.readouterr()

    amp_train_step(model, optimizer, *batch(0, device))

    assert capsys.readouterr().out == ""
    assert scale_of() == 1.0
    assert not torch.isfinite(model[3].weight).all()  # Apex's static 1.0 steps with what it got


def test_o3_dynamic_unscales_half_grads_and_skips_on_overflow(device, capsys):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"], opt_level="O3",
                                               loss_scale="dynamic", verbosity=1)
    twin = _half_twin(device)
    x, y = batch(0, device)
    capsys.readouterr()

    with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
        scaled.backward()
    (F.mse_loss(twin(x.half()).float(), y) * INIT_SCALE).backward()

    for p, t in zip(model.parameters(), twin.parameters()):
        assert p.grad.dtype == torch.float16
        assert torch.equal(p.grad, (t.grad.float() * (1.0 / INIT_SCALE)).half())
    optimizer.step()
    optimizer.zero_grad()
    assert capsys.readouterr().out == ""

    armed = [True]
    _inject_into(model[3].weight, float("inf"), armed)
    weights = [p.detach().clone() for p in model.parameters()]
    state = snapshot_optimizer_state(optimizer)
    amp_train_step(model, optimizer, *batch(1, device))

    assert capsys.readouterr().out == OVERFLOW_MESSAGE.format(0, 32768.0) + "\n"
    assert_bitwise(model.parameters(), weights, "model param")
    assert_optimizer_state_equal(optimizer, state)


# --- 8. the multi-tensor promise ---------------------------------------------------------------------

_COUNTED = ["amp_foreach_non_finite_check_and_unscale_"] + sorted(
    name for name in dir(_torch_compat) if name.startswith("foreach_"))
_ALLOCATIONS = {"empty_like", "empty", "empty_strided", "full"}


def _count_calls(monkeypatch, names):
    counts = collections.Counter({name: 0 for name in names})

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in names:
        monkeypatch.setattr(_torch_compat, name, counting(name, getattr(_torch_compat, name)))
    return counts


def _count_items(monkeypatch):
    """Host reads of tensor values (``item`` and ``tolist``): each is a sync on a GPU."""
    count = [0]

    def counting(original):
        def read(self):
            count[0] += 1
            return original(self)
        return read

    monkeypatch.setattr(torch.Tensor, "item", counting(torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting(torch.Tensor.tolist))
    return count


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every ATen op that reaches a kernel (host reads included, as ``_local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _measure_one_step(device, depth, monkeypatch):
    """Counts for the third O2 step (lazy init and the first-scale setup are behind it)."""
    import ampcompat

    ampcompat.reset()
    make_optimizer = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=False)  # noqa: E731
    model, optimizer = amp_model_and_optimizer(device, make_optimizer, depth=depth)
    for step in range(2):
        amp_train_step(model, optimizer, *batch(step, device))
    x, y = batch(2, device)
    loss = F.mse_loss(model(x), y)
    context = amp.scale_loss(loss, optimizer)  # entered by hand, as Lightning did, to time the exit alone
    context.__enter__().backward()

    with monkeypatch.context() as patch:
        exit_calls = _count_calls(patch, _COUNTED)
        exit_items = _count_items(patch)
        with _AtenOps() as exit_ops:
            context.__exit__(None, None, None)
    with monkeypatch.context() as patch:
        step_calls = _count_calls(patch, _COUNTED)  # single-tensor SGD: only amp's own copy is foreach
        optimizer.step()
    with _AtenOps() as copy_ops:
        optimizer._master_params_to_model_params()
    assert scale_of() == INIT_SCALE and not optimizer._amp_stash.already_patched
    n_params = len(list(model.parameters()))
    kernels = {k: v for k, v in exit_ops.ops.items() if k not in _ALLOCATIONS}
    return n_params, +exit_calls, exit_items[0], kernels, +step_calls, dict(copy_ops.ops)


def test_gradient_work_is_a_constant_number_of_multi_tensor_calls(device, monkeypatch):
    small = _measure_one_step(device, 2, monkeypatch)
    large = _measure_one_step(device, 20, monkeypatch)
    n_small, exit_small, items_small, kernels_small, step_small, copy_small = small
    n_large, exit_large, items_large, kernels_large, step_large, copy_large = large
    assert n_large >= 5 * n_small

    # Gradient transfer + unscale + inf/NaN check: the same multi-tensor calls whatever the model size ...
    assert exit_small == exit_large
    assert exit_small["amp_foreach_non_finite_check_and_unscale_"] >= 1
    assert exit_small["foreach_copy_"] >= 1
    # ... and no per-parameter kernels besides (gradient buffers are allocated, nothing else).
    assert kernels_small == kernels_large
    assert sum(kernels_small.values()) <= 8
    # Exactly one host read per scale_loss exit (the flag and the new scale, read together).
    assert items_small == items_large == 1
    # Master -> model copy: one multi-tensor call per step.
    assert step_small == step_large == collections.Counter({"foreach_copy_": 1})
    assert copy_small == copy_large == {"_foreach_copy_": 1}


# --- the unscale path is chosen, not found: BatchNorm models and amp's zero_grad ---------------------

@pytest.mark.parametrize("set_to_none", [False, True], ids=["zero_grad_in_place", "zero_grad_to_none"])
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw_foreach"])
def test_bn_model_takes_the_fast_path_every_step_and_equals_the_hand_written_twin(optimizer_name, set_to_none,
                                                                                    device):
    """With BatchNorm (FP32 params under O2) and Apex's default zero_grad, which zeroes gradients in place,
    the FP32 gradients are known zeros at each scale_loss entry: every exit takes the fast path."""
    steps = 8
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS[optimizer_name])
    reference = ReferenceO2(make_net(device), OPTIMIZERS[optimizer_name])
    for step in range(steps):
        x, y = batch(step, device)
        optimizer.zero_grad(set_to_none=set_to_none)
        with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
            scaled.backward()
        optimizer.step()
        assert reference.train_step(x, y)
        assert_bitwise(amp.master_params(optimizer), reference.masters, "master after step %d" % step)
    assert_bitwise(model.parameters(), reference.params, "model param")
    assert optimizer._amp_stash.unscale_paths == {"fast": steps, "general": 0}
    assert any(isinstance(m, _BatchNorm) for m in model.modules())


def _bn_params(model):
    return [p for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)]


def test_gradients_written_after_zero_grad_are_not_taken_for_zeros(device):
    """A backward outside scale_loss after zero_grad writes into the zeroed FP32 gradients: they are put
    aside and added back (the general path), exactly as gradients zero_grad dropped and backward re-made."""
    runs = {}
    for set_to_none in (False, True):
        import ampcompat

        ampcompat.reset()
        model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
        x, y = batch(0, device)
        optimizer.zero_grad(set_to_none=set_to_none)
        F.mse_loss(model(x), y).backward()  # not scaled: these gradients must not be divided by the scale
        outside = [p.grad.clone() for p in _bn_params(model)]
        with amp.scale_loss(F.mse_loss(model(x), y), optimizer) as scaled:
            scaled.backward()
        assert optimizer._amp_stash.unscale_paths == {"fast": 0, "general": 1}
        runs[set_to_none] = [p.grad.clone() for p in _bn_params(model)]
        assert all(not torch.equal(g, o) for g, o in zip(runs[set_to_none], outside))
    assert_bitwise(runs[False], runs[True], "BatchNorm gradient")


def test_an_aborted_block_after_zero_grad_leaves_the_zeroed_gradients_zero(device):
    model, optimizer = amp_model_and_optimizer(device, OPTIMIZERS["sgd_momentum"])
    amp_train_step(model, optimizer, *batch(0, device))  # zero_grad in place: every grad is a zero tensor
    held = {id(p): p.grad for p in model.parameters()}
    with pytest.raises(ZeroDivisionError):
        with amp.scale_loss(F.mse_loss(model(batch(1, device)[0]), batch(1, device)[1]), optimizer) as scaled:
            scaled.backward()
            raise ZeroDivisionError
    for p in model.parameters():
        assert p.grad is held[id(p)] and not p.grad.any()  # the same tensors, zero again
    assert all(m.grad is None for m in optimizer._amp_stash.all_fp32_from_fp16_params)
    amp_train_step(model, optimizer, *batch(1, device))
    assert optimizer._amp_stash.unscale_paths == {"fast": 2, "general": 0}
