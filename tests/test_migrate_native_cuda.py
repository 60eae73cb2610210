"""The plain-PyTorch code ``--to-native`` writes into a file, run on CUDA: the FusedAdam and LARC classes, the
``unscaled_gradients`` context manager and the O2/O3 model casts against ampcompat's own CUDA paths.

The CPU twins are in ``test_migrate_native_inline_optim.py`` and ``test_migrate_native_leftovers.py``; on CUDA,
ampcompat's FusedAdam runs torch's fused kernels, so the comparison allows rounding there.
"""
import contextlib
import collections.abc
import math

import pytest
import torch

from ampcompat import amp
from ampcompat.optimizers import FusedAdam
from ampcompat.parallel.LARC import LARC
from ampcompat.tools.migrate import native_inference, native_reads
from ampcompat.tools.migrate.native_inline_classes import FUSED_ADAM, LARC as INLINE_LARC, class_text

pytestmark = pytest.mark.cuda


def _generated(lines_or_text: str, name: str, **modules):
    namespace = {"torch": torch, "math": math, "contextlib": contextlib, "collections": collections, **modules}
    exec(lines_or_text, namespace)
    return namespace[name]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()


def _batches(count: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 32, generator=generator).cuda(), torch.randint(0, 8, (16,), generator=generator).cuda())
            for _ in range(count)]


def _train_native(model, optimizer, batches, loss_scale=1.0):
    """The native recipe the conversion writes: autocast forward, GradScaler backward and step."""
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y) * loss_scale
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("kwargs", [dict(bias_correction=False, max_grad_norm=1.0), dict(bias_correction=False),
                                    dict(eps_inside_sqrt=True, weight_decay=0.01, eps=1e-4)],
                         ids=["2019-clipped", "no-bias-correction", "2019-eps-inside-sqrt"])
def test_inline_fused_adam_on_cuda_trains_as_ampcompat_fused_adam(kwargs):
    inline_cls = _generated(class_text(FUSED_ADAM), "_ApexFusedAdam")
    batches = _batches(12)
    reference, inline = _model(), _model()
    _train_native(reference, FusedAdam(reference.parameters(), lr=1e-2, **kwargs), batches, loss_scale=4.0)
    _train_native(inline, inline_cls(inline.parameters(), lr=1e-2, **kwargs), batches, loss_scale=4.0)
    start = _model()
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(start.parameters(), inline.parameters()))
    assert moved > 1e-3
    for a, b in zip(reference.parameters(), inline.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_inline_larc_on_cuda_trains_as_ampcompat_larc():
    inline_cls = _generated(class_text(INLINE_LARC), "_ApexLARC")
    batches = _batches(8)
    reference, inline = _model(), _model()
    for model, wrapper in ((reference, LARC), (inline, inline_cls)):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        _train_native(model, wrapper(sgd, trust_coefficient=0.02, clip=True), batches)
    for a, b in zip(reference.parameters(), inline.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_unscaled_gradients_on_cuda_shows_the_unscaled_sum_and_keeps_a_clip_scaled():
    unscaled_gradients = _generated("\n".join(native_reads.helper_lines("unscaled_gradients")),
                                    "unscaled_gradients")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    for x, y in _batches(2):  # two micro-batches accumulate
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    tensors = [p.grad for p in model.parameters()]
    with unscaled_gradients(scaler, optimizer):
        for p, grad in zip(model.parameters(), scaled):
            torch.testing.assert_close(p.grad, grad / 2.0 ** 10, rtol=0, atol=0)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert float(norm) > 1e-3  # the clip was hit
    assert all(p.grad is t for p, t in zip(model.parameters(), tensors))  # the same tensors, now clipped and scaled
    expected = [g / 2.0 ** 10 * (1e-3 / (float(norm) + 1e-6)) * 2.0 ** 10 for g in scaled]
    for p, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("level, keep", [("O2", True), ("O3", False)])
def test_model_casts_on_cuda_compute_as_ampcompats_level(level, keep):
    casts = _generated("\n".join(native_inference.helper_lines("fp16_model_casts")), "fp16_model_casts")
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8)).cuda()
    reference, native = build().eval(), build().eval()
    reference = amp.initialize(reference, opt_level=level, verbosity=0)
    native = casts.apply(native, keep_batchnorm_fp32=keep)
    x = torch.randn(16, 32, device="cuda")
    with torch.no_grad():
        expected, got = reference(x), native(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert native[1].weight.dtype == (torch.float32 if keep else torch.float16)
    assert all(value.dtype != torch.float16 for value in native.state_dict().values())
