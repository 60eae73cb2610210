"""Apex's fused-optimizer API before September 2019 (and its successor in ``apex.contrib.optimizers``):
``FusedAdam``'s ``eps_inside_sqrt``/``max_grad_norm`` and ``step(grads, output_params, scale, grad_norms)``,
the two fused ``FP16_Optimizer`` wrappers, contrib's ``FusedSGD`` and ``FusedLAMB`` -- against plain PyTorch."""
import math

import pytest
import torch

from ampcompat.contrib import optimizers as contrib
from ampcompat.optimizers import FP16_Optimizer, FusedAdam


def _params(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(4, 3, device=device, dtype=dtype).requires_grad_(),
            torch.randn(5, device=device, dtype=dtype).requires_grad_()]


def _grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.device) for p in params]


def _adam_2019_reference(params, grads_per_step, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                         bias_correction=True, eps_inside_sqrt=False, max_grad_norm=0.0, scale=1.0):
    """The 2019 FusedAdam written per tensor with plain torch ops (clipping by ``clip_grad_norm_``)."""
    params = [p.detach().clone().double() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        grads = [g.double() / scale for g in grads]
        if max_grad_norm > 0:
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            grads = [p.grad for p in params]
        step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) if bias_correction else lr
        for p, g, (m, v) in zip(params, grads, moments):
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v + eps).sqrt() if eps_inside_sqrt else v.sqrt() + eps
            p.sub_(step_size * (m / denom + weight_decay * p))
    return params


# --- FusedAdam's 2019 API -----------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(bias_correction=False, weight_decay=0.01, max_grad_norm=1.0),
    dict(bias_correction=True, eps_inside_sqrt=True, weight_decay=0.1),
    dict(bias_correction=True, max_grad_norm=0.5, eps=1e-3),
])
def test_fused_adam_2019_keywords_match_the_2019_formula(device, options):
    params = _params(device)
    reference_start = [p.detach().clone() for p in params]
    optimizer = FusedAdam(params, lr=1e-2, **options)
    grads_per_step = [_grads(params, step, scale=3.0) for step in range(4)]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    want = _adam_2019_reference(reference_start, grads_per_step, lr=1e-2, **options)
    for got, expected in zip(params, want):
        torch.testing.assert_close(got.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_fused_adam_2019_equals_torch_adam_where_the_formulas_agree(device):
    """With eps=0 and no decay the 2019 step-size form is algebraically torch.optim.Adam."""
    params = _params(device)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedAdam(params, lr=1e-2, eps=0.0, eps_inside_sqrt=True)
    theirs = torch.optim.Adam(twins, lr=1e-2, eps=0.0)
    for step in range(5):
        for p, t, g in zip(params, twins, _grads(params, step)):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)


def test_fused_adam_step_takes_scaled_half_grads_and_writes_output_params(device):
    params = _params(device)
    start = [p.detach().clone() for p in params]
    outputs = [torch.zeros_like(p, dtype=torch.float16) for p in params]
    optimizer = FusedAdam(params, lr=1e-2, bias_correction=False, max_grad_norm=1.0)
    scale = 1024.0
    half_grads = [g.half() for g in _grads(params, 0, scale=scale)]
    norm = float(torch.linalg.vector_norm(torch.cat([g.float().reshape(-1) for g in half_grads])))
    optimizer.step(grads=[half_grads], output_params=[outputs], scale=scale, grad_norms=[norm])
    want = _adam_2019_reference(start, [[g.float() for g in half_grads]], lr=1e-2, bias_correction=False,
                                max_grad_norm=1.0, scale=scale)
    for p, out, expected in zip(params, outputs, want):
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
        assert out.dtype == torch.float16 and torch.equal(out, p.detach().half())
        assert p.grad is None
    assert optimizer.state[params[0]]["step"] == 1


def test_fused_adam_2019_arguments_are_checked():
    params = _params("cpu")
    with pytest.raises(ValueError, match="cannot be combined with adam_w_mode=False"):
        FusedAdam(params, max_grad_norm=1.0, adam_w_mode=False)
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        FusedAdam(params, max_grad_norm=-1.0)
    optimizer = FusedAdam(params)
    with pytest.raises(ValueError, match="grads for 2 param groups; the optimizer has 1"):
        optimizer.step(grads=[[torch.ones(4, 3)], [torch.ones(5)]])
    sparse = torch.ones(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step(grads=[sparse, torch.ones(5)])
    with pytest.raises(ValueError, match="cannot be combined with a GradScaler or capturable"):
        FusedAdam(params, capturable=True).step(scale=2.0)


def test_contrib_fused_adam_is_always_the_2019_optimizer(device):
    params = _params(device)
    start = [p.detach().clone() for p in params]
    optimizer = contrib.FusedAdam(params, lr=1e-2, weight_decay=0.05, use_mt=True, amp_scale_adjustment=2.0)
    assert optimizer.param_groups[0]["max_grad_norm"] == 0.0
    grads_per_step = [_grads(params, step) for step in range(3)]
    for grads in grads_per_step:
        optimizer.step(grads=grads)  # one flat list = one param group, as Apex read it
    want = _adam_2019_reference(start, grads_per_step, lr=1e-2, weight_decay=0.05)
    for p, expected in zip(params, want):
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not support the AMSGrad variant"):
        contrib.FusedAdam(params, amsgrad=True)


# --- the fused FP16_Optimizer wrappers ---------------------------------------------------------------------

def _half_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device).half()


def _batch(device, step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=gen).to(device).half(), torch.randint(0, 3, (16,), generator=gen).to(device)


def _train(model, optimizer, device, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(device, step)
        optimizer.zero_grad()
        optimizer.backward(torch.nn.functional.cross_entropy(model(x).float(), y))
        optimizer.step()


def test_contrib_fp16_optimizer_with_fused_sgd_matches_sgd_on_fp32_masters(device):
    model = _half_model(device)
    optimizer = contrib.FP16_Optimizer(contrib.FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                                       static_loss_scale=128.0)
    twin = _half_model(device)
    masters = [p.detach().float().requires_grad_() for p in twin.parameters()]
    reference = torch.optim.SGD(masters, lr=0.1, momentum=0.9, weight_decay=1e-3)
    _train(model, optimizer, device, 4)
    for step in range(4):
        x, y = _batch(device, step)
        for p in twin.parameters():
            p.grad = None
        (torch.nn.functional.cross_entropy(twin(x).float(), y) * 128.0).backward()
        for m, p in zip(masters, twin.parameters()):
            m.grad = p.grad.float() / 128.0
        reference.step()
        with torch.no_grad():
            for p, m in zip(twin.parameters(), masters):
                p.copy_(m)
    exact = dict(rtol=0, atol=0) if device == "cpu" else {}  # CUDA's fused SGD kernel may round differently
    for got, want in zip(optimizer.fp32_groups[0], masters):
        torch.testing.assert_close(got, want.detach(), **exact)
    for got, want in zip(model.parameters(), twin.parameters()):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, **exact)


@pytest.mark.parametrize("wrapper", [FP16_Optimizer, contrib.FP16_Optimizer])
def test_overflow_skips_the_step_and_the_scale_follows_apexs_2019_rule(wrapper, capsys):
    model = _half_model("cpu")
    optimizer = wrapper(FusedAdam(model.parameters(), lr=1e-2), dynamic_loss_scale=True)
    assert capsys.readouterr().out.startswith("\n")  # the wrapper's deprecation banner
    optimizer.scale_window = 3
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch("cpu", 0)
    optimizer.backward(torch.nn.functional.cross_entropy(model(x).float(), y))
    next(model.parameters()).grad[0, 0] = float("inf")
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert optimizer.cur_scale == 2.0 ** 15 and optimizer.last_overflow_iter == 0
    assert capsys.readouterr().out == "\nGrad overflow on iteration 0\nUsing dynamic loss scale of 65536.0\n"
    scales = []
    for step in range(1, 7):
        _train(model, optimizer, "cpu", 1, start=step)
        scales.append(optimizer.cur_scale)
    # doubles when (iteration - last overflow) is a multiple of the window: iterations 3 and 6
    assert scales == [2.0 ** 15, 2.0 ** 15, 2.0 ** 16, 2.0 ** 16, 2.0 ** 16, 2.0 ** 17]
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("wrapper,key", [(FP16_Optimizer, "fp32_groups_flat"), (contrib.FP16_Optimizer, "fp32_groups")])
def test_fp16_optimizer_state_dict_round_trip_resumes_exactly(device, wrapper, key):
    def build():
        model = _half_model(device)
        return model, wrapper(contrib.FusedAdam(model.parameters(), lr=1e-2, max_grad_norm=1.0),
                              dynamic_loss_scale=True, verbose=False)

    model, optimizer = build()
    _train(model, optimizer, device, 6)
    straight = [p.detach().clone() for p in model.parameters()]

    model, optimizer = build()
    _train(model, optimizer, device, 3)
    state, weights = optimizer.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    assert key in state and state["cur_iter"] == 3 and state["scale_window"] == 1000
    state = {k: v for k, v in state.items()}
    resumed_model, resumed = build()
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    _train(resumed_model, resumed, device, 3, start=3)
    for got, want in zip(resumed_model.parameters(), straight):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_2019_fp16_optimizer_keeps_flat_masters_and_model_views():
    model = _half_model("cpu")
    optimizer = FP16_Optimizer(FusedAdam(model.parameters(), lr=1e-2), verbose=False)
    (master,) = optimizer.param_groups[0]["params"]
    assert master.dtype == torch.float32 and master.shape == (sum(p.numel() for p in model.parameters()),)
    flat = optimizer.fp16_groups_flat[0]
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in model.parameters())
    _train(model, optimizer, "cpu", 2)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), master.detach().half(),
                               rtol=0, atol=0)


def test_fp16_optimizer_around_a_plain_torch_optimizer_steps_on_unscaled_master_grads(device):
    model = _half_model(device)
    optimizer = contrib.FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), static_loss_scale=64.0,
                                       verbose=False)
    twin = _half_model(device)
    x, y = _batch(device, 0)
    _train(model, optimizer, device, 1)
    (torch.nn.functional.cross_entropy(twin(x).float(), y) * 64.0).backward()
    for got, p in zip(optimizer.fp32_groups[0], twin.parameters()):
        want = p.detach().float() - 0.1 * (p.grad.float() / 64.0)
        torch.testing.assert_close(got, want, **(dict(rtol=0, atol=0) if device == "cpu" else {}))
        assert got.grad is None


def test_fp16_optimizer_bad_input():
    model = _half_model("cpu")
    with pytest.raises(SystemError, match="Do not support dynamic loss scale args for now."):
        FP16_Optimizer(FusedAdam(model.parameters()), dynamic_loss_scale=True, dynamic_loss_args={"scale_window": 5})
    with pytest.raises(TypeError, match="mixes dtypes/devices"):
        FP16_Optimizer(FusedAdam([torch.zeros(2, requires_grad=True), torch.zeros(2).half().requires_grad_()]))
    optimizer = contrib.FP16_Optimizer(FusedAdam(model.parameters()), verbose=False)
    with pytest.raises(NotImplementedError, match="does not support step\\(closure\\)"):
        optimizer.step(lambda: 0.0)
    state = optimizer.state_dict()
    del state["cur_scale"]
    with pytest.raises(KeyError, match="cur_scale"):
        optimizer.load_state_dict(state)
    other = contrib.FP16_Optimizer(FusedAdam(torch.nn.Linear(2, 2).half().parameters()), verbose=False)
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(contrib.FP16_Optimizer(FusedAdam(model.parameters()), verbose=False).state_dict())


# --- contrib FusedLAMB ----------------------------------------------------------------------------------

def _lamb_reference(params, grads_per_step, *, lr, betas, eps, weight_decay, max_grad_norm):
    """LAMB as Apex's kernel computes it, per tensor with plain torch ops."""
    params = [p.detach().clone().double() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        grads = [g.double() for g in grads]
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        divisor = norm / max_grad_norm if norm > max_grad_norm else 1.0
        for p, g, (m, v) in zip(params, grads, moments):
            g = g / divisor
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps) + weight_decay * p
            p_norm, u_norm = p.norm(), update.norm()
            ratio = p_norm / u_norm if weight_decay != 0 and p_norm != 0 and u_norm != 0 else 1.0
            p.sub_(lr * ratio * update)
    return params


def test_contrib_fused_lamb_matches_a_per_tensor_lamb(device):
    params = _params(device)
    start = [p.detach().clone() for p in params]
    optimizer = contrib.FusedLAMB(params, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)
    grads_per_step = [_grads(params, step, scale=2.0) for step in range(3)]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    want = _lamb_reference(start, grads_per_step, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                           max_grad_norm=1.0)
    for got, expected in zip(params, want):
        torch.testing.assert_close(got.detach().double(), expected, rtol=1e-5, atol=1e-6)
