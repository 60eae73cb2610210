"""ampcompat.amp_C and ampcompat.multi_tensor_apply: Apex's multi-tensor kernels, each against its definition."""
import math

import pytest
import torch

from ampcompat import amp_C
from ampcompat.multi_tensor_apply import MultiTensorApply, multi_tensor_applier

SIZES = [7, 1, 33, 4096]


def tensors(device, dtype=torch.float32, seed=0, sizes=SIZES, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(device=device, dtype=dtype) for n in sizes]


def flag(device):
    return torch.zeros(1, dtype=torch.int32, device=device)


def test_applier_forwards_to_op_with_its_chunk_size():
    calls = []

    def op(*args):
        calls.append(args)
        return "result"

    buf, lists = flag("cpu"), [[torch.ones(2)]]
    assert multi_tensor_applier.available is True
    assert multi_tensor_applier.chunk_size == 2048 * 32
    assert multi_tensor_applier(op, buf, lists, 1.5, "x") == "result"
    assert calls == [(2048 * 32, buf, lists, 1.5, "x")]
    assert MultiTensorApply(128)(lambda *a: a[0], buf, lists) == 128


def test_multi_tensor_apply_keeps_apexs_package_layout():
    """Apex code imports the class from the submodule: `from apex.multi_tensor_apply.multi_tensor_apply import ...`."""
    import ampcompat.multi_tensor_apply as package
    from ampcompat.multi_tensor_apply.multi_tensor_apply import MultiTensorApply as from_submodule

    assert from_submodule is MultiTensorApply and type(multi_tensor_applier) is from_submodule
    assert package.multi_tensor_apply.__name__ == "ampcompat.multi_tensor_apply.multi_tensor_apply"


# --- multi_tensor_scale ----------------------------------------------------------------------------

@pytest.mark.parametrize("src_dtype,dst_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
])
def test_scale_writes_scaled_copy_in_destination_dtype(device, src_dtype, dst_dtype):
    src = tensors(device, src_dtype)
    original = [t.clone() for t in src]
    dst = [torch.empty_like(t, dtype=dst_dtype) for t in src]
    noop = flag(device)
    multi_tensor_applier(amp_C.multi_tensor_scale, noop, [src, dst], 0.25)
    for s, d, o in zip(src, dst, original):
        assert d.dtype == dst_dtype
        torch.testing.assert_close(d, (o.float() * 0.25).to(dst_dtype), rtol=0, atol=0)
        assert torch.equal(s, o)
    assert noop.item() == 0


def test_scale_in_place_and_mixed_groups(device):
    a = tensors(device, torch.float32)
    b = tensors(device, torch.float16, seed=1)
    expected = [(t.float() * 3.0).to(t.dtype) for t in a + b]
    noop = flag(device)
    amp_C.multi_tensor_scale(65536, noop, [a + b, a + b], 3.0)
    for t, e in zip(a + b, expected):
        torch.testing.assert_close(t, e, rtol=0, atol=0)
    assert noop.item() == 0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_scale_flags_non_finite_source_and_never_clears(device, bad):
    src = tensors(device)
    src[2][5] = bad
    dst = [torch.empty_like(t, dtype=torch.float16) for t in src]
    noop = flag(device)
    amp_C.multi_tensor_scale(65536, noop, [src, dst], 0.5)
    assert noop.item() == 1
    torch.testing.assert_close(dst[0], (src[0] * 0.5).half(), rtol=0, atol=0)  # written regardless
    amp_C.multi_tensor_scale(65536, noop, [tensors(device), [torch.empty(n, device=device) for n in SIZES]], 1.0)
    assert noop.item() == 1


def test_scale_checks_the_source_not_the_overflowing_result(device):
    src = [torch.full((4,), 60000.0, device=device)]
    dst = [torch.empty(4, dtype=torch.float16, device=device)]
    noop = flag(device)
    amp_C.multi_tensor_scale(65536, noop, [src, dst], 2.0)
    assert torch.isinf(dst[0]).all() and noop.item() == 0


# --- multi_tensor_axpby ----------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_axpby_computes_a_x_plus_b_y(device, out_dtype):
    x, y = tensors(device, seed=0), tensors(device, torch.float16, seed=1)
    x_before = [t.clone() for t in x]
    out = [torch.empty_like(t, dtype=out_dtype) for t in x]
    noop = flag(device)
    amp_C.multi_tensor_axpby(65536, noop, [x, y, out], 2.0, -0.5, -1)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]  # FMA may round once less
    for xi, yi, oi in zip(x, y, out):
        torch.testing.assert_close(oi, (2.0 * xi + -0.5 * yi.float()).to(out_dtype), rtol=tol, atol=tol)
    assert all(torch.equal(a, b) for a, b in zip(x, x_before))
    assert noop.item() == 0


@pytest.mark.parametrize("arg_to_check,bad_in,expect_flag", [
    (-1, "x", 1), (-1, "y", 1), (0, "x", 1), (0, "y", 0), (1, "x", 0), (1, "y", 1), (2, "x", 0),
])
def test_axpby_checks_the_requested_argument(device, arg_to_check, bad_in, expect_flag):
    x, y = tensors(device, seed=0), tensors(device, seed=1)
    (x if bad_in == "x" else y)[1][0] = math.nan
    noop = flag(device)
    amp_C.multi_tensor_axpby(65536, noop, [x, y, [torch.empty_like(t) for t in x]], 1.0, 1.0, arg_to_check)
    assert noop.item() == expect_flag


# --- norms -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_l2norm_total_and_per_tensor(device, dtype):
    ts = tensors(device, dtype)
    noop = flag(device)
    total, per = amp_C.multi_tensor_l2norm(65536, noop, [ts], True)
    expected_per = torch.stack([t.float().norm() for t in ts])
    assert total.shape == (1,) and per.shape == (len(ts),)
    assert total.dtype == per.dtype == torch.float32 and total.device == ts[0].device
    torch.testing.assert_close(per, expected_per, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, torch.cat([t.float() for t in ts]).norm().reshape(1), rtol=1e-5, atol=0)
    total_only, empty = amp_C.multi_tensor_l2norm(65536, noop, [ts], False)
    assert empty.shape == (0,) and torch.equal(total_only, total)
    assert amp_C.multi_tensor_l2norm(65536, noop, [ts])[1].shape == (0,)
    assert noop.item() == 0


def test_l2norm_mixed_dtypes_keep_list_order(device):
    ts = tensors(device, torch.float16, sizes=[3, 5]) + tensors(device, torch.float32, sizes=[4]) + \
        tensors(device, torch.float16, seed=2, sizes=[6])
    _, per = amp_C.multi_tensor_l2norm(65536, flag(device), [ts], True)
    torch.testing.assert_close(per, torch.stack([t.float().norm() for t in ts]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_l2norm_flags_non_finite(device, bad):
    ts = tensors(device)
    ts[3][100] = bad
    noop = flag(device)
    total, _ = amp_C.multi_tensor_l2norm(65536, noop, [ts], False)
    assert noop.item() == 1 and not torch.isfinite(total).all()


def test_unscale_l2norm_is_the_norm_of_the_unscaled_tensors(device):
    ts = tensors(device, torch.float16, scale=1024.0)
    before = [t.clone() for t in ts]
    inv_scale = torch.full((1,), 1 / 1024.0, device=device)
    noop = flag(device)
    total, per = amp_C.multi_tensor_unscale_l2norm(65536, noop, [ts], inv_scale, True)
    torch.testing.assert_close(per, torch.stack([(t.float() / 1024.0).norm() for t in ts]), rtol=1e-5, atol=0)
    torch.testing.assert_close(total, torch.cat([t.float() / 1024.0 for t in ts]).norm().reshape(1), rtol=1e-5, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(ts, before)) and noop.item() == 0
    ts[0][0] = math.inf
    amp_C.multi_tensor_unscale_l2norm(65536, noop, [ts], inv_scale, False)
    assert noop.item() == 1


# --- update_scale_hysteresis -----------------------------------------------------------------------

def reference_hysteresis(scale, growth, hyst, found, growth_factor, backoff_factor, interval, hysteresis):
    """The kernel's contract, step by step (scalars; FP32 scale)."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    if found > 0:
        hyst -= 1
        if hyst > 0:
            return scale, 0, hyst
    if found:
        backed_off = f32(scale * backoff_factor)
        scale, growth = (0.0 if abs(backed_off) < torch.finfo(torch.float32).tiny else backed_off), 0
    else:
        successful = growth + 1
        if successful == interval:
            grown = f32(scale * growth_factor)
            scale = grown if math.isfinite(grown) else scale
            growth = 0
        else:
            growth = successful
    if found <= 0:
        hyst = hysteresis
    return scale, growth, hyst


def test_update_scale_hysteresis_follows_the_kernel_contract(device):
    pattern = [0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0] + [0] * 6
    scale = torch.full((1,), 2.0 ** 16, device=device)
    growth = torch.zeros(1, dtype=torch.int32, device=device)
    hyst = torch.full((1,), 2, dtype=torch.int32, device=device)
    expected = (2.0 ** 16, 0, 2)
    for found in pattern:
        returned = amp_C.update_scale_hysteresis(scale, growth, hyst, torch.full((1,), float(found), device=device),
                                                 2.0, 0.5, 3, 2)
        expected = reference_hysteresis(*expected, found, 2.0, 0.5, 3, 2)
        assert returned is scale
        assert (scale.item(), growth.item(), hyst.item()) == expected
    assert growth.dtype == hyst.dtype == torch.int32 and scale.dtype == torch.float32


def test_update_scale_hysteresis_backs_off_below_the_normal_range_to_zero(device):
    """Apex's kernel is built with --use_fast_math: a backed-off scale that would be subnormal is 0."""
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.full((1,), tiny, device=device)
    growth = torch.zeros(1, dtype=torch.int32, device=device)
    hyst = torch.ones(1, dtype=torch.int32, device=device)
    amp_C.update_scale_hysteresis(scale, growth, hyst, torch.ones(1, device=device), 2.0, 0.5, 10, 1)
    assert scale.item() == 0.0
    scale.fill_(4 * tiny)
    hyst.fill_(1)
    amp_C.update_scale_hysteresis(scale, growth, hyst, torch.ones(1, device=device), 2.0, 0.5, 10, 1)
    assert scale.item() == 2 * tiny  # still normal: kept


def test_update_scale_hysteresis_does_not_grow_to_inf(device):
    scale = torch.full((1,), 3e38, device=device)
    growth = torch.zeros(1, dtype=torch.int32, device=device)
    hyst = torch.ones(1, dtype=torch.int32, device=device)
    amp_C.update_scale_hysteresis(scale, growth, hyst, torch.zeros(1, device=device), 2.0, 0.5, 1, 1)
    assert scale.item() == pytest.approx(3e38) and growth.item() == 0


# --- optimizer kernels -----------------------------------------------------------------------------

def test_multi_tensor_adam_matches_torch_adamw(device):
    params = tensors(device, seed=3)
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(1, 4):
        grads = tensors(device, seed=10 + step)
        amp_C.multi_tensor_adam(65536, flag(device), [grads, params, m, v], 1e-2, 0.9, 0.999, 1e-8, step, 1, 1, 0.1)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)


def test_multi_tensor_sgd_skips_on_flag_scales_and_writes_half_copy(device):
    params = tensors(device, seed=3)
    grads = tensors(device, seed=4)
    bufs = [torch.zeros_like(p) for p in params]
    halves = [torch.empty_like(p, dtype=torch.float16) for p in params]
    before = [p.clone() for p in params]
    raised = torch.ones(1, dtype=torch.int32, device=device)
    amp_C.multi_tensor_sgd(65536, raised, [grads, params, bufs, halves], 0.0, 0.9, 0.0, 0.1, False, True, False, 0.5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    amp_C.multi_tensor_sgd(65536, flag(device), [grads, params, bufs, halves], 0.0, 0.9, 0.0, 0.1, False, True,
                           False, 0.5)
    for p, b, g, buf, h in zip(params, before, grads, bufs, halves):
        torch.testing.assert_close(buf, g * 0.5, rtol=0, atol=0)
        torch.testing.assert_close(p, b - 0.1 * (g * 0.5), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(h, p.half(), rtol=0, atol=0)


def test_multi_tensor_lamb_overwrites_grads_with_the_update(device):
    params, grads = tensors(device, seed=3), tensors(device, seed=4)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    norm = torch.cat(grads).norm().reshape(1)
    amp_C.multi_tensor_lamb(65536, flag(device), [grads, params, m, v], 1e-2, 0.9, 0.999, 1e-6, 1, 1, 0.0, 1, 1,
                            norm, 1e9, False)
    for p, b, u in zip(params, before, grads):  # no decay, no nvlamb: p -= lr * update, update = sign-like
        torch.testing.assert_close(p, b - 1e-2 * u, rtol=1e-6, atol=1e-6)
        assert u.abs().max() <= 1.0 + 1e-5


def test_multi_tensor_novograd_updates_grad_norms_in_place(device):
    params, grads = tensors(device, seed=3), tensors(device, seed=4)
    m = [torch.zeros_like(p) for p in params]
    norms = torch.zeros(len(params), device=device)
    amp_C.multi_tensor_novograd(65536, flag(device), [grads, params, m], norms, 1e-2, 0.95, 0.98, 1e-8, 1, 1, 0.0, 1,
                                1, 2)
    torch.testing.assert_close(norms, math.sqrt(0.02) * torch.stack([g.norm() for g in grads]), rtol=1e-5, atol=0)


def test_multi_tensor_adagrad_decoupled_mode(device):
    params, grads = tensors(device, seed=3), tensors(device, seed=4)
    sums = [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    amp_C.multi_tensor_adagrad(65536, flag(device), [grads, params, sums], 0.1, 1e-10, 1, 0.01)
    for p, b, g, h in zip(params, before, grads, sums):
        torch.testing.assert_close(h, g * g, rtol=0, atol=0)
        torch.testing.assert_close(p, b - 0.1 * (g / (g.abs() + 1e-10) + 0.01 * b), rtol=1e-6, atol=1e-6)


# --- argument checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("lists,message", [
    ([[torch.ones(2)], [torch.ones(2)], [torch.ones(2)]], "tensor_lists.size() != depth"),
    ([[], []], "tensor_lists[0].size() is not > 0"),
    ([[torch.ones(2), torch.ones(3)], [torch.ones(2)]], "Size mismatch among tensor lists"),
    ([[torch.ones(2)], [torch.ones(3)]], "Size mismatch"),
])
def test_malformed_lists_raise_apex_messages(lists, message):
    with pytest.raises(RuntimeError) as info:
        amp_C.multi_tensor_scale(65536, flag("cpu"), lists, 1.0)
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["multi_tensor_adam_capturable", "multi_tensor_adam_capturable_master",
                                  "multi_tensor_lars"])
def test_unprovided_kernels_name_the_replacement(name):
    with pytest.raises(NotImplementedError, match="does not provide {}. Use".format(name)):
        getattr(amp_C, name)(65536, flag("cpu"), [[torch.ones(1)]])
