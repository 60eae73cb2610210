"""Scenarios run inside a 2-process group for tests/test_parallel_dist.py, plus the models and data they share
with the single-process references computed in the test process.

One ``torch.multiprocessing.spawn`` runs every scenario in sequence (starting processes is the slow part);
each rank saves ``{scenario: result dict}`` to ``<out_dir>/rank<r>.pt``. A scenario that raises records its
traceback under ``"error"`` so the matching test fails with it.
"""
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WORLD_SIZE = 2
STEPS = 3
LR = 0.1
GLOBAL_BATCH = 8


# ------------------------------------------------------------------------------------------------
# Models and data shared with the references
# ------------------------------------------------------------------------------------------------

def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_bn_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


class MLPWithUnused(nn.Module):
    """An MLP plus a layer that forward never touches (its parameters never get a gradient)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.body = make_mlp(seed)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


class HalfScale(nn.Module):
    """``(w * x).sum()`` with an FP16 ``w``: its gradient is exactly ``x`` in FP16."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float16))

    def forward(self, x):
        return (self.w * x).sum()


class WithRankBuffer(nn.Module):
    """A linear layer plus a buffer holding this process's rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.register_buffer("marker", torch.full((3,), float(rank)))

    def forward(self, x):
        return self.lin(x) + self.marker


def batches(steps: int = STEPS, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator))
            for _ in range(steps)]


def chunk(tensor, rank: int, world_size: int = WORLD_SIZE):
    return tensor.chunk(world_size)[rank]


def train_sgd(model, data, device="cpu", rank=None, world_size=WORLD_SIZE, lr=LR):
    """Plain SGD on MSE; with ``rank`` each step uses only this rank's slice of the batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        if rank is not None:
            x, y = chunk(x, rank, world_size), chunk(y, rank, world_size)
        optimizer.zero_grad()
        F.mse_loss(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
    return model


def train_amp(model, opt_level, data, device="cpu", rank=None, world_size=WORLD_SIZE, wrap=None, lr=LR):
    """``amp.initialize`` + (optionally) a parallel wrapper + SGD with ``amp.scale_loss``.

    Returns ``(model_params, master_params)`` as CPU tensors.
    """
    from ampcompat import amp

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer = amp.initialize(model, optimizer, opt_level=opt_level, verbosity=0)
    net = wrap(model) if wrap is not None else model
    for x, y in data:
        if rank is not None:
            x, y = chunk(x, rank, world_size), chunk(y, rank, world_size)
        optimizer.zero_grad()
        loss = F.mse_loss(net(x.to(device)).float(), y.to(device))
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        optimizer.step()
    return _cpu(model.parameters()), _cpu(amp.master_params(optimizer))


def local_grads(model, x, y, device="cpu"):
    model.zero_grad()
    F.mse_loss(model(x.to(device)), y.to(device)).backward()
    return _cpu(p.grad for p in model.parameters())


def syncbn_inputs(channel_last: bool = False, seed: int = 11):
    """(x, z, output weights, eval input) for the batch-norm scenarios; channel dimension 3."""
    generator = torch.Generator().manual_seed(seed)
    shape = (GLOBAL_BATCH, 5, 3) if channel_last else (GLOBAL_BATCH, 3, 5)
    return tuple(torch.randn(*shape, generator=generator) for _ in range(4))


def _cpu(tensors):
    return [t.detach().cpu().clone() for t in tensors]


# ------------------------------------------------------------------------------------------------
# Scenarios (run on every rank; return a dict of CPU tensors / plain values)
# ------------------------------------------------------------------------------------------------

def scenario_ddp_training(rank, world_size, device):
    from ampcompat.parallel import DistributedDataParallel

    model = make_mlp(seed=100 + rank).to(device)  # ranks start different; DDP must broadcast rank 0's
    ddp = DistributedDataParallel(model)
    initial = _cpu(model.parameters())
    train_sgd(ddp, batches(), device, rank, world_size)

    torch_model = make_mlp(seed=100 + rank).to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    train_sgd(torch.nn.parallel.DistributedDataParallel(torch_model, device_ids=device_ids), batches(), device,
              rank, world_size)
    return {"initial": initial, "apex": _cpu(model.parameters()), "torch": _cpu(torch_model.parameters()),
            "state_dict_keys": list(ddp.state_dict().keys())}


def scenario_delay_allreduce_unused(rank, world_size, device):
    from ampcompat.parallel import DistributedDataParallel

    model = MLPWithUnused(seed=100 + rank).to(device)
    train_sgd(DistributedDataParallel(model, delay_allreduce=True), batches(), device, rank, world_size)
    return {"params": _cpu(model.parameters()), "unused_grads": [p.grad for p in model.unused.parameters()]}


GRAD_OPTIONS = {
    "predivide2_average": dict(gradient_predivide_factor=2.0),
    "no_average": dict(gradient_average=False),
    "predivide4_no_average": dict(gradient_predivide_factor=4.0, gradient_average=False),
    "predivide2_fp32": dict(gradient_predivide_factor=2.0, allreduce_always_fp32=True),
}


def scenario_grad_options(rank, world_size, device):
    from ampcompat.parallel import DistributedDataParallel

    x, y = batches(steps=1)[0]
    results = {}
    for name, options in GRAD_OPTIONS.items():
        model = make_mlp(seed=100).to(device)
        ddp = DistributedDataParallel(model, **options)
        results[name] = local_grads(ddp, chunk(x, rank, world_size), chunk(y, rank, world_size), device)
    return results


TINY_FP16 = 2.0 ** -24  # smallest FP16 subnormal: half of it rounds to 0 in FP16


def scenario_fp32_allreduce(rank, world_size, device):
    """Both ranks' FP16 gradient is 2**-24; their mean is 2**-24, but half of it underflows in FP16."""
    from ampcompat.parallel import DistributedDataParallel

    results = {"backend": dist.get_backend()}
    for always_fp32 in (True, False):
        model = HalfScale().to(device)
        ddp = DistributedDataParallel(model, allreduce_always_fp32=always_fp32)
        ddp(torch.full((4,), TINY_FP16, dtype=torch.float16, device=device)).backward()
        results[always_fp32] = model.w.grad.detach().cpu().clone()
    return results


def scenario_buffers(rank, world_size, device):
    from ampcompat.parallel import DistributedDataParallel

    results = {}
    for name, wrap in (("apex", DistributedDataParallel),
                       ("torch_default", torch.nn.parallel.DistributedDataParallel)):
        model = WithRankBuffer(rank).to(device)
        train_sgd(wrap(model), batches(steps=2), device, rank, world_size)
        results[name] = model.marker.detach().cpu().clone()
    return results


def _syncbn_run(layer, x, z, weights, x_eval, rank, world_size, device):
    x = chunk(x, rank, world_size).to(device).requires_grad_()
    z = chunk(z, rank, world_size).to(device).requires_grad_() if z is not None else None
    out = layer(x) if z is None else layer(x, z)
    (out * chunk(weights, rank, world_size).to(device)).sum().backward()
    result = {"out": out.detach().cpu(), "x_grad": x.grad.cpu(), "weight_grad": layer.weight.grad.cpu(),
              "bias_grad": layer.bias.grad.cpu(), "running_mean": layer.running_mean.cpu().clone(),
              "running_var": layer.running_var.cpu().clone(),
              "num_batches_tracked": layer.num_batches_tracked.cpu().clone()}
    if z is not None:
        result["z_grad"] = z.grad.cpu()
    layer.eval()
    with torch.no_grad():
        result["eval_out"] = layer(chunk(x_eval, rank, world_size).to(device)).cpu()
    return result


def scenario_syncbn(rank, world_size, device):
    from ampcompat.parallel import SyncBatchNorm

    x, _, weights, x_eval = syncbn_inputs()
    plain = _syncbn_run(SyncBatchNorm(3).to(device), x, None, weights, x_eval, rank, world_size, device)
    x, z, weights, x_eval = syncbn_inputs(channel_last=True)
    fused = _syncbn_run(SyncBatchNorm(3, channel_last=True, fuse_relu=True).to(device), x, z, weights, x_eval,
                        rank, world_size, device)
    return {"plain": plain, "channel_last_fused": fused}


def scenario_syncbn_ddp(rank, world_size, device):
    from ampcompat.parallel import DistributedDataParallel, convert_syncbn_model

    model = convert_syncbn_model(make_bn_mlp(seed=100)).to(device)
    train_sgd(DistributedDataParallel(model), batches(), device, rank, world_size)
    return {"params": _cpu(model.parameters()), "buffers": _cpu(model.buffers())}


def scenario_disable_allreduce(rank, world_size, device):
    from ampcompat.parallel import DistributedDataParallel

    (xa, ya), (xb, yb) = batches(steps=2)
    model = make_mlp(seed=100).to(device)
    ddp = DistributedDataParallel(model)
    ddp.disable_allreduce()
    disabled_flag = ddp._disable_allreduce
    F.mse_loss(ddp(chunk(xa, rank).to(device)), chunk(ya, rank).to(device)).backward()
    accumulated = _cpu(p.grad for p in model.parameters())
    ddp.enable_allreduce()
    F.mse_loss(ddp(chunk(xb, rank).to(device)), chunk(yb, rank).to(device)).backward()
    return {"disabled_flag": disabled_flag, "local": accumulated, "synced": _cpu(p.grad for p in model.parameters())}


def scenario_reducer(rank, world_size, device):
    from ampcompat.parallel import Reducer
    from ampcompat.parallel.distributed import flat_dist_call

    x, y = batches(steps=1)[0]
    model = make_mlp(seed=100 + rank).to(device)
    reducer = Reducer(model)
    initial = _cpu(model.parameters())
    local = local_grads(model, chunk(x, rank), chunk(y, rank), device)
    reducer.reduce()
    module_reduced = _cpu(p.grad for p in model.parameters())

    grads = [torch.full((2, 2), float(rank + 1), device=device),
             [torch.full((3,), 10.0 * (rank + 1), dtype=torch.float64, device=device)]]
    Reducer(grads).reduce()

    mixed = [torch.full((2,), float(rank), device=device), torch.full((3,), 2.0 * rank, dtype=torch.float64,
                                                                          device=device)]
    flat_dist_call(mixed, dist.broadcast, (1,))
    return {"initial": initial, "local": local, "module_reduced": module_reduced,
            "list_reduced": [grads[0].cpu(), grads[1][0].cpu()], "broadcast_from_1": _cpu(mixed)}


def scenario_syncbn_groups(rank, world_size, device):
    from ampcompat.parallel import SyncBatchNorm, create_syncbn_process_group

    x, _, _, _ = syncbn_inputs()
    results = {"group_0_is_none": create_syncbn_process_group(0) is None}
    for size in (1, 2):
        group = create_syncbn_process_group(size)
        layer = SyncBatchNorm(3, process_group=group).to(device)
        layer(chunk(x, rank).to(device))
        results[size] = layer.running_mean.cpu().clone()
    try:
        create_syncbn_process_group(3)
    except AssertionError as error:
        results["too_large"] = str(error)
    return results


def _amp_scenario(opt_level):
    def scenario(rank, world_size, device):
        import ampcompat
        from ampcompat.parallel import DistributedDataParallel

        ampcompat.reset()
        params, masters = train_amp(make_mlp(seed=100).to(device), opt_level, batches(), device, rank, world_size,
                                    wrap=DistributedDataParallel)
        ampcompat.reset()
        return {"params": params, "masters": masters}

    return scenario


SCENARIOS = {
    "ddp_training": scenario_ddp_training,
    "delay_allreduce_unused": scenario_delay_allreduce_unused,
    "grad_options": scenario_grad_options,
    "fp32_allreduce": scenario_fp32_allreduce,
    "buffers": scenario_buffers,
    "syncbn": scenario_syncbn,
    "syncbn_ddp": scenario_syncbn_ddp,
    "disable_allreduce": scenario_disable_allreduce,
    "reducer": scenario_reducer,
    "syncbn_groups": scenario_syncbn_groups,
    "amp_O1": _amp_scenario("O1"),
    "amp_O2": _amp_scenario("O2"),
}


# ------------------------------------------------------------------------------------------------
# Process group plumbing
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` once every collective of the group has let go of its tensors.

    On torch 2.4 the gloo group's destructor joins its worker threads while holding the GIL; a worker
    still releasing a finished collective's tensors needs the GIL too, and the two deadlock. The barrier
    is waited on with the GIL released, so the workers finish first.
    """
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, world_size, port, backend, out_dir, names):
    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method="tcp://127.0.0.1:{}".format(port), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            try:
                results[name] = SCENARIOS[name](rank, world_size, device)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, "rank{}.pt".format(rank)))
        destroy_process_group()


def run_scenarios(out_dir, backend="gloo", names=None):
    """Run the named scenarios (default: all) on 2 spawned processes; return ``{name: [rank0, rank1]}``."""
    import torch.multiprocessing as mp

    names = list(SCENARIOS) if names is None else list(names)
    mp.spawn(_worker, args=(WORLD_SIZE, free_port(), backend, str(out_dir), names), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(os.path.join(str(out_dir), "rank{}.pt".format(r)), weights_only=False)
                for r in range(WORLD_SIZE)]
    return {name: [per_rank[r][name] for r in range(WORLD_SIZE)] for name in names}
