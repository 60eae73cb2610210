"""Misuse catalogue: every wrong use of the amp API gets a clear error and leaves no half-changed state.

Where Apex raised, its exception type (and message, where it wrote one) is kept. Where Apex went on
silently and corrupted training (a second ``step()`` after a skipped one applies the inf gradients;
nested ``scale_loss`` blocks mix up the gradient stash; a ``backward()`` after the block applies
gradients still multiplied by the loss scale), ampcompat raises instead. "No half-changed state" is
checked by a snapshot of parameters, gradients, optimizer state, ``_amp_stash`` flags, loss scalers and
``amp._amp_state`` options taken before the bad call and compared after it.

One misuse cannot be detected in general and is documented instead (docs/reliability.md): calling
``loss.backward()`` on the raw loss inside the block instead of ``scaled_loss.backward()`` gives
gradients that are simply too small by the loss scale.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import ampcompat
from ampcompat import amp

from _amp_snapshot import differences, same, snapshot
from _dist_workers import destroy_process_group
from _models import batches, make_mlp

LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")




def _setup(level: str = "O1", device: str = "cpu", seed: int = 0, optimizer=None, **kw):
    """A model and optimizer through ``amp.initialize``; loss scaling is dynamic at every level."""
    model = make_mlp(device, seed=seed, d_hidden=16)
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)))(model.parameters())
    kw.setdefault("loss_scale", "dynamic")
    amp.initialize(model, opt, opt_level=level, verbosity=0, **kw)
    return model, opt


def _loss(model, device="cpu", seed=1):
    (x, y), = batches(1, device, seed=seed)
    return F.cross_entropy(model(x), y)


def _train_step(model, opt, seed=1, **kw):
    with amp.scale_loss(_loss(model, seed=seed), opt, **kw) as scaled:
        scaled.backward()
    opt.step()
    opt.zero_grad()


def _clone(t):
    return None if t is None else t.detach().clone()


def _all_finite(model, opt) -> bool:
    tensors = list(model.parameters()) + [p for g in opt.param_groups for p in g["params"]]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --- step() after a skipped step ---------------------------------------------------------------------

def _overflow(model, opt):
    with amp.scale_loss(_loss(model) * float("inf"), opt) as scaled:
        scaled.backward()


@pytest.mark.parametrize("level", LEVELS)
def test_first_step_after_overflow_is_skipped(level):
    model, opt = _setup(level)
    _train_step(model, opt)
    _overflow(model, opt)
    params = [_clone(p) for p in model.parameters()]
    stepped = [_clone(p) for g in opt.param_groups for p in g["params"]]
    state = snapshot([model], [opt])["optimizers"][0]["state"]
    opt.step()
    assert same(params, [_clone(p) for p in model.parameters()])
    assert same(stepped, [_clone(p) for g in opt.param_groups for p in g["params"]])
    assert same(state, snapshot([model], [opt])["optimizers"][0]["state"])
    assert opt._amp_stash.already_patched is False


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw_fused"])
@pytest.mark.parametrize("level", LEVELS)
def test_second_step_after_skipped_step_raises_and_keeps_params(level, optimizer):
    make = {"sgd_momentum": None, "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)}[optimizer]
    model, opt = _setup(level, optimizer=make)
    _train_step(model, opt)
    _overflow(model, opt)
    opt.step()  # skipped
    params = [_clone(p) for p in model.parameters()]
    stepped = [_clone(p) for g in opt.param_groups for p in g["params"]]
    with pytest.raises(RuntimeError, match="called again after a step skipped for gradient overflow"):
        opt.step()
    assert same(params, [_clone(p) for p in model.parameters()])
    assert same(stepped, [_clone(p) for g in opt.param_groups for p in g["params"]])
    assert _all_finite(model, opt)
    opt.zero_grad()
    _train_step(model, opt)  # a new scale_loss pass makes step() legal again
    assert _all_finite(model, opt) and not same(params, [_clone(p) for p in model.parameters()])


# --- nested scale_loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["O1", "O2"])
def test_nested_scale_loss_on_same_optimizer_raises(level):
    model, opt = _setup(level)
    with amp.scale_loss(_loss(model), opt) as scaled:
        scaled.backward()  # grads accumulated so far
    outer_loss, inner_loss = _loss(model, seed=2), _loss(model, seed=3)  # forwards move BatchNorm's stats
    before = snapshot([model], [opt])
    with pytest.raises(RuntimeError, match="amp.scale_loss blocks cannot be nested for the same optimizer"):
        with amp.scale_loss(outer_loss, opt) as outer:
            outer.backward()
            with amp.scale_loss(inner_loss, opt) as inner:
                inner.backward()
    assert differences(before, snapshot([model], [opt])) == []


def test_sequential_scale_loss_on_same_optimizer_is_fine():
    model, opt = _setup("O1")
    ref = make_mlp(seed=0, d_hidden=16)
    for seed in (1, 2, 3):
        with amp.scale_loss(_loss(model, seed=seed), opt) as scaled:
            scaled.backward()
        _loss(ref, seed=seed).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)


# --- backward outside the block ----------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_backward_after_the_block_is_refused_at_step(level):
    model, opt = _setup(level)
    with amp.scale_loss(_loss(model), opt) as scaled:
        pass  # backward forgotten inside the block ...
    scaled.backward()  # ... and called after it: gradients are still scaled by 2**16
    params = [_clone(p) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="not produced inside `with amp.scale_loss"):
        opt.step()
    assert same(params, [_clone(p) for p in model.parameters()])


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_autograd_grad_inside_block_then_backward_block_is_fine(level):
    """A block used only for a scaled ``autograd.grad`` (gradient penalty) must stay legal."""
    model, opt = _setup(level)
    x, y = batches(1, seed=1)[0]
    x.requires_grad_(True)
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        (gx,) = torch.autograd.grad(scaled, x, create_graph=True)
    penalty = (gx.float() / amp._amp_state.loss_scalers[0].loss_scale()).pow(2).sum()
    with amp.scale_loss(F.cross_entropy(model(x), y) + penalty, opt) as scaled:
        scaled.backward()
    before = [_clone(p) for p in model.parameters()]
    opt.step()
    assert _all_finite(model, opt) and not same(before, [_clone(p) for p in model.parameters()])


# --- loss_id -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["O1", "O2"])
def test_loss_id_too_large_raises_index_error_before_touching_anything(level):
    model, opt = _setup(level, num_losses=2)
    _loss(model).backward()  # pre-existing grads, which a half-done scale_loss would stash away
    loss = _loss(model)
    before = snapshot([model], [opt])
    with pytest.raises(IndexError):  # Apex: IndexError from _amp_state.loss_scalers[loss_id]
        with amp.scale_loss(loss, opt, loss_id=2) as scaled:
            scaled.backward()
    assert differences(before, snapshot([model], [opt])) == []


@pytest.mark.parametrize("loss_id", [2, -1])
def test_loss_id_out_of_range_message_names_num_losses(loss_id):
    model, opt = _setup("O1", num_losses=2)
    loss = _loss(model)
    before = snapshot([model], [opt])
    with pytest.raises(IndexError, match=r"loss_id {} is out of range.*num_losses=2".format(loss_id)):
        with amp.scale_loss(loss, opt, loss_id=loss_id) as scaled:
            scaled.backward()
    assert differences(before, snapshot([model], [opt])) == []


# --- bad losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [torch.tensor(3), torch.tensor([True]), 3.0], ids=["int", "bool", "float"])
def test_non_floating_loss_raises_type_error_at_entry(bad):
    model, opt = _setup("O1")
    _loss(model).backward()
    before = snapshot([model], [opt])
    with pytest.raises(TypeError, match="amp.scale_loss needs a floating-point loss tensor"):
        with amp.scale_loss(bad, opt) as scaled:
            scaled.backward()
    assert differences(before, snapshot([model], [opt])) == []


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_non_scalar_loss_raises_torch_error_and_keeps_accumulated_grads(level):
    model, opt = _setup(level)
    with amp.scale_loss(_loss(model), opt) as scaled:
        scaled.backward()  # one accumulated micro-batch
    (x, y), = batches(1, seed=2)
    losses = F.cross_entropy(model(x), y, reduction="none")
    before = snapshot([model], [opt])
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        with amp.scale_loss(losses, opt) as scaled:
            scaled.backward()
    assert differences(before, snapshot([model], [opt])) == []


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_non_scalar_loss_with_explicit_gradient_works(level):
    model, opt = _setup(level, max_loss_scale=2.0 ** 10)
    ref = make_mlp(seed=0, d_hidden=16)
    (x, y), = batches(1, seed=2)
    losses = F.cross_entropy(model(x), y, reduction="none")
    with amp.scale_loss(losses, opt) as scaled:
        scaled.backward(torch.full_like(scaled, 1.0 / len(y)))
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(amp.master_params(opt), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("level", LEVELS)
def test_loss_on_another_device_works(level):
    """A loss moved to the CPU (metrics code does this) backpropagates into the CUDA model."""
    results = []
    for loss_device in ("cuda", "cpu"):
        ampcompat.reset()
        model, opt = _setup(level, device="cuda")
        for seed in (1, 2, 3):
            (x, y), = batches(1, "cuda", seed=seed)
            loss = F.cross_entropy(model(x).float().to(loss_device), y.to(loss_device))
            with amp.scale_loss(loss, opt) as scaled:
                scaled.backward()
            opt.step()
            opt.zero_grad()
        results.append([_clone(p) for p in amp.master_params(opt)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# --- optimizers that did not go through initialize ---------------------------------------------------

def test_unpatched_optimizer_raises_apex_attribute_error():
    model, opt = _setup("O1")
    stranger = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = _loss(model)
    before = snapshot([model], [opt])
    with pytest.raises(AttributeError, match="'SGD' object has no attribute '_amp_stash'"):
        with amp.scale_loss(loss, stranger) as scaled:
            scaled.backward()
    assert differences(before, snapshot([model], [opt])) == []


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_unpatched_optimizer_in_a_list_leaves_the_others_untouched(level):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(list(model.fc1.parameters()) + list(model.bn.parameters()), lr=0.1)
    stranger = torch.optim.SGD(list(model.ln.parameters()) + list(model.fc2.parameters()), lr=0.1)
    amp.initialize(model, opt, opt_level=level, verbosity=0)
    with amp.scale_loss(_loss(model), opt) as scaled:
        scaled.backward()
    loss = _loss(model)
    before = snapshot([model], [opt])
    with pytest.raises(AttributeError, match="_amp_stash"):
        with amp.scale_loss(loss, [opt, stranger]) as scaled:
            scaled.backward()
    assert differences(before, snapshot([model], [opt])) == []


# --- parameters frozen or added later ----------------------------------------------------------------



def _reference_sgd(model_seed, train_plan):
    """Plain FP32 SGD following ``train_plan``: a list of (seed, frozen module names)."""
    model = make_mlp(seed=model_seed, d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed, frozen in train_plan:
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] not in frozen)
        _loss(model, seed=seed).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("level", LEVELS)
def test_params_frozen_after_initialize_stay_put(level):
    model, opt = _setup(level, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    _train_step(model, opt, seed=1)  # lazy init with everything trainable
    model.fc1.weight.requires_grad_(False)
    model.fc1.bias.requires_grad_(False)
    frozen = [_clone(p) for p in model.fc1.parameters()]
    for seed in (2, 3):
        _train_step(model, opt, seed=seed)
    assert same(frozen, [_clone(p) for p in model.fc1.parameters()])
    assert _all_finite(model, opt)


@pytest.mark.parametrize("level", [
    "O1",
    "O2",
    "O4",
    "O5",
])
def test_unfreezing_a_param_frozen_before_the_first_step(level):
    """Progressive unfreezing: fc1 is frozen when amp builds its state, trained later."""
    model, opt = _setup(level, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), max_loss_scale=2.0 ** 10)
    for p in model.fc1.parameters():
        p.requires_grad_(False)
    _train_step(model, opt, seed=1)
    for p in model.fc1.parameters():
        p.requires_grad_(True)
    _train_step(model, opt, seed=2)
    ref = _reference_sgd(0, [(1, {"fc1"}), (2, set())])
    assert _all_finite(model, opt)
    torch.testing.assert_close(model.fc1.weight.float(), ref.fc1.weight, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("level", LEVELS)
def test_param_group_added_later_trains_like_fp32(level):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(list(model.fc1.parameters()) + list(model.bn.parameters()), lr=0.1)
    amp.initialize(model, opt, opt_level=level, loss_scale="dynamic", max_loss_scale=2.0 ** 10, verbosity=0)
    with amp.scale_loss(_loss(model, seed=1), opt) as scaled:
        scaled.backward()
    opt.step()
    model.zero_grad()  # ln/fc2 are in no optimizer yet: their grads stay scaled (Apex), so drop them
    opt.add_param_group({"params": list(model.ln.parameters()) + list(model.fc2.parameters()), "lr": 0.05})
    _train_step(model, opt, seed=2)
    ref = make_mlp(d_hidden=16)
    ref_opt = torch.optim.SGD(list(ref.fc1.parameters()) + list(ref.bn.parameters()), lr=0.1)
    _loss(ref, seed=1).backward()
    ref_opt.step()
    ref.zero_grad()
    ref_opt.add_param_group({"params": list(ref.ln.parameters()) + list(ref.fc2.parameters()), "lr": 0.05})
    _loss(ref, seed=2).backward()
    ref_opt.step()
    tol = dict(rtol=0, atol=0) if level == "O0" else dict(rtol=5e-2, atol=5e-3)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.float(), q, **tol)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_params_appended_to_param_groups_by_hand_are_refused(level):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(list(model.fc1.parameters()) + list(model.bn.parameters()), lr=0.1)
    amp.initialize(model, opt, opt_level=level, verbosity=0)
    _train_step(model, opt, seed=1)
    opt.param_groups[0]["params"].extend(model.fc2.parameters())
    before = [_clone(p) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="optimizer.add_param_group"):
        _train_step(model, opt, seed=2)
    assert same(before, [_clone(p) for p in model.parameters()])


# --- models ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_models_without_floating_params(level):
    act = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten())
    act.register_buffer("calls", torch.zeros((), dtype=torch.long))
    assert amp.initialize(act, opt_level=level, verbosity=0) is act
    assert act(torch.randn(2, 3)).dtype == torch.float32
    ampcompat.reset()
    act = torch.nn.Sequential(torch.nn.ReLU())
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    models, _ = amp.initialize([act, model], opt, opt_level=level, verbosity=0)
    assert models[0] is act
    (x, y), = batches(1)
    with amp.scale_loss(F.cross_entropy(model(act(x)), y), opt) as scaled:
        scaled.backward()
    opt.step()
    assert _all_finite(model, opt)


# --- a second initialize -----------------------------------------------------------------------------

def test_second_initialize_with_same_optimizer_apex_error_and_no_change_to_the_optimizer():
    model, opt = _setup("O2")
    _train_step(model, opt)
    before = snapshot([model], [opt])
    other = make_mlp(seed=3, d_hidden=16)
    with pytest.raises(RuntimeError, match="^A given optimizer should only be passed through amp.initialize once.$"):
        amp.initialize(other, opt, opt_level="O2", verbosity=0)
    assert differences(before, snapshot([model], [opt])) == []
    assert all(p.dtype == torch.float32 for p in other.parameters())


@pytest.mark.parametrize("bad_call", ["same_optimizer", "bad_loss_scale", "half_model"])
def test_refused_second_initialize_leaves_amp_state_unchanged(bad_call, capsys):
    model, opt = _setup("O2")
    _train_step(model, opt)
    before = snapshot([model], [opt])
    other = make_mlp(seed=3, d_hidden=16)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises((RuntimeError, ValueError)):
        if bad_call == "same_optimizer":
            amp.initialize(other, opt, opt_level="O1", verbosity=1, max_loss_scale=4.0)
        elif bad_call == "bad_loss_scale":
            amp.initialize(other, other_opt, opt_level="O3", loss_scale="abc", verbosity=1)
        else:
            amp.initialize(other.half(), other_opt, opt_level="O1", verbosity=1)
    assert differences(before, snapshot([model], [opt])) == []


def test_second_initialize_with_new_pair_is_allowed_and_trains():
    model, opt = _setup("O1")
    _train_step(model, opt)
    model2, opt2 = _setup("O2", seed=4)
    assert not torch.is_autocast_enabled("cpu")  # the O1 handle of the first call retired
    params = [_clone(p) for p in amp.master_params(opt2)]
    _train_step(model2, opt2)
    assert _all_finite(model2, opt2)
    assert not same(params, [_clone(p) for p in amp.master_params(opt2)])


# --- initialize after wrapping in DDP ----------------------------------------------------------------

@pytest.fixture
def single_process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("needs a PyTorch built with torch.distributed (the Linux and macOS wheels are)")
    # A file store, not a TCP one: a free port can be taken by another process before the store binds it.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    destroy_process_group()


_DDP_MESSAGE = ("Incoming model is an instance of torch.nn.parallel.DistributedDataParallel. Parallel wrappers "
                "should only be applied to the model(s) AFTER \nthe model(s) have been returned from "
                "amp.initialize.")


@pytest.mark.parametrize("as_list", [False, True])
def test_initialize_after_ddp_apex_error_and_nothing_patched(single_process_group, as_list):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    plain = make_mlp(seed=2, d_hidden=16)
    with pytest.raises(RuntimeError) as err:
        amp.initialize([plain, ddp] if as_list else ddp, opt, opt_level="O2", verbosity=0)
    assert str(err.value) == _DDP_MESSAGE
    assert not hasattr(opt, "_amp_stash")
    assert all(p.dtype == torch.float32 for p in list(model.parameters()) + list(plain.parameters()))
    assert not plain._forward_pre_hooks and not model._forward_pre_hooks


def test_scale_loss_after_refused_first_initialize_says_not_initialized(single_process_group):
    model = make_mlp(d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(RuntimeError):
        amp.initialize(ddp, opt, opt_level="O2", verbosity=0)
    with pytest.raises(RuntimeError, match="internal Amp state has not been initialized"):
        with amp.scale_loss(_loss(model), opt):
            pass


def test_ddp_after_initialize_trains(single_process_group):
    model, opt = _setup("O2")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = [_clone(p) for p in amp.master_params(opt)]
    for seed in (1, 2):
        _train_step(ddp, opt, seed=seed)
    assert _all_finite(model, opt) and not same(params, [_clone(p) for p in amp.master_params(opt)])
