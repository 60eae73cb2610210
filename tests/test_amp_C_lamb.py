"""amp_C's LAMB kernels -- the 2019 two-stage pair (``multi_tensor_lamb_stage1_cuda`` / ``_stage2_cuda``) and
``FusedMixedPrecisionLamb``'s ``multi_tensor_lamb_mp`` -- against references written per tensor in float64,
over size pairs around Apex's chunk boundaries, every launcher chunk size, and mixes of FP16/BF16/FP32 lists;
plus the flag semantics of each kernel. The full sizes run under the ``cuda`` marker."""
import math

import pytest
import torch

from ampcompat import amp_C
from ampcompat.multi_tensor_apply import MultiTensorApply

CHUNK_SIZES = (2048 * 32, 333)
BOUNDARY_PAIRS = ((777, 555), (555, 2048 * 32 + 1), (333, 334), (666, 1))
FULL_PAIRS = ((7777 * 77, 555 * 555), (2048 * 32 + 1, 555), (33333, 555))
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-5),
       torch.bfloat16: dict(rtol=8e-3, atol=1e-4)}


def randn(sizes, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(device=device, dtype=dtype) for n in sizes]


def flag(device, value=0):
    return torch.full((1,), value, dtype=torch.int32, device=device)


def close(got, want, dtype):
    """``got`` (stored in ``dtype``) against the float64 ``want`` rounded to ``dtype``."""
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


# --- references: Apex's kernels, one tensor at a time, in float64 --------------------------------------------

def ref_stage1(grads, params, exp_avgs, exp_avg_sqs, decays, step, beta1, beta2, eps, norm, max_norm):
    clip = norm / max_norm if norm > max_norm else 1.0
    bc1, bc2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
    results = []
    for g, p, m, v, decay in zip(grads, params, exp_avgs, exp_avg_sqs, decays):
        g = g.double() / clip
        m = beta1 * m.double() + (1 - beta1) * g
        v = beta2 * v.double() + (1 - beta2) * g * g
        results.append((m, v, (m / bc1) / ((v / bc2).sqrt() + eps) + decay * p.double()))
    return results


def ref_stage2(params, updates, param_norms, update_norms, lr, weight_decay, use_nvlamb):
    out = []
    for p, u, pn, un in zip(params, updates, param_norms.tolist(), update_norms.tolist()):
        ratio = lr * (pn / un) if (use_nvlamb or weight_decay != 0) and pn != 0 and un != 0 else lr
        out.append(p.double() - ratio * u.double())
    return out


def ref_lamb_mp(grads, params, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, step, weight_decay, adam_w_mode,
                grad_averaging, norm, max_norm, use_nvlamb, inv_scale):
    """Returns (m, v, stored update, new params) per tensor; the update is rounded to the gradient's dtype."""
    clip = norm / max_norm if norm > max_norm else 1.0
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    beta3 = 1 - beta1 if grad_averaging else 1.0
    results = []
    for g, p, m, v in zip(grads, params, exp_avgs, exp_avg_sqs):
        w = p.double()
        scaled = g.double() * inv_scale / clip
        if not adam_w_mode:
            scaled = scaled + weight_decay * w
        m = beta1 * m.double() + beta3 * scaled
        v = beta2 * v.double() + (1 - beta2) * scaled * scaled
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        if adam_w_mode:
            u = u + weight_decay * w
        u = u.to(g.dtype).double()  # stored in the gradient
        pn, un = w.norm().item(), u.norm().item()
        ratio = lr * (pn / un) if (use_nvlamb or weight_decay != 0) and pn != 0 and un != 0 else lr
        slack = ratio * u.abs() * torch.finfo(g.dtype).eps  # the stored update may round the other way: 1 ulp
        results.append((m, v, u, w - ratio * u, slack))
    return results


# --- stage 1 / stage 2 ---------------------------------------------------------------------------------------

def _stage_lists(sizes, grad_dtype, param_dtype, update_dtype, device, seed):
    grads = randn(sizes, grad_dtype, device, seed)
    params = randn(sizes, param_dtype, device, seed + 1)
    exp_avgs = [t.abs() * 0.1 for t in randn(sizes, param_dtype, device, seed + 2)]
    exp_avg_sqs = [t.abs() * 0.01 for t in randn(sizes, param_dtype, device, seed + 3)]
    updates = [torch.full_like(p, math.nan, dtype=update_dtype) for p in params]
    return grads, params, exp_avgs, exp_avg_sqs, updates


def _check_stages(sizes, grad_dtype, param_dtype, update_dtype, chunk_size, device, seed=0):
    grads, params, exp_avgs, exp_avg_sqs, updates = _stage_lists(sizes, grad_dtype, param_dtype, update_dtype, device,
                                                                 seed)
    before = [[t.clone() for t in lst] for lst in (grads, params, exp_avgs, exp_avg_sqs)]
    decays = torch.tensor([0.01 * (i % 3) for i in range(len(params))], device=device)
    norm = torch.cat([g.double().flatten() for g in grads]).norm().float().reshape(1)
    applier, noop = MultiTensorApply(chunk_size), flag(device)
    applier(amp_C.multi_tensor_lamb_stage1_cuda, noop, [grads, params, exp_avgs, exp_avg_sqs, updates], decays, 4,
            0.9, 0.999, 1e-6, norm, 0.5 * norm.item())
    want = ref_stage1(*before, decays.tolist(), 4, 0.9, 0.999, 1e-6, norm.item(), 0.5 * norm.item())
    for (m, v, u), em, ev, up in zip(want, exp_avgs, exp_avg_sqs, updates):
        close(em, m, param_dtype)
        close(ev, v, param_dtype)
        close(up, u, update_dtype)
    assert all(torch.equal(a, b) for a, b in zip(grads + params, before[0] + before[1]))  # read only
    assert noop.item() == 0

    param_norms = torch.stack([p.float().norm() for p in params])
    update_norms = torch.stack([u.float().norm() for u in updates])
    param_norms[0] = 0.0  # the trust ratio falls back to 1 there
    params_before = [p.clone() for p in params]
    applier(amp_C.multi_tensor_lamb_stage2_cuda, noop, [params, updates], param_norms, update_norms, 0.01, 0.01)
    for p, want_p in zip(params, ref_stage2(params_before, updates, param_norms, update_norms, 0.01, 0.01, False)):
        close(p, want_p, param_dtype)


STAGE_DTYPES = [(torch.float32, torch.float32, torch.float32), (torch.float16, torch.float32, torch.float16),
                (torch.float16, torch.float16, torch.float16), (torch.float32, torch.float32, torch.float16)]


@pytest.mark.parametrize("grad_dtype,param_dtype,update_dtype", STAGE_DTYPES)
def test_lamb_stages_match_the_reference_at_chunk_boundaries(device, grad_dtype, param_dtype, update_dtype):
    for sizea, sizeb in BOUNDARY_PAIRS:
        for repeat in (1, 3):
            for chunk_size in CHUNK_SIZES:
                _check_stages([sizea, sizeb] * repeat, grad_dtype, param_dtype, update_dtype, chunk_size, device,
                              seed=sizea + repeat)


@pytest.mark.cuda
@pytest.mark.parametrize("grad_dtype,param_dtype,update_dtype", STAGE_DTYPES)
def test_lamb_stages_full_sizes_on_cuda(grad_dtype, param_dtype, update_dtype):
    for sizea, sizeb in FULL_PAIRS:
        for repeat in (1, 55):
            _check_stages([sizea, sizeb] * repeat, grad_dtype, param_dtype, update_dtype, 2048 * 32, "cuda")


def test_stage2_applies_the_plain_learning_rate_without_decay_or_nvlamb(device):
    params, updates = randn([5, 9], torch.float32, device, 0), randn([5, 9], torch.float32, device, 1)
    before = [p.clone() for p in params]
    norms = torch.tensor([2.0, 3.0], device=device)
    amp_C.multi_tensor_lamb_stage2_cuda(2048, flag(device), [params, updates], norms, norms * 4, 0.1, 0.0)
    for p, b, u in zip(params, before, updates):
        torch.testing.assert_close(p, b - 0.1 * u)
    amp_C.multi_tensor_lamb_stage2_cuda(2048, flag(device), [params, updates], norms, norms * 4, 0.1, 0.0, True)
    for p, b, u in zip(params, before, updates):  # NVLAMB: ratio ||p||/||u|| = 1/4
        torch.testing.assert_close(p, b - 0.1 * u - 0.1 * 0.25 * u)


def test_the_stage_kernels_neither_read_nor_set_the_flag(device):
    grads, params, exp_avgs, exp_avg_sqs, updates = _stage_lists([4, 6], torch.float32, torch.float32, torch.float32,
                                                                 device, 0)
    grads[0][0] = math.inf
    raised = flag(device, 1)
    amp_C.multi_tensor_lamb_stage1_cuda(2048, raised, [grads, params, exp_avgs, exp_avg_sqs, updates],
                                        torch.zeros(2, device=device), 0, 0.9, 0.999, 1e-6,
                                        torch.ones(1, device=device), 1.0)
    assert raised.item() == 1 and not torch.isnan(updates[1]).any()  # ran despite the flag
    clear = flag(device)
    amp_C.multi_tensor_lamb_stage1_cuda(2048, clear, [grads, params, exp_avgs, exp_avg_sqs, updates],
                                        torch.zeros(2, device=device), 0, 0.9, 0.999, 1e-6,
                                        torch.ones(1, device=device), 1.0)
    assert clear.item() == 0  # inf gradients are propagated, not flagged ("I'd like this kernel to propagate infs")
    with pytest.raises(RuntimeError, match="per_tensor_decay has 1 entries for 2 tensors"):
        amp_C.multi_tensor_lamb_stage1_cuda(2048, clear, [grads, params, exp_avgs, exp_avg_sqs, updates],
                                            torch.zeros(1, device=device), 0, 0.9, 0.999, 1e-6,
                                            torch.ones(1, device=device), 1.0)
    with pytest.raises(RuntimeError, match=r"^tensor_lists.size\(\) != depth$"):
        amp_C.multi_tensor_lamb_stage2_cuda(2048, clear, [params], torch.ones(2), torch.ones(2), 0.1, 0.0)


# --- multi_tensor_lamb_mp ------------------------------------------------------------------------------------

def _mp_lists(sizes, grad_dtype, master, device, seed, scale=256.0):
    """(grads, params, exp_avgs, exp_avg_sqs, model_params or None): FP32 masters when ``master``."""
    model = randn(sizes, grad_dtype, device, seed + 1)
    params = [p.float() for p in model] if master else model
    state_dtype = torch.float32 if master else grad_dtype
    grads = randn(sizes, grad_dtype, device, seed, scale=scale)
    exp_avgs = [t.abs().to(state_dtype) * 0.1 for t in randn(sizes, torch.float32, device, seed + 2)]
    # A floor under the second moments: with ~10^7 draws some |randn| * 0.01 come so close to 0 that the
    # update overflows an FP16 gradient, which (as in Apex) skips the whole step by design.
    exp_avg_sqs = [(t.abs() * 0.01 + 1e-4).to(state_dtype) for t in randn(sizes, torch.float32, device, seed + 3)]
    return grads, params, exp_avgs, exp_avg_sqs, (model if master else None)


def _check_lamb_mp(sizes, grad_dtype, master, chunk_size, device, options, seed=0):
    grads, params, exp_avgs, exp_avg_sqs, model = _mp_lists(sizes, grad_dtype, master, device, seed)
    before = [[t.clone() for t in lst] for lst in (grads, params, exp_avgs, exp_avg_sqs)]
    scale = 256.0
    norm = torch.cat([g.double().flatten() for g in grads]).norm().float().reshape(1)
    lists = [grads, params, exp_avgs, exp_avg_sqs] + ([model] if master else [])
    noop = flag(device)
    MultiTensorApply(chunk_size)(
        amp_C.multi_tensor_lamb_mp, noop, lists, torch.tensor(0.01, device=device), 0.9, 0.999, 1e-6,
        torch.tensor([3], dtype=torch.int32, device=device), 1, options["weight_decay"], options["grad_averaging"],
        options["mode"], norm, torch.tensor([0.5 * scale], device=device), options["use_nvlamb"],
        torch.zeros(1, device=device), torch.tensor([1 / scale], device=device))
    want = ref_lamb_mp(*before, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, step=3,
                       weight_decay=options["weight_decay"], adam_w_mode=options["mode"] == 1,
                       grad_averaging=options["grad_averaging"], norm=norm.item(), max_norm=0.5 * scale,
                       use_nvlamb=options["use_nvlamb"], inv_scale=1 / scale)
    state_dtype = torch.float32 if master else grad_dtype
    for i, (m, v, u, p, slack) in enumerate(want):
        close(exp_avgs[i], m, state_dtype)
        close(exp_avg_sqs[i], v, state_dtype)
        close(grads[i], u, grad_dtype)  # the update, stored in the gradient
        tol = TOL[params[i].dtype]
        assert ((params[i].double() - p).abs() <= tol["atol"] + tol["rtol"] * p.abs() + slack).all()
        if master:
            assert torch.equal(model[i], params[i].to(grad_dtype))  # the model copy is the master, rounded
    assert noop.item() == 0


MP_OPTIONS = [dict(weight_decay=0.01, grad_averaging=1, mode=1, use_nvlamb=False),
              dict(weight_decay=0.01, grad_averaging=0, mode=0, use_nvlamb=False),
              dict(weight_decay=0.0, grad_averaging=1, mode=1, use_nvlamb=True),
              dict(weight_decay=0.0, grad_averaging=1, mode=1, use_nvlamb=False)]


@pytest.mark.parametrize("options", MP_OPTIONS, ids=["adamw", "l2", "nvlamb", "no_decay"])
@pytest.mark.parametrize("grad_dtype,master", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False),
                                               (torch.float16, False)])
def test_lamb_mp_matches_the_reference_at_chunk_boundaries(device, grad_dtype, master, options):
    for sizea, sizeb in BOUNDARY_PAIRS[:3]:
        for chunk_size in CHUNK_SIZES:
            _check_lamb_mp([sizea, sizeb, 7], grad_dtype, master, chunk_size, device, options, seed=sizea)


@pytest.mark.cuda
@pytest.mark.parametrize("grad_dtype,master", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False)])
def test_lamb_mp_full_sizes_on_cuda(grad_dtype, master):
    for sizea, sizeb in FULL_PAIRS:
        for repeat in (1, 55):
            _check_lamb_mp([sizea, sizeb] * repeat, grad_dtype, master, 2048 * 32, "cuda", MP_OPTIONS[0])


def _lamb_mp_call(lists, noop, device, found_inf=0.0):
    norm = torch.ones(1, device=device)
    amp_C.multi_tensor_lamb_mp(2048, noop, lists, torch.tensor(0.01, device=device), 0.9, 0.999, 1e-6,
                               torch.tensor([1], dtype=torch.int32, device=device), 1, 0.01, 1, 1, norm,
                               torch.ones(1, device=device), False, torch.full((1,), found_inf, device=device),
                               torch.ones(1, device=device))


def test_lamb_mp_flag_semantics(device):
    lists = list(_mp_lists([5, 9], torch.float16, True, device, 0))
    before = [[t.clone() for t in lst] for lst in lists]

    def unchanged():
        return all(torch.equal(a, b) for lst, old in zip(lists, before) for a, b in zip(lst, old))

    _lamb_mp_call(lists, flag(device, 1), device)  # the flag set: nothing happens
    assert unchanged()
    noop = flag(device)
    _lamb_mp_call(lists, noop, device, found_inf=1.0)  # found_inf is not read: the caller copies it into the flag
    assert noop.item() == 0 and not unchanged()
    lists = list(_mp_lists([5, 9], torch.float16, True, device, 0))
    lists[1][1][0] = math.inf  # a non-finite parameter norm: flagged, and the step skipped
    before = [[t.clone() for t in lst] for lst in lists]
    noop = flag(device)
    _lamb_mp_call(lists, noop, device)
    assert noop.item() == 1 and unchanged()
    with pytest.raises(RuntimeError, match=r"^tensor_lists.size\(\) != depth$"):
        _lamb_mp_call(lists[:3], flag(device), device)



def test_interleaved_dtypes_take_their_own_norms(device):
    """Tensors are grouped by dtype; each must still be paired with its own entry of the per-tensor norms."""
    params = [t.to(dtype) for t, dtype in zip(randn([6, 8, 10], torch.float32, device, 0),
                                              (torch.float32, torch.float16, torch.float32))]
    updates = randn([6, 8, 10], torch.float32, device, 1)
    param_norms, update_norms = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 0.5])
    before = [p.clone() for p in params]
    amp_C.multi_tensor_lamb_stage2_cuda(2048, flag(device), [params, updates], param_norms, update_norms, 0.1, 0.01)
    for p, want in zip(params, ref_stage2(before, updates, param_norms, update_norms, 0.1, 0.01, False)):
        close(p, want, p.dtype)
