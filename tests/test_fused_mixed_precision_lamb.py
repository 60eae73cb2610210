"""apex.optimizers.FusedMixedPrecisionLamb against Apex's step written per tensor in float64: reduced-precision
parameters with FP32 masters and moments, the loss scale divided out inside the step, inf/NaN steps skipped with
nothing changed, the update left in ``.grad``; checkpoints, LR schedulers, and bad input."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from ampcompat.optimizers import FusedMixedPrecisionLamb

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float16: dict(rtol=1e-3, atol=1e-5),
       torch.bfloat16: dict(rtol=8e-3, atol=1e-4)}


class ReferenceLamb:
    """Apex's FusedMixedPrecisionLamb.step in float64, one tensor at a time. Masters and moments are rounded
    to the dtype Apex stores them in after each step; the update is rounded to the gradient's dtype."""

    def __init__(self, groups, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, adam_w_mode=True,
                 grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False, bias_correction=True,
                 reduced_precision_dtype=None):
        self.groups = [dict(params=list(g["params"]), weight_decay=g.get("weight_decay", weight_decay), step=0)
                       for g in groups]
        self.lr, self.betas, self.eps, self.adam_w_mode = lr, betas, eps, adam_w_mode
        self.grad_averaging, self.max_grad_norm, self.use_nvlamb = grad_averaging, max_grad_norm, use_nvlamb
        self.bias_correction = bias_correction
        self.storage, self.weights, self.m, self.v = {}, {}, {}, {}
        for group in self.groups:
            for p in group["params"]:
                reduced = reduced_precision_dtype is not None and p.dtype == reduced_precision_dtype
                self.storage[p] = (torch.float32 if reduced else p.dtype, p.dtype)  # (master/state, parameter)
                self.weights[p] = p.detach().double()
                self.m[p] = torch.zeros_like(p, dtype=torch.float64)
                self.v[p] = torch.zeros_like(p, dtype=torch.float64)
        self.updates, self.slack = {}, {}

    def step(self, grads, scale, found_inf):
        norm = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
        if found_inf or not math.isfinite(norm):
            return
        max_norm = self.max_grad_norm * scale
        clip = norm / max_norm if norm > max_norm else 1.0
        beta1, beta2 = self.betas
        beta3 = 1 - beta1 if self.grad_averaging else 1.0
        for group in self.groups:
            group["step"] += 1
            step, decay = group["step"], group["weight_decay"]
            bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if self.bias_correction else (1.0, 1.0)
            for p in group["params"]:
                if p not in grads:
                    continue
                state_dtype, _ = self.storage[p]
                w, g = self.weights[p], grads[p].double() / scale / clip
                if not self.adam_w_mode:
                    g = g + decay * w
                m = beta1 * self.m[p] + beta3 * g
                v = beta2 * self.v[p] + (1 - beta2) * g * g
                u = (m / bc1) / ((v / bc2).sqrt() + self.eps)  # from the moments before they are stored
                if self.adam_w_mode:
                    u = u + decay * w
                u = u.to(grads[p].dtype).double()
                pn, un = w.norm().item(), u.norm().item()
                ratio = self.lr * pn / un if (self.use_nvlamb or decay != 0) and pn and un else self.lr
                self.weights[p] = (w - ratio * u).to(state_dtype).double()
                self.m[p], self.v[p] = m.to(state_dtype).double(), v.to(state_dtype).double()
                self.updates[p] = u
                self.slack[p] = ratio * u.abs() * torch.finfo(grads[p].dtype).eps  # the stored update's last ulp


def within(got, want, dtype, slack=0.0):
    tol = TOL[dtype]
    return bool(((got.double() - want).abs() <= tol["atol"] + tol["rtol"] * want.abs() + slack).all())


def make_model(dtype, device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device=device, dtype=dtype)


def groups_of(model):
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "weight" in n]},
            {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}]


def snapshot(model, optimizer):
    return ([p.detach().clone() for p in model.parameters()],
            {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()},
            [g["step"].clone() for g in optimizer.param_groups])


def same(a, b):
    (pa, sa, ga), (pb, sb, gb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(torch.equal(x, y) for x, y in zip(ga, gb))
            and sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k]))


CASES = {"adamw": {}, "l2": dict(adam_w_mode=False), "nvlamb_no_decay": dict(use_nvlamb=True, weight_decay=0.0),
         "clipped_plain": dict(grad_averaging=False, bias_correction=False, max_grad_norm=0.05)}


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("param_dtype,reduced", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, None), (torch.float16, None)])
def test_grad_scaler_steps_match_the_reference_and_an_inf_step_changes_nothing(device, param_dtype, reduced, case):
    model = make_model(param_dtype, device)
    options = dict(lr=1e-2, reduced_precision_dtype=reduced, **CASES[case])
    optimizer = FusedMixedPrecisionLamb(groups_of(model), **options)
    reference = ReferenceLamb(groups_of(model), **options)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=1000)
    data = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(16, 6, generator=data).to(device=device, dtype=param_dtype)
        scaler.scale(model(x).float().square().mean()).backward()
        if step == 2:
            model[2].weight.grad[0, 0] = math.inf
        grads = {p: p.grad.clone() for p in model.parameters()}
        scale, before = scaler.get_scale(), snapshot(model, optimizer)
        scaler.step(optimizer)
        scaler.update()
        reference.step(grads, scale, found_inf=step == 2)
        if step == 2:  # skipped: parameters, masters, moments and step counts untouched; the scale halves
            assert same(snapshot(model, optimizer), before) and scaler.get_scale() == scale / 2
            optimizer.zero_grad()
            continue
        for p in model.parameters():
            state = optimizer.state[p]
            state_dtype, _ = reference.storage[p]
            weight = state.get("master_param", p)
            assert weight.dtype == state_dtype and state["exp_avg"].dtype == state_dtype
            assert within(weight, reference.weights[p], state_dtype, reference.slack[p]), (step, p.shape)
            assert within(state["exp_avg"], reference.m[p], state_dtype)
            assert within(state["exp_avg_sq"], reference.v[p], state_dtype)
            assert within(p.grad, reference.updates[p], p.grad.dtype)  # Apex's kernel leaves the update in .grad
            if "master_param" in state:
                assert torch.equal(p, state["master_param"].to(p.dtype))
        optimizer.zero_grad()
    assert [g["step"].item() for g in optimizer.param_groups] == [3, 3]


def _torch_unscales(dtype: torch.dtype, device: str) -> bool:
    """Whether torch's own unscale-and-check kernel (behind ``GradScaler.unscale_``) takes ``dtype`` here."""
    try:
        torch._amp_foreach_non_finite_check_and_unscale_([torch.ones(2, dtype=dtype, device=device)],
                                                         torch.zeros(1, device=device), torch.ones(1, device=device))
        return True
    except (NotImplementedError, RuntimeError):
        return False


def test_torchs_newer_protocol_and_an_unscaled_step_give_the_same_result(device):
    """``GradScaler`` may set ``grad_scale``/``found_inf`` on the optimizer instead of passing itself; and a
    plain ``step()`` on gradients already unscaled is the same step. (BF16: ``GradScaler.unscale_`` refuses
    FP16 gradients; where torch's unscale kernel has no BF16 version either, CUDA, FP32 parameters.)"""
    dtype = torch.bfloat16 if _torch_unscales(torch.bfloat16, device) else torch.float32
    reduced = dtype if dtype != torch.float32 else None
    results = []
    for protocol in ("attributes", "unscaled", "scaler_unscaled_first"):
        model = make_model(dtype, device)
        optimizer = FusedMixedPrecisionLamb(model.parameters(), lr=1e-2, reduced_precision_dtype=reduced)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 4)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        loss = model(x).float().square().mean()
        if protocol == "attributes":
            scaler.scale(loss).backward()
            optimizer.grad_scale = torch.full((), 2.0 ** 4, device=device)
            optimizer.found_inf = torch.zeros((), device=device)
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        elif protocol == "unscaled":
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the step must not divide the scale out a second time
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                scaler.step(optimizer)
        results.append([optimizer.state[p].get("master_param", p) for p in model.parameters()])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-4)  # power-of-two scale: BF16 rounding only


def test_found_inf_set_on_the_optimizer_skips_the_step(device):
    model = make_model(torch.bfloat16, device)
    optimizer = FusedMixedPrecisionLamb(model.parameters(), reduced_precision_dtype=torch.bfloat16)
    model(torch.randn(4, 6, device=device, dtype=torch.bfloat16)).float().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.found_inf = torch.ones((), device=device)
    optimizer.step()
    assert not optimizer.state and optimizer.param_groups[0]["step"].item() == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert optimizer._dummy_overflow_buf.item() == 1


def test_state_dict_round_trip_resumes_bitwise_and_keeps_fp32_state(device):
    def run(model, optimizer, steps, seed):
        data = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(8, 6, generator=data).to(device=device, dtype=torch.float16)
            model(x).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    model = make_model(torch.float16, device)
    optimizer = FusedMixedPrecisionLamb(groups_of(model), lr=1e-2, reduced_precision_dtype=torch.float16)
    run(model, optimizer, 2, 1)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    run(model, optimizer, 2, 2)

    resumed = make_model(torch.float16, device)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = FusedMixedPrecisionLamb(groups_of(resumed), lr=1e-2, reduced_precision_dtype=torch.float16)
    resumed_optimizer.load_state_dict(saved)
    state = resumed_optimizer.state[resumed[0].weight]
    assert state["exp_avg"].dtype == state["master_param"].dtype == torch.float32
    assert resumed_optimizer.param_groups[0]["lr"].device.type == device
    run(resumed, resumed_optimizer, 2, 2)
    for got, want in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(got, want)
    for got, want in zip(resumed_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_apex_checkpoint_without_masters_loads_and_copies_them_from_the_model(device):
    model = make_model(torch.float16, device)
    optimizer = FusedMixedPrecisionLamb(model.parameters(), reduced_precision_dtype=torch.float16)
    model(torch.randn(4, 6, device=device, dtype=torch.float16)).float().sum().backward()
    optimizer.step()
    apex_format = copy.deepcopy(optimizer.state_dict())
    for entry in apex_format["state"].values():
        del entry["master_param"]
    fresh = FusedMixedPrecisionLamb(model.parameters(), reduced_precision_dtype=torch.float16)
    fresh.load_state_dict(apex_format)
    assert "master_param" not in fresh.state[model[0].weight]
    model(torch.randn(4, 6, device=device, dtype=torch.float16)).float().sum().backward()
    fresh.step()
    assert fresh.state[model[0].weight]["master_param"].dtype == torch.float32
    assert torch.equal(model[0].weight, fresh.state[model[0].weight]["master_param"].half())


def test_lr_and_step_are_tensors_on_the_device_and_lr_schedulers_update_them_in_place(device):
    model = make_model(torch.float32, device)
    optimizer = FusedMixedPrecisionLamb(groups_of(model), lr=1e-2, step=5)
    lr, step = optimizer.param_groups[1]["lr"], optimizer.param_groups[1]["step"]
    assert lr.device.type == step.device.type == device and lr.dtype == torch.float32 and step.dtype == torch.int32
    assert lr is not optimizer.param_groups[0]["lr"] and step.tolist() == [5]  # each group has its own
    optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2, device=device))], "lr": 0.5})
    assert optimizer.param_groups[2]["lr"].device.type == device and optimizer.param_groups[2]["lr"].item() == 0.5
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(2, 6, device=device)).sum().backward()
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[1]["lr"] is lr and lr.item() == pytest.approx(5e-3)
    assert step.tolist() == [6]
    assert optimizer.param_groups_full_precision[0]["params"] == [None, None]  # no reduced dtype: no masters


def test_bad_input_raises_apexs_errors():
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(RuntimeError, match="^FusedLAMB does not support the AMSGrad variant.$"):
        FusedMixedPrecisionLamb(params, amsgrad=True)
    with pytest.raises(TypeError, match="reduced_precision_dtype must be a floating-point torch.dtype"):
        FusedMixedPrecisionLamb(params, reduced_precision_dtype="fp16")
    embedding = nn.Embedding(4, 2, sparse=True)
    optimizer = FusedMixedPrecisionLamb(embedding.parameters())
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def _aten_ops_per_step(num_layers, dtype, **options):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(num_layers)]).to(dtype)
    optimizer = FusedMixedPrecisionLamb(model.parameters(), **options)
    for _ in range(2):  # the second step: state exists
        model(torch.randn(2, 8).to(dtype)).float().sum().backward()
        Count.calls = 0
        with Count():
            optimizer.step()
    return Count.calls


def test_a_step_dispatches_a_fixed_number_of_ops_not_a_loop_over_tensors():
    """Multi-tensor: FP32 parameters cost the same ops for 8 tensors as for 32; FP16 parameters with masters
    add one FP32 working copy of each gradient (an allocation), nothing else per tensor."""
    assert _aten_ops_per_step(4, torch.float32) == _aten_ops_per_step(16, torch.float32)
    half = dict(reduced_precision_dtype=torch.float16)
    assert _aten_ops_per_step(16, torch.float16, **half) - _aten_ops_per_step(4, torch.float16, **half) == 32 - 8


def _bf16_run_with_grad_scaler(device):
    model = make_model(torch.bfloat16, device)
    optimizer = FusedMixedPrecisionLamb(groups_of(model), lr=1e-2, reduced_precision_dtype=torch.bfloat16)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=1000)
    data = torch.Generator().manual_seed(1)
    skipped_unchanged = None
    for step in range(3):
        x = torch.randn(16, 6, generator=data).to(device=device, dtype=torch.bfloat16)
        scaler.scale(model(x).float().square().mean()).backward()
        if step == 1:
            model[2].weight.grad[0, 0] = math.inf
        scale, before = scaler.get_scale(), snapshot(model, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scaler.step(optimizer)
        scaler.update()
        if step == 1:
            skipped_unchanged = same(snapshot(model, optimizer), before) and scaler.get_scale() == scale / 2
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], skipped_unchanged


def test_bf16_gradients_where_torchs_check_kernel_refuses_them(device, monkeypatch):
    """torch's CUDA inf/NaN check kernel has no BF16 version, so ``GradScaler`` cannot check BF16 gradients
    there: the optimizer checks them itself and records the flags where ``GradScaler.update`` reads them.
    Forced here by making the kernel refuse; the same run without refusal (where torch can) must agree."""
    reference, _ = _bf16_run_with_grad_scaler(device)

    def refuse(self, optimizer):
        raise NotImplementedError('"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for \'BFloat16\'')

    monkeypatch.setattr(torch.amp.GradScaler, "_check_inf_per_device", refuse)
    weights, skipped_unchanged = _bf16_run_with_grad_scaler(device)
    assert skipped_unchanged, "the inf step must change nothing and halve the scale"
    for got, want in zip(weights, reference):
        assert torch.equal(got, want)
