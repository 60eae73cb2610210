"""Checkpoints: every state ampcompat writes loads with ``weights_only=True``; resuming is bitwise.

A resumed run (fresh process state: ``ampcompat.reset()``, a new model built from another seed, a new
optimizer, ``amp.initialize``, then the three state dicts loaded) must equal the uninterrupted run
bit for bit: parameters, FP32 masters, buffers, optimizer state, loss scales and the losses
themselves, with overflows both before and after the checkpoint (apex#180 and #480 were loss spikes
after resuming O2, whose masters Apex did not save). Loading a checkpoint of one opt level into
another works, with the precision the target level keeps, or fails with a clear message.
"""
from __future__ import annotations

import copy
import io
import pickle
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

import ampcompat
from ampcompat import amp

from _models import batches, make_mlp

LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")
OPTIMIZERS: Dict[str, Callable] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-3),  # eps representable in fp16 (O3)
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-3, fused=True),
}
STEPS, SAVE_AT = 8, 4
OVERFLOWS = (1, 6)  # one before the checkpoint, one after




def _build(level: str, optimizer: str = "adam", seed: int = 0, device: str = "cpu", initialize: bool = True, **kw):
    model = make_mlp(device, seed=seed, d_hidden=16)
    opt = OPTIMIZERS[optimizer](model.parameters())
    if initialize:
        kw.setdefault("loss_scale", "dynamic")  # so that the overflows are detected at every level
        amp.initialize(model, opt, opt_level=level, verbosity=0, **kw)
    return model, opt


def _train(model, opt, steps, device="cpu") -> List[torch.Tensor]:
    data = batches(STEPS, device)
    losses = []
    for step in steps:
        x, y = data[step]
        loss = F.cross_entropy(model(x), y)
        if step in OVERFLOWS:
            loss = loss * float("inf")
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def _state(model, opt) -> List[torch.Tensor]:
    """Everything that must be restored, in a fixed order (optimizer state by parameter position)."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [b.detach().clone() for b in model.buffers()]
    for group in opt.param_groups:
        for p in group["params"]:
            tensors.append(p.detach().clone())
            for key in sorted(opt.state[p]):
                value = opt.state[p][key]
                tensors.append(value.clone() if torch.is_tensor(value) else torch.tensor(value))
    return tensors


def _assert_bitwise(got: List[torch.Tensor], want: List[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _save(model, opt) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "amp": amp.state_dict()}, buf)
    buf.seek(0)
    return buf


def _only_plain_types(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _only_plain_types(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain_types(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


# --- weights_only loading ----------------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_every_state_dict_loads_with_weights_only(level, device):
    model, opt = _build(level, device=device)
    _train(model, opt, range(3), device)
    checkpoint = torch.load(_save(model, opt), weights_only=True)
    assert _only_plain_types(checkpoint)
    assert set(checkpoint["amp"]) == {"loss_scaler0"}
    assert checkpoint["amp"]["loss_scaler0"] == {"loss_scale": 2.0 ** 15, "unskipped": 1}
    assert all(t.dtype in (torch.float32, torch.int64) for t in checkpoint["model"].values())
    masters = checkpoint["optimizer"].get("amp_master_params")
    if level in ("O2", "O5"):
        assert [m.dtype for m in masters] == [torch.float32] * len(masters) and masters
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(checkpoint["model"][name].cpu(), tensor.detach().cpu().to(checkpoint["model"][name].dtype))


def test_fp16_optimizer_state_dict_loads_with_weights_only_and_resumes_bitwise(capsys):
    fp16_utils = pytest.importorskip("ampcompat.fp16_utils")

    def build(seed):
        model = make_mlp(seed=seed, d_hidden=16)
        fp16_utils.convert_network(model, torch.float16)
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, fp16_utils.FP16_Optimizer(inner, dynamic_loss_scale=True, verbose=False)

    def train(model, opt, steps):
        data = batches(STEPS)
        for step in steps:
            x, y = data[step]
            loss = F.cross_entropy(model(x.half()).float(), y)
            if step in OVERFLOWS:
                loss = loss * float("inf")
            opt.zero_grad()
            opt.backward(loss)
            opt.step()

    model, opt = build(0)
    train(model, opt, range(SAVE_AT))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    train(model, opt, range(SAVE_AT, STEPS))
    want = [p.detach().clone() for p in list(model.parameters()) + opt.all_fp32_from_fp16_params]
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    assert _only_plain_types(checkpoint)
    resumed, resumed_opt = build(7)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, range(SAVE_AT, STEPS))
    got = [p.detach().clone() for p in list(resumed.parameters()) + resumed_opt.all_fp32_from_fp16_params]
    _assert_bitwise(got, want)
    assert resumed_opt.loss_scale == opt.loss_scale


# --- bitwise resume ----------------------------------------------------------------------------------

def _uninterrupted_and_checkpoint(level, optimizer, device="cpu"):
    model, opt = _build(level, optimizer, device=device)
    _train(model, opt, range(SAVE_AT), device)
    buf = _save(model, opt)
    losses = _train(model, opt, range(SAVE_AT, STEPS), device)
    return buf, losses, _state(model, opt), amp.state_dict()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("level", LEVELS)
def test_resume_is_bitwise(level, optimizer, device):
    buf, want_losses, want_state, want_amp = _uninterrupted_and_checkpoint(level, optimizer, device)
    ampcompat.reset()
    model, opt = _build(level, optimizer, seed=7, device=device)
    checkpoint = torch.load(buf, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    amp.load_state_dict(checkpoint["amp"])
    losses = _train(model, opt, range(SAVE_AT, STEPS), device)
    _assert_bitwise(losses, want_losses)
    _assert_bitwise(_state(model, opt), want_state)
    assert amp.state_dict() == want_amp


@pytest.mark.parametrize("level", LEVELS)
def test_resume_is_bitwise_when_optimizer_state_loads_before_the_model(level):
    """Any order of the three load_state_dict calls after initialize gives the same run."""
    buf, want_losses, want_state, _ = _uninterrupted_and_checkpoint(level, "adam")
    ampcompat.reset()
    model, opt = _build(level, seed=7)
    checkpoint = torch.load(buf, weights_only=True)
    amp.load_state_dict(checkpoint["amp"])
    opt.load_state_dict(checkpoint["optimizer"])
    model.load_state_dict(checkpoint["model"])
    _assert_bitwise(_train(model, opt, range(SAVE_AT, STEPS)), want_losses)
    _assert_bitwise(_state(model, opt), want_state)




@pytest.mark.parametrize("level", [
    "O0", "O1", "O3", "O4",
    "O2",
    "O5",
])
def test_state_loaded_before_initialize_keeps_optimizer_state_exact(level):
    """Apex's own checkpoint test loaded state before initialize too. The optimizer state must survive
    exactly (cast to the parameter dtype only where the level steps FP16 parameters: O3); O2/O5 masters
    then come from the FP16/BF16 model weights, as torch's optimizer.load_state_dict drops amp's key."""
    buf, _, _, _ = _uninterrupted_and_checkpoint(level, "adam")
    checkpoint = torch.load(buf, weights_only=True)
    ampcompat.reset()
    model, opt = _build(level, seed=7, initialize=False)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    amp.initialize(model, opt, opt_level=level, loss_scale="dynamic", verbosity=0)
    amp.load_state_dict(checkpoint["amp"])
    opt._amp_lazy_init()
    stepped_dtype = torch.float16 if level == "O3" else torch.float32
    saved = checkpoint["optimizer"]["state"]
    for index, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for key, value in saved[index].items():
            assert torch.equal(opt.state[p][key], value.to(stepped_dtype) if key != "step" else value), (index, key)
    if level in ("O2", "O5"):
        half = [p for p in model.parameters() if p.dtype != torch.float32]
        masters = opt._amp_stash.all_fp32_from_fp16_params
        _assert_bitwise([m.detach() for m in masters], [p.detach().float() for p in half])


# --- checkpoints across opt levels -------------------------------------------------------------------

CROSS = [("O1", "O2"), ("O2", "O1"), ("O0", "O2"), ("O2", "O0"), ("O4", "O5"), ("O5", "O4"),
         ("O2", "O5"), ("O5", "O2"), ("O1", "O3"), ("O3", "O1")]


@pytest.mark.parametrize("src,dst", CROSS, ids=["%s-to-%s" % pair for pair in CROSS])
def test_checkpoint_across_opt_levels(src, dst):
    """What each target level restores: its model weights from the model state (cast to its dtype), the
    optimizer moments exactly, and its FP32 masters from saved masters when the source had them, else
    from the model weights."""
    model, opt = _build(src)
    _train(model, opt, range(SAVE_AT))
    saved_masters = [p.detach().clone() for p in amp.master_params(opt)]
    checkpoint = torch.load(_save(model, opt), weights_only=True)
    ampcompat.reset()
    model, opt = _build(dst, seed=7)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    amp.load_state_dict(checkpoint["amp"])
    for name, p in model.named_parameters():
        assert torch.equal(p, checkpoint["model"][name].to(p.dtype))
    opt._amp_lazy_init()
    src_masters, dst_masters = src in ("O2", "O5"), dst in ("O2", "O5")
    if dst_masters:
        with amp.scale_loss(F.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]), opt) as scaled:
            scaled.backward()  # an Apex-era / no-master checkpoint rebuilds the masters here
        opt.zero_grad()
        want = saved_masters if src_masters else [checkpoint["model"][name].to(p.dtype).float()
                                                  for name, p in model.named_parameters()]
        _assert_bitwise([p.detach() for p in amp.master_params(opt)], want)
    stepped_dtype = torch.float16 if dst == "O3" else torch.float32
    for index, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for key, value in checkpoint["optimizer"]["state"][index].items():
            assert torch.equal(opt.state[p][key], value.to(stepped_dtype) if key != "step" else value)
    losses = _train(model, opt, range(SAVE_AT, STEPS))
    assert all(torch.isfinite(loss) for i, loss in zip(range(SAVE_AT, STEPS), losses) if i not in OVERFLOWS)
    assert all(bool(torch.isfinite(p).all()) for p in list(model.parameters()) + list(amp.master_params(opt)))


def test_masters_of_another_model_are_refused_with_a_clear_message():
    model, opt = _build("O2")
    _train(model, opt, range(2))
    checkpoint = torch.load(_save(model, opt), weights_only=True)
    ampcompat.reset()
    other = make_mlp(seed=7, d_hidden=16)
    other_opt = torch.optim.Adam(list(other.fc1.parameters()) + list(other.bn.parameters()), lr=1e-2)
    amp.initialize(other, other_opt, opt_level="O2", verbosity=0)
    other_opt._amp_lazy_init()
    before = [p.detach().clone() for p in amp.master_params(other_opt)]
    with pytest.raises(ValueError, match="holds 6 FP32 master weights but this optimizer has 2"):
        other_opt.load_state_dict(checkpoint["optimizer"])
    _assert_bitwise([p.detach() for p in amp.master_params(other_opt)], before)
    assert not other_opt.state


def test_apex_era_o2_checkpoint_without_masters_loads():
    """Apex saved no masters: they are rebuilt from the (FP16) model weights at the next backward."""
    model, opt = _build("O2")
    _train(model, opt, range(SAVE_AT))
    checkpoint = torch.load(_save(model, opt), weights_only=True)
    del checkpoint["optimizer"]["amp_master_params"]
    ampcompat.reset()
    model, opt = _build("O2", seed=7)
    opt.load_state_dict(checkpoint["optimizer"])
    model.load_state_dict(checkpoint["model"])
    _train(model, opt, [SAVE_AT])
    assert all(bool(torch.isfinite(p).all()) for p in amp.master_params(opt))
    half = [p for p in model.parameters() if p.dtype == torch.float16]
    _assert_bitwise([p.detach() for p in half],
                    [m.detach().half() for m in opt._amp_stash.all_fp32_from_fp16_params])


# --- copies and pickles mid-run ----------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_loss_scalers_pickled_mid_run_resume_bitwise(level):
    """GradScaler's tests pickle the scaler mid-run; amp's scalers (Apex's LossScaler objects, which
    FP16_Optimizer-era checkpoints pickled) restore the run as exactly as amp.state_dict() does."""
    model, opt = _build(level)
    _train(model, opt, range(SAVE_AT))
    buf = _save(model, opt)
    scalers = pickle.dumps(amp._amp_state.loss_scalers)
    want = _train(model, opt, range(SAVE_AT, STEPS))
    want_state = _state(model, opt)
    ampcompat.reset()
    model, opt = _build(level, seed=7)
    checkpoint = torch.load(buf, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    amp._amp_state.loss_scalers = pickle.loads(scalers)
    _assert_bitwise(_train(model, opt, range(SAVE_AT, STEPS)), want)
    _assert_bitwise(_state(model, opt), want_state)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_copy_of_model_and_optimizer_mid_run_trains_identically(level, how):
    """The patched model/optimizer pair copied together (so the optimizer's stash points at the copy's
    parameters), e.g. for a best-so-far snapshot, must still be an amp optimizer."""
    model, opt = _build(level, "sgd_momentum")
    _train(model, opt, range(SAVE_AT))
    if how == "deepcopy":
        twin, twin_opt = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        twin, twin_opt = torch.load(buf, weights_only=False)
    scalers = pickle.dumps(amp._amp_state.loss_scalers)
    want = _train(model, opt, range(SAVE_AT, STEPS))
    amp._amp_state.loss_scalers = pickle.loads(scalers)
    assert hasattr(twin_opt, "_amp_stash")
    got = _train(twin, twin_opt, range(SAVE_AT, STEPS))
    _assert_bitwise(got, want)
    _assert_bitwise(_state(twin, twin_opt), _state(model, opt))
