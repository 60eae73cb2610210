"""``apex_C``, ``apex.contrib`` (xentropy, clip_grad, group_norm, layer_norm, focal_loss),
``apex.mlp``, ``apex.fused_dense`` -- each against a plain-PyTorch twin, values and gradients, on every
device -- and the Apex modules ampcompat refuses (``ApexModuleNotProvided`` at import)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ampcompat import apex_C
from ampcompat._not_provided import NOT_PROVIDED, ApexModuleNotProvided
from ampcompat.contrib.clip_grad import clip_grad_norm_
from ampcompat.contrib.focal_loss import focal_loss
from ampcompat.contrib.group_norm import GroupNorm
from ampcompat.contrib.layer_norm import FastLayerNorm
from ampcompat.contrib.xentropy import SoftmaxCrossEntropyLoss
from ampcompat.fused_dense import FusedDense, FusedDenseGeluDense
from ampcompat.mlp import MLP

REPO = Path(__file__).resolve().parents[1]
LOW = [torch.float16, torch.bfloat16]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)

def _assert_affine_norm_twin(norm, ours, reference, ref_params, fp32: bool) -> None:
    """Output, input gradient and weight/bias gradients of ``norm`` equal the FP32 reference's."""
    (got_in, got), (want_in, want), (ref_w, ref_b) = ours, reference, ref_params
    torch.testing.assert_close(got, want, **(dict(rtol=1e-5, atol=1e-5) if fp32 else {}))
    dy = torch.randn_like(got)
    got.backward(dy)
    want.backward(dy)
    grad_tol = dict(rtol=1e-4, atol=1e-4) if fp32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_in.grad, want_in.grad, **grad_tol)
    torch.testing.assert_close(norm.weight.grad.float(), ref_w.grad, **grad_tol)
    torch.testing.assert_close(norm.bias.grad.float(), ref_b.grad, **grad_tol)



# --- apex_C ---------------------------------------------------------------------------------------

def test_apex_c_flatten_and_unflatten_are_torchs(device):
    tensors = [torch.randn(2, 3, device=device), torch.randn(4, device=device), torch.randn(1, 2, 2, device=device)]
    flat = apex_C.flatten(tensors)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]))
    views = apex_C.unflatten(flat, tensors)
    assert [v.shape for v in views] == [t.shape for t in tensors]
    for view, tensor in zip(views, tensors):
        assert torch.equal(view, tensor)
    flat.zero_()  # views, not copies, as Apex's
    assert all(not v.any() for v in views)


def test_apex_c_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one tensor"):
        apex_C.flatten([])
    with pytest.raises(TypeError, match="one dtype and device"):
        apex_C.flatten([torch.ones(2), torch.ones(2, dtype=torch.float16)])
    with pytest.raises(TypeError, match="sequence of tensors"):
        apex_C.flatten([torch.ones(2), 3.0])
    with pytest.raises(ValueError, match="has 3 elements, the tensors need 4"):
        apex_C.unflatten(torch.ones(3), [torch.ones(4)])


# --- xentropy -------------------------------------------------------------------------------------

def _xentropy_reference(logits, labels, smoothing, padding_idx):
    logprobs = F.log_softmax(logits.float(), dim=-1)
    nll = -logprobs.gather(1, labels.unsqueeze(1)).squeeze(1)
    smooth = -logprobs.mean(dim=-1)
    return ((1 - smoothing) * nll + smoothing * smooth).masked_fill(labels == padding_idx, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_matches_log_softmax(device, dtype, smoothing):
    torch.manual_seed(0)
    logits = torch.randn(24, 37, device=device).mul(3).to(dtype)
    labels = torch.randint(0, 37, (24,), device=device)
    labels[::5] = 2  # the padding index
    got_in, want_in = _leaf(logits), _leaf(logits)
    got = SoftmaxCrossEntropyLoss.apply(got_in, labels, smoothing, 2, dtype != torch.float32)
    want = _xentropy_reference(want_in, labels, smoothing, 2)
    assert got.dtype == torch.float32 and got.shape == (24,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.rand(24, device=device)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert got_in.grad.dtype == dtype
    assert not got_in.grad[::5].any()  # padding rows get no gradient
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(got_in.grad, want_in.grad, **tol)


def test_softmax_cross_entropy_defaults_and_bad_input():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    losses = SoftmaxCrossEntropyLoss.apply(logits, labels)  # smoothing 0, padding_idx 0
    assert losses[0] == 0 and torch.allclose(losses[1:], F.cross_entropy(logits, labels, reduction="none")[1:])
    with pytest.raises(RuntimeError, match="half_to_float=True needs FP16/BF16 logits"):
        SoftmaxCrossEntropyLoss.apply(logits, labels, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="labels must be torch.long"):
        SoftmaxCrossEntropyLoss.apply(logits, labels.int())
    with pytest.raises(RuntimeError, match="one label per row"):
        SoftmaxCrossEntropyLoss.apply(logits, labels[:3])
    with pytest.raises(RuntimeError, match="must be 2-D"):
        SoftmaxCrossEntropyLoss.apply(logits.unsqueeze(0), labels)


# --- clip_grad ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_contrib_clip_grad_norm_is_torchs(device, norm_type):
    torch.manual_seed(0)
    params = [torch.randn(5, 3, device=device, requires_grad=True), torch.randn(7, device=device).half()]
    twins = [p.detach().clone() for p in params]
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p) * 3
        t.grad = p.grad.clone()
    no_grad = torch.randn(2, device=device, requires_grad=True)
    got = clip_grad_norm_(params + [no_grad], 0.5, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_(twins, 0.5, norm_type=norm_type)
    torch.testing.assert_close(got, want)
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.grad, t.grad)
    assert float(got) > 0.5 and no_grad.grad is None


def test_contrib_clip_grad_norm_edge_cases():
    assert torch.equal(clip_grad_norm_([torch.ones(2, requires_grad=True)], 1.0), torch.tensor(0.0))
    p = torch.ones(2, requires_grad=True)
    p.grad = torch.tensor([float("inf"), 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(p, 1.0, error_if_nonfinite=True)


# --- group_norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_group_norm_matches_torch(device, act, x_dtype, w_dtype):
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, act=act).to(device=device, dtype=w_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 16, 5, 5, device=device).to(x_dtype).contiguous(memory_format=torch.channels_last)
    got_in, want_in = _leaf(x), _leaf(x)
    got = norm(got_in)
    ref_w, ref_b = _leaf(norm.weight.float()), _leaf(norm.bias.float())
    want = F.group_norm(want_in.float(), 4, ref_w, ref_b, 1e-5)
    want = (F.silu(want) if act else want).to(x_dtype)
    assert got.dtype == x_dtype
    _assert_affine_norm_twin(norm, (got_in, got), (want_in, want), (ref_w, ref_b),
                             fp32=x_dtype == w_dtype == torch.float32)


def test_group_norm_options_and_bad_input():
    plain = GroupNorm(2, 4, affine=False)
    assert plain.weight is None and list(plain.parameters()) == []
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(plain(x), F.group_norm(x, 2, eps=1e-5))
    with pytest.raises(ValueError, match="num_channels must be divisible by num_groups"):
        GroupNorm(3, 4)
    with pytest.raises(ValueError, match="act must be None, 'silu' or 'swish'"):
        GroupNorm(2, 4, act="relu")
    assert "act=swish" in repr(GroupNorm(2, 4, act="Swish"))


# --- layer_norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_fast_layer_norm_matches_torch_with_output_in_weight_dtype(device, x_dtype, w_dtype):
    torch.manual_seed(0)
    norm = FastLayerNorm(32, eps=1e-5).to(device=device, dtype=w_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 6, 32, device=device).to(x_dtype)
    got_in, want_in = _leaf(x), _leaf(x)
    ref_w, ref_b = _leaf(norm.weight.float()), _leaf(norm.bias.float())
    got = norm(got_in)
    want = F.layer_norm(want_in.float(), (32,), ref_w, ref_b, 1e-5).to(w_dtype)
    assert got.dtype == w_dtype  # Apex's kernel: output type = weight type
    _assert_affine_norm_twin(norm, (got_in, got), (want_in, want), (ref_w, ref_b),
                             fp32=x_dtype == w_dtype == torch.float32)


def test_fast_layer_norm_under_autocast_returns_the_autocast_dtype(device):
    norm = FastLayerNorm(8).to(device)
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = norm(torch.randn(3, 8, device=device))
    assert out.dtype == dtype
    with pytest.raises(RuntimeError, match="1-D of the input's last size 8"):
        FastLayerNorm(7)(torch.randn(2, 8))


# --- focal_loss -----------------------------------------------------------------------------------

def _focal_reference(logits, labels, num_pos, num_real, alpha, gamma, smoothing):
    """torchvision-style sigmoid focal loss on one-hot targets (smoothed for the BCE term only)."""
    x = logits.float()
    onehot = F.one_hot(labels.clamp(min=0), x.size(-1)).float() * (labels >= 0).unsqueeze(-1)
    target = onehot * (1 - smoothing) + smoothing / 2
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    keep = (labels != -2).unsqueeze(-1) & (torch.arange(x.size(-1), device=x.device) < num_real)
    return (loss * keep).sum() / num_pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_loss_matches_a_torchvision_style_reference(device, dtype, smoothing):
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 8, device=device).mul(2).to(dtype)
    labels = torch.randint(-2, 6, (2, 10), device=device)  # -2 ignored, -1 background, 6 and 7 padding classes
    num_pos = (labels >= 0).sum().float().reshape(1)
    got_in, want_in = _leaf(logits), _leaf(logits)
    got = focal_loss.focal_loss(got_in, labels, num_pos, 6, 0.25, 2.0, smoothing)
    want = _focal_reference(want_in, labels, num_pos, 6, 0.25, 2.0, smoothing)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want.reshape(()))
    got.backward()
    want.backward()
    assert got_in.grad.dtype == dtype and not got_in.grad[..., 6:].any()
    assert not got_in.grad[labels == -2].any()
    torch.testing.assert_close(got_in.grad, want_in.grad)
    applied = focal_loss.FocalLoss.apply(logits, labels, num_pos, 6, 0.25, 2.0, smoothing)
    torch.testing.assert_close(applied, got.detach())


def test_focal_loss_rejects_bad_input():
    logits, labels, one = torch.randn(3, 4), torch.tensor([0, 1, -1]), torch.ones([])
    with pytest.raises(RuntimeError, match="labels must be torch.long"):
        focal_loss.focal_loss(logits, labels.int(), one, 4, 0.25, 2.0)
    with pytest.raises(RuntimeError, match="labels' shape plus a class dimension"):
        focal_loss.focal_loss(logits, labels[:2], one, 4, 0.25, 2.0)
    with pytest.raises(RuntimeError, match="num_real_classes must be in 1..4"):
        focal_loss.focal_loss(logits, labels, one, 5, 0.25, 2.0)
    with pytest.raises(RuntimeError, match="one-element tensor"):
        focal_loss.focal_loss(logits, labels, torch.ones(2), 4, 0.25, 2.0)


# --- apex.mlp and apex.fused_dense --------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "sigmoid", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_matches_a_sequential_of_linears(device, activation, bias):
    torch.manual_seed(0)
    mlp = MLP([6, 8, 5, 3], bias=bias, activation=activation).to(device)
    layers = []
    for i in range(mlp.num_layers):
        linear = torch.nn.Linear(mlp.mlp_sizes[i], mlp.mlp_sizes[i + 1], bias=bias).to(device)
        with torch.no_grad():
            linear.weight.copy_(mlp.weights[i])
            if bias:
                linear.bias.copy_(mlp.biases[i])
        layers.append(linear)
        layers.append({"relu": torch.nn.ReLU(), "sigmoid": torch.nn.Sigmoid(), "none": torch.nn.Identity()}[activation])
    reference = torch.nn.Sequential(*layers)
    x = torch.randn(10, 6, device=device)
    got_in, want_in = _leaf(x), _leaf(x)
    got, want = mlp(got_in), reference(want_in)
    torch.testing.assert_close(got, want)
    got.mul(10).sum().backward()
    want.mul(10).sum().backward()
    torch.testing.assert_close(got_in.grad, want_in.grad)
    torch.testing.assert_close(mlp.weights[0].grad, reference[0].weight.grad)
    names = [f"{kind}_{i}" for i in range(3) for kind in (("weight", "bias") if bias else ("weight",))]
    assert list(mlp.state_dict()) == names


def test_mlp_bad_activation_and_autocast(device):
    with pytest.raises(TypeError, match="activation must be one of"):
        MLP([2, 2], activation="gelu")
    mlp = MLP([4, 4]).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert mlp(torch.randn(2, 4, device=device)).dtype == torch.bfloat16


def test_fused_dense_modules_match_linear_and_tanh_gelu(device):
    torch.manual_seed(0)
    dense = FusedDense(6, 4).to(device)
    no_bias = FusedDense(6, 4, bias=False).to(device)
    mlp = FusedDenseGeluDense(6, 12, 3).to(device)
    for module in (dense, no_bias, mlp):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)  # Apex left them uninitialised
    x = torch.randn(5, 6, device=device)
    got_in, want_in = _leaf(x), _leaf(x)
    out = dense(got_in) .sum() + no_bias(got_in).sum() + mlp(got_in).sum()
    want = (F.linear(want_in, dense.weight, dense.bias).sum() + F.linear(want_in, no_bias.weight).sum()
            + F.linear(F.gelu(F.linear(want_in, mlp.weight1, mlp.bias1), approximate="tanh"),
                       mlp.weight2, mlp.bias2).sum())
    torch.testing.assert_close(out, want)
    out.backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    want.backward()
    torch.testing.assert_close(got_in.grad, want_in.grad)
    for got, p in zip(grads, mlp.parameters()):
        torch.testing.assert_close(got, p.grad)
    with pytest.raises(ValueError, match="without bias is not supported"):
        FusedDenseGeluDense(2, 2, 2, bias=False)


# --- modules ampcompat does not provide -----------------------------------------------------------------

def test_every_refused_module_raises_a_module_not_found_error_naming_the_replacement():
    for apex_name, (what, instead) in NOT_PROVIDED.items():
        module_name = "ampcompat" + apex_name[len("apex"):]
        with pytest.raises(ModuleNotFoundError) as info:
            __import__(module_name)
        assert isinstance(info.value, ApexModuleNotProvided) and isinstance(info.value, ImportError)
        assert info.value.name == module_name and info.value.apex_name == apex_name
        assert str(info.value).startswith(f"{apex_name} is not provided by ampcompat: {what}. Use {instead} instead")
        assert module_name not in sys.modules


def test_refused_modules_under_the_alias_keep_try_except_fallbacks_working():
    """Checked in a fresh interpreter: the alias is process-wide."""
    code = textwrap.dedent("""
        import ampcompat
        ampcompat.install_apex_alias()

        try:
            from apex.contrib.sparsity import ASP
            HAVE_ASP = True
        except ImportError as exc:
            HAVE_ASP = False
            asp_error = exc
        assert HAVE_ASP is False
        assert "torch.ao.pruning" in str(asp_error) and asp_error.name == "ampcompat.contrib.sparsity"

        try:
            from apex.transformer import parallel_state, tensor_parallel
            HAVE_APEX = True
        except (ImportError, ModuleNotFoundError) as exc:
            HAVE_APEX = False
            assert "Megatron-Core" in str(exc)
        assert HAVE_APEX is False

        try:
            from apex.contrib.optimizers import DistributedFusedAdam
        except ImportError as exc:
            assert "ZeroRedundancyOptimizer" in str(exc) or "FSDP2" in str(exc)
        else:
            raise AssertionError("DistributedFusedAdam imported")

        import apex
        assert not hasattr(apex, "transformer")  # an AttributeError carrying the reason, not an ImportError
        try:
            apex.transformer
        except AttributeError as exc:
            assert "Megatron-Core" in str(exc)
        # What is provided imports through the same paths.
        from apex.contrib.xentropy import SoftmaxCrossEntropyLoss
        from apex.contrib.optimizers import FP16_Optimizer, FusedAdam, FusedLAMB, FusedSGD
        from apex.optimizers import FP16_Optimizer as OldFP16Optimizer
        import apex_C, apex.mlp, apex.fused_dense, apex.contrib.group_norm, apex.contrib.layer_norm
        assert apex_C is ampcompat.apex_C and apex.mlp is ampcompat.mlp
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "AMPCOMPAT_APEX_ALIAS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("name", ["multihead_attn", "sparsity"])
def test_from_contrib_import_a_refused_module_keeps_the_advice(name):
    from ampcompat._not_provided import ApexModuleNotProvided

    with pytest.raises(ApexModuleNotProvided, match=rf"apex\.contrib\.{name} is not provided by ampcompat: .* Use "):
        exec(f"from ampcompat.contrib import {name}", {})
    with pytest.raises(ImportError):  # what an `except ImportError:` fallback catches
        exec(f"from ampcompat.contrib import {name}", {})
    exec("from ampcompat.contrib import xentropy, clip_grad", {})  # provided ones still import this way
