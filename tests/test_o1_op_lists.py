"""O1/O4 follow Apex's op lists on every device: FP32 list, banned BCE; in-place ops and .cpu() as native autocast has them.

Native autocast's CPU list leaves softmax/exp/sum... in low precision; under ampcompat's O1 they run in
FP32 on CPU as on CUDA. Outside O1 (plain ``torch.autocast``, ``amp.disable_casts()``, after ``reset``)
nothing of this applies.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

import ampcompat
from ampcompat import amp
from ampcompat.amp import o1_op_lists

B, H = 4, 8


def _half(device, *shape, positive=False):
    t = torch.rand(*shape, device=device) + 0.5 if positive else torch.randn(*shape, device=device)
    return t.half()


def _target(device):
    return torch.randn(B, H, device=device)


# Apex's FP32 list (functional, torch and Tensor), each as a call on one fp16 input.
FP32_FUNCTIONS = {
    # torch.nn.functional
    "interpolate": lambda x: F.interpolate(x.view(1, B, H), scale_factor=2),
    "interpolate_bilinear": lambda x: F.interpolate(x.view(1, 1, B, H), scale_factor=2, mode="bilinear"),
    "grid_sample": lambda x: F.grid_sample(x.view(1, 1, B, H), torch.zeros(1, 2, 2, 2, device=x.device),
                                                align_corners=False),
    "softplus": F.softplus,
    "softmin": lambda x: F.softmin(x, dim=-1),
    "log_softmax": lambda x: F.log_softmax(x, dim=-1),
    "softmax": lambda x: F.softmax(x, dim=-1),
    "layer_norm": lambda x: F.layer_norm(x, (H,)),
    "group_norm": lambda x: F.group_norm(x.view(B, H, 1), 2),
    "local_response_norm": lambda x: F.local_response_norm(x.view(1, B, H), 2),
    "normalize": F.normalize,
    "cosine_similarity": lambda x: F.cosine_similarity(x, x),
    "poisson_nll_loss": lambda x: F.poisson_nll_loss(x, _target(x.device).abs()),
    "cosine_embedding_loss": lambda x: F.cosine_embedding_loss(x, x, torch.ones(B, device=x.device)),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.zeros(B, dtype=torch.long, device=x.device)),
    "hinge_embedding_loss": lambda x: F.hinge_embedding_loss(x, torch.ones(B, H, device=x.device)),
    "kl_div": lambda x: F.kl_div(x, _target(x.device).softmax(-1), reduction="batchmean"),
    "l1_loss": lambda x: F.l1_loss(x, _target(x.device)),
    "mse_loss": lambda x: F.mse_loss(x, _target(x.device)),
    "margin_ranking_loss": lambda x: F.margin_ranking_loss(x, x.flip(0), torch.ones(B, H, device=x.device)),
    "multilabel_margin_loss": lambda x: F.multilabel_margin_loss(
        x, torch.zeros(B, H, dtype=torch.long, device=x.device)),
    "multilabel_soft_margin_loss": lambda x: F.multilabel_soft_margin_loss(x, torch.ones(B, H, device=x.device)),
    "multi_margin_loss": lambda x: F.multi_margin_loss(x, torch.zeros(B, dtype=torch.long, device=x.device)),
    "nll_loss": lambda x: F.nll_loss(x, torch.zeros(B, dtype=torch.long, device=x.device)),
    "binary_cross_entropy_with_logits": lambda x: F.binary_cross_entropy_with_logits(x, _target(x.device).sigmoid()),
    "smooth_l1_loss": lambda x: F.smooth_l1_loss(x, _target(x.device)),
    "soft_margin_loss": lambda x: F.soft_margin_loss(x, torch.ones(B, H, device=x.device)),
    "triplet_margin_loss": lambda x: F.triplet_margin_loss(x, x.flip(0), x.flip(1)),
    "ctc_loss": lambda x: F.ctc_loss(
        x.view(B, 1, H).log_softmax(-1), torch.ones(1, 2, dtype=torch.long, device=x.device),
        torch.tensor([B]), torch.tensor([2])),
    # torch and Tensor
    "acos": lambda x: torch.acos(x.clamp(-0.5, 0.5)), "asin": lambda x: x.clamp(-0.5, 0.5).asin(),
    "cosh": torch.cosh, "erfinv": lambda x: torch.erfinv(x.clamp(-0.5, 0.5)), "exp": torch.exp,
    "exp_method": lambda x: x.exp(), "expm1": torch.expm1, "log": lambda x: torch.log(x.abs() + 1),
    "log10": lambda x: (x.abs() + 1).log10(), "log2": lambda x: torch.log2(x.abs() + 1),
    "reciprocal": torch.reciprocal, "rsqrt": lambda x: torch.rsqrt(x.abs() + 1), "sinh": torch.sinh,
    "tan": torch.tan, "pow": lambda x: torch.pow(x, 2), "pow_operator": lambda x: x ** 2,
    "rpow_operator": lambda x: 2 ** x, "cumprod": lambda x: torch.cumprod(x, 0),
    "cumsum": lambda x: x.cumsum(1), "dist": lambda x: torch.dist(x, x.flip(0)), "norm": torch.norm,
    "norm_dim": lambda x: x.norm(dim=1), "prod": torch.prod, "std": torch.std, "std_dim": lambda x: x.std(0),
    "sum": torch.sum, "sum_method_dim": lambda x: x.sum(1), "var": torch.var,
    "renorm": lambda x: torch.renorm(x, 2, 0, 1.0),
}


class _Probe(torch.nn.Module):
    """Applies ``fn`` to the fp16 output of a Linear, inside ``forward``: an O1 model's own op."""

    def __init__(self, fn):
        super().__init__()
        self.fc = torch.nn.Linear(H, H)
        self.fn = fn

    def forward(self, x):
        hidden = self.fc(x)
        return hidden.dtype, self.fn(hidden)


@pytest.mark.parametrize("name", sorted(FP32_FUNCTIONS))
def test_fp32_list_runs_in_fp32_under_o1(device, name):
    fn = FP32_FUNCTIONS[name]
    model = _Probe(fn).to(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    hidden_dtype, out = model(torch.randn(B, H, device=device))
    assert hidden_dtype == torch.float16
    assert out.dtype == torch.float32  # inside forward
    x = _half(device, B, H).requires_grad_()
    out = fn(x)  # and outside forward, e.g. a loss (Apex's O1 scope)
    assert out.dtype == torch.float32
    out.float().sum().backward()
    assert x.grad.dtype == torch.float16  # casts are differentiable: the gradient keeps the input's type


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "exp", "sum", "layer_norm", "mse_loss"])
def test_fp32_list_matches_the_fp32_computation(device, name):
    fn = FP32_FUNCTIONS[name]
    torch.manual_seed(0)
    x = _half(device, B, H)
    torch.manual_seed(1)
    expected = fn(x.float())
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    torch.manual_seed(1)
    torch.testing.assert_close(fn(x), expected, rtol=0, atol=0)


def test_o4_runs_fp32_list_in_fp32(device):
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O4", verbosity=0)
    x = torch.randn(B, H, device=device)
    hidden = x @ x.t()
    assert hidden.dtype == torch.bfloat16
    assert F.softmax(hidden, -1).dtype == torch.exp(hidden).dtype == hidden.sum().dtype == torch.float32


def test_fp16_list_runs_in_fp16_under_o1(device):
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    m, v = torch.randn(H, H, device=device), torch.randn(H, device=device)
    assert torch.mv(m, v).dtype == torch.float16
    assert torch.addmv(v, m, v).dtype == torch.float16
    assert torch.addr(m, v, v).dtype == torch.float16
    assert torch.mm(m, m).dtype == torch.float16
    x = torch.randn(B, H, device=device)
    for cell in (torch.nn.LSTMCell(H, H), torch.nn.GRUCell(H, H), torch.nn.RNNCell(H, H)):
        out = cell.to(device)(x)  # FP32 hidden state created inside: cast with the rest
        assert (out[0] if isinstance(out, tuple) else out).dtype == torch.float16


def test_gelu_keeps_native_autocast_behaviour(device):
    """gelu is the one Apex FP32-list member left to native autocast (documented): input dtype."""
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    assert F.gelu(_half(device, B, H)).dtype == torch.float16


def _cpu_softmax_dtype_under_plain_autocast():
    with torch.autocast("cpu", dtype=torch.float16):
        return F.softmax(torch.randn(B, H).half(), -1).dtype, torch.randn(B).half().exp().dtype


def test_plain_autocast_outside_o1_is_native():
    native = _cpu_softmax_dtype_under_plain_autocast()
    assert native == (torch.float16, torch.float16)  # CPU autocast's own list: what O1 must not leak into
    handle = amp.init(enabled=True)
    with amp.disable_casts():
        # while O1 is on, every autocast region of its device uses O1's lists (see the checkpoint test)
        assert _cpu_softmax_dtype_under_plain_autocast() == (torch.float32, torch.float32)
    handle._deactivate()
    assert _cpu_softmax_dtype_under_plain_autocast() == native
    amp.initialize(torch.nn.Linear(1, 1), opt_level="O1", verbosity=0)
    ampcompat.reset()
    assert _cpu_softmax_dtype_under_plain_autocast() == native


def test_kernels_registered_only_while_o1_is_on():
    def registered(op):
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::" + op, "AutocastCPU")

    assert not registered("softmax.int") and not registered("exp")
    model = torch.nn.Linear(1, 1)
    amp.initialize(model, opt_level="O1", verbosity=0)
    assert registered("softmax.int") and registered("exp") and registered("mv")
    amp.initialize(model, opt_level="O1", verbosity=0)  # a second initialize replaces, never stacks
    assert registered("softmax.int")
    amp.initialize(model, opt_level="O2", verbosity=0)
    assert not registered("softmax.int") and not registered("exp")
    amp.init(enabled=True)
    assert registered("softmax.int")
    ampcompat.reset()
    assert not registered("softmax.int") and not registered("mv")


def test_native_kernels_are_never_overridden():
    """Only ops without an autocast kernel on the device get one: native policies stay native."""
    key_name = "AutocastCPU"
    native = {op for op in o1_op_lists.FP32_OPS + o1_op_lists.HALF_OPS
              if torch._C._dispatch_has_kernel_for_dispatch_key("aten::" + op, key_name)}
    handle = amp.init(enabled=True)
    assert native and not native & set(handle._apex_lists.op_lists.registered)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_recomputes_with_the_same_lists(device, reentrant):
    """Recomputation in backward (autocast off for O1's backward) re-enters the forward's autocast state;
    O1's lists must apply there too, or the recomputed layer_norm would not match the saved one."""
    from torch.utils.checkpoint import checkpoint

    class Block(torch.nn.Module):
        def __init__(self, use_checkpoint):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.ln = torch.nn.Linear(H, H), torch.nn.LayerNorm(H)
            self.use_checkpoint = use_checkpoint

        def body(self, t):
            return self.fc(self.ln(self.fc(t)))

        def forward(self, x):
            return checkpoint(self.body, x, use_reentrant=reentrant) if self.use_checkpoint else self.body(x)

    grads = []
    for use_checkpoint in (False, True):
        ampcompat.reset()
        model = Block(use_checkpoint).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        amp.initialize(model, opt, opt_level="O1", verbosity=0, loss_scale=128.0)
        torch.manual_seed(1)
        x = torch.randn(B, H, device=device).requires_grad_(reentrant)
        with amp.scale_loss(model(x).float().mean(), opt) as scaled:
            scaled.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_worker_thread_model_runs_fp32_list_in_fp32(device):
    model = _Probe(lambda t: F.softmax(t, -1)).to(device)
    amp.initialize(model, opt_level="O1", verbosity=0)
    seen = {}

    def worker():
        seen["out"] = model(torch.randn(B, H, device=device))[1].dtype

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["out"] == torch.float32


# --- banned functions ----------------------------------------------------------------------------

def _bce_calls(device):
    target = torch.rand(B, H, device=device)
    module = torch.nn.BCELoss()
    return {"BCELoss": lambda x: module(x, target),
            "binary_cross_entropy": lambda x: F.binary_cross_entropy(x, target=target)}


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _turn_on_o1(device, entry, **kwargs):
    if entry == "init":
        if device != _default_device():
            pytest.skip("amp.init turns O1 on for the default device only")
        amp.init(enabled=True, **kwargs)
    else:
        amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0, **kwargs)


@pytest.mark.parametrize("call", ["BCELoss", "binary_cross_entropy"])
@pytest.mark.parametrize("entry", ["init", "initialize"])
def test_bce_on_half_input_raises_apex_error_under_o1(device, call, entry):
    fn = _bce_calls(device)[call]
    _turn_on_o1(device, entry)
    with pytest.raises(NotImplementedError) as err:
        fn(torch.rand(B, H, device=device).half())
    assert str(err.value) == o1_op_lists.BANNED_MESSAGE
    assert "torch.nn.BCEWithLogitsLoss" in str(err.value) and "allow_banned=True" in str(err.value)


@pytest.mark.parametrize("call", ["BCELoss", "binary_cross_entropy"])
@pytest.mark.parametrize("entry", ["init", "initialize"])
def test_bce_with_allow_banned_runs_in_fp32(device, call, entry):
    fn = _bce_calls(device)[call]
    x = torch.rand(B, H, device=device).half()
    expected = fn(x.float())
    _turn_on_o1(device, entry, allow_banned=True)
    out = fn(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bce_on_fp32_input_runs_under_o1(device):
    """Apex allowed FP32 inputs; native CUDA autocast refuses BCE for any input, so it runs with autocast off."""
    fn = _bce_calls(device)["BCELoss"]
    x = torch.rand(B, H, device=device)
    expected = fn(x)
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    torch.testing.assert_close(fn(x), expected, rtol=0, atol=0)


def test_bce_is_restored_and_not_banned_outside_o1():
    original = F.binary_cross_entropy
    handle = amp.init(enabled=True)
    assert F.binary_cross_entropy is not original
    x, target = torch.rand(B, H).half(), torch.rand(B, H).half()
    with amp.disable_casts():
        assert F.binary_cross_entropy(x, target).dtype == torch.float16  # casts off: plain PyTorch
    handle._deactivate()
    assert F.binary_cross_entropy is original
    assert F.binary_cross_entropy(x, target).dtype == torch.float16
    amp.initialize(torch.nn.Linear(1, 1), opt_level="O1", verbosity=0)
    ampcompat.reset()
    assert F.binary_cross_entropy is original


def test_bce_is_not_banned_in_a_thread_outside_o1():
    amp.init(enabled=True)
    seen = {}

    def worker():
        seen["dtype"] = F.binary_cross_entropy(torch.rand(B).half(), torch.rand(B).half()).dtype

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["dtype"] == torch.float16


# --- in-place FP32-list ops and .cpu() (decided: see migration_guide.md, "O1 op lists") ----------

@pytest.mark.parametrize("method,args", [("exp_", ()), ("log_", ()), ("pow_", (2,)), ("rsqrt_", ()),
                                         ("cumsum_", (0,))])
def test_in_place_fp32_list_op_on_half_runs_as_native_autocast(device, method, args):
    """Decided: no NotImplementedError (Apex's): the op runs in place in FP16, as under native autocast."""
    half = _half(device, B, positive=True)
    with torch.autocast(device, dtype=torch.float16):
        expected = getattr(half.clone(), method)(*args)
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    out = getattr(half, method)(*args)
    assert out is half and out.dtype == torch.float16
    assert torch.equal(out, expected)


def test_ops_using_in_place_fp32_list_ops_internally_work(device):
    """CPU logsumexp calls exp_ on an fp16 intermediate: a dispatcher-level refusal would break it."""
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    x = _half(device, B, H)
    torch.testing.assert_close(torch.logsumexp(x, 1).float(), torch.logsumexp(x.float(), 1), rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
def test_cpu_of_half_cuda_tensor_stays_half_under_o1():
    """Decided: ``.cpu()`` moves, it does not cast (Apex returned FP32 here); see migration_guide.md."""
    amp.init(enabled=True)
    x = torch.randn(B, H, device="cuda").half()
    moved = x.cpu()
    assert moved.dtype == torch.float16 and torch.equal(moved, x.cpu())


def test_cpu_of_half_tensor_stays_half_under_o1(device):
    amp.initialize(torch.nn.Linear(1, 1).to(device), opt_level="O1", verbosity=0)
    x = _half(device, B, H)
    assert x.cpu().dtype == torch.float16
    assert torch.equal(x.cpu().to(device), x)
