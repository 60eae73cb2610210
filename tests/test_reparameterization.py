"""apex.reparameterization: weight norm against hand-written twins (same forward, same gradients), Apex's
state_dict keys and hook placement, removal, the computed-weight cache, O2 casting, cuDNN's flat weights."""
import copy
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import ampcompat
from ampcompat import amp
from ampcompat.reparameterization import (Reparameterization, WeightNorm, apply_reparameterization,
                                          apply_weight_norm, remove_weight_norm)

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "apex_era"))
from sentiment_lm_model import StackedMLSTM  # noqa: E402


def hand_norm(v, dim):
    """||v|| over every dimension but ``dim``, written out (per row of ``v`` moved to the front)."""
    if dim is None:
        return v.norm()
    moved = v.transpose(0, dim)
    norms = moved.reshape(moved.size(0), -1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
    return norms.transpose(0, dim)


def build(case):
    torch.manual_seed(0)
    if case == "linear":
        return nn.Linear(6, 5), (torch.randn(3, 6),)
    if case == "conv":
        return nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 6, 6),)
    if case == "lstm":
        return nn.LSTM(4, 5, 2), (torch.randn(7, 3, 4),)
    if case == "mlstm":
        return StackedMLSTM(4, 6, 2), (torch.randn(5, 3, 4),)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2)), \
        (torch.randn(4, 6),)


def leaves(out):
    return [t for item in out for t in leaves(item)] if isinstance(out, (tuple, list)) else [out]


def scalar(out):
    """A loss touching every output tensor with different weights."""
    return sum(((t.float() * torch.linspace(-1, 2, t.numel(), device=t.device).view_as(t)).sum() for t in leaves(out)))


class Twin:
    """The module's weights (>= 2-D) written as ``g * v / ||v||`` by hand, run with ``functional_call``."""

    def __init__(self, module, dim):
        self.module = copy.deepcopy(module)
        self.dim = dim
        self.names = [n for n, p in module.named_parameters() if p.dim() > 1]
        self.g = {n: hand_norm(p.detach(), dim).clone().requires_grad_() for n, p in module.named_parameters()
                  if n in self.names}
        self.v = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters() if n in self.names}

    def __call__(self, *args):
        weights = {n: self.g[n] * self.v[n] / hand_norm(self.v[n], self.dim) for n in self.names}
        return functional_call(self.module, weights, args)

    def trainables(self):
        others = [p for n, p in self.module.named_parameters() if n not in self.names]
        return others + list(self.g.values()) + list(self.v.values())


def sgd_(params, lr=0.1):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


@pytest.mark.parametrize("hook_child", [True, False])
@pytest.mark.parametrize("case,dim", [("linear", 0), ("linear", None), ("linear", 1), ("linear", -1), ("conv", 0),
                                      ("conv", 1), ("lstm", 0), ("mlstm", 0), ("nested", 0)])
def test_forward_and_gradients_match_a_hand_written_weight_norm(case, dim, hook_child):
    module, inputs = build(case)
    twin = Twin(module, dim)
    apply_weight_norm(module, dim=dim, hook_child=hook_child)
    for _ in range(2):  # the second round checks that the updated g/v are used, not a stale weight
        out, want = module(*inputs), twin(*inputs)
        for got, expected in zip(leaves(out), leaves(want)):
            torch.testing.assert_close(got, expected)
        scalar(out).backward()
        scalar(want).backward()
        for name in twin.names:
            torch.testing.assert_close(module.get_parameter(name + "_g").grad, twin.g[name].grad)
            torch.testing.assert_close(module.get_parameter(name + "_v").grad, twin.v[name].grad)
        sgd_(module.parameters())
        sgd_(twin.trainables())


def test_state_dict_keys_and_shapes_are_apexs():
    m = apply_weight_norm(nn.Linear(20, 40), name="weight")  # Apex's docstring example
    assert list(m.state_dict()) == ["bias", "weight_g", "weight_v"]
    assert m.weight_g.shape == (40, 1) and m.weight_v.shape == (40, 20)
    assert apply_weight_norm(nn.Linear(20, 40), dim=None).weight_g.shape == ()
    assert apply_weight_norm(nn.Linear(20, 40), dim=1).weight_g.shape == (1, 20)
    assert apply_weight_norm(nn.Conv2d(3, 8, 3)).weight_g.shape == (8, 1, 1, 1)
    lstm = apply_weight_norm(nn.LSTM(4, 5, 2))
    assert sorted(lstm.state_dict()) == sorted(
        [f"bias_{k}_l{i}" for i in range(2) for k in ("ih", "hh")]
        + [f"weight_{k}_l{i}_{s}" for i in range(2) for k in ("ih", "hh") for s in ("g", "v")])
    reference = nn.Linear(20, 40)
    normed = apply_weight_norm(copy.deepcopy(reference))
    torch.testing.assert_close(normed.weight_v, reference.weight, rtol=0, atol=0)  # v starts as the weight
    torch.testing.assert_close(normed.weight_g, reference.weight.norm(dim=1, keepdim=True))


def test_a_weight_norm_checkpoint_round_trips_into_a_fresh_weight_normed_model():
    torch.manual_seed(0)
    trained = apply_weight_norm(nn.Linear(4, 3))
    scalar(trained(torch.randn(2, 4))).backward()
    sgd_(trained.parameters())
    fresh = apply_weight_norm(nn.Linear(4, 3))
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="weight_g"):
        nn.Linear(4, 3).load_state_dict(trained.state_dict())  # as in Apex: the keys differ from a plain model's


def test_name_empty_leaves_vectors_buffers_and_embeddings_alone():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    apply_weight_norm(model)
    assert sorted(model.state_dict()) == sorted(
        ["0.weight", "1.bias", "1.weight_g", "1.weight_v", "2.weight", "2.bias", "3.weight", "3.bias",
         "3.running_mean", "3.running_var", "3.num_batches_tracked"])
    assert isinstance(model[0].weight, nn.Parameter)


def test_hook_child_decides_which_module_computes_the_weight():
    model, _ = build("nested")
    apply_weight_norm(model, hook_child=True)
    assert not model._forward_pre_hooks
    hooks = [h for h in model[2][0]._forward_pre_hooks.values()]
    assert len(hooks) == 1 and isinstance(hooks[0], WeightNorm) and hooks[0].name == "weight"

    model, _ = build("nested")
    apply_weight_norm(model, hook_child=False)
    names = sorted(h.name for h in model._forward_pre_hooks.values())
    assert names == ["0.weight", "2.0.weight", "3.weight"]
    assert all(not m._forward_pre_hooks for m in list(model.modules())[1:])
    assert model[2][0].weight is None  # nothing computed before the root runs (as in Apex)
    model(torch.randn(2, 6))
    assert model[2][0].weight.shape == (8, 8)


def test_a_submodule_name_applies_to_its_parameters_as_sentiment_discovery_calls_it():
    model = nn.Module()
    model.rnn = nn.LSTM(4, 5)
    model.decoder = nn.Linear(5, 3)
    apply_weight_norm(model, "rnn", hook_child=False)
    assert sorted(h.name for h in model._forward_pre_hooks.values()) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert isinstance(model.decoder.weight, nn.Parameter)
    remove_weight_norm(model)
    assert not model._forward_pre_hooks and isinstance(model.rnn.weight_ih_l0, nn.Parameter)


def test_applying_twice_changes_nothing_and_an_explicit_second_apply_is_refused():
    model, inputs = build("nested")
    apply_weight_norm(model)
    keys, hooks = list(model.state_dict()), [list(m._forward_pre_hooks) for m in model.modules()]
    apply_weight_norm(model)
    assert list(model.state_dict()) == keys and [list(m._forward_pre_hooks) for m in model.modules()] == hooks
    with pytest.raises(ValueError, match="already reparameterized"):
        apply_weight_norm(model, "0.weight")
    assert list(model.state_dict()) == keys


def test_bad_input_leaves_the_module_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.register_buffer("table", torch.ones(3, 3))
    keys = list(model.state_dict())
    with pytest.raises(AttributeError):
        apply_weight_norm(model, "0.wieght")
    with pytest.raises(ValueError, match="not a parameter"):
        apply_weight_norm(nn.Linear(4, 4, bias=False), "bias")
    with pytest.raises(ValueError, match="'table' of Sequential is not a parameter"):
        apply_weight_norm(model, "table")
    with pytest.raises(IndexError, match="out of range"):
        apply_weight_norm(model, "0.weight", dim=2)
    with pytest.raises(AssertionError, match="WeightNorm"):
        apply_reparameterization(model, None, "0.weight")
    with pytest.raises(NotImplementedError):  # the abstract base class
        apply_reparameterization(model, Reparameterization, "0.weight")
    assert list(model.state_dict()) == keys
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_remove_restores_a_plain_parameter_holding_the_trained_weight():
    model, inputs = build("nested")
    apply_weight_norm(model, hook_child=False)
    for _ in range(2):
        scalar(model(*inputs)).backward()
        sgd_(model.parameters())
    expected = model[0].weight_g * model[0].weight_v / hand_norm(model[0].weight_v, 0)
    before = model(*inputs)
    assert remove_weight_norm(model) is model
    assert sorted(model.state_dict()) == sorted(["0.weight", "0.bias", "2.0.weight", "2.0.bias", "3.weight", "3.bias"])
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad
    torch.testing.assert_close(model[0].weight, expected.detach())
    torch.testing.assert_close(model(*inputs), before)
    scalar(model(*inputs)).backward()
    assert model[0].weight.grad is not None


def test_remove_by_name_and_apexs_error_for_an_unknown_name():
    model = apply_weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError) as info:
        remove_weight_norm(model, "bias")
    assert str(info.value) == ("reparameterization of 'bias' not found in "
                               "Linear(in_features=3, out_features=2, bias=True)")
    assert list(model.state_dict()) == ["bias", "weight_g", "weight_v"]
    remove_weight_norm(model, "weight")
    assert list(model.state_dict()) == ["bias", "weight"]
    assert remove_weight_norm(model, remove_all=True) is model  # nothing left: no error


def test_weights_are_computed_once_per_call_of_the_hooked_module_not_per_time_step(monkeypatch):
    calls = []
    original = WeightNorm.compute_weight

    def counting(self, module=None, name=None):
        calls.append(self.name)
        return original(self, module, name)

    monkeypatch.setattr(WeightNorm, "compute_weight", counting)
    for hook_child in (False, True):
        rnn, (x,) = build("mlstm")
        twin = Twin(rnn, 0)
        apply_weight_norm(rnn, hook_child=hook_child)
        calls.clear()
        out, _ = rnn(x)  # 5 time steps x 2 layers of cells
        assert len(calls) == 8  # 4 weights per cell, each computed once
        torch.testing.assert_close(out, twin(x)[0])


def test_the_cached_weight_is_never_stale_nor_without_gradient():
    rnn, (x,) = build("mlstm")
    twin = Twin(rnn, 0)
    apply_weight_norm(rnn, hook_child=False)
    with torch.no_grad():  # an evaluation pass first: its weight carries no graph
        rnn(x)
    out1, _ = rnn(x)
    out2, _ = rnn(x)  # a second forward before backward shares the weight
    (scalar(out1) + scalar(out2)).backward()
    want1, want2 = twin(x)[0], twin(x)[0]
    (scalar(want1) + scalar(want2)).backward()
    for name in twin.names:  # gradients flow to g and v, as in the hand-written model
        torch.testing.assert_close(rnn.get_parameter(name + "_v").grad, twin.v[name].grad)
    scalar(rnn(x)[0]).backward()  # gradient accumulation: a new graph after the previous backward
    scalar(twin(x)[0]).backward()
    for name in twin.names:
        torch.testing.assert_close(rnn.get_parameter(name + "_g").grad, twin.g[name].grad)
    sgd_(rnn.parameters())
    sgd_(twin.trainables())
    with torch.no_grad():
        torch.testing.assert_close(rnn(x)[0], twin(x)[0])
        for name in twin.names:  # an in-place edit (load_state_dict, an EMA copy) without a backward pass
            rnn.get_parameter(name + "_g").mul_(0.5)
            twin.g[name].mul_(0.5)
        torch.testing.assert_close(rnn(x)[0], twin(x)[0])


def test_the_model_copies_and_pickles_before_a_forward_and_after_removal():
    model, inputs = build("nested")
    apply_weight_norm(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(*inputs), model(*inputs))
    assert isinstance(pickle.loads(pickle.dumps(model._modules["0"]._forward_pre_hooks)), dict)
    remove_weight_norm(model)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(*inputs), model(*inputs))


class HandWrittenWeightNormLinear(nn.Module):
    """A linear layer written with explicit ``weight_g``/``weight_v`` (computed in FP32 as Apex's kernel did)."""

    def __init__(self, linear):
        super().__init__()
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.weight_g = nn.Parameter(linear.weight.detach().norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(linear.weight.detach().clone())

    def forward(self, x):
        v = self.weight_v.float()
        weight = (v * (self.weight_g.float() / v.norm(dim=1, keepdim=True))).to(self.weight_v.dtype)
        return F.linear(x, weight, self.bias)


def _train_o2(model, steps=4):
    ampcompat.reset()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    data = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=data), torch.randint(0, 3, (8,), generator=data)
        optimizer.zero_grad()
        with amp.scale_loss(F.cross_entropy(model(x), y), optimizer) as scaled:
            scaled.backward()
        optimizer.step()
    return model, optimizer


def test_o2_casts_g_and_v_and_keeps_fp32_masters_like_a_hand_written_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = nn.Sequential(HandWrittenWeightNormLinear(base[0]), nn.Tanh(), HandWrittenWeightNormLinear(base[2]))
    normed = apply_weight_norm(copy.deepcopy(base))
    assert list(normed.state_dict()) == list(twin.state_dict())
    normed, optimizer = _train_o2(normed)
    twin, _ = _train_o2(twin)
    assert normed[0].weight_g.dtype == normed[0].weight_v.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in amp.master_params(optimizer))
    assert {k: v.dtype for k, v in normed.state_dict().items()} == {k: torch.float32 for k in twin.state_dict()}
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(normed.state_dict()[key], value, rtol=0, atol=0)
    remove_weight_norm(normed)
    assert normed[0].weight.dtype == torch.float16
    v, g = twin[0].weight_v.float(), twin[0].weight_g.float()
    torch.testing.assert_close(normed[0].weight, (v * (g / v.norm(dim=1, keepdim=True))).half(), rtol=0, atol=0)


@pytest.mark.cuda
def test_a_weight_normed_lstm_on_cuda_keeps_cudnns_flat_weights_and_matches_its_twin():
    lstm, (x,) = build("lstm")
    lstm, x = lstm.cuda(), x.cuda()
    twin = Twin(lstm, 0)
    apply_weight_norm(lstm, hook_child=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            lstm.flatten_parameters()  # what DataParallel-era code calls at the top of forward
            out = lstm(x)
            scalar(out).backward()
            sgd_(lstm.parameters())
    assert not [w for w in caught if "contiguous chunk" in str(w.message)]
    for _ in range(3):
        scalar(twin(x)).backward()
        sgd_(twin.trainables())
    for got, want in zip(leaves(lstm(x)), leaves(twin(x))):
        torch.testing.assert_close(got, want)
    lstm.half()  # casting after a forward: the next forward computes half weights from the half g/v
    assert lstm(x.half())[0].dtype == torch.float16
    remove_weight_norm(lstm)
    assert lstm(x.half())[0].dtype == torch.float16
