"""ampcompat.optimizers: Apex's fused optimizers against torch's optimizers and hand-written references."""
import copy
import io
import math
import warnings

import pytest
import torch

from ampcompat.optimizers import FusedAdagrad, FusedAdam, FusedLAMB, FusedNovoGrad, FusedSGD

SHAPES = [(5, 3), (3,), (2, 2, 2)]
STEPS = 4


def make_params(device, dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grad_sequence(params, steps=STEPS, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(p.shape, generator=g) * scale).to(device=p.device, dtype=p.dtype) for p in params]
            for _ in range(steps)]


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
    return params


def torch_impl(device, op):
    """What torch itself runs for ``op`` on ``device``: its fused kernel where one exists, else foreach."""
    fused = torch._C._dispatch_has_kernel_for_dispatch_key("aten::" + op, device.upper())
    return {"fused": True} if fused else {"foreach": True}


def assert_params_equal(actual, expected, **tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e.detach(), **(tol or dict(rtol=0, atol=0)))


# --- plain-loop references written from the published formulas (float64) ----------------------------

def ref_adam(params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.0, adam_w=True, bias_correction=True):
    p = [x.detach().double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t, step_grads in enumerate(grads, start=1):
        bc1 = 1 - betas[0] ** t if bias_correction else 1.0
        bc2 = 1 - betas[1] ** t if bias_correction else 1.0
        for i, g in enumerate(step_grads):
            g = g.double() + (0 if adam_w else wd * p[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps) + (wd * p[i] if adam_w else 0)
            p[i] = p[i] - lr * update
    return p


def ref_lamb(groups, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, adam_w_mode=True, grad_averaging=True,
             bias_correction=True, max_grad_norm=1.0, use_nvlamb=False):
    """LAMB as Apex: global-norm clipping over all grads, trust ratio ||p||/||u|| where decay != 0 or nvlamb.

    ``groups``: list of (params, weight_decay); ``grads``: per step, the grads of all params in order.
    """
    p = [[x.detach().double().clone() for x in params] for params, _ in groups]
    m = [[torch.zeros_like(x) for x in ps] for ps in p]
    v = [[torch.zeros_like(x) for x in ps] for ps in p]
    b1, b2 = betas
    beta3 = 1 - b1 if grad_averaging else 1.0
    for t, step_grads in enumerate(grads, start=1):
        flat = [g.double() for g in step_grads]
        norm = math.sqrt(sum(float((g * g).sum()) for g in flat))
        clip = norm / max_grad_norm if norm > max_grad_norm else 1.0
        bc1 = 1 - b1 ** t if bias_correction else 1.0
        bc2 = 1 - b2 ** t if bias_correction else 1.0
        k = 0
        for gi, (_, wd) in enumerate(groups):
            for i in range(len(p[gi])):
                g = flat[k] / clip
                k += 1
                w = p[gi][i]
                if not adam_w_mode:
                    g = g + wd * w
                m[gi][i] = b1 * m[gi][i] + beta3 * g
                v[gi][i] = b2 * v[gi][i] + (1 - b2) * g * g
                u = (m[gi][i] / bc1) / ((v[gi][i] / bc2).sqrt() + eps)
                if adam_w_mode:
                    u = u + wd * w
                ratio = 1.0
                if use_nvlamb or wd != 0:
                    pn, un = float(w.norm()), float(u.norm())
                    ratio = pn / un if pn != 0 and un != 0 else 1.0
                p[gi][i] = w - lr * ratio * u
    return [x for ps in p for x in ps]


def ref_novograd(params, grads, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, wd=0.0, reg_inside_moment=False,
                 grad_averaging=True, norm_type=2, init_zero=False, bias_correction=True):
    """NovoGrad (Jasper paper / Apex): per-tensor norm average v, Adam-like first moment."""
    p = [x.detach().double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [None] * len(p)
    b1, b2 = betas
    beta3 = 1 - b1 if grad_averaging else 1.0
    for t, step_grads in enumerate(grads, start=1):
        bc1 = 1 - b1 ** t if bias_correction else 1.0
        bc2 = math.sqrt(1 - b2 ** t) if bias_correction else 1.0
        for i, g in enumerate(step_grads):
            g = g.double()
            n = float(g.abs().max()) if norm_type == 0 else float(g.norm())
            if v[i] is None:
                v[i] = 0.0 if init_zero else n
            v[i] = b2 * v[i] + (1 - b2) * n if norm_type == 0 else math.sqrt(b2 * v[i] ** 2 + (1 - b2) * n ** 2)
            denom = v[i] / bc2 + eps
            if reg_inside_moment:
                m[i] = b1 * m[i] + beta3 * (g / denom + wd * p[i])
                p[i] = p[i] - lr * m[i] / bc1
            else:
                m[i] = b1 * m[i] + beta3 * g
                p[i] = p[i] - lr * ((m[i] / bc1) / denom + wd * p[i])
    return p


def ref_sgd_wd_after(params, grads, lr, momentum, dampening, wd, nesterov):
    p = [x.detach().double().clone() for x in params]
    buf = [None] * len(p)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            g = g.double()
            if momentum:
                buf[i] = g.clone() if buf[i] is None else momentum * buf[i] + (1 - dampening) * g
                g = g + momentum * buf[i] if nesterov else buf[i]
            p[i] = p[i] - lr * (g + wd * p[i])
    return p


def ref_adagrad_w(params, grads, lr, eps, wd):
    p = [x.detach().double().clone() for x in params]
    h = [torch.zeros_like(x) for x in p]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            g = g.double()
            h[i] = h[i] + g * g
            p[i] = p[i] - lr * (g / (h[i].sqrt() + eps) + wd * p[i])
    return p


CLOSE = dict(rtol=1e-5, atol=1e-6)
HALF_CLOSE = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}  # ~1 ulp


def case_id(case):
    return ",".join("{}={}".format(*kv) for kv in case.items()) or "defaults"


# --- FusedAdam -------------------------------------------------------------------------------------

def test_fused_adam_has_apex_defaults():
    opt = FusedAdam(make_params("cpu"))
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert group == dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert (opt.adam_w_mode, opt.set_grad_none, opt.capturable, opt.master_weights) == (1, True, False, False)
    assert isinstance(opt, torch.optim.Optimizer)


def test_fused_adam_defaults_equal_adamw_without_weight_decay(device):
    params, ref_params = make_params(device), make_params(device)
    grads = grad_sequence(params)
    run(FusedAdam(params), params, grads)
    run(torch.optim.AdamW(ref_params, weight_decay=0.0, **torch_impl(device, "_fused_adamw_")), ref_params, grads)
    assert_params_equal(params, ref_params)


@pytest.mark.parametrize("adam_w_mode,weight_decay", [(True, 0.1), (False, 0.1), (False, 0.0)])
def test_fused_adam_matches_torch_adam(device, adam_w_mode, weight_decay):
    params, ref_params = make_params(device), make_params(device)
    grads = grad_sequence(params)
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    run(FusedAdam(params, adam_w_mode=adam_w_mode, **kwargs), params, grads)
    reference = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    impl = torch_impl(device, "_fused_adamw_" if adam_w_mode else "_fused_adam_")
    run(reference(ref_params, **impl, **kwargs), ref_params, grads)
    assert_params_equal(params, ref_params)


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_fused_adam_without_bias_correction(device, adam_w_mode):
    params = make_params(device)
    grads = grad_sequence(params)
    expected = ref_adam(params, grads, lr=1e-2, wd=0.05, adam_w=adam_w_mode, bias_correction=False)
    run(FusedAdam(params, lr=1e-2, weight_decay=0.05, adam_w_mode=adam_w_mode, bias_correction=False),
        params, grads)
    assert_params_equal(params, [e.float() for e in expected], **CLOSE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_adam_half_params_keep_fp32_moments(device, dtype):
    params = make_params(device, dtype)
    grads = grad_sequence(params)
    opt = FusedAdam(params, lr=1e-2)
    # Reference: FP32 math on the half values each step, moments kept in FP32, result rounded to half.
    p32 = [p.detach().float() for p in params]
    m = [torch.zeros_like(p) for p in p32]
    v = [torch.zeros_like(p) for p in p32]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            g = g.float()
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            update = (m[i] / (1 - 0.9 ** t)) / ((v[i] / (1 - 0.999 ** t)).sqrt() + 1e-8)
            p32[i] = (p32[i] - 1e-2 * update).to(dtype).float()
    run(opt, params, grads)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    assert all(opt.state[p]["exp_avg_sq"].dtype == torch.float32 for p in params)
    assert_params_equal(params, [x.to(dtype) for x in p32], **HALF_CLOSE[dtype])


def test_fused_adam_master_weights_update_fp32_masters(device):
    params = make_params(device, torch.float16)
    masters = [p.detach().float() for p in params]
    grads = grad_sequence(params)
    opt = FusedAdam(params, lr=1e-2, capturable=True, master_weights=True)
    run(opt, params, grads)
    expected = ref_adam(masters, grads, lr=1e-2)
    for p in params:
        assert opt.state[p]["master_param"].dtype == torch.float32
    assert_params_equal([opt.state[p]["master_param"] for p in params], [e.float() for e in expected], **CLOSE)
    assert_params_equal(params, [opt.state[p]["master_param"].half() for p in params])


def test_fused_adam_errors_are_apex_messages():
    params = make_params("cpu")
    with pytest.raises(RuntimeError, match=r"^FusedAdam does not support the AMSGrad variant\.$"):
        FusedAdam(params, amsgrad=True)
    message = r"^Master weights is currently only supported with the capturable version\.$"
    with pytest.raises(RuntimeError, match=message):
        FusedAdam(params, master_weights=True)


def test_fused_adam_loads_apex_format_state_dict():
    """Apex kept `step` in the param group and none per parameter; loading it resumes the same run."""
    params, twin = make_params("cpu"), make_params("cpu")
    grads = grad_sequence(params, steps=5)
    opt = FusedAdam(params, lr=1e-2)
    run(opt, params, grads[:3])
    apex_style = copy.deepcopy(opt.state_dict())
    for state in apex_style["state"].values():
        del state["step"]
    apex_style["param_groups"][0]["step"] = 3
    with torch.no_grad():
        for t, p in zip(twin, params):
            t.copy_(p)
    resumed = FusedAdam(twin, lr=1e-2)
    resumed.load_state_dict(apex_style)
    assert "step" not in resumed.param_groups[0]
    assert all(float(resumed.state[p]["step"]) == 3 for p in twin)
    run(opt, params, grads[3:])
    run(resumed, twin, grads[3:])
    assert_params_equal(twin, params)


def test_fused_adam_grad_scaler_unscales_and_skips():
    """capturable=True: GradScaler hands itself to step(); result equals fused AdamW under GradScaler."""
    def train(make_optimizer, inject_inf_at):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = make_optimizer(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        snapshots = []
        for i in range(3):
            scaler.scale(model(torch.randn(5, 4)).square().sum()).backward()
            if i == inject_inf_at:
                model.weight.grad[0, 0] = float("inf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's note about grad_scaler= passing
                scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            snapshots.append(model.weight.detach().clone())
        return snapshots, scaler.get_scale()

    ours, our_scale = train(lambda p: FusedAdam(p, lr=1e-2, capturable=True), inject_inf_at=1)
    theirs, their_scale = train(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0, fused=True), 1)
    assert our_scale == their_scale == 512.0
    assert torch.equal(ours[1], ours[0])  # the overflowing step was skipped
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_adam_honours_grad_scale_and_found_inf_attributes(device, dtype):
    """torch's newer GradScaler protocol: the scaler sets ``grad_scale``/``found_inf`` around ``step()``."""
    params, ref_params = make_params(device, dtype), make_params(device, dtype)
    grads = grad_sequence(params, steps=2)
    opt, ref = FusedAdam(params, lr=1e-2, capturable=True), FusedAdam(ref_params, lr=1e-2)
    run(ref, ref_params, grads[:1])
    opt.grad_scale = torch.full((), 8.0, device=device)
    opt.found_inf = torch.zeros((), device=device)
    run(opt, params, [[g * 8 for g in grads[0]]])
    assert_params_equal(params, ref_params)
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.ones((), device=device)
    run(opt, params, grads[1:])
    assert_params_equal(params, before)
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


# --- FusedSGD --------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov",
                         [(0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.1, 1e-2, False),
                          (0.9, 0.0, 1e-2, True)])
def test_fused_sgd_matches_torch_sgd(device, momentum, dampening, weight_decay, nesterov):
    params, ref_params = make_params(device), make_params(device)
    grads = grad_sequence(params)
    kwargs = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    run(FusedSGD(params, **kwargs), params, grads)
    run(torch.optim.SGD(ref_params, **torch_impl(device, "_fused_sgd_"), **kwargs), ref_params, grads)
    assert_params_equal(params, ref_params)


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.1), (True, 0.0)])
def test_fused_sgd_weight_decay_after_momentum(device, nesterov, dampening):
    params = make_params(device)
    grads = grad_sequence(params)
    run(FusedSGD(params, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.05, nesterov=nesterov,
                 wd_after_momentum=True), params, grads)
    expected = ref_sgd_wd_after(make_params(device), grads, 0.1, 0.9, dampening, 0.05, nesterov)
    assert_params_equal(params, [e.float() for e in expected], **CLOSE)


def test_fused_sgd_parameter_joining_late_starts_its_own_momentum():
    """A parameter whose first gradient arrives after others have momentum starts from that gradient."""
    params, ref_params = make_params("cpu"), make_params("cpu")
    grads = grad_sequence(params)
    for step_grads in grads[:2]:
        step_grads[1] = None
    kwargs = dict(lr=0.1, momentum=0.9)
    for opt, ps in ((FusedSGD(params, **kwargs), params), (torch.optim.SGD(ref_params, foreach=False, **kwargs),
                                                           ref_params)):
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else g.clone()
            opt.step()
    assert_params_equal(params, ref_params, **CLOSE)


def test_fused_sgd_sparse_gradients_match_torch():
    weight, ref_weight = make_params("cpu", shapes=[(6, 3)])[0], make_params("cpu", shapes=[(6, 3)])[0]
    index = torch.tensor([0, 2, 2, 5])
    for w in (weight, ref_weight):
        torch.nn.functional.embedding(index, w, sparse=True).sum().backward()
    FusedSGD([weight], lr=0.1, momentum=0.9).step()
    torch.optim.SGD([ref_weight], lr=0.1, momentum=0.9).step()
    assert weight.grad.is_sparse
    torch.testing.assert_close(weight.detach(), ref_weight.detach(), rtol=0, atol=0)


def test_fused_sgd_apex_arguments_and_errors():
    params = make_params("cpu")
    opt = FusedSGD(params, lr=0.1, wd_after_momentum=True, materialize_master_grads=False)
    assert (opt.wd_after_momentum, opt.materialize_master_grads, opt.set_grad_none) == (True, False, False)
    assert (opt.most_recent_scale, opt.scale_set_by_backward) == (1.0, False)
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1$"):
        FusedSGD(params, lr=-1)
    with pytest.raises(ValueError, match=r"^Invalid momentum value: -0.5$"):
        FusedSGD(params, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match=r"^Invalid weight_decay value: -0.1$"):
        FusedSGD(params, lr=0.1, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"^Nesterov momentum requires a momentum and zero dampening$"):
        FusedSGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        FusedSGD(params)


# --- FusedAdagrad ----------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_adagrad_matches_torch_adagrad(device, weight_decay):
    params, ref_params = make_params(device), make_params(device)
    grads = grad_sequence(params)
    run(FusedAdagrad(params, lr=0.1, weight_decay=weight_decay), params, grads)
    impl = torch_impl(device, "_fused_adagrad_")
    try:
        run(torch.optim.Adagrad(ref_params, lr=0.1, eps=1e-10, weight_decay=weight_decay, **impl), ref_params, grads)
        tolerance = {}
    except RuntimeError:  # torch.optim.Adagrad refuses fused=True on this device (CUDA in torch 2.11)
        ref_params = make_params(device)
        run(torch.optim.Adagrad(ref_params, lr=0.1, eps=1e-10, weight_decay=weight_decay, foreach=True),
            ref_params, grads)
        tolerance = CLOSE
    assert_params_equal(params, ref_params, **tolerance)


def test_fused_adagrad_decoupled_weight_decay(device):
    params = make_params(device)
    grads = grad_sequence(params)
    run(FusedAdagrad(params, lr=0.1, weight_decay=0.05, adagrad_w_mode=True), params, grads)
    expected = ref_adagrad_w(make_params(device), grads, 0.1, 1e-10, 0.05)
    assert_params_equal(params, [e.float() for e in expected], **CLOSE)


def test_fused_adagrad_loads_apex_format_state_dict():
    params, twin = make_params("cpu"), make_params("cpu")
    grads = grad_sequence(params)
    opt = FusedAdagrad(params, lr=0.1)
    run(opt, params, grads[:2])
    apex_style = copy.deepcopy(opt.state_dict())
    for state in apex_style["state"].values():
        del state["step"]
    with torch.no_grad():
        for t, p in zip(twin, params):
            t.copy_(p)
    resumed = FusedAdagrad(twin, lr=0.1)
    resumed.load_state_dict(apex_style)
    run(opt, params, grads[2:])
    run(resumed, twin, grads[2:])
    assert_params_equal(twin, params)


# --- FusedLAMB -------------------------------------------------------------------------------------

LAMB_CASES = [
    dict(),
    dict(adam_w_mode=False),
    dict(use_nvlamb=True, weight_decay=0.0),
    dict(grad_averaging=False, bias_correction=False),
    dict(max_grad_norm=0.05),   # clipping active
    dict(max_grad_norm=100.0),  # clipping inactive
]


@pytest.mark.parametrize("case", LAMB_CASES, ids=case_id)
def test_fused_lamb_matches_reference(device, case):
    params = make_params(device)
    grads = grad_sequence(params)
    kwargs = dict(lr=1e-2, **case)
    wd = kwargs.pop("weight_decay", 0.01)
    expected = ref_lamb([(make_params(device), wd)], grads, **{k: v for k, v in kwargs.items()})
    opt = FusedLAMB(params, weight_decay=wd, **kwargs)
    run(opt, params, grads)
    assert opt.param_groups[0]["step"] == STEPS
    assert_params_equal(params, [e.float() for e in expected], **CLOSE)


def test_fused_lamb_groups_share_the_global_norm_and_skip_trust_ratio_without_decay(device):
    decayed, plain = make_params(device, seed=0)[:2], make_params(device, seed=3)[2:]
    grads = grad_sequence(decayed + plain, scale=3.0)
    expected = ref_lamb([(make_params(device, seed=0)[:2], 0.1), (make_params(device, seed=3)[2:], 0.0)], grads,
                        lr=1e-2)
    opt = FusedLAMB([{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}], lr=1e-2)
    run(opt, decayed + plain, grads)
    assert_params_equal(decayed + plain, [e.float() for e in expected], **CLOSE)


def test_fused_lamb_defaults_and_errors():
    opt = FusedLAMB(make_params("cpu"))
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert group == dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                         grad_averaging=True, max_grad_norm=1.0)
    assert (opt.adam_w_mode, opt.use_nvlamb, opt.set_grad_none) == (1, False, True)
    with pytest.raises(RuntimeError, match=r"^FusedLAMB does not support the AMSGrad variant\.$"):
        FusedLAMB(make_params("cpu"), amsgrad=True)


def test_fused_lamb_half_params_use_fp32_state(device):
    params = make_params(device, torch.bfloat16)
    grads = grad_sequence(params, steps=1)
    opt = FusedLAMB(params, lr=1e-2)
    run(opt, params, grads)
    expected = ref_lamb([(make_params(device, torch.bfloat16), 0.01)], grads, lr=1e-2)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    assert_params_equal(params, [e.to(torch.bfloat16) for e in expected], **HALF_CLOSE[torch.bfloat16])


# --- FusedNovoGrad ---------------------------------------------------------------------------------

NOVOGRAD_CASES = [
    dict(),
    dict(reg_inside_moment=True, weight_decay=0.01),
    dict(weight_decay=0.01),
    dict(norm_type=0),
    dict(init_zero=True),
    dict(grad_averaging=False, bias_correction=False),
]


@pytest.mark.parametrize("case", NOVOGRAD_CASES, ids=case_id)
def test_fused_novograd_matches_reference(device, case):
    params = make_params(device)
    grads = grad_sequence(params)
    kwargs = dict(lr=1e-2, betas=(0.95, 0.98), **case)
    ref_kwargs = dict(kwargs)
    ref_kwargs["wd"] = ref_kwargs.pop("weight_decay", 0.0)
    expected = ref_novograd(make_params(device), grads, **ref_kwargs)
    opt = FusedNovoGrad(params, **kwargs)
    run(opt, params, grads)
    assert opt.param_groups[0]["step"] == STEPS
    assert_params_equal(params, [e.float() for e in expected], **CLOSE)


def test_fused_novograd_errors_are_apex_messages():
    with pytest.raises(RuntimeError, match=r"^FusedNovoGrad does not support the AMSGrad variant\.$"):
        FusedNovoGrad(make_params("cpu"), amsgrad=True)
    params = make_params("cpu")
    opt = FusedNovoGrad(params, norm_type=1)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"^FusedNovoGrad only support l2/inf norm now\.$"):
        opt.step()
    assert_params_equal(params, before)
    assert "step" not in opt.param_groups[0]


def test_fused_novograd_loads_apex_format_state_dict():
    """Apex kept the per-tensor norms as [fp16 norms, fp32 norms] in each param group."""
    params, twin = make_params("cpu"), make_params("cpu")
    grads = grad_sequence(params, steps=5)
    opt = FusedNovoGrad(params, lr=1e-2)
    run(opt, params, grads[:3])
    apex_style = copy.deepcopy(opt.state_dict())
    norms = [apex_style["state"][i].pop("exp_avg_sq") for i in apex_style["param_groups"][0]["params"]]
    apex_style["param_groups"][0]["exp_avg_sq"] = [torch.zeros(0), torch.stack(norms)]
    with torch.no_grad():
        for t, p in zip(twin, params):
            t.copy_(p)
    resumed = FusedNovoGrad(twin, lr=1e-2)
    resumed.load_state_dict(apex_style)
    run(opt, params, grads[3:])
    run(resumed, twin, grads[3:])
    assert_params_equal(twin, params)
    apex_style["param_groups"][0]["exp_avg_sq"] = [torch.zeros(0), torch.stack(norms[:2])]
    with pytest.raises(ValueError, match="holds 2 per-tensor norms for 3 parameters"):
        FusedNovoGrad(make_params("cpu")).load_state_dict(apex_style)


# --- shared behaviour ------------------------------------------------------------------------------

FACTORIES = {
    "FusedAdam": lambda p, **kw: FusedAdam(p, lr=1e-2, **kw),
    "FusedAdam-nobc": lambda p, **kw: FusedAdam(p, lr=1e-2, bias_correction=False, **kw),
    "FusedSGD": lambda p, **kw: FusedSGD(p, lr=0.1, momentum=0.9, **kw),
    "FusedSGD-wdafter": lambda p, **kw: FusedSGD(p, lr=0.1, momentum=0.9, weight_decay=0.01,
                                                 wd_after_momentum=True, **kw),
    "FusedAdagrad": lambda p, **kw: FusedAdagrad(p, **kw),
    "FusedAdagrad-w": lambda p, **kw: FusedAdagrad(p, adagrad_w_mode=True, weight_decay=0.01, **kw),
    "FusedLAMB": lambda p, **kw: FusedLAMB(p, **kw),
    "FusedNovoGrad": lambda p, **kw: FusedNovoGrad(p, **kw),
}
DEFAULT_SET_GRAD_NONE = {"FusedSGD": False, "FusedSGD-wdafter": False}


@pytest.mark.parametrize("name", FACTORIES)
def test_zero_grad_follows_set_grad_none_unless_told(name):
    params = make_params("cpu")
    for set_grad_none in (True, False):
        opt = FACTORIES[name](params, set_grad_none=set_grad_none)
        for call, expect_none in ((lambda: opt.zero_grad(), set_grad_none),
                                  (lambda: opt.zero_grad(set_to_none=True), True),
                                  (lambda: opt.zero_grad(set_to_none=False), False),
                                  (lambda: opt.zero_grad(True), True)):
            for p in params:
                p.grad = torch.ones_like(p)
            call()
            if expect_none:
                assert all(p.grad is None for p in params)
            else:
                assert all(p.grad is not None and not p.grad.any() for p in params)
    assert FACTORIES[name](params).set_grad_none == DEFAULT_SET_GRAD_NONE.get(name, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_round_trip_resumes_identically(device, name, dtype):
    params, twin = make_params(device, dtype), make_params(device, dtype)
    grads = grad_sequence(params, steps=5)
    opt = FACTORIES[name](params)
    run(opt, params, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with torch.no_grad():
        for t, p in zip(twin, params):
            t.copy_(p)
    resumed = FACTORIES[name](twin)
    resumed.load_state_dict(saved)
    for p, t in zip(params, twin):  # FP32 state of half parameters survives the load in FP32
        for key, value in opt.state[p].items():
            torch.testing.assert_close(resumed.state[t][key], value, rtol=0, atol=0, check_device=False)
    run(opt, params, grads[3:])
    run(resumed, twin, grads[3:])
    assert_params_equal(twin, params)


@pytest.mark.parametrize("name", FACTORIES)
def test_step_evaluates_closure_and_skips_params_without_grad(name):
    params = make_params("cpu")
    frozen = params[1].detach().clone()
    opt = FACTORIES[name](params)

    def closure():
        opt.zero_grad()
        loss = params[0].square().sum() + params[2].sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    assert torch.equal(params[1].detach(), frozen)
    assert len(opt.state[params[1]]) == 0


# --- under amp.initialize --------------------------------------------------------------------------

def _amp_or_skip():
    try:
        from ampcompat import amp
        amp.initialize  # noqa: B018
    except (ImportError, AttributeError) as exc:  # the core is built alongside; skip until it exists
        pytest.skip("ampcompat.amp.initialize is not importable yet: {}".format(exc))
    return amp


def _train_with_amp(amp, make_optimizer, opt_level, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = make_optimizer(model.parameters())
    model, optimizer = amp.initialize(model, optimizer, opt_level=opt_level, verbosity=0)
    data = torch.randn(steps, 6, 8)
    for x in data:
        loss = model(x).float().square().mean()
        with amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("opt_level", ["O0", "O1", "O2", "O3"])
@pytest.mark.parametrize("name", ["FusedAdam", "FusedSGD", "FusedLAMB", "FusedNovoGrad", "FusedAdagrad"])
def test_fused_optimizers_train_under_amp(opt_level, name):
    amp = _amp_or_skip()
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).state_dict()
    model, optimizer = _train_with_amp(amp, FACTORIES[name], opt_level)
    final = model.state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k].float(), initial[k].float()) for k in initial)
    assert any(len(s) > 0 for s in optimizer.state.values())


@pytest.mark.parametrize("ours,torch_twin", [
    (lambda p: FusedAdam(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0, fused=True)),
    (lambda p: FusedAdam(p, lr=1e-2, adam_w_mode=False, weight_decay=0.1),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, fused=True)),
    (lambda p: FusedSGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
], ids=["FusedAdam", "FusedAdam-L2", "FusedSGD"])
def test_o2_run_equals_same_run_with_torch_optimizer(ours, torch_twin):
    amp = _amp_or_skip()
    model, optimizer = _train_with_amp(amp, ours, "O2")
    amp_state = amp.state_dict()
    import ampcompat
    ampcompat.reset()
    ref_model, ref_optimizer = _train_with_amp(amp, torch_twin, "O2")
    assert amp.state_dict() == amp_state
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(amp.master_params(optimizer), amp.master_params(ref_optimizer)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
