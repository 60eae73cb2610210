"""PyTorch features that native AMP supports and Apex broke on, under every opt level.

Each feature is checked by a twin run: the same level with and without the feature where the
feature must not change the math (activation checkpointing, ``torch.compile`` with the
``aot_eager`` backend, a worker thread: bitwise equal), or against a plain FP32 PyTorch reference
within the level's precision where it does (double backward, sparse embedding gradients,
channels_last, frozen sub-modules). Levels run with their own default options.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

import ampcompat
from ampcompat import amp

from _models import batches, make_mlp

LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")
STEPS = 3




def _tolerance(level: str) -> Dict[str, float]:
    """How far a level may sit from FP32 after a few SGD steps of a small model."""
    if level == "O0":
        return dict(rtol=1e-5, atol=1e-6)
    if level in ("O4", "O5"):
        return dict(rtol=6e-2, atol=2e-2)  # bfloat16: 8 bits of mantissa
    return dict(rtol=1e-2, atol=3e-3)


def _close_to_reference(level: str, got: List[torch.Tensor], want: List[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **_tolerance(level))


def _equal(got: List[torch.Tensor], want: List[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _masters(opt) -> List[torch.Tensor]:
    return [p.detach().clone() for p in amp.master_params(opt)]


def _amp_train(level: str, model: torch.nn.Module, opt, loss_fn: Callable, data, **kw):
    amp.initialize(model, opt, opt_level=level, verbosity=0, **kw)
    losses = []
    for batch in data:
        loss = loss_fn(model, batch)
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().float())
    return losses


def _fp32_train(model: torch.nn.Module, opt, loss_fn: Callable, data):
    for batch in data:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# --- double backward ---------------------------------------------------------------------------------

def _penalised_loss(model, batch):
    """WGAN-GP style: the squared gradient of the output w.r.t. the input, with create_graph=True."""
    x, y = batch
    x = x.clone().requires_grad_(True)
    out = model(x)
    (gx,) = torch.autograd.grad(out.float().logsumexp(1).sum(), x, create_graph=True)
    return F.cross_entropy(out, y) + 0.1 * gx.float().pow(2).sum(1).mean()


@pytest.mark.parametrize("level", LEVELS)
def test_double_backward_gradient_penalty(level, device):
    data = batches(STEPS, device)
    ref = make_mlp(device)
    _fp32_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), _penalised_loss, data)
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = _amp_train(level, model, opt, _penalised_loss, data)
    assert all(torch.isfinite(loss) for loss in losses)
    _close_to_reference(level, _masters(opt), list(ref.parameters()))


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_double_backward_of_the_scaled_loss_w_r_t_params(level):
    """PyTorch's documented gradient-penalty recipe, spelled with amp: autograd.grad of the scaled loss,
    unscaled by hand, then a second scale_loss block for the penalised loss."""
    data = batches(STEPS)
    ref = make_mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data:
        loss = F.cross_entropy(ref(x), y)
        grads = torch.autograd.grad(loss, list(ref.parameters()), create_graph=True)
        (loss + 0.01 * sum(g.pow(2).sum() for g in grads)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.initialize(model, opt, opt_level=level, verbosity=0, max_loss_scale=2.0 ** 8)
    for x, y in data:
        params = [p for p in model.parameters() if p.requires_grad]
        with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
            scaled_grads = torch.autograd.grad(scaled, params, create_graph=True)
        inv = 1.0 / amp._amp_state.loss_scalers[0].loss_scale()
        penalty = sum((g.float() * inv).pow(2).sum() for g in scaled_grads)
        with amp.scale_loss(F.cross_entropy(model(x), y) + 0.01 * penalty, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
    _close_to_reference(level, _masters(opt), list(ref.parameters()))


# --- activation checkpointing ------------------------------------------------------------------------

class CheckpointedMLP(torch.nn.Module):
    """fc1 -> relu -> ln inside ``torch.utils.checkpoint`` (no batchnorm there: it would update twice)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.fc1 = torch.nn.Linear(8, 32)
        self.ln = torch.nn.LayerNorm(32)
        self.bn = torch.nn.BatchNorm1d(32)
        self.fc2 = torch.nn.Linear(32, 4)

    def block(self, x):
        return self.ln(F.relu(self.fc1(x)))

    def forward(self, x):
        if self.mode == "none":
            h = self.block(x)
        else:
            h = checkpoint.checkpoint(self.block, x, use_reentrant=self.mode == "reentrant")
        return self.fc2(self.bn(h))


def _ckpt_run(level, mode, device):
    torch.manual_seed(0)
    model = CheckpointedMLP(mode).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x.clone().requires_grad_(mode == "reentrant")), y)

    losses = _amp_train(level, model, opt, loss_fn, batches(STEPS, device))
    return losses, _masters(opt) + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("level", LEVELS)
def test_activation_checkpointing_is_bitwise_transparent(level, mode, device):
    plain_losses, plain_state = _ckpt_run(level, "none", device)
    ampcompat.reset()
    losses, state = _ckpt_run(level, mode, device)
    _equal(losses, plain_losses)
    _equal(state, plain_state)


# --- sparse embedding gradients ----------------------------------------------------------------------

class Bag(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8, sparse=True)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, idx):
        return self.fc(self.emb(idx).mean(1))


def _bag_data(device):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 50, (16, 6), generator=g).to(device), torch.randint(0, 4, (16,), generator=g).to(device))
            for _ in range(STEPS)]




@pytest.mark.parametrize("level", [
    "O0",
    "O1",
    "O2",
    "O3",
    "O4",
    "O5",
])
def test_sparse_embedding_gradients(level, device):
    data = _bag_data(device)
    torch.manual_seed(0)
    ref = Bag().to(device)
    _fp32_train(ref, torch.optim.SGD(ref.parameters(), lr=0.5), _ce, data)
    torch.manual_seed(0)
    model = Bag().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _amp_train(level, model, opt, _ce, data)
    _close_to_reference(level, _masters(opt), list(ref.parameters()))


@pytest.mark.parametrize("level", ["O0", "O3", "O4"])
def test_sparse_embedding_gradients_with_dynamic_scaling(level):
    data = _bag_data("cpu")
    torch.manual_seed(0)
    ref = Bag()
    _fp32_train(ref, torch.optim.SGD(ref.parameters(), lr=0.5), _ce, data)
    torch.manual_seed(0)
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _amp_train(level, model, opt, _ce, data, loss_scale="dynamic")
    _close_to_reference(level, _masters(opt), list(ref.parameters()))


# --- channels_last -----------------------------------------------------------------------------------

class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _image_data(device):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 6, 6, generator=g).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 4, (4,), generator=g).to(device)) for _ in range(STEPS)]


@pytest.mark.parametrize("level", LEVELS)
def test_channels_last(level, device):
    data = _image_data(device)
    torch.manual_seed(0)
    ref = ConvNet().to(device, memory_format=torch.channels_last)
    _fp32_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), _ce, data)
    torch.manual_seed(0)
    model = ConvNet().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _amp_train(level, model, opt, _ce, data)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv_master = next(p for p in amp.master_params(opt) if p.dim() == 4)
    assert conv_master.is_contiguous(memory_format=torch.channels_last)
    _close_to_reference(level, _masters(opt), list(ref.parameters()))


# --- frozen sub-modules ------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer_params", ["all", "trainable"])
@pytest.mark.parametrize("level", LEVELS)
def test_frozen_submodule(level, optimizer_params, device):
    data = batches(STEPS, device)

    def build():
        model = make_mlp(device)
        for p in model.fc1.parameters():
            p.requires_grad_(False)
        params = model.parameters() if optimizer_params == "all" else \
            [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.SGD(params, lr=0.1, momentum=0.9)

    ref, ref_opt = build()
    _fp32_train(ref, ref_opt, _ce, data)
    model, opt = build()
    frozen_before = [p.detach().clone() for p in model.fc1.parameters()]
    _amp_train(level, model, opt, _ce, data)
    cast = {p.dtype for p in model.fc1.parameters()}
    assert all(torch.equal(p, q.to(p.dtype)) for p, q in zip(model.fc1.parameters(), frozen_before)), cast
    assert all(p.grad is None for p in model.fc1.parameters())
    trainable = [p for p in amp.master_params(opt) if p.requires_grad]
    _close_to_reference(level, [p.detach() for p in trainable],
                        [p for p in ref.parameters() if p.requires_grad])


# --- torch.compile -----------------------------------------------------------------------------------


def _compile_run(level, backend):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp.initialize(model, opt, opt_level=level, verbosity=0)
    run = torch.compile(model, backend=backend) if backend else model
    losses = []
    for x, y in batches(5):
        out = run(x)
        loss = F.cross_entropy(out, y)
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, out.dtype, _masters(opt)


def _check_compiled_matches_eager(level, backend, tol):
    eager_losses, eager_dtype, eager_params = _compile_run(level, None)
    ampcompat.reset()
    torch._dynamo.reset()
    try:
        losses, dtype, params = _compile_run(level, backend)
    finally:
        torch._dynamo.reset()
    assert dtype == eager_dtype
    for a, b in zip(losses + params, eager_losses + eager_params):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("level", [  # a compile each (about 1 s): O1 and O2 by default, every level under --full
    pytest.param("O0", marks=pytest.mark.slow),
    "O1",
    "O2",
    pytest.param("O3", marks=pytest.mark.slow),
    pytest.param("O4", marks=pytest.mark.slow),
    pytest.param("O5", marks=pytest.mark.slow),
])
def test_torch_compile_after_initialize_aot_eager(level):
    """aot_eager runs the traced graph with eager kernels: the 5 losses must equal eager's bitwise."""
    _check_compiled_matches_eager(level, "aot_eager", dict(rtol=0, atol=0))


@pytest.mark.slow
@pytest.mark.parametrize("level", [
    "O1",
    "O2",
])
def test_torch_compile_after_initialize_inductor(level):
    """Inductor fuses kernels, so rounding differs a little from eager: close, not equal."""
    _check_compiled_matches_eager(level, "inductor", dict(rtol=1e-3, atol=1e-3))


# --- a worker thread ---------------------------------------------------------------------------------

def _thread_run(level, device, data, initialize_in_worker):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result: Dict[str, object] = {}

    def train():
        try:
            if initialize_in_worker:
                amp.initialize(model, opt, opt_level=level, verbosity=0)
            result["losses"] = [loss for loss in _train_loop(model, opt, data)]
            result["dtype"] = model(data[0][0]).dtype
        except BaseException as exc:  # surfaced in the main thread below
            result["error"] = exc

    if not initialize_in_worker:
        amp.initialize(model, opt, opt_level=level, verbosity=0)
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["losses"], result["dtype"], _masters(opt)


def _train_loop(model, opt, data):
    for x, y in data:
        # .float(): a worker thread never ran under O1's thread-wide autocast, so a loss on the half
        # logits would run in half there and in FP32 (autocast's FP32 list) in the main thread.
        loss = F.cross_entropy(model(x).float(), y)
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
        yield loss.detach().float()


def _main_thread_run(level, device, data):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp.initialize(model, opt, opt_level=level, verbosity=0)
    losses = list(_train_loop(model, opt, data))
    return losses, model(data[0][0]).dtype, _masters(opt)


@pytest.mark.parametrize("level", LEVELS)
def test_everything_in_a_worker_thread_equals_main_thread(level, device):
    data = batches(STEPS, device)
    main_losses, main_dtype, main_params = _main_thread_run(level, device, data)
    ampcompat.reset()
    losses, dtype, params = _thread_run(level, device, data, initialize_in_worker=True)
    assert dtype == main_dtype
    _equal(losses + params, main_losses + main_params)
    assert not torch.is_autocast_enabled(device)  # the worker's O1 autocast stayed in the worker


@pytest.mark.parametrize("level", LEVELS)
def test_initialize_in_main_thread_train_in_worker(level, device):
    """The model's forward autocasts in the worker too (O1/O4: a forward hook enters the region)."""
    data = batches(STEPS, device)
    main_losses, main_dtype, main_params = _main_thread_run(level, device, data)
    ampcompat.reset()
    losses, dtype, params = _thread_run(level, device, data, initialize_in_worker=False)
    assert dtype == main_dtype
    _equal(losses + params, main_losses + main_params)
