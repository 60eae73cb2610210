"""ampcompat.normalization: Apex's fused norms as nn.LayerNorm/nn.RMSNorm, with Apex's dtype rules."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from ampcompat.normalization import (FusedLayerNorm, FusedRMSNorm, MixedFusedLayerNorm, MixedFusedRMSNorm,
                                     fused_layer_norm, fused_layer_norm_affine, fused_rms_norm,
                                     fused_rms_norm_affine, mixed_dtype_fused_layer_norm_affine,
                                     mixed_dtype_fused_rms_norm_affine)
from ampcompat.normalization.fused_layer_norm import (FusedLayerNormAffineFunction,
                                                      FusedLayerNormAffineMixedDtypesFunction,
                                                      FusedRMSNormAffineFunction, manual_rms_norm)

SHAPE = (4, 6)  # normalised over the last two dims of a (3, 4, 6) input


def autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def inputs(device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((3,) + SHAPE, generator=g).to(device=device, dtype=dtype)


PAIRS = [
    (lambda: FusedLayerNorm(SHAPE), lambda: torch.nn.LayerNorm(SHAPE)),
    (lambda: FusedLayerNorm(SHAPE, elementwise_affine=False),
     lambda: torch.nn.LayerNorm(SHAPE, elementwise_affine=False)),
    (lambda: MixedFusedLayerNorm(SHAPE), lambda: torch.nn.LayerNorm(SHAPE)),
    (lambda: FusedRMSNorm(SHAPE), lambda: torch.nn.RMSNorm(SHAPE, eps=1e-5)),
    (lambda: FusedRMSNorm(SHAPE, elementwise_affine=False),
     lambda: torch.nn.RMSNorm(SHAPE, eps=1e-5, elementwise_affine=False)),
    (lambda: MixedFusedRMSNorm(SHAPE), lambda: torch.nn.RMSNorm(SHAPE, eps=1e-5)),
]
PAIR_IDS = ["LayerNorm", "LayerNorm-noaffine", "MixedLayerNorm", "RMSNorm", "RMSNorm-noaffine", "MixedRMSNorm"]


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_output_and_grads_equal_torch_norm(device, pair):
    ours, theirs = randomize(pair[0]().to(device)), randomize(pair[1]().to(device))
    x = inputs(device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ours(x), theirs(x_ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = inputs(device, seed=2)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    for (name, p), (ref_name, p_ref) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == ref_name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_state_dict_interchangeable_with_torch_norm(pair):
    ours, theirs = randomize(pair[0](), seed=3), pair[1]()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fresh = pair[0]()
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = inputs("cpu")
    torch.testing.assert_close(fresh(x), theirs(x), rtol=0, atol=0)


def test_modules_are_torch_norms_with_apex_defaults():
    assert isinstance(FusedLayerNorm(8), torch.nn.LayerNorm)
    assert isinstance(FusedRMSNorm(8), torch.nn.RMSNorm)
    assert FusedLayerNorm(8).eps == 1e-5
    rms = FusedRMSNorm(8)
    assert rms.eps == 1e-5 and torch.nn.RMSNorm(8).eps is None  # torch's default differs: passed explicitly
    assert rms.normalized_shape == torch.Size([8]) and rms.memory_efficient is False
    assert repr(FusedLayerNorm([4, 6])) == "FusedLayerNorm(torch.Size([4, 6]), eps=1e-05, elementwise_affine=True)"
    assert repr(FusedRMSNorm(8, eps=1e-6)) == "FusedRMSNorm(torch.Size([8]), eps=1e-06, elementwise_affine=True)"
    assert torch.equal(FusedLayerNorm(8).weight, torch.ones(8)) and torch.equal(FusedLayerNorm(8).bias, torch.zeros(8))


@pytest.mark.parametrize("cls", [FusedLayerNorm, FusedRMSNorm, MixedFusedLayerNorm, MixedFusedRMSNorm])
def test_under_autocast_output_has_autocast_dtype(device, cls):
    """Apex casts input and parameters to the autocast dtype and runs the kernel with autocast off."""
    dtype = autocast_dtype(device)
    module = randomize(cls(SHAPE).to(device))
    x = inputs(device)
    with torch.autocast(device, dtype=dtype):
        out = module(x)
    params = [p.to(dtype) for p in module.parameters()]
    if cls in (FusedLayerNorm, MixedFusedLayerNorm):
        expected = F.layer_norm(x.to(dtype), SHAPE, *params, eps=1e-5)
    else:
        expected = F.rms_norm(x.to(dtype), SHAPE, *params, eps=1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_torch_layer_norm_under_autocast_differs():
    """The contrast Apex users relied on: nn.LayerNorm under autocast returns FP32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.LayerNorm(SHAPE)(inputs("cpu")).dtype == torch.float32
        assert FusedLayerNorm(SHAPE)(inputs("cpu")).dtype == torch.bfloat16


@pytest.mark.parametrize("fused,mixed,param_dtype", [
    (FusedLayerNorm, MixedFusedLayerNorm, torch.float32), (FusedRMSNorm, MixedFusedRMSNorm, torch.float32),
    (FusedLayerNorm, MixedFusedLayerNorm, torch.float16), (FusedRMSNorm, MixedFusedRMSNorm, torch.float16),
])
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_output_dtype_without_autocast(device, fused, mixed, param_dtype, input_dtype):
    """Fused*: the input's dtype. Mixed*: the parameters' dtype. Mixed dtypes are normalised in FP32."""
    x = inputs(device, input_dtype)
    for cls, out_dtype in ((fused, input_dtype), (mixed, param_dtype)):
        module = randomize(cls(SHAPE)).to(device=device, dtype=param_dtype)
        out = module(x)
        assert out.dtype == out_dtype
        params = [p.float() for p in module.parameters()]
        op = F.layer_norm if fused is FusedLayerNorm else F.rms_norm
        work = x.float() if input_dtype != param_dtype else x
        params = params if input_dtype != param_dtype else list(module.parameters())
        torch.testing.assert_close(out, op(work, SHAPE, *params, eps=1e-5).to(out_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [MixedFusedLayerNorm, MixedFusedRMSNorm])
def test_mixed_norms_reject_non_affine(cls):
    name = cls.__name__
    with pytest.warns(UserWarning, match="^{} does not support `elementwise_affine` argument$".format(name)):
        with pytest.raises(RuntimeError, match="^{} does not support `elementwise_affine = False`$".format(name)):
            cls(8, elementwise_affine=False)
    with pytest.warns(UserWarning, match="does not support `elementwise_affine` argument"):
        module = cls(8, elementwise_affine=True)
    assert module.weight is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(8, memory_efficient=True)


def test_functional_forms_use_apex_argument_order_and_eps(device):
    x = inputs(device)
    w = torch.randn(SHAPE, device=device)
    b = torch.randn(SHAPE, device=device)
    torch.testing.assert_close(fused_layer_norm_affine(x, w, b, SHAPE), F.layer_norm(x, SHAPE, w, b, 1e-6),
                               rtol=0, atol=0)
    torch.testing.assert_close(fused_layer_norm(x, SHAPE), F.layer_norm(x, SHAPE, eps=1e-6), rtol=0, atol=0)
    torch.testing.assert_close(fused_rms_norm_affine(x, w, SHAPE), F.rms_norm(x, SHAPE, w, 1e-6), rtol=0, atol=0)
    torch.testing.assert_close(fused_rms_norm(x, SHAPE), F.rms_norm(x, SHAPE, eps=1e-6), rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    assert mixed_dtype_fused_layer_norm_affine(xb, w, b, SHAPE).dtype == torch.float32
    assert mixed_dtype_fused_rms_norm_affine(xb, w, SHAPE).dtype == torch.float32
    assert fused_layer_norm_affine(xb, w, b, SHAPE).dtype == torch.bfloat16


def test_autograd_function_names_apply_without_autocast_cast():
    """Apex's `*Function.apply` (used by Megatron) ran the kernel on the arguments as given."""
    x = inputs("cpu").to(torch.bfloat16)
    w, b = torch.randn(SHAPE), torch.randn(SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedLayerNormAffineFunction.apply(x, w, b, SHAPE, 1e-5)
    torch.testing.assert_close(out, F.layer_norm(x.float(), SHAPE, w, b, 1e-5).to(torch.bfloat16), rtol=0, atol=0)
    assert FusedLayerNormAffineMixedDtypesFunction.apply(x, w, b, SHAPE, 1e-5).dtype == torch.float32
    torch.testing.assert_close(FusedRMSNormAffineFunction.apply(inputs("cpu"), w, list(SHAPE), 1e-5),
                               F.rms_norm(inputs("cpu"), SHAPE, w, 1e-5), rtol=0, atol=0)


def test_manual_rms_norm_matches_apex_reference_semantics():
    x = inputs("cpu", torch.float16)
    w = torch.randn(SHAPE, dtype=torch.float16)
    out = manual_rms_norm(x, SHAPE, w, 1e-5)
    variance = x.float().pow(2).mean((-2, -1), keepdim=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, w * (x * torch.rsqrt(variance + 1e-5)).half(), rtol=0, atol=0)
    assert manual_rms_norm(x, SHAPE, None, 1e-5).dtype == torch.float32
