"""ampcompat.parallel under a real 2-process group (gloo on CPU; NCCL on 2 GPUs behind the cuda marker).

Every scenario in tests/_dist_workers.py runs once per backend in one spawn; each test checks one of
them against a single-process reference computed here on the concatenated batch.
"""
import pytest
import torch

import _dist_workers as W

BACKENDS = [pytest.param("gloo", id="gloo-cpu"), pytest.param("nccl", id="nccl-cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=BACKENDS)
def results(request, tmp_path_factory):
    if request.param == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    return W.run_scenarios(tmp_path_factory.mktemp(request.param), backend=request.param)


def _ranks(results, name):
    per_rank = results[name]
    for rank, result in enumerate(per_rank):
        if isinstance(result, dict) and "error" in result:
            pytest.fail("scenario {} failed on rank {}:\n{}".format(name, rank, result["error"]))
    return per_rank


def _assert_lists_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _assert_lists_close(a, b, **tolerances):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tolerances)


def _full_batch_sgd(model):
    W.train_sgd(model, W.batches())
    return [p.detach() for p in model.parameters()]


def test_ddp_matches_single_process_on_concatenated_batch(results):
    rank0, rank1 = _ranks(results, "ddp_training")
    reference_init = [p.detach() for p in W.make_mlp(seed=100).parameters()]
    _assert_lists_equal(rank0["initial"], reference_init)  # rank 0's weights broadcast at construction
    _assert_lists_equal(rank1["initial"], reference_init)
    _assert_lists_equal(rank0["apex"], rank1["apex"])
    reference = _full_batch_sgd(W.make_mlp(seed=100))
    _assert_lists_close(rank0["apex"], reference)
    _assert_lists_close(rank0["apex"], rank0["torch"])
    assert rank0["state_dict_keys"] == ["module." + k for k in W.make_mlp(seed=0).state_dict()]


def test_delay_allreduce_tolerates_unused_parameters(results):
    rank0, rank1 = _ranks(results, "delay_allreduce_unused")
    reference = _full_batch_sgd(W.MLPWithUnused(seed=100))
    for result in (rank0, rank1):
        _assert_lists_close(result["params"], reference)
        assert result["unused_grads"] == [None, None]


@pytest.fixture(scope="module")
def per_rank_grads():
    x, y = W.batches(steps=1)[0]
    return [W.local_grads(W.make_mlp(seed=100), W.chunk(x, r), W.chunk(y, r)) for r in range(W.WORLD_SIZE)]


@pytest.mark.parametrize("name, expected", [
    ("predivide2_average", lambda g0, g1: g0 / 2 + g1 / 2),
    ("no_average", lambda g0, g1: g0 + g1),
    ("predivide4_no_average", lambda g0, g1: g0 / 4 + g1 / 4),
    ("predivide2_fp32", lambda g0, g1: g0 / 2 + g1 / 2),
])
def test_gradient_average_and_predivide_factor(results, per_rank_grads, name, expected):
    rank0, rank1 = _ranks(results, "grad_options")
    want = [expected(g0, g1) for g0, g1 in zip(*per_rank_grads)]
    _assert_lists_equal(rank0[name], rank1[name])
    _assert_lists_close(rank0[name], want)


def test_allreduce_always_fp32_reduces_fp16_grads_in_fp32(results):
    rank0, rank1 = _ranks(results, "fp32_allreduce")
    for result in (rank0, rank1):
        assert result[True].dtype == torch.float16
        torch.testing.assert_close(result[True], torch.full((4,), W.TINY_FP16, dtype=torch.float16), rtol=0, atol=0)
        if result["backend"] == "gloo":
            # Control: torch's built-in FP16 path divides by the world size first, and 2**-25 underflows.
            assert torch.count_nonzero(result[False]) == 0


def test_buffers_are_never_broadcast(results):
    rank0, rank1 = _ranks(results, "buffers")
    torch.testing.assert_close(rank0["apex"], torch.zeros(3))
    torch.testing.assert_close(rank1["apex"], torch.ones(3))
    torch.testing.assert_close(rank1["torch_default"], torch.zeros(3))  # control: torch's default syncs them


def _reference_bn(channel_last):
    x, z, weights, x_eval = W.syncbn_inputs(channel_last=channel_last)
    bn = torch.nn.BatchNorm1d(3)
    x = x.clone().requires_grad_()
    z = z.clone().requires_grad_()
    if channel_last:
        out = torch.relu(bn(x.transpose(1, 2)).transpose(1, 2) + z)
    else:
        out = bn(x)
    (out * weights).sum().backward()
    bn.eval()
    with torch.no_grad():
        eval_out = torch.relu(bn(x_eval.transpose(1, 2)).transpose(1, 2)) if channel_last else bn(x_eval)
    return {"out": out.detach(), "x_grad": x.grad, "z_grad": z.grad, "weight_grad": bn.weight.grad,
            "bias_grad": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var,
            "num_batches_tracked": bn.num_batches_tracked, "eval_out": eval_out}


@pytest.mark.parametrize("variant, channel_last", [("plain", False), ("channel_last_fused", True)])
def test_syncbn_matches_batchnorm_over_full_batch(results, variant, channel_last):
    per_rank = [r[variant] for r in _ranks(results, "syncbn")]
    ref = _reference_bn(channel_last)
    for key in ("out", "x_grad", "eval_out") + (("z_grad",) if channel_last else ()):
        torch.testing.assert_close(torch.cat([r[key] for r in per_rank]), ref[key])
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        for result in per_rank:
            torch.testing.assert_close(result[key], ref[key])
    for key in ("weight_grad", "bias_grad"):  # each rank holds its own batch's share, as with any DDP model
        torch.testing.assert_close(per_rank[0][key] + per_rank[1][key], ref[key])


def test_converted_syncbn_model_under_ddp_matches_full_batch(results):
    rank0, rank1 = _ranks(results, "syncbn_ddp")
    model = W.make_bn_mlp(seed=100)
    reference = _full_batch_sgd(model)
    for result in (rank0, rank1):
        _assert_lists_close(result["params"], reference)
        _assert_lists_close(result["buffers"], [b.detach() for b in model.buffers()])


def test_disable_allreduce_accumulates_locally(results):
    ranks = _ranks(results, "disable_allreduce")
    (xa, ya), (xb, yb) = W.batches(steps=2)
    second = [W.local_grads(W.make_mlp(seed=100), W.chunk(xb, r), W.chunk(yb, r)) for r in range(W.WORLD_SIZE)]
    first = [W.local_grads(W.make_mlp(seed=100), W.chunk(xa, r), W.chunk(ya, r)) for r in range(W.WORLD_SIZE)]
    for rank, result in enumerate(ranks):
        assert result["disabled_flag"] is True
        _assert_lists_close(result["local"], first[rank])
    synced = [(a0 + b0 + a1 + b1) / 2 for a0, b0, a1, b1 in zip(first[0], second[0], first[1], second[1])]
    for result in ranks:
        _assert_lists_close(result["synced"], synced)


def test_reducer_and_flat_dist_call(results, per_rank_grads):
    ranks = _ranks(results, "reducer")
    reference_init = [p.detach() for p in W.make_mlp(seed=100).parameters()]
    mean_grads = [(g0 + g1) / 2 for g0, g1 in zip(*per_rank_grads)]
    for rank, result in enumerate(ranks):
        _assert_lists_equal(result["initial"], reference_init)
        _assert_lists_close(result["local"], per_rank_grads[rank])
        _assert_lists_close(result["module_reduced"], mean_grads)
        torch.testing.assert_close(result["list_reduced"][0], torch.full((2, 2), 1.5))
        torch.testing.assert_close(result["list_reduced"][1], torch.full((3,), 15.0, dtype=torch.float64))
        torch.testing.assert_close(result["broadcast_from_1"][0], torch.full((2,), 1.0))
        torch.testing.assert_close(result["broadcast_from_1"][1], torch.full((3,), 2.0, dtype=torch.float64))


def test_create_syncbn_process_group(results):
    ranks = _ranks(results, "syncbn_groups")
    x = W.syncbn_inputs()[0]
    global_bn = torch.nn.BatchNorm1d(3)
    global_bn(x)
    for rank, result in enumerate(ranks):
        assert result["group_0_is_none"] is True
        local_bn = torch.nn.BatchNorm1d(3)
        local_bn(W.chunk(x, rank))
        torch.testing.assert_close(result[1], local_bn.running_mean)  # groups of one: local statistics
        torch.testing.assert_close(result[2], global_bn.running_mean)
        assert result["too_large"] == "group_size (3) must not exceed the world size (2)."


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_amp_initialize_then_ddp_matches_single_process_amp(results, opt_level):
    import ampcompat

    rank0, rank1 = _ranks(results, "amp_" + opt_level)
    ampcompat.reset()
    params, masters = W.train_amp(W.make_mlp(seed=100), opt_level, W.batches())
    _assert_lists_equal(rank0["params"], rank1["params"])
    _assert_lists_equal(rank0["masters"], rank1["masters"])
    # FP16 rounding differs between a batch of 8 and two of 4, hence the FP16-level tolerance.
    _assert_lists_close(rank0["params"], params, rtol=2e-3, atol=2e-3)
    _assert_lists_close(rank0["masters"], masters, rtol=2e-3, atol=2e-3)
    if opt_level == "O2":
        assert all(p.dtype == torch.float16 for p in rank0["params"])
        assert all(p.dtype == torch.float32 for p in rank0["masters"])
    reference_fp32 = _full_batch_sgd(W.make_mlp(seed=100))
    _assert_lists_close(rank0["masters"], reference_fp32, rtol=2e-2, atol=2e-2)
