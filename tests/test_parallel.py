"""ampcompat.parallel in one process: module shape, DDP options and errors, the comm hook, flat collectives,
SyncBatchNorm without peers, convert_syncbn_model, LARC and the multiproc launcher.

Multi-process behaviour (2 ranks) lives in tests/test_parallel_dist.py.
"""
import copy
import pickle
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import ampcompat.parallel as parallel
from ampcompat.parallel import (DistributedDataParallel, Reducer, SyncBatchNorm, convert_syncbn_model,
                                create_syncbn_process_group)
from ampcompat.parallel import distributed as apex_dist
from ampcompat.parallel.LARC import LARC
from ampcompat.parallel.multiproc import main as multiproc_main
from ampcompat.parallel.multiproc import worker_argv
from ampcompat.parallel.sync_batchnorm import _sync_batch_norm_plain

import _dist_workers as W
from _stderr import own_stderr


@pytest.fixture
def world_of_one(tmp_path):
    """A real gloo process group of size 1 (torch DDP and the collectives need one).

    Its store is a file, not a TCP port: a free port can be taken by another process before the store binds it.
    """
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield dist.group.WORLD
    W.destroy_process_group()


def _mlp(seed=0, dtype=torch.float32):
    return W.make_mlp(seed).to(dtype)


# --------------------------------------------------------------------------------------------------
# Module shape
# --------------------------------------------------------------------------------------------------

def test_module_layout_matches_apex():
    assert isinstance(parallel.LARC, types.ModuleType)
    assert parallel.LARC.LARC is LARC
    assert parallel.ReduceOp is dist.ReduceOp
    assert parallel.distributed.flat_dist_call is apex_dist.flat_dist_call
    assert issubclass(SyncBatchNorm, _BatchNorm)
    for name in ("DistributedDataParallel", "Reducer", "SyncBatchNorm", "convert_syncbn_model",
                 "create_syncbn_process_group", "ReduceOp", "LARC", "distributed", "sync_batchnorm"):
        assert hasattr(parallel, name)


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(shared_param=True), apex_dist._SHARED_PARAM_MESSAGE),
    (dict(shared_param=False), apex_dist._SHARED_PARAM_MESSAGE),
    (dict(delay_allreduce=True, allreduce_trigger_params=[]),
     "Setting allreduce_trigger_params is only valid if delay_allreduce=False."),
    (dict(delay_allreduce=True, num_allreduce_streams=2),
     "self.allreduce_different_streams may only be used if delay_allreduce=False."),
])
def test_ddp_rejects_apex_invalid_options_before_touching_anything(kwargs, message):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as error:
        DistributedDataParallel(model, **kwargs)
    assert str(error.value) == message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ddp_shared_param_message_is_apexs_text():
    assert apex_dist._SHARED_PARAM_MESSAGE == (
        "shared_param is no longer supported as an option.  It was misleadingly named from the start.  It turns "
        "out overlapping communication with computation should work fine with shared parameters.  If you still "
        "wish to delay communication to the end of the backward pass, use delay_allreduce=True|False instead.")


def test_ddp_communicators_must_match_streams():
    with pytest.raises(AssertionError):
        DistributedDataParallel(_mlp(), num_allreduce_streams=2, allreduce_communicators=([None], [None, None]))
    with pytest.raises(AssertionError):
        DistributedDataParallel(_mlp(), num_allreduce_streams=1, allreduce_communicators=([None], [None]))


def test_ddp_without_process_group_raises_torchs_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="Default process group has not been initialized"):
        DistributedDataParallel(_mlp())


def test_ddp_nccl_backend_requires_cuda_params(world_of_one, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda *args, **kwargs: "nccl")
    with pytest.raises(AssertionError) as error:
        DistributedDataParallel(_mlp())
    assert str(error.value) == "NCCL backend only supports model parameters to be on GPU."


def test_ddp_wraps_torch_ddp_like_apex(world_of_one):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's broadcast_buffers deprecation must not reach users
        ddp = DistributedDataParallel(model, message_size=1000, delay_allreduce=True)
    assert ddp.module is model
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    assert list(ddp.state_dict()) == ["module." + key for key in model.state_dict()]
    assert ddp.forward_sync_buffers is False if hasattr(ddp, "forward_sync_buffers") else not ddp.broadcast_buffers
    assert ddp.find_unused_parameters is True
    assert ddp.device_ids is None
    assert abs(ddp.bucket_bytes_cap - 1000 * 4) <= 1  # elements x FP32 bytes
    assert (ddp.message_size, ddp.delay_allreduce, ddp.world_size) == (1000, True, 1.0)
    assert DistributedDataParallel(_mlp()).find_unused_parameters is False


def test_ddp_message_size_uses_the_dominant_grad_dtype(world_of_one):
    model = nn.Sequential(nn.Linear(16, 16).half(), nn.BatchNorm1d(16))  # O2-like: mostly FP16
    ddp = DistributedDataParallel(model, message_size=500)
    assert abs(ddp.bucket_bytes_cap - 500 * 2) <= 1


def test_ddp_trains_like_the_bare_model_in_a_world_of_one(world_of_one):
    reference = W.train_sgd(_mlp(seed=3), W.batches())
    model = _mlp(seed=3)
    W.train_sgd(DistributedDataParallel(model, allreduce_trigger_params=list(model.parameters()),
                                        retain_allreduce_buffers=True, num_allreduce_streams=1, prof=True,
                                        gradient_average_split_factor=2.0), W.batches())
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("options, factor", [
    (dict(gradient_predivide_factor=4.0), 1.0),                          # 1/4 before, 4/1 after
    (dict(gradient_predivide_factor=4.0, gradient_average=False), 0.25),  # 1/4 before, nothing after
    (dict(gradient_average=False), 1.0),
])
def test_ddp_predivide_and_average_in_a_world_of_one(world_of_one, options, factor):
    x, y = W.batches(steps=1)[0]
    expected = W.local_grads(_mlp(seed=3), x, y)
    got = W.local_grads(DistributedDataParallel(_mlp(seed=3), **options), x, y)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e * factor)


def test_ddp_disable_and_enable_allreduce_flags(world_of_one):
    ddp = DistributedDataParallel(_mlp())
    assert ddp._disable_allreduce is False and ddp.require_backward_grad_sync is True
    ddp.disable_allreduce()
    assert ddp._disable_allreduce is True and ddp.require_backward_grad_sync is False
    ddp.enable_allreduce()
    assert ddp.require_backward_grad_sync is True
    ddp._disable_allreduce = True
    assert ddp.require_backward_grad_sync is False


class _FakeBucket:
    def __init__(self, tensor):
        self._tensor = tensor

    def buffer(self):
        return self._tensor


def _run_hook(**state):
    bucket = _FakeBucket(state.pop("buffer"))
    options = apex_dist._AllreduceOptions(process_group=None, **state)
    result = apex_dist._apex_allreduce_hook(options, bucket).wait()
    assert result is bucket.buffer()
    return result


def test_allreduce_hook_scales_before_and_after(world_of_one):
    grads = torch.tensor([8.0, -4.0, 2.0])
    averaged = _run_hook(buffer=grads.clone(), world_size=4, predivide_factor=2.0, average=True, always_fp32=False)
    torch.testing.assert_close(averaged, grads / 4)  # (g/2 summed over one rank) * 2/4
    summed = _run_hook(buffer=grads.clone(), world_size=4, predivide_factor=2.0, average=False, always_fp32=False)
    torch.testing.assert_close(summed, grads / 2)


def test_allreduce_hook_fp32_path_keeps_tiny_fp16_grads(world_of_one):
    tiny = torch.full((3,), 2.0 ** -24, dtype=torch.float16)
    options = dict(world_size=1, predivide_factor=2.0, average=True)
    in_fp32 = _run_hook(buffer=tiny.clone(), always_fp32=True, **options)
    assert in_fp32.dtype == torch.float16
    torch.testing.assert_close(in_fp32, tiny, rtol=0, atol=0)
    in_fp16 = _run_hook(buffer=tiny.clone(), always_fp32=False, **options)
    assert torch.count_nonzero(in_fp16) == 0  # control: 2**-25 underflows in FP16


def test_allreduce_hook_leaves_fp64_buckets_in_fp64(world_of_one):
    grads = torch.tensor([1.0 + 2.0 ** -40], dtype=torch.float64)
    out = _run_hook(buffer=grads.clone(), world_size=1, predivide_factor=1.0, average=True, always_fp32=True)
    assert torch.equal(out, grads)


# --------------------------------------------------------------------------------------------------
# Flat collectives, Reducer
# --------------------------------------------------------------------------------------------------

def test_split_helpers_group_by_type_in_first_seen_order():
    a, b, c, d = torch.ones(2), torch.ones(3, dtype=torch.float64), torch.ones(1), torch.ones(2, dtype=torch.half)
    buckets = apex_dist.split_by_type([a, b, c, d])
    assert list(buckets) == ["torch.FloatTensor", "torch.DoubleTensor", "torch.HalfTensor"]
    assert buckets["torch.FloatTensor"][0] is a and buckets["torch.FloatTensor"][1] is c
    bf = torch.ones(1, dtype=torch.bfloat16)
    assert [[t.dtype for t in bucket] for bucket in apex_dist.split_half_float_double([a, b, bf, d, c])] == [
        [torch.half], [torch.bfloat16], [torch.float32, torch.float32], [torch.float64]]


def test_flatten_unflatten_round_trip():
    bucket = [torch.arange(6.0).view(2, 3), torch.arange(3.0).view(3, 1).t(), torch.tensor(7.0)]
    flat = apex_dist.flatten(bucket)
    assert flat.shape == (10,)
    for original, view in zip(bucket, apex_dist.unflatten(flat, bucket)):
        assert torch.equal(original, view)


def test_flat_dist_call_makes_one_call_per_type_and_copies_back():
    tensors = [torch.ones(2, 2), torch.full((3,), 2.0, dtype=torch.float64), torch.full((1,), 3.0)]
    calls = []

    def double_in_place(flat, *extra):
        calls.append((flat.dtype, flat.numel(), extra))
        flat.mul_(2)

    apex_dist.flat_dist_call(tensors, double_in_place, ("extra",))
    assert calls == [(torch.float32, 5, ("extra",)), (torch.float64, 3, ("extra",))]
    assert torch.equal(tensors[0], torch.full((2, 2), 2.0))
    assert torch.equal(tensors[1], torch.full((3,), 4.0, dtype=torch.float64))
    assert torch.equal(tensors[2], torch.full((1,), 6.0))


def test_flat_dist_call_all_reduce_averages(world_of_one, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 4)  # sum over 1 rank, then /4
    tensors = [torch.full((2,), 8.0)]
    apex_dist.flat_dist_call(tensors, dist.all_reduce)
    assert torch.equal(tensors[0], torch.full((2,), 2.0))


def test_extract_tensors_flattens_nested_iterables():
    a, b, c = torch.ones(1), torch.zeros(1), torch.ones(2)
    found = []
    apex_dist.extract_tensors([a, (b, [c]), "text", 3, None], found)
    assert found[0] is a and found[1] is b and found[2] is c and len(found) == 3


def test_reducer_in_a_world_of_one(world_of_one):
    model = _mlp()
    reducer = Reducer(model)
    x, y = W.batches(steps=1)[0]
    grads = W.local_grads(model, x, y)
    reducer.reduce()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    listed = Reducer([p.grad for p in model.parameters()])
    assert listed.module is None and len(listed.grads) == 4
    listed.reduce()


# --------------------------------------------------------------------------------------------------
# SyncBatchNorm
# --------------------------------------------------------------------------------------------------

def _twin_bn(sync_kwargs=None, bn_cls=nn.BatchNorm2d, **kwargs):
    torch.manual_seed(0)
    bn = bn_cls(4, **kwargs)
    sync = SyncBatchNorm(4, **kwargs, **(sync_kwargs or {}))
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            sync.weight.copy_(bn.weight)
            sync.bias.copy_(bn.bias)
    return bn, sync


def _compare_train_eval(bn, sync, x, to_sync=lambda t: t, from_sync=lambda t: t, steps=2):
    for _ in range(steps):
        xa = x.clone().requires_grad_()
        xb = to_sync(x.clone()).requires_grad_()
        out_a, out_b = bn(xa), sync(xb)
        torch.testing.assert_close(from_sync(out_b), out_a)
        (out_a * out_a.detach()).sum().backward()
        (from_sync(out_b) * out_a.detach()).sum().backward()
        torch.testing.assert_close(from_sync(xb.grad), xa.grad)
        x = x * 1.5 + 0.25
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(bn, name), getattr(sync, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a)
    if bn.affine:
        torch.testing.assert_close(sync.weight.grad, bn.weight.grad)
        torch.testing.assert_close(sync.bias.grad, bn.bias.grad)
    bn.eval()
    sync.eval()
    torch.testing.assert_close(from_sync(sync(to_sync(x))), bn(x))


@pytest.mark.parametrize("kwargs", [
    dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(eps=1e-2, momentum=0.5)])
def test_syncbn_without_torch_distributed_is_batchnorm(kwargs):
    assert not dist.is_initialized()
    bn, sync = _twin_bn(**kwargs)
    _compare_train_eval(bn, sync, torch.randn(3, 4, 5, 2))


def test_syncbn_in_a_world_of_one_on_cpu_is_batchnorm(world_of_one):
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        torch.nn.SyncBatchNorm(4)(torch.randn(3, 4, 5))  # control: torch's own refuses CPU here
    bn, sync = _twin_bn(bn_cls=nn.BatchNorm1d)
    _compare_train_eval(bn, sync, torch.randn(3, 4, 5))


def test_syncbn_channel_last_takes_channels_from_the_last_dim():
    bn, sync = _twin_bn(sync_kwargs=dict(channel_last=True))
    _compare_train_eval(bn, sync, torch.randn(3, 4, 5, 2),
                        to_sync=lambda t: t.permute(0, 2, 3, 1).contiguous(), from_sync=lambda t: t.permute(0, 3, 1, 2))
    bn2d, sync2d = _twin_bn(sync_kwargs=dict(channel_last=True), bn_cls=nn.BatchNorm1d)
    _compare_train_eval(bn2d, sync2d, torch.randn(6, 4))  # (N, C): already channel-last


def test_syncbn_specify_helpers():
    sync = SyncBatchNorm(4)
    sync._specify_channel_last(True)
    sync._specify_process_group("group")
    assert sync.channel_last is True and sync.process_group == "group"


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_syncbn_adds_residual_and_fuses_relu(fuse_relu):
    bn, sync = _twin_bn(sync_kwargs=dict(fuse_relu=fuse_relu))
    x = torch.randn(3, 4, 5, 2)
    z = torch.randn(3, 4, 5, 2)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    expected = bn(x) + za
    expected = torch.relu(expected) if fuse_relu else expected
    got = sync(x, zb)
    torch.testing.assert_close(got, expected)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(zb.grad, za.grad)
    assert bool((sync(x) >= 0).all()) == fuse_relu  # without z: ReLU only when fused


def test_syncbn_fp16_input_with_fp32_layer_returns_fp16():
    bn, sync = _twin_bn()
    x = torch.randn(3, 4, 5, 2)
    out = sync(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), bn(x), rtol=1e-2, atol=1e-2)


def test_plain_sync_batch_norm_matches_batch_norm_in_a_world_of_one(world_of_one):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    stats_a = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    stats_b = [t.clone() for t in stats_a]
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, weight, bias))
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, weight, bias))
    out_a = F.batch_norm(xa, *stats_a, wa, ba, True, 0.3, 1e-5)
    out_b = _sync_batch_norm_plain(xb, wb, bb, *stats_b, 0.3, 1e-5, world_of_one)
    torch.testing.assert_close(out_b, out_a)
    cotangent = torch.randn_like(out_a)
    torch.autograd.backward(out_a, cotangent)
    torch.autograd.backward(out_b, cotangent)
    for a, b in zip((xa, wa, ba), (xb, wb, bb)):
        torch.testing.assert_close(b.grad, a.grad)
    for a, b in zip(stats_a, stats_b):
        torch.testing.assert_close(b, a)


def test_syncbn_deepcopy_and_pickle():
    sync = SyncBatchNorm(4, channel_last=True, fuse_relu=True)
    sync(torch.randn(3, 5, 4))
    for clone in (copy.deepcopy(sync), pickle.loads(pickle.dumps(sync))):
        assert clone.channel_last and clone.fuse_relu
        torch.testing.assert_close(clone.running_mean, sync.running_mean)


# --------------------------------------------------------------------------------------------------
# convert_syncbn_model, create_syncbn_process_group
# --------------------------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)
        self.block = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, affine=False))
        self.inorm = nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        return self.block(self.bn(self.inorm(self.conv(x))))


def test_convert_syncbn_model_replaces_batchnorms_only():
    net = _Net()
    old_bn, old_bn1d, inorm = net.bn, net.block[2], net.inorm
    converted = convert_syncbn_model(net, process_group="pg", channel_last=True)
    assert converted is net
    assert type(net.bn) is SyncBatchNorm and type(net.block[2]) is SyncBatchNorm
    assert net.inorm is inorm and net.block[1].__class__ is nn.Linear
    new_bn = net.bn
    assert (new_bn.num_features, new_bn.eps, new_bn.momentum, new_bn.affine, new_bn.track_running_stats) == (
        4, 1e-3, 0.3, True, True)
    assert new_bn.process_group == "pg" and new_bn.channel_last is True
    assert new_bn.running_mean is old_bn.running_mean and new_bn.running_var is old_bn.running_var
    assert new_bn.num_batches_tracked is old_bn.num_batches_tracked
    assert new_bn.weight is not old_bn.weight and new_bn.bias is not old_bn.bias
    assert torch.equal(new_bn.weight, old_bn.weight) and torch.equal(new_bn.bias, old_bn.bias)
    assert new_bn.weight.data_ptr() != old_bn.weight.data_ptr()
    assert net.block[2].weight is None and net.block[2].running_mean is old_bn1d.running_mean


def test_convert_syncbn_model_keeps_outputs_training_flag_and_frozen_params():
    reference, net = _Net(), _Net()
    net.bn.weight.requires_grad_(False)
    net.block[2].eval()
    convert_syncbn_model(net)
    assert net.bn.weight.requires_grad is False and net.bn.bias.requires_grad is True
    assert net.block[2].training is False and net.bn.training is True
    reference.block[2].eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(net(x), reference(x))
    net.eval()
    reference.eval()
    torch.testing.assert_close(net(x), reference(x))


def test_convert_syncbn_model_on_a_bare_batchnorm_returns_a_new_module():
    bn = nn.BatchNorm1d(3)
    converted = convert_syncbn_model(bn)
    assert isinstance(converted, SyncBatchNorm) and converted is not bn
    assert isinstance(convert_syncbn_model(converted), SyncBatchNorm)


def test_amp_O2_keeps_converted_syncbn_in_fp32():
    from ampcompat import amp

    model = convert_syncbn_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    amp.initialize(model, opt_level="O2", verbosity=0)
    assert model[0].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32 and model[1].running_mean.dtype == torch.float32
    assert model(torch.randn(3, 4)).dtype == torch.float32


def test_create_syncbn_process_group_sizes(world_of_one):
    assert create_syncbn_process_group(0) is None
    group = create_syncbn_process_group(1)
    assert dist.get_world_size(group) == 1
    with pytest.raises(AssertionError) as error:
        create_syncbn_process_group(2)
    assert str(error.value) == "group_size (2) must not exceed the world size (1)."


# --------------------------------------------------------------------------------------------------
# LARC
# --------------------------------------------------------------------------------------------------

def _larc_reference_grad(p, g, lr, weight_decay, trust_coefficient, clip, eps):
    """LARC's rule for one parameter, written out per tensor."""
    p_norm, g_norm = p.norm().item(), g.norm().item()
    if p_norm == 0 or g_norm == 0:
        return g
    local = trust_coefficient * p_norm / (g_norm + p_norm * weight_decay + eps)
    factor = min(local / lr, 1.0) if clip else local
    return (g + weight_decay * p) * factor


def _larc_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model.extra = nn.Parameter(torch.zeros(3))   # zero weight: LARC leaves it (and its decay) alone
    model.no_grad = nn.Parameter(torch.ones(2))  # never gets a gradient
    return model


def _larc_groups(model, weight_decay):
    return [{"params": list(model[0].parameters()), "lr": 0.1, "weight_decay": weight_decay},
            {"params": list(model[2].parameters()) + [model.extra, model.no_grad], "lr": 0.02}]


def _loss(model, x):
    return model(x).pow(2).sum() + (model.extra * torch.arange(3.0, device=x.device)).sum()


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_larc_step_equals_reference_formula(clip, weight_decay):
    larc_model, ref_model = _larc_model(), _larc_model()
    trust, eps = 0.5, 1e-8
    inner = torch.optim.SGD(_larc_groups(larc_model, weight_decay), lr=0.1, momentum=0.9, weight_decay=1e-3)
    larc = LARC(inner, trust_coefficient=trust, clip=clip, eps=eps)
    ref_groups = _larc_groups(ref_model, weight_decay)
    ref_decays = [weight_decay, 1e-3]
    ref_opt = torch.optim.SGD(ref_groups, lr=0.1, momentum=0.9, weight_decay=0.0)
    for group in ref_opt.param_groups:
        group["weight_decay"] = 0.0
    x = torch.randn(6, 5)
    for _ in range(3):
        larc.zero_grad()
        ref_opt.zero_grad()
        _loss(larc_model, x).backward()
        _loss(ref_model, x).backward()
        with torch.no_grad():
            for group, decay in zip(ref_opt.param_groups, ref_decays):
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.copy_(_larc_reference_grad(p, p.grad, group["lr"], decay, trust, clip, eps))
        larc.step()
        ref_opt.step()
        assert [g["weight_decay"] for g in inner.param_groups] == [weight_decay, 1e-3]  # restored
    for got, want in zip(larc_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(got, want)
    assert torch.equal(larc_model.no_grad, torch.ones(2))


def test_larc_clip_caps_the_rate_at_lr():
    p = nn.Parameter(torch.full((4,), 10.0))
    larc = LARC(torch.optim.SGD([p], lr=0.1), trust_coefficient=1.0)  # local rate ~10 > lr: clipped to lr
    p.grad = torch.ones(4)
    larc.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 10.0 - 0.1))


def test_larc_restores_weight_decay_when_the_inner_step_fails():
    p = nn.Parameter(torch.ones(2))
    inner = torch.optim.SGD([p], lr=0.1, weight_decay=0.3)
    inner.step = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
    larc = LARC(inner)
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="boom"):
        larc.step()
    assert inner.param_groups[0]["weight_decay"] == 0.3


def test_larc_group_without_weight_decay_key_is_left_without_it():
    p = nn.Parameter(torch.ones(2))
    inner = torch.optim.SGD([p], lr=0.1)
    del inner.param_groups[0]["weight_decay"]
    p.grad = torch.ones(2)
    LARC(inner).step()
    assert "weight_decay" not in inner.param_groups[0]


def test_larc_proxies_the_wrapped_optimizer():
    model = _larc_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    larc = LARC(inner)
    assert larc.param_groups is inner.param_groups and larc.state is inner.state
    assert larc.defaults is inner.defaults and repr(larc) == repr(inner)
    _loss(model, torch.randn(2, 5)).backward()
    larc.step()
    saved = copy.deepcopy(larc.state_dict())
    assert saved["param_groups"] == inner.state_dict()["param_groups"]
    fresh = torch.optim.SGD(_larc_model().parameters(), lr=0.5, momentum=0.9)
    LARC(fresh).load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.1 and len(fresh.state) == len(inner.state)
    larc.zero_grad(set_to_none=False)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert model[0].weight.grad is not None
    larc.zero_grad()
    assert model[0].weight.grad is None  # the wrapped optimizer's own default (set_to_none=True)
    extra = nn.Parameter(torch.ones(1))
    larc.add_param_group({"params": [extra], "lr": 0.3})
    assert inner.param_groups[-1]["params"] == [extra]
    new_groups = [dict(inner.param_groups[0])]
    larc.param_groups = new_groups
    assert inner.param_groups is new_groups


def test_larc_step_with_closure_returns_its_loss():
    model = _larc_model()
    larc = LARC(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []

    def closure():
        calls.append(1)
        larc.zero_grad()
        loss = _loss(model, torch.ones(2, 5))
        loss.backward()
        return loss

    before = model[0].weight.detach().clone()
    loss = larc.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    assert not torch.equal(model[0].weight, before)


def test_larc_deepcopy_and_pickle_round_trip():
    model = _larc_model()
    larc = LARC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), trust_coefficient=0.3, clip=False,
                eps=1e-6)
    _loss(model, torch.randn(2, 5)).backward()
    larc.step()
    for clone in (copy.deepcopy(larc), pickle.loads(pickle.dumps(larc))):
        assert (clone.trust_coefficient, clone.clip, clone.eps) == (0.3, False, 1e-6)
        assert clone.param_groups[0]["lr"] == 0.1 and len(clone.state) == len(larc.state)


def test_larc_on_fp16_params_matches_fp32_math():
    p32 = nn.Parameter(torch.linspace(-1, 1, 8))
    p16 = nn.Parameter(p32.detach().half())
    grad = torch.linspace(0.5, -0.25, 8)
    for p in (p32, p16):
        p.grad = grad.to(p.dtype)
        LARC(torch.optim.SGD([p], lr=0.1, weight_decay=0.01)).step()
    assert p16.dtype == torch.float16
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_amp_initialize_accepts_larc_and_steps(opt_level):
    from ampcompat import amp

    model = _larc_model()
    model.no_grad.requires_grad_(False)
    larc = LARC(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01), trust_coefficient=0.5)
    returned_model, returned_opt = amp.initialize(model, larc, opt_level=opt_level, loss_scale=8.0, verbosity=0)
    assert returned_model is model and returned_opt is larc
    with amp.scale_loss(_loss(model, torch.randn(6, 5)).float(), larc) as scaled:
        scaled.backward()
    masters = [p for p in amp.master_params(larc) if p.requires_grad]
    before = [p.detach().clone() for p in masters]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in masters]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    larc.step()
    for p, old, g in zip(masters, before, grads):
        expected = old if g is None else old - 0.1 * _larc_reference_grad(old, g, 0.1, 0.01, 0.5, True, 1e-8)
        torch.testing.assert_close(p.detach(), expected)
    assert not torch.equal(masters[2], before[2])
    if opt_level == "O2":  # the FP16 model follows its FP32 masters (same order as the param groups)
        for model_param, master in zip([p for p in model.parameters() if p.requires_grad], masters):
            assert model_param.dtype == torch.float16
            torch.testing.assert_close(model_param, master.detach().half())


# --------------------------------------------------------------------------------------------------
# multiproc
# --------------------------------------------------------------------------------------------------

def test_multiproc_worker_argv_sets_or_replaces_flags():
    assert worker_argv(["train.py", "--lr", "1"], 4, 2) == ["train.py", "--lr", "1", "--world-size", "4",
                                                           "--rank", "2"]
    assert worker_argv(["train.py", "--rank", "9", "--world-size", "9"], 2, 1) == [
        "train.py", "--rank", "1", "--world-size", "2"]


def test_multiproc_refuses_to_run_without_gpus_or_script(monkeypatch):
    with pytest.raises(SystemExit, match="usage"):
        multiproc_main([])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match="found none; use torchrun"):
        multiproc_main(["train.py"])


def test_multiproc_runs_as_a_module_without_warnings(tmp_path):
    if torch.cuda.device_count() > 0:
        pytest.skip("would launch real workers on this machine's GPUs")
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "ampcompat.parallel.multiproc",
                           "train.py"], capture_output=True, text=True, cwd=str(tmp_path),
                          env=_env_with_repo_on_path(), timeout=120)
    assert proc.returncode == 1
    stderr = own_stderr(proc.stderr)  # not other packages' import-time warnings (torch without numpy)
    assert "found none; use torchrun" in stderr and "Warning" not in stderr


def _env_with_repo_on_path():
    import os

    import ampcompat

    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(ampcompat.__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------------------------------
# CUDA (one GPU)
# --------------------------------------------------------------------------------------------------

def _require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.cuda
def test_syncbn_on_cuda_without_peers_is_batchnorm():
    _require_cuda()
    bn, sync = _twin_bn()
    _compare_train_eval(bn.cuda(), sync.cuda(), torch.randn(3, 4, 5, 2, device="cuda"))
    out = sync.train()(torch.randn(3, 4, 5, 2, device="cuda").half())
    assert out.dtype == torch.float16


@pytest.mark.cuda
def test_ddp_on_one_gpu_with_nccl_trains_like_the_bare_model():
    _require_cuda()
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{}".format(W.free_port()), rank=0, world_size=1)
    try:
        reference = W.train_sgd(_mlp(seed=3).cuda(), W.batches(), device="cuda")
        model = _mlp(seed=3).cuda()
        ddp = DistributedDataParallel(model, allreduce_always_fp32=True)
        assert ddp.device_ids == [torch.cuda.current_device()]
        W.train_sgd(ddp, W.batches(), device="cuda")
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want)
        with pytest.raises(AssertionError, match="NCCL backend only supports model parameters to be on GPU."):
            DistributedDataParallel(_mlp())
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_larc_on_cuda_matches_cpu():
    _require_cuda()
    results = []
    for device in ("cpu", "cuda"):
        model = _larc_model().to(device)
        larc = LARC(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01))
        _loss(model, torch.ones(3, 5, device=device)).backward()
        larc.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
