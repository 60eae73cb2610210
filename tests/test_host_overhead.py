"""ampcompat adds no host work to a training step: counted, not timed, against the native loops it replaces.

One MLP training step (zero_grad, forward, scale_loss + backward, step) is run for several steady-state
steps four ways: O1 against ``torch.autocast`` + ``torch.amp.GradScaler`` (native fp16), and O2 against
O2 written by hand (an fp16 model, FP32 masters stepped by the optimizer, fp16 grads copied into the
masters' grads and unscaled by ``GradScaler``, masters copied back), each built here in plain PyTorch.
Python function calls (``sys.setprofile``, Python and builtin functions, as cProfile counts them) and
aten ops (a ``TorchDispatchMode`` counter) per step must be no more than the reference's. The counts
are deterministic, so this pins the host overhead of the step path without timing anything; the
comparison is a ratio within one torch version, so a torch upgrade moves both sides alike.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _counters import count_aten_ops, count_calls  # benchmarks/_counts.py
from ampcompat import amp

WARMUP, STEPS = 4, 6
WIDTH, DEPTH, BATCH, CLASSES = 32, 4, 8, 10


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH if i < DEPTH - 1 else CLASSES)] + ([nn.ReLU()] if i < DEPTH - 1 else [])
    return nn.Sequential(*layers)


def _data() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(4)]


OPTIMIZERS = {
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def native_fp16_loop(optimizer: str) -> Callable[[int], None]:
    """``torch.autocast`` fp16 + ``GradScaler``: what O1 replaces."""
    model, data = _mlp(), _data()
    opt = OPTIMIZERS[optimizer](model.parameters())
    scaler = torch.amp.GradScaler("cpu")

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def manual_o2_loop(optimizer: str) -> Callable[[int], None]:
    """O2 by hand: fp16 model, FP32 masters, fp16 grads copied to the masters and unscaled there."""
    model, data = _mlp().half(), _data()
    params = list(model.parameters())
    masters = [p.detach().float().requires_grad_(True) for p in params]
    opt = OPTIMIZERS[optimizer](masters)
    scaler = torch.amp.GradScaler("cpu")

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        opt.zero_grad()
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x.half()).float(), y)
        scaler.scale(loss).backward()
        for m in masters:
            m.grad = torch.empty_like(m)
        torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)

    return step


def ampcompat_loop(level: str, optimizer: str) -> Callable[[int], None]:
    """Apex's loop, unchanged, on ampcompat."""
    model, data = _mlp(), _data()
    opt = OPTIMIZERS[optimizer](model.parameters())
    model, opt = amp.initialize(model, opt, opt_level=level, loss_scale="dynamic", verbosity=0)

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with amp.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()

    return step


REFERENCE = {"O1": ("native_fp16", native_fp16_loop), "O2": ("manual_o2", manual_o2_loop)}


def _counts(step: Callable[[int], None]):
    for i in range(WARMUP):
        step(i)
    calls = count_calls(step, STEPS, first=WARMUP)
    ops = count_aten_ops(step, STEPS, first=WARMUP + STEPS)
    return calls, ops


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_step_host_work_is_no_more_than_the_native_loop(level, optimizer):
    ref_name, ref_loop = REFERENCE[level]
    ref_calls, ref_ops = _counts(ref_loop(optimizer))
    calls, ops = _counts(ampcompat_loop(level, optimizer))
    report = "{} {}: calls {:.0f} (python {:.0f}) vs {} {:.0f} (python {:.0f}); aten ops {:.0f} vs {:.0f}".format(
        level, optimizer, calls.total, calls.python, ref_name, ref_calls.total, ref_calls.python, ops, ref_ops)
    print(report)
    assert calls.total <= ref_calls.total, report
    assert calls.python <= ref_calls.python, report
    assert ops <= ref_ops, report


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fused_o2_step_host_work_is_no_more_than_todays_o2(optimizer, monkeypatch):
    """The fused O2 step (``fused_master_weights``) against today's O2 path on the same loop: no more Python
    calls, calls or aten ops per step. The kernels are stubbed out (``_fused_o2_stub.py``: each launch is one
    recorded call), as Triton's interpreter is no measure of a real launch; on CUDA the same comparison
    with Triton's own launch path is ``test_o2_fused_step.py::test_cuda_host_work_per_step_fused_against_todays_path``.
    """
    import _fused_o2_stub
    from ampcompat.amp.fused_o2 import coverage

    launches = _fused_o2_stub.install(monkeypatch)
    counts = {}
    for fused in (False, True):
        coverage.set_enabled(fused)
        try:
            counts[fused] = _counts(ampcompat_loop("O2", optimizer))
        finally:
            coverage.set_enabled(None)
    (calls, ops), (ref_calls, ref_ops) = counts[True], counts[False]
    assert launches.count("nonfinite_kernel") == WARMUP + 2 * STEPS - 1  # every step but the first was fused
    report = "O2 fused {}: calls {:.0f} (python {:.0f}) vs today's O2 {:.0f} (python {:.0f}); aten ops {:.0f} vs " \
             "{:.0f}".format(optimizer, calls.total, calls.python, ref_calls.total, ref_calls.python, ops, ref_ops)
    print(report)
    assert calls.total <= ref_calls.total, report
    assert calls.python <= ref_calls.python, report
    assert ops <= ref_ops, report


def test_the_counters_see_added_host_work():
    """A loop doing one more Python call and one more aten op per step counts exactly that much more."""
    data = torch.ones(3)

    def helper() -> None:
        pass

    def plain(i: int) -> None:
        data.add(1)

    def more(i: int) -> None:
        helper()
        data.add(1).mul(2)

    assert count_calls(more, 5).python == count_calls(plain, 5).python + 1
    assert count_aten_ops(more, 5) == count_aten_ops(plain, 5) + 1
