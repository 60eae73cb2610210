"""Apex's synchronized batch norm (``apex.parallel.SyncBatchNorm``, ``convert_syncbn_model``) on torch.

Training-mode statistics are reduced over the process group. On CUDA (and the other devices whose
kernels torch.nn.SyncBatchNorm uses) torch's fused implementation runs; elsewhere (CPU with gloo) a
plain-ops version with differentiable all-reduces computes the same result. Without a process group,
or with a group of one, it is ordinary batch norm, which is what a one-process sync BN computes.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _torch_compat

__all__ = ["SyncBatchNorm", "convert_syncbn_model", "create_syncbn_process_group"]

# Devices with torch.nn.SyncBatchNorm's fused kernels (batch_norm_stats etc. do not exist on CPU).
_TORCH_SYNC_DEVICE_TYPES = frozenset({"cuda", "hpu", "xpu"})
_LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over a process group; the gradient is summed over the group the same way."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        summed = tensor.clone()
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = grad_output.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sync_batch_norm_plain(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           momentum: float, eps: float, group) -> Tensor:
    """Training-mode batch norm with statistics over all ranks of ``group``, in differentiable plain ops.

    Two all-reduces: (sum, count) for the mean, then the sum of squared deviations for the variance
    (two passes keep the variance accurate). Statistics are computed in FP32 for FP16/BF16 inputs; the
    output has the input's dtype. Running statistics get the unbiased variance, as in torch.
    """
    compute_dtype = torch.float32 if input.dtype in _LOW_PRECISION_DTYPES else input.dtype
    x = input.to(compute_dtype)
    reduce_dims = [0] + list(range(2, x.dim()))
    stat_shape = [1, x.size(1)] + [1] * (x.dim() - 2)

    local_count = x.new_full((1,), x.numel() // x.size(1))
    sums = _AllReduceSum.apply(torch.cat([x.sum(reduce_dims), local_count]), group)
    count = sums[-1]
    mean = sums[:-1] / count
    centered = x - mean.view(stat_shape)
    var = _AllReduceSum.apply(centered.square().sum(reduce_dims), group) / count
    out = centered * torch.rsqrt(var + eps).view(stat_shape)
    if weight is not None:
        out = out * weight.to(compute_dtype).view(stat_shape)
    if bias is not None:
        out = out + bias.to(compute_dtype).view(stat_shape)

    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            unbiased_var = var * count / (count - 1)
            running_var.lerp_(unbiased_var.to(running_var.dtype), momentum)
    return out.to(input.dtype)


def _torch_sync_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           momentum: float, eps: float, group) -> Tensor:
    """torch.nn.SyncBatchNorm's fused kernels (GPU-class devices only)."""
    return _torch_compat.SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, eps, momentum,
                                                     group, dist.get_world_size(group))


class SyncBatchNorm(_torch_compat.BatchNormBase):
    """Apex's ``SyncBatchNorm``: batch norm whose training statistics are reduced across processes.

    Like Apex's, a direct subclass of ``_BatchNorm`` (so amp O2 keeps it in FP32), not of
    ``torch.nn.SyncBatchNorm``: torch's DDP refuses modules holding the latter on CPU. On CUDA it runs
    torch.nn.SyncBatchNorm's fused kernels; on CPU (gloo) an equivalent plain-ops version. In eval mode,
    without an initialized ``torch.distributed``, or in a group of one, it is ordinary batch norm (eval
    mode uses the running statistics and never communicates).

    Args:
        num_features: number of channels ``C``.
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm*d`` (``momentum=None`` is a
            cumulative average).
        process_group: group whose ranks share statistics; ``None`` is the whole world.
        channel_last: the channel is the *last* dimension of the input (``(N, ..., C)``, e.g. NHWC), as in
            Apex; internally the input is viewed as ``(N, C, ...)`` in channels-last memory format.
        fuse_relu: apply ReLU after the normalization (and after adding ``z``).

    ``forward(input, z=None)``: ``out = BN(input)``; ``out += z`` when ``z`` is given; ``out = relu(out)``
    when ``fuse_relu``. (Apex's fused kernel honoured ``z``/``fuse_relu`` only with ``channel_last=True``
    and silently ignored them otherwise; here they always apply.)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 channel_last: bool = False, fuse_relu: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.process_group = process_group
        self.channel_last = channel_last
        self.fuse_relu = fuse_relu

    def _specify_process_group(self, process_group) -> None:
        self.process_group = process_group

    def _specify_channel_last(self, channel_last: bool) -> None:
        self.channel_last = channel_last

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError("expected at least 2D input (got {}D input)".format(input.dim()))

    def forward(self, input: Tensor, z: Optional[Tensor] = None) -> Tensor:
        channel_is_last = self.channel_last and input.dim() > 2
        out = self._normalize(input.movedim(-1, 1) if channel_is_last else input)
        if channel_is_last:
            out = out.movedim(1, -1)
        if z is not None:
            out = out + z
        if self.fuse_relu:
            out = torch.relu(out)
        return out

    def _sync_group(self):
        """The process group to reduce statistics over, or None when there is nothing to reduce."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _normalize(self, input: Tensor) -> Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        sync_batch_norm = (_torch_sync_batch_norm if input.device.type in _TORCH_SYNC_DEVICE_TYPES
                           else _sync_batch_norm_plain)
        return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var, momentum, self.eps, group)


def convert_syncbn_model(module: torch.nn.Module, process_group=None, channel_last: bool = False) -> torch.nn.Module:
    """Replace every ``_BatchNorm`` (not instance norm) in ``module`` by :class:`SyncBatchNorm`, recursively.

    Apex's rules: the new layers *share* the running-statistics tensors of the old ones (also
    ``num_batches_tracked``) but get *new* weight/bias Parameters holding copies, so build the optimizer
    after converting. Children are replaced in place; the return value is ``module`` itself unless
    ``module`` is a batch norm. Unlike Apex, ``training`` and the parameters' ``requires_grad`` are kept
    (Apex reset them: a frozen or eval-mode BN silently became trainable / training).

    Args:
        module: the network.
        process_group: passed to every new layer (``None``: the whole world).
        channel_last: passed to every new layer.

    Returns:
        The converted module.
    """
    converted = module
    if isinstance(module, _torch_compat.BatchNormBase):
        converted = _sync_batchnorm_like(module, process_group, channel_last)
    for name, child in module.named_children():
        converted.add_module(name, convert_syncbn_model(child, process_group=process_group,
                                                        channel_last=channel_last))
    return converted


def _sync_batchnorm_like(bn: _torch_compat.BatchNormBase, process_group, channel_last: bool) -> SyncBatchNorm:
    sync_bn = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                            process_group, channel_last=channel_last)
    if bn.track_running_stats:
        sync_bn.running_mean = bn.running_mean
        sync_bn.running_var = bn.running_var
        sync_bn.num_batches_tracked = bn.num_batches_tracked
    if bn.affine:
        sync_bn.weight = torch.nn.Parameter(bn.weight.detach().clone(), requires_grad=bn.weight.requires_grad)
        sync_bn.bias = torch.nn.Parameter(bn.bias.detach().clone(), requires_grad=bn.bias.requires_grad)
    sync_bn.train(bn.training)
    return sync_bn


def create_syncbn_process_group(group_size: int) -> Optional[dist.ProcessGroup]:
    """Split the world into consecutive groups of ``group_size`` ranks; return the one holding this rank.

    Every rank must call this (each group is created collectively). ``group_size=0`` returns ``None``,
    which :class:`SyncBatchNorm` reads as the whole world.

    Raises:
        AssertionError: if ``group_size`` exceeds the world size or does not divide it (Apex's checks).
    """
    if group_size == 0:
        return None
    world_size = dist.get_world_size()
    if world_size < group_size:
        raise AssertionError("group_size ({}) must not exceed the world size ({}).".format(group_size, world_size))
    if world_size % group_size != 0:
        raise AssertionError("group_size ({}) must divide the world size ({}).".format(group_size, world_size))
    rank = dist.get_rank()
    own_group = None
    for first_rank in range(0, world_size, group_size):
        group = dist.new_group(ranks=list(range(first_rank, first_rank + group_size)))
        if first_rank <= rank < first_rank + group_size:
            own_group = group
    return own_group
