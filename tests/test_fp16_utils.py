"""``ampcompat.fp16_utils``: FP16_Optimizer, the fp16util helpers and the legacy loss scalers.

FP16_Optimizer is checked by twin runs against a hand-written FP16-model / FP32-master loop using
the same loss-scaling rules, by fault injection, and by state_dict round trips; the helpers by
their dtype tables, key prefixes and copy semantics; the legacy scalers by their closed-form
scale sequences.
"""
import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn as nn

import ampcompat.fp16_utils as fp16_utils
from ampcompat.fp16_utils import (
    BN_convert_float,
    DynamicLossScaler,
    FP16_Optimizer,
    FP16Model,
    LossScaler,
    convert_module,
    convert_network,
    master_params_to_model_params,
    model_grads_to_master_grads,
    network_to_half,
    prep_param_lists,
    to_python_float,
    tofp16,
)
from ampcompat.amp.scaler import LossScaler as AmpLossScaler

DEPRECATION_LINE = (
    "Warning:  FP16_Optimizer is deprecated and dangerous, and will be deleted soon.  "
    "If it still works, you're probably getting lucky.  "
    "For mixed precision, use the documented API https://nvidia.github.io/apex/amp.html, with opt_level=O1."
)
MAINTAINED_PATH_LINE = ("ampcompat: FP16_Optimizer keeps working; amp.initialize(model, optimizer, opt_level='O2') "
                        "gives the same FP32 master weights and is the maintained path.")
INF = float("inf")


# --- a small mixed model: an FP16 body and an FP32 head ------------------------------------------

class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.to(self.body.weight.dtype))).float())


def make_net(device, seed=0, half_dtype=torch.float16):
    torch.manual_seed(seed)
    net = MixedNet()
    net.body.to(half_dtype)
    return net.to(device)


def make_batches(device, steps=10):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(16, 6, generator=g).to(device), torch.randn(16, 3, generator=g).to(device))
            for _ in range(steps)]


def loss_fn(net, x, y):
    return (net(x) - y).pow(2).mean()


class InfInjector:
    """A grad hook on ``net.body.weight`` that writes inf into one element at chosen steps."""

    def __init__(self, net, steps, value=INF):
        self.steps, self.value, self.step = set(steps), value, 0
        net.body.weight.register_hook(self._hook)

    def _hook(self, grad):
        if self.step in self.steps:
            grad = grad.clone()
            grad[0, 0] = self.value
        return grad


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=1e-2)


class RefScaler:
    """Apex's amp LossScaler rules, written out: halve on overflow, double after `window` clean passes."""

    def __init__(self, dynamic, scale, window=2000, max_scale=2.0 ** 24):
        self.dynamic, self.window, self.max_scale = dynamic, window, max_scale
        self.scale = min(scale, max_scale) if dynamic else scale
        self.unskipped = 0

    def update(self, overflow):
        checks = self.dynamic or self.scale != 1.0
        if overflow and checks:
            self.unskipped = 0
            if self.dynamic:
                self.scale /= 2.0
            return True
        self.unskipped += 1
        if self.dynamic and self.unskipped == self.window:
            self.scale = min(self.max_scale, self.scale * 2.0)
            self.unskipped = 0
        return False


class ReferenceLoop:
    """FP16 body + FP32 head, FP32 masters for the body, a torch optimizer over [masters, head params]."""

    def __init__(self, net, kind, scaler):
        self.net, self.scaler = net, scaler
        self.half_params = list(net.body.parameters())
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.half_params]
        self.fp32_params = list(net.head.parameters())
        self.opt = make_optimizer(kind, self.masters + self.fp32_params)

    def step(self, x, y):
        for p in self.half_params + self.masters + self.fp32_params:
            p.grad = None
        loss = loss_fn(self.net, x, y)
        (loss.float() * self.scaler.scale).backward()
        inv = torch.tensor(1.0 / self.scaler.scale, dtype=torch.float32)
        grads = []
        for p, m in zip(self.half_params, self.masters):
            m.grad = p.grad.float() * inv.to(p.device)
            grads.append(m.grad)
        for p in self.fp32_params:
            p.grad.mul_(inv.to(p.device))
            grads.append(p.grad)
        overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
        if not self.scaler.update(overflow):
            self.opt.step()
            with torch.no_grad():
                for p, m in zip(self.half_params, self.masters):
                    p.copy_(m)


def fp16_optimizer_for(net, kind, dynamic, verbose=False, **kwargs):
    inner = make_optimizer(kind, net.parameters())
    if dynamic:
        return FP16_Optimizer(inner, dynamic_loss_scale=True, dynamic_loss_args=kwargs, verbose=verbose)
    return FP16_Optimizer(inner, static_loss_scale=kwargs.get("scale", 128.0), verbose=verbose)


def run_fp16_optimizer_step(net, opt, x, y):
    opt.zero_grad()
    loss = loss_fn(net, x, y)
    opt.backward(loss)
    opt.step()


def assert_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        assert torch.equal(a, e), (a, e)


def assert_optimizer_states_equal(opt_a, opt_b):
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name, value in state_a[key].items():
            other = state_b[key][name]
            if torch.is_tensor(value):
                assert torch.equal(value, other), name
            else:
                assert value == other, name


# --- FP16_Optimizer: twin runs ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_fp16_optimizer_matches_hand_written_master_loop(device, kind, dynamic):
    batches = make_batches(device)
    ref_net, net = make_net(device), make_net(device)
    args = dict(init_scale=2.0 ** 10, scale_window=3) if dynamic else dict(scale=128.0)
    ref = ReferenceLoop(ref_net, kind, RefScaler(dynamic, args.get("init_scale", args.get("scale")), window=3))
    opt = fp16_optimizer_for(net, kind, dynamic, **args)
    injected = [4] if dynamic else []
    ref_inject, inject = InfInjector(ref_net, injected), InfInjector(net, injected)

    scales = []
    for step, (x, y) in enumerate(batches):
        ref_inject.step = inject.step = step
        ref.step(x, y)
        run_fp16_optimizer_step(net, opt, x, y)
        assert opt.loss_scale == ref.scaler.scale
        assert opt.overflow == (step in injected)
        assert_bitwise(list(net.parameters()), list(ref_net.parameters()))
        assert_bitwise(opt.fp32_from_fp16_groups[0], ref.masters)
        scales.append(opt.loss_scale)
    assert_optimizer_states_equal(opt.optimizer, ref.opt)
    if dynamic:  # growth at passes 3 and 9 (clean windows of 3), halving at the injected pass 4
        base = 2.0 ** 10
        assert scales[2] == 2 * base and scales[4] == base and scales[7] == 2 * base and scales[9] == 2 * base
    # The model really trained: the body moved away from its initial weights.
    assert not torch.equal(net.body.weight, make_net(device).body.weight)


@pytest.mark.parametrize("flat", [False, True], ids=["per_param", "flat_master"])
def test_manual_master_loop_with_fp16util_matches_fp16_optimizer(device, flat):
    """The 'Real Examples' recipe (prep_param_lists + copies) equals FP16_Optimizer with a static scale."""
    batches = make_batches(device, steps=5)
    torch.manual_seed(0)
    manual_net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).half().to(device)
    wrapped_net = copy.deepcopy(manual_net)
    model_params, master_params = prep_param_lists(manual_net, flat_master=flat)
    manual_opt = torch.optim.SGD(master_params, lr=0.1)
    opt = FP16_Optimizer(torch.optim.SGD(wrapped_net.parameters(), lr=0.1), static_loss_scale=128.0, verbose=False)
    for x, y in batches:
        manual_net.zero_grad()
        loss = (manual_net(x.half()).float() - y).pow(2).mean()
        (loss * 128.0).backward()
        model_grads_to_master_grads(model_params, master_params, flat_master=flat)
        for m in master_params:
            m.grad.mul_(1.0 / 128.0)
        manual_opt.step()
        master_params_to_model_params(model_params, master_params, flat_master=flat)

        opt.zero_grad()
        opt.backward((wrapped_net(x.half()).float() - y).pow(2).mean())
        opt.step()
    assert_bitwise(list(manual_net.parameters()), list(wrapped_net.parameters()))


# --- FP16_Optimizer: overflow handling ----------------------------------------------------------

def _snapshot(net, opt):
    return ([p.detach().clone() for p in net.parameters()],
            [m.detach().clone() for m in opt.all_fp32_from_fp16_params],
            copy.deepcopy(opt.optimizer.state_dict()["state"]))


@pytest.mark.parametrize("bad", [INF, float("nan")], ids=["inf", "nan"])
def test_overflow_skips_step_and_halves_dynamic_scale(device, capsys, bad):
    batches = make_batches(device, steps=2)
    net = make_net(device)
    opt = fp16_optimizer_for(net, "sgd", dynamic=True)
    run_fp16_optimizer_step(net, opt, *batches[0])  # creates momentum state
    before = _snapshot(net, opt)
    scale = opt.loss_scale
    inject = InfInjector(net, [1], value=bad)
    inject.step = 1
    capsys.readouterr()

    opt.zero_grad()
    opt.backward(loss_fn(net, *batches[1]))
    assert opt.overflow is True
    assert opt.step() is None

    assert capsys.readouterr().out == "Gradient overflow.  Skipping step, reducing loss scale to {}\n".format(scale / 2)
    assert opt.loss_scale == scale / 2
    after = _snapshot(net, opt)
    assert_bitwise(after[0], before[0])
    assert_bitwise(after[1], before[1])
    for key, entry in before[2].items():
        assert torch.equal(entry["momentum_buffer"], after[2][key]["momentum_buffer"])
    assert opt.clip_master_grads(1.0) == -1


def test_static_scale_above_one_skips_without_changing_scale(capsys):
    """ampcompat's documented fix: a static scale != 1 still checks for inf/NaN and skips the step."""
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=False, scale=128.0)
    inject = InfInjector(net, [0])
    before = _snapshot(net, opt)
    capsys.readouterr()
    run_fp16_optimizer_step(net, opt, *make_batches("cpu", 1)[0])
    assert inject.step == 0 and opt.overflow is True
    assert capsys.readouterr().out == "Gradient overflow.  Skipping step, reducing loss scale to 128.0\n"
    assert opt.loss_scale == 128.0
    assert_bitwise([p.detach() for p in net.parameters()], before[0])


def test_static_scale_of_one_never_skips_as_apex():
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=False, scale=1.0)
    InfInjector(net, [0])
    run_fp16_optimizer_step(net, opt, *make_batches("cpu", 1)[0])
    assert opt.overflow is False
    assert not torch.isfinite(opt.all_fp32_from_fp16_params[0]).all()


def test_overflow_message_follows_amp_verbosity(capsys, monkeypatch):
    from ampcompat.amp import _amp_state

    monkeypatch.setattr(_amp_state, "verbosity", 0)
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=True)
    InfInjector(net, [0])
    capsys.readouterr()
    run_fp16_optimizer_step(net, opt, *make_batches("cpu", 1)[0])
    assert opt.overflow is True
    assert capsys.readouterr().out == ""


def test_dynamic_loss_args_reach_the_amp_loss_scaler():
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=True, init_scale=2.0 ** 30, scale_factor=4.0, scale_window=5,
                             min_loss_scale=8.0, max_loss_scale=2.0 ** 20)
    scaler = opt.loss_scaler
    assert isinstance(scaler, AmpLossScaler) and scaler.dynamic and opt.dynamic_loss_scale is True
    assert (scaler.loss_scale(), scaler._scale_factor, scaler._scale_seq_len, scaler._min_loss_scale,
            scaler._max_loss_scale) == (2.0 ** 20, 4.0, 5, 8.0, 2.0 ** 20)
    default = fp16_optimizer_for(make_net("cpu"), "sgd", dynamic=True).loss_scaler
    assert (default.loss_scale(), default._scale_seq_len, default._max_loss_scale) == (2.0 ** 16, 2000, 2.0 ** 24)
    static = fp16_optimizer_for(make_net("cpu"), "sgd", dynamic=False, scale=64.0)
    assert static.loss_scaler.dynamic is False and static.loss_scale == 64.0 and static.dynamic_loss_scale is False


# --- FP16_Optimizer: multiple losses, clipping, inspection, zero_grad --------------------------------

def test_multi_loss_pattern_equals_reference(device):
    x, y = make_batches(device, 1)[0]
    ref_net, net = make_net(device), make_net(device)
    opt = fp16_optimizer_for(net, "sgd", dynamic=True)
    scale = opt.loss_scale

    for n in (ref_net,):
        out = n(x)
        ((out - y).pow(2).mean().float() * scale).backward(retain_graph=True)
        (out.abs().mean().float() * scale).backward()
    expected = [p.grad.float() * (1.0 / scale) for p in ref_net.body.parameters()]
    expected_fp32 = [p.grad * (1.0 / scale) for p in ref_net.head.parameters()]

    out = net(x)
    opt.backward((out - y).pow(2).mean(), update_master_grads=False, retain_graph=True)
    opt.backward(out.abs().mean(), update_master_grads=False)
    opt.update_master_grads()
    assert_bitwise([m.grad for m in opt.all_fp32_from_fp16_params], expected)
    assert_bitwise([p.grad for p in opt.all_fp32_from_fp32_params], expected_fp32)


def test_update_master_grads_overwrites_master_grads():
    x, y = make_batches("cpu", 1)[0]
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=False, scale=4.0)
    opt.backward(loss_fn(net, x, y))
    first = [m.grad.clone() for m in opt.all_fp32_from_fp16_params]
    for p in net.body.parameters():
        p.grad.zero_()
    for p in net.head.parameters():
        p.grad = None
    opt.update_master_grads()
    assert all(torch.count_nonzero(m.grad) == 0 for m in opt.all_fp32_from_fp16_params)
    assert any(torch.count_nonzero(g) > 0 for g in first)


def test_clip_master_grads_equals_clip_grad_norm_on_masters(device):
    x, y = make_batches(device, 1)[0]
    net = make_net(device)
    opt = fp16_optimizer_for(net, "sgd", dynamic=False, scale=128.0)
    opt.backward(loss_fn(net, x, y) * 100)
    assert opt.overflow is False
    params = [p for g in opt.param_groups for p in g["params"]]
    clones = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(clones, params):
        c.grad = p.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(clones, 0.5)
    norm = opt.clip_master_grads(0.5)
    assert torch.equal(norm, expected_norm) and norm > 0.5
    assert_bitwise([p.grad for p in params], [c.grad for c in clones])
    norm_inf = opt.clip_master_grads(0.1, norm_type=INF)
    assert torch.equal(norm_inf, torch.nn.utils.clip_grad_norm_(clones, 0.1, norm_type=INF))


def test_inspect_master_grad_data(capsys):
    x, y = make_batches("cpu", 1)[0]
    net = make_net("cpu")
    net.extra = nn.Linear(2, 2)  # trainable but unused: no gradient
    opt = FP16_Optimizer(torch.optim.SGD([{"params": net.body.parameters()},
                                          {"params": list(net.head.parameters()) + list(net.extra.parameters())}],
                                         lr=0.1), dynamic_loss_scale=True, verbose=False)
    opt.backward(loss_fn(net, x, y))
    data = opt.inspect_master_grad_data()
    assert [len(g) for g in data] == [2, 4]
    assert_bitwise(data[0], [m.grad for m in opt.fp32_from_fp16_groups[0]])
    assert_bitwise(data[1][:2], [p.grad for p in net.head.parameters()])
    assert data[1][2:] == [None, None]
    opt.overflow = True
    capsys.readouterr()
    assert opt.inspect_master_grad_data() is None
    assert capsys.readouterr().out == (
        "Warning:  calling FP16_Optimizer.inspect_master_grad_data while in an overflow state.  "
        "Gradients are currently invalid (may be inf, nan, or stale).  Returning None.\n"
    )


def test_zero_grad_zeroes_or_drops_every_gradient():
    x, y = make_batches("cpu", 1)[0]
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=True)
    everything = lambda: list(net.parameters()) + opt.all_fp32_from_fp16_params  # noqa: E731

    opt.backward(loss_fn(net, x, y))
    opt.zero_grad()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in everything())
    opt.backward(loss_fn(net, x, y))
    opt.zero_grad(set_grads_to_None=True)
    assert all(p.grad is None for p in everything())
    opt.backward(loss_fn(net, x, y))
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in everything())


# --- FP16_Optimizer: closures ---------------------------------------------------------------------

def test_closure_reruns_after_overflow_and_matches_manual_sequence(capsys):
    x, y = make_batches("cpu", 1)[0]
    net, twin = make_net("cpu"), make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=True)
    twin_opt = fp16_optimizer_for(twin, "sgd", dynamic=True)
    inject, twin_inject = InfInjector(net, [0]), InfInjector(twin, [0])
    scale = opt.loss_scale
    calls = []

    def closure():
        inject.step = len(calls)
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        opt.backward(loss)
        return loss

    capsys.readouterr()
    loss = opt.step(closure)
    assert capsys.readouterr().out == "OVERFLOW within closure! Skipping step, reducing loss scale to {}\n".format(
        scale / 2)
    assert len(calls) == 2 and torch.is_tensor(loss)
    assert opt.first_closure_call_this_step is True and opt.loss_scale == scale / 2

    for step in (0, 1):  # the same two passes by hand: an overflowing one, then a clean one and the step
        twin_inject.step = step
        twin_opt.zero_grad()
        twin_opt.backward(loss_fn(twin, x, y))
    twin_opt.step()
    assert_bitwise(list(net.parameters()), list(twin.parameters()))
    assert_bitwise(opt.all_fp32_from_fp16_params, twin_opt.all_fp32_from_fp16_params)


def test_closure_refreshes_model_between_lbfgs_evaluations():
    x, y = make_batches("cpu", 1)[0]
    net = make_net("cpu")
    opt = FP16_Optimizer(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4), dynamic_loss_scale=True,
                         verbose=False)
    seen = []

    def closure():
        seen.append(all(torch.equal(p, m.half()) for p, m in zip(opt.all_fp16_params, opt.all_fp32_from_fp16_params)))
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        opt.backward(loss)
        return loss

    opt.step(closure)
    assert len(seen) > 1 and all(seen)
    assert all(torch.equal(p, m.half()) for p, m in zip(opt.all_fp16_params, opt.all_fp32_from_fp16_params))
    assert not torch.equal(net.body.weight, make_net("cpu").body.weight)


# --- FP16_Optimizer: construction ---------------------------------------------------------------

def test_construction_prints_apex_lines_and_puts_masters_in_param_groups(device, capsys):
    net = make_net(device)
    prefix = "torch.cuda." if device == "cuda" else "torch."
    inner = torch.optim.SGD([{"params": net.body.parameters()}, {"params": net.head.parameters()}], lr=0.1,
                            momentum=0.9)
    # A step before wrapping leaves FP16 momentum buffers that must move to the masters as FP32.
    loss_fn(net, *make_batches(device, 1)[0]).backward()
    inner.step()
    momentum = [inner.state[p]["momentum_buffer"].clone() for p in net.body.parameters()]
    capsys.readouterr()

    opt = FP16_Optimizer(inner)
    assert capsys.readouterr().out.splitlines() == [
        DEPRECATION_LINE,  # Apex's line, unchanged: logs and scripts look for it
        MAINTAINED_PATH_LINE,
        "FP16_Optimizer processing param group 0:",
        "FP16_Optimizer received {}HalfTensor with torch.Size([8, 6])".format(prefix),
        "FP16_Optimizer received {}HalfTensor with torch.Size([8])".format(prefix),
        "FP16_Optimizer processing param group 1:",
        "FP16_Optimizer received {}FloatTensor with torch.Size([3, 8])".format(prefix),
        "FP16_Optimizer received {}FloatTensor with torch.Size([3])".format(prefix),
    ]
    assert opt.optimizer is inner and opt.param_groups is inner.param_groups and opt.state is inner.state
    masters = opt.param_groups[0]["params"]
    assert masters == opt.fp32_from_fp16_groups[0] and opt.fp16_groups[0] == list(net.body.parameters())
    for master, param, buf in zip(masters, net.body.parameters(), momentum):
        assert master.dtype == torch.float32 and master.requires_grad and master.is_leaf
        assert torch.equal(master, param.float())
        assert inner.state[master]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(inner.state[master]["momentum_buffer"], buf.float())
        assert param not in inner.state
    assert all(a is b for a, b in zip(opt.param_groups[1]["params"], net.head.parameters()))
    assert opt.fp32_from_fp32_groups == [[], list(net.head.parameters())]

    FP16_Optimizer(torch.optim.SGD(make_net(device).parameters(), lr=0.1), verbose=False)
    assert capsys.readouterr().out == DEPRECATION_LINE + "\n" + MAINTAINED_PATH_LINE + "\n"


def test_frozen_params_stay_in_place_and_bf16_gets_fp32_masters(capsys):
    net = make_net("cpu", half_dtype=torch.bfloat16)
    net.body.bias.requires_grad_(False)
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = FP16_Optimizer(inner, dynamic_loss_scale=True)
    out = capsys.readouterr().out
    assert "FP16_Optimizer received torch.BFloat16Tensor with torch.Size([8, 6])" in out
    assert inner.param_groups[0]["params"][1] is net.body.bias
    assert opt.fp16_groups == [[net.body.weight]]
    run_fp16_optimizer_step(net, opt, *make_batches("cpu", 1)[0])
    assert torch.equal(net.body.weight, opt.all_fp32_from_fp16_params[0].bfloat16())


def test_wrong_dtype_raises_apex_type_error_and_leaves_optimizer_untouched():
    net = make_net("cpu")
    odd = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    inner = torch.optim.SGD([{"params": net.body.parameters()}, {"params": [odd]}], lr=0.1)
    groups_before = [list(g["params"]) for g in inner.param_groups]
    with pytest.raises(TypeError) as err:
        FP16_Optimizer(inner, verbose=False)
    assert str(err.value) == ("Wrapped parameters must be either torch.cuda.FloatTensor or torch.cuda.HalfTensor. "
                              "Received torch.DoubleTensor")
    assert all(all(a is b for a, b in zip(g["params"], before))
               for g, before in zip(inner.param_groups, groups_before))

    with pytest.raises(TypeError):
        FP16_Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), dynamic_loss_scale=True,
                       dynamic_loss_args={"no_such_arg": 1}, verbose=False)
    assert net.body.weight.dtype == torch.float16


def test_not_an_optimizer_and_not_picklable():
    opt = fp16_optimizer_for(make_net("cpu"), "sgd", dynamic=True)
    with pytest.raises(TypeError, match="is not an Optimizer"):
        torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(RuntimeError) as err:
        copy.deepcopy(opt)
    assert str(err.value) == "FP16_Optimizer should be serialized using state_dict()."
    with pytest.raises(RuntimeError) as err:
        pickle.dumps(opt)
    assert str(err.value) == "FP16_Optimizer should be serialized using state_dict()."
    with pytest.raises(RuntimeError) as err:
        opt.__setstate__({})
    assert str(err.value) == "FP16_Optimizer should be deserialized using load_state_dict()."


def test_loss_scale_and_param_group_proxies():
    opt = fp16_optimizer_for(make_net("cpu"), "sgd", dynamic=True)
    opt.loss_scale = 2.0 ** 20
    assert opt.loss_scaler._loss_scale == 2.0 ** 20 and opt.loss_scale == 2.0 ** 20
    opt.param_groups[0]["lr"] = 0.5
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    new_state = {}
    opt.state = new_state
    assert opt.optimizer.state is new_state


# --- FP16_Optimizer: state_dict -----------------------------------------------------------------

def _resumable_run(device, kind, steps, resume_at=None):
    """Train `steps` steps (dynamic scale, window 3, inf at step 3); optionally checkpoint/restore at `resume_at`."""
    batches = make_batches(device, steps)
    net = make_net(device)
    opt = fp16_optimizer_for(net, kind, dynamic=True, init_scale=2.0 ** 10, scale_window=3)
    inject = InfInjector(net, [3])
    for step, (x, y) in enumerate(batches):
        if step == resume_at:
            buf = io.BytesIO()
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buf)
            buf.seek(0)
            checkpoint = torch.load(buf, weights_only=True)
            net = make_net(device, seed=99)
            opt = fp16_optimizer_for(net, kind, dynamic=True, init_scale=2.0 ** 10, scale_window=3)
            net.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["optimizer"])
            inject = InfInjector(net, [3])
        inject.step = step
        run_fp16_optimizer_step(net, opt, x, y)
    return net, opt


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_dict_resume_is_bitwise_identical(device, kind):
    straight_net, straight = _resumable_run(device, kind, 10)
    resumed_net, resumed = _resumable_run(device, kind, 10, resume_at=5)
    assert_bitwise(list(resumed_net.parameters()), list(straight_net.parameters()))
    assert_bitwise(resumed.all_fp32_from_fp16_params, straight.all_fp32_from_fp16_params)
    assert_optimizer_states_equal(resumed.optimizer, straight.optimizer)
    assert resumed.loss_scaler._unskipped == straight.loss_scaler._unskipped
    assert resumed.loss_scale == straight.loss_scale


def test_state_dict_format_and_weights_only_load():
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "adam", dynamic=True, scale_window=7, min_loss_scale=2.0)
    run_fp16_optimizer_step(net, opt, *make_batches("cpu", 1)[0])
    sd = opt.state_dict()
    assert list(sd) == ["loss_scaler", "dynamic_loss_scale", "overflow", "first_closure_call_this_step",
                        "optimizer_state_dict", "fp32_from_fp16"]
    assert sd["loss_scaler"] == {"loss_scale": 65536.0, "unskipped": 1, "dynamic": True, "min_loss_scale": 2.0,
                                 "max_loss_scale": 2.0 ** 24, "scale_window": 7, "scale_factor": 2.0}
    assert sd["fp32_from_fp16"][0][0] is opt.all_fp32_from_fp16_params[0]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["loss_scaler"] == sd["loss_scaler"] and loaded["overflow"] is False
    assert_bitwise(loaded["fp32_from_fp16"][0], opt.fp32_from_fp16_groups[0])


def test_load_state_dict_accepts_apex_era_loss_scaler_objects():
    net = make_net("cpu")
    source = fp16_optimizer_for(net, "sgd", dynamic=False, scale=1.0)
    sd = source.state_dict()

    # An amp LossScaler as Apex pickled it (no ampcompat-only fields), unpickled through the class path.
    apex_scaler = AmpLossScaler.__new__(AmpLossScaler)
    apex_scaler.__setstate__({"_loss_scale": 512.0, "_unskipped": 2, "dynamic": True, "_has_overflow": False,
                              "_min_loss_scale": None, "_max_loss_scale": 2.0 ** 24, "_scale_seq_len": 7})
    target = fp16_optimizer_for(make_net("cpu", seed=5), "sgd", dynamic=False, scale=1.0)
    target.load_state_dict(dict(sd, loss_scaler=pickle.loads(pickle.dumps(apex_scaler)), dynamic_loss_scale=True))
    s = target.loss_scaler
    assert (s.loss_scale(), s._unskipped, s.dynamic, s._scale_seq_len) == (512.0, 2, True, 7)
    assert target.dynamic_loss_scale is True
    assert_bitwise(target.all_fp32_from_fp16_params, source.all_fp32_from_fp16_params)

    # 2018 checkpoints held the pre-amp fp16_utils scalers.
    legacy = DynamicLossScaler(init_scale=2.0 ** 12)
    target.load_state_dict(dict(sd, loss_scaler=legacy))
    assert (target.loss_scale, target.loss_scaler.dynamic, target.loss_scaler._unskipped) == (2.0 ** 12, True, 0)
    target.load_state_dict(dict(sd, loss_scaler=LossScaler(8.0)))
    assert (target.loss_scale, target.loss_scaler.dynamic) == (8.0, False)


def test_load_state_dict_rejects_mismatches_without_changing_anything():
    net = make_net("cpu")
    opt = fp16_optimizer_for(net, "sgd", dynamic=True)
    good = copy.deepcopy(opt.state_dict())
    masters_before = [m.detach().clone() for m in opt.all_fp32_from_fp16_params]

    wrong_shape = dict(good, fp32_from_fp16=[[torch.zeros(3, 3), torch.zeros(8)]], loss_scaler=dict(
        good["loss_scaler"], loss_scale=1.0))
    with pytest.raises(ValueError, match="Master weights of param group 0 do not match"):
        opt.load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match="master weights for 2 param groups, this FP16_Optimizer has 1"):
        opt.load_state_dict(dict(good, fp32_from_fp16=[[], []]))
    missing = {k: v for k, v in good.items() if k != "overflow"}
    with pytest.raises(KeyError, match="overflow"):
        opt.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected key"):
        opt.load_state_dict(dict(good, loss_scaler=dict(good["loss_scaler"], bogus=1)))
    assert opt.loss_scale == 65536.0
    assert_bitwise([m.detach() for m in opt.all_fp32_from_fp16_params], masters_before)


# --- fp16util: network casting --------------------------------------------------------------------

class ZooNet(nn.Module):
    """One of each module kind whose casting rule differs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.bn_plain = nn.BatchNorm1d(4, affine=False)
        self.sync_bn = nn.SyncBatchNorm(4)
        self.ln = nn.LayerNorm(4)
        self.emb = nn.Embedding(5, 4)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("counter", torch.zeros(2, dtype=torch.int64))

    def forward(self, x):
        return self.ln(self.bn_plain(self.bn(self.linear(x))))


def dtype_table(model):
    return {**{k: v.dtype for k, v in model.named_parameters()},
            **{k: v.dtype for k, v in model.named_buffers()}}


def expected_table(prefix, half, bn_dtype):
    table = {}
    for name in ("linear.weight", "linear.bias", "ln.weight", "ln.bias", "emb.weight", "scale",
                 "bn_plain.running_mean", "bn_plain.running_var"):
        table[name] = half
    for bn in ("bn", "sync_bn"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            table["{}.{}".format(bn, name)] = bn_dtype
        table[bn + ".num_batches_tracked"] = torch.int64
    table["bn_plain.num_batches_tracked"] = torch.int64
    table["counter"] = torch.int64
    return {prefix + k: v for k, v in table.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convert_network_dtype_table_keeps_identity(dtype):
    net = ZooNet()
    net.linear.weight.grad = torch.ones(4, 4)
    params_before = dict(net.named_parameters())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert convert_network(net, dtype) is net
    assert dtype_table(net) == expected_table("", dtype, torch.float32)
    assert all(p is params_before[k] for k, p in net.named_parameters())
    assert optimizer.param_groups[0]["params"][0] is net.linear.weight
    assert net.linear.weight.grad.dtype == dtype


def test_convert_network_leaves_affine_batchnorm_in_its_incoming_dtype():
    net = ZooNet().double()
    convert_network(net, torch.float16)
    assert dtype_table(net) == expected_table("", torch.float16, torch.float64)


def test_convert_network_flattens_rnn_parameters():
    net = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 2))
    calls = []
    net[0].flatten_parameters = lambda: calls.append(1)
    convert_network(net, torch.float16)
    assert calls == [1] and net[0].weight_ih_l0.dtype == torch.float16


def test_convert_module_casts_only_immediate_tensors():
    outer = nn.Sequential(nn.Linear(2, 2))
    outer.register_buffer("buf", torch.ones(1))
    outer.register_parameter("own", nn.Parameter(torch.ones(2)))
    outer.own.grad = torch.ones(2)
    own = outer.own
    assert convert_module(outer, torch.float16) is None
    assert outer.own is own and own.dtype == torch.float16 and own.grad.dtype == torch.float16
    assert outer.buf.dtype == torch.float16 and outer[0].weight.dtype == torch.float32


def test_network_to_half_prefix_dtypes_and_forward():
    net = ZooNet()
    weight = net.linear.weight
    seq = network_to_half(net)
    assert isinstance(seq, nn.Sequential) and isinstance(seq[0], tofp16) and seq[1] is net
    assert net.linear.weight is weight
    assert dtype_table(seq) == expected_table("1.", torch.float16, torch.float32)
    assert set(seq.state_dict()) == {"1." + k for k in ZooNet().state_dict()}
    assert seq(torch.randn(3, 4)).dtype == torch.float16
    # From FP64, network_to_half brings affine batch norms to FP32 (convert_network would keep FP64).
    assert dtype_table(network_to_half(ZooNet().double())) == expected_table("1.", torch.float16, torch.float32)


def test_bn_convert_float_only_touches_affine_batchnorm():
    net = ZooNet().half()
    assert BN_convert_float(net) is net
    table = dtype_table(net)
    assert table["bn.weight"] == table["bn.running_var"] == table["sync_bn.running_mean"] == torch.float32
    assert table["bn_plain.running_mean"] == table["ln.weight"] == torch.float16
    assert tofp16()(torch.ones(2)).dtype == torch.float16


def test_fp16_model_prefix_and_positional_input_casting():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.seen = None

        def forward(self, x, extra=None, scale=None):
            self.seen = (x.dtype, extra, scale.dtype if scale is not None else None)
            return self.bn(self.linear(x))

    probe = Probe()
    model = FP16Model(probe)
    assert model.network is probe
    assert set(model.state_dict()) == {"network." + k for k in Probe().state_dict()}
    assert probe.linear.weight.dtype == torch.float16 and probe.bn.weight.dtype == torch.float32
    out = model(torch.randn(3, 4), None, scale=torch.ones(1))
    assert probe.seen == (torch.float16, None, torch.float32)
    assert out.dtype == torch.float16


# --- fp16util: manual master weights --------------------------------------------------------------

def small_half_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).half()
    net[1].bias.requires_grad_(False)
    return net


def test_prep_param_lists_per_param_masters():
    net = small_half_net()
    model_params, masters = prep_param_lists(net)
    assert model_params == [net[0].weight, net[0].bias, net[1].weight]
    for p, m in zip(model_params, masters):
        assert m.dtype == torch.float32 and m.requires_grad and m.is_leaf and m.grad is None
        assert torch.equal(m, p.float()) and m.data_ptr() != p.data_ptr()
        assert not isinstance(m, nn.Parameter)


def test_prep_param_lists_flat_master():
    net = small_half_net()
    model_params, masters = prep_param_lists(net, flat_master=True)
    assert len(masters) == 1
    flat = masters[0]
    assert isinstance(flat, nn.Parameter) and flat.dtype == torch.float32 and flat.requires_grad
    assert flat.shape == (12 + 4 + 8,) and flat.grad.shape == flat.shape
    assert torch.equal(flat.detach(), torch.cat([p.detach().float().reshape(-1) for p in model_params]))
    single = nn.Linear(2, 1, bias=False)
    _, (single_flat,) = prep_param_lists(single, flat_master=True)
    assert single_flat.data_ptr() != single.weight.data_ptr()


def test_prep_param_lists_flat_failure_prints_apex_line_and_reraises(capsys):
    frozen = nn.Linear(2, 2).requires_grad_(False)
    try:  # what torch raises for nothing to flatten: ValueError on recent releases, RuntimeError on 2.4
        torch._utils._flatten_dense_tensors([])
    except Exception as error:  # noqa: BLE001
        torch_error = error
    with pytest.raises(type(torch_error), match="non-empty") as raised:
        prep_param_lists(frozen, flat_master=True)
    assert str(raised.value) == str(torch_error)
    assert capsys.readouterr().out == (
        "Error in prep_param_lists:  model may contain a mixture of parameters of different types.  "
        "Use flat_master=False, or use F16_Optimizer.\n"
    )


@pytest.mark.parametrize("flat", [False, True], ids=["per_param", "flat_master"])
def test_grad_and_param_copies(device, flat):
    net = small_half_net().to(device)
    model_params, masters = prep_param_lists(net, flat_master=flat)
    net(torch.randn(5, 3, device=device).half()).float().sum().backward()
    model_grads_to_master_grads(model_params, masters, flat_master=flat)
    expected = [p.grad.float() for p in model_params]
    got = masters[0].grad.split([p.numel() for p in model_params]) if flat else [m.grad for m in masters]
    assert_bitwise([g.reshape(e.shape) for g, e in zip(got, expected)], expected)

    with torch.no_grad():
        for m in masters:
            m.add_(0.25)
    identities = [id(p) for p in model_params]
    master_params_to_model_params(model_params, masters, flat_master=flat)
    values = masters[0].detach().split([p.numel() for p in model_params]) if flat else [m.detach() for m in masters]
    expected_params = [v.reshape(p.shape).half() for v, p in zip(values, model_params)]
    assert_bitwise([p.detach() for p in model_params], expected_params)
    assert [id(p) for p in model_params] == identities


def test_model_grads_to_master_grads_none_handling_and_bad_lists():
    net = small_half_net()
    model_params, masters = prep_param_lists(net)
    masters[0].grad = torch.ones_like(masters[0])
    model_params[1].grad = torch.full_like(model_params[1], 2.0)
    model_grads_to_master_grads(model_params, masters)
    assert masters[0].grad is None and masters[2].grad is None
    assert torch.equal(masters[1].grad, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="got 3 model parameters but 2 master parameters"):
        model_grads_to_master_grads(model_params, masters[:2])

    _, flat = prep_param_lists(net, flat_master=True)
    with pytest.raises(ValueError, match=r"parameters \[0, 2\] have none"):
        model_grads_to_master_grads(model_params, flat, flat_master=True)
    with pytest.raises(ValueError, match="flat master holds 24 elements but the model parameters hold 16"):
        master_params_to_model_params(model_params[:2], flat, flat_master=True)


def test_to_python_float_and_clip_alias():
    assert to_python_float(torch.tensor(2.5)) == 2.5 and isinstance(to_python_float(torch.tensor(1.5)), float)
    assert to_python_float([3.5]) == 3.5
    assert fp16_utils.clip_grad_norm is torch.nn.utils.clip_grad_norm_


def test_star_import_brings_exactly_apex_names():
    namespace = {}
    exec("from ampcompat.fp16_utils import *", namespace)
    names = {k for k in namespace if not k.startswith("__")}
    assert names == {"BN_convert_float", "DynamicLossScaler", "FP16Model", "FP16_Optimizer", "LossScaler",
                     "clip_grad_norm", "convert_module", "convert_network", "master_params_to_model_params",
                     "model_grads_to_master_grads", "network_to_half", "prep_param_lists", "to_python_float",
                     "tofp16", "fp16_optimizer", "fp16util", "loss_scaler"}
    assert namespace["loss_scaler"].LossScaler is LossScaler


# --- legacy loss scalers ------------------------------------------------------------------------------

def test_legacy_static_loss_scaler():
    assert isinstance(inspect.getattr_static(LossScaler, "loss_scale"), property)  # a property, not a method
    assert LossScaler().loss_scale == 1
    scaler = LossScaler(4.0)
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([INF, 1.0])
    assert scaler.has_overflow([p]) is False and LossScaler._has_inf_or_nan(p.grad) is False
    scaler.update_scale(True)
    assert scaler.loss_scale == 4.0
    assert torch.equal(scaler.scale_gradient(None, (torch.ones(2),), None)[0], torch.full((2,), 4.0))
    p.grad = None
    loss = (p * 3).sum()
    scaler.backward(loss, retain_graph=True)
    scaler.backward(loss)
    assert torch.equal(p.grad, torch.full((2,), 2 * 3 * 4.0))


def test_dynamic_loss_scaler_defaults_and_growth_in_closed_form():
    default = DynamicLossScaler()
    assert (default.loss_scale, default.scale_factor, default.scale_window) == (2 ** 32, 2.0, 1000)
    assert (default.cur_iter, default.last_overflow_iter) == (0, -1)
    scaler = DynamicLossScaler(init_scale=2.0 ** 4, scale_factor=2.0, scale_window=3)
    for n in range(1, 11):  # n clean iterations: one doubling per full window
        scaler.update_scale(False)
        assert scaler.loss_scale == 2.0 ** 4 * 2 ** (n // 3)
        assert scaler.cur_iter == n


def test_dynamic_loss_scaler_backoff_then_regrowth_in_closed_form():
    window, factor = 3, 4.0
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, scale_factor=factor, scale_window=window)
    for _ in range(4):
        scaler.update_scale(False)
    grown = 2.0 ** 10 * factor ** (4 // window)
    assert scaler.loss_scale == grown
    scaler.update_scale(True)  # iteration 4 overflows
    assert (scaler.loss_scale, scaler.last_overflow_iter, scaler.cur_iter) == (grown / factor, 4, 5)
    for j in range(1, 8):  # j clean iterations after the overflow
        scaler.update_scale(False)
        assert scaler.loss_scale == grown / factor * factor ** (j // window)


def test_dynamic_loss_scaler_never_goes_below_one():
    scaler = DynamicLossScaler(init_scale=2.0, scale_window=100)
    for expected in (1.0, 1, 1):
        scaler.update_scale(True)
        assert scaler.loss_scale == expected


@pytest.mark.parametrize("bad", [INF, -INF, float("nan")])
def test_dynamic_has_overflow_checks_every_grad_without_changing_them(device, bad):
    scaler = DynamicLossScaler()
    params = [nn.Parameter(torch.zeros(3, device=device, dtype=dt)) for dt in (torch.float16, torch.float32)]
    params.append(nn.Parameter(torch.zeros(2, device=device)))  # no grad: ignored
    params[0].grad = torch.tensor([1.0, -0.0, 65504.0], device=device, dtype=torch.float16)
    params[1].grad = torch.tensor([3e38, -2.0, 1e-40], device=device)
    originals = [p.grad.clone() for p in params[:2]]
    assert scaler.has_overflow(params) is False
    assert_bitwise([p.grad for p in params[:2]], originals)
    assert all(torch.equal(torch.signbit(p.grad), torch.signbit(o)) for p, o in zip(params[:2], originals))
    params[1].grad[2] = bad
    assert scaler.has_overflow(params) is True
    assert DynamicLossScaler._has_inf_or_nan(params[1].grad) is True
    assert scaler._has_inf_or_nan(params[0].grad) is False
    assert scaler.has_overflow([]) is False
    sparse = nn.Parameter(torch.zeros(4, device=device, dtype=torch.float16))
    sparse.grad = torch.sparse_coo_tensor([[1, 1]], [60000.0, 60000.0], (4,), device=device, dtype=torch.float16,
                                          check_invariants=True)
    assert scaler.has_overflow([sparse]) is True  # the duplicates sum past the FP16 range


def test_dynamic_loss_scaler_backward_scales_loss():
    scaler = DynamicLossScaler(init_scale=8.0)
    p = nn.Parameter(torch.ones(2))
    scaler.backward((p * 2).sum())
    assert torch.equal(p.grad, torch.full((2,), 16.0))


def test_legacy_scalers_pickle_and_old_pickles_restore():
    scaler = DynamicLossScaler(init_scale=64.0, scale_window=2)
    scaler.update_scale(True)
    clone = pickle.loads(pickle.dumps(scaler))
    assert vars(clone) == vars(scaler)
    # An old pickle restores only Apex's attribute dict, without running __init__.
    old = DynamicLossScaler.__new__(DynamicLossScaler)
    old.__dict__.update(cur_scale=2.0 ** 20, cur_iter=5, last_overflow_iter=3, scale_factor=2.0, scale_window=2)
    old.update_scale(False)  # 5 - 3 = 2 iterations since the overflow: a full window
    assert old.loss_scale == 2.0 ** 21 and old.cur_iter == 6
    static = LossScaler.__new__(LossScaler)
    static.__dict__.update(cur_scale=16.0)
    assert static.loss_scale == 16.0
