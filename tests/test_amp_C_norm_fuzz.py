"""amp_C's norm kernels over Apex's fuzz grid: size pairs around the chunk boundaries, every launcher
chunk size, fp16 and FP32 lists, per-tensor on and off. Each result must equal, at FP32 tolerances
(``assert_close``'s float32 defaults), the norm computed in FP32 of the (unscaled) values, be FP32 with
Apex's shapes, and leave the overflow flag 0.

The CPU grid keeps Apex's boundary cases at small repeat counts; the full sizes (~600k elements, lists
of 110 tensors) run under the ``cuda`` marker.
"""
import pytest
import torch

from ampcompat import amp_C
from ampcompat.multi_tensor_apply import MultiTensorApply

CHUNK_SIZES = (2048 * 32, 333, 33333)
BOUNDARY_PAIRS = ((777, 555), (555, 2048 * 32 + 1), (2048 * 32 + 1, 555), (555, 2048 * 32), (2048 * 32, 555),
                  (33333, 555), (555, 33333), (333, 334), (666, 1))
FULL_PAIRS = ((7777 * 77, 555 * 555),) + BOUNDARY_PAIRS


def _lists(sizea, sizeb, repeat, dtype, device, values):
    g = torch.Generator().manual_seed(sizea * 7 + sizeb)
    if values == "constant":  # Apex's own fill value
        a, b = torch.full((sizea,), 4.0), torch.full((sizeb,), 4.0)
    else:  # scaled-gradient-like values: what unscale_l2norm sees in training
        a, b = torch.randn(sizea, generator=g) * 1024, torch.randn(sizeb, generator=g) * 1024
    a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    return [t.clone() for _ in range(repeat) for t in (a, b)]


def _check(kernel, tensors, chunk_size, per_tensor, inv_scale, device):
    noop = torch.zeros(1, dtype=torch.int32, device=device)
    before = [t.clone() for t in tensors]
    applier = MultiTensorApply(chunk_size)
    if inv_scale is None:
        total, per = applier(kernel, noop, [tensors], per_tensor)
        factor = 1.0
    else:
        total, per = applier(kernel, noop, [tensors], torch.full((1,), inv_scale, device=device), per_tensor)
        factor = inv_scale
    # The reference: the unscaled values in FP32, their norm summed exactly enough (FP64) and rounded to FP32.
    unscaled = [t.float() * factor for t in tensors]
    torch.testing.assert_close(total, torch.cat(unscaled).double().norm().float().reshape(1))
    if per_tensor:
        torch.testing.assert_close(per, torch.stack([t.double().norm().float() for t in unscaled]))
    else:
        assert per.shape == (0,)
    assert total.dtype == per.dtype == torch.float32
    assert noop.item() == 0
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))  # the inputs are only read


KERNELS = {"l2norm": (amp_C.multi_tensor_l2norm, None), "l2norm_mp": (amp_C.multi_tensor_l2norm_mp, None),
           "unscale_l2norm": (amp_C.multi_tensor_unscale_l2norm, 0.5),
           "unscale_l2norm_third": (amp_C.multi_tensor_unscale_l2norm, 1 / 3)}


def _fuzz(device, kernel_name, dtype, pairs, repeats, values):
    kernel, inv_scale = KERNELS[kernel_name]
    for sizea, sizeb in pairs:
        for repeat in repeats:
            tensors = _lists(sizea, sizeb, repeat, dtype, device, values)
            for chunk_size in CHUNK_SIZES:
                for per_tensor in (False, True):
                    _check(kernel, tensors, chunk_size, per_tensor, inv_scale, device)


@pytest.mark.parametrize("values", ["constant", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_norm_fuzz_at_chunk_boundaries(kernel_name, dtype, values):
    _fuzz("cpu", kernel_name, dtype, BOUNDARY_PAIRS, (1, 3), values)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_norm_fuzz_full_sizes_on_cuda(kernel_name, dtype):
    _fuzz("cuda", kernel_name, dtype, FULL_PAIRS, (1, 55), "constant")
    _fuzz("cuda", kernel_name, dtype, FULL_PAIRS[:3], (1, 55), "random")


def test_mixed_fp16_and_fp32_list(device):
    """One list of both dtypes (Apex's ``_mp`` use): norms still in FP32, in list order."""
    tensors = _lists(2048 * 32 + 1, 555, 2, torch.float16, device, "random")
    tensors[1::2] = [t.float() for t in tensors[1::2]]
    for name in KERNELS:
        kernel, inv_scale = KERNELS[name]
        _check(kernel, tensors, 2048 * 32, True, inv_scale, device)


def test_half_values_whose_squares_overflow_fp16_are_summed_in_fp32(device):
    """fp16 maxima squared overflow fp16: the sum of squares must be accumulated in FP32."""
    tensors = [torch.full((4096,), 60000.0, device=device).half() for _ in range(3)]
    for name in KERNELS:
        kernel, inv_scale = KERNELS[name]
        _check(kernel, tensors, 2048 * 32, True, inv_scale, device)


def _check_l2norm_scale(sources, chunk_size, per_tensor, dst_dtype, device):
    noop = torch.zeros(1, dtype=torch.int32, device=device)
    before = [t.clone() for t in sources]
    destinations = [torch.empty_like(t, dtype=dst_dtype) for t in sources]
    total, per = MultiTensorApply(chunk_size)(amp_C.multi_tensor_l2norm_scale, noop, [sources, destinations], 0.25,
                                              per_tensor)
    reference = [t.float() for t in before]  # the norm is of the sources, before scaling
    torch.testing.assert_close(total, torch.cat(reference).double().norm().float().reshape(1))
    if per_tensor:
        torch.testing.assert_close(per, torch.stack([t.double().norm().float() for t in reference]))
    else:
        assert per.shape == (0,)
    for d, s in zip(destinations, reference):
        torch.testing.assert_close(d, (s * 0.25).to(dst_dtype), rtol=0, atol=0)
    assert noop.item() == 0 and all(torch.equal(t, b) for t, b in zip(sources, before))


@pytest.mark.parametrize("dtype,dst_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_l2norm_scale_fuzz_at_chunk_boundaries(device, dtype, dst_dtype):
    for sizea, sizeb in BOUNDARY_PAIRS[:4]:
        sources = _lists(sizea, sizeb, 2, dtype, device, "random")
        for chunk_size in CHUNK_SIZES:
            for per_tensor in (False, True):
                _check_l2norm_scale(sources, chunk_size, per_tensor, dst_dtype, device)


def test_l2norm_scale_in_place_flags_non_finite_and_still_writes(device):
    tensors = _lists(777, 555, 1, torch.float32, device, "random")
    expected = [t * 0.5 for t in tensors]
    norm = torch.cat(tensors).double().norm().float()
    noop = torch.zeros(1, dtype=torch.int32, device=device)
    total, _ = amp_C.multi_tensor_l2norm_scale(2048 * 32, noop, [tensors, tensors], 0.5)
    torch.testing.assert_close(total, norm.reshape(1))  # measured before the in-place scaling
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected)) and noop.item() == 0
    tensors[1][3] = float("nan")
    out = [torch.empty_like(t) for t in tensors]
    amp_C.multi_tensor_l2norm_scale(2048 * 32, noop, [tensors, out], 2.0, True)
    assert noop.item() == 1 and torch.equal(out[0], tensors[0] * 2)
