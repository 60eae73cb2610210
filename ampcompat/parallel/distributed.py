"""Apex's ``apex.parallel.distributed`` on native ``torch.distributed``.

``DistributedDataParallel`` is PyTorch's DDP configured the way Apex's behaved: parameters (never
buffers) broadcast from rank 0, gradients all-reduced and averaged, ``message_size`` elements per
bucket, ``delay_allreduce`` tolerating parameters that get no gradient, and Apex's predivide / no-average
/ FP32 all-reduce options through a DDP communication hook. ``Reducer`` and ``flat_dist_call`` are the
manual helpers legacy scripts call next to it (BERT pretraining calls ``flat_dist_call`` directly).
"""
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as _TorchDDP

from .. import _torch_compat

__all__ = [
    "DistributedDataParallel",
    "Reducer",
    "flat_dist_call",
    "apply_flat_dist_call",
    "split_by_type",
    "split_half_float_double",
    "flatten",
    "unflatten",
    "extract_tensors",
]

_SHARED_PARAM_MESSAGE = (
    "shared_param is no longer supported as an option.  It was misleadingly named from the start.  It turns "
    "out overlapping communication with computation should work fine with shared parameters.  If you still "
    "wish to delay communication to the end of the backward pass, use delay_allreduce=True|False instead."
)
_STREAMS_WITH_DELAY_MESSAGE = "self.allreduce_different_streams may only be used if delay_allreduce=False."
_TRIGGERS_WITH_DELAY_MESSAGE = "Setting allreduce_trigger_params is only valid if delay_allreduce=False."
_NCCL_NEEDS_CUDA_MESSAGE = "NCCL backend only supports model parameters to be on GPU."

# Apex's bucket order for its end-of-backward all-reduce; bfloat16 is ours (Apex dropped bf16 grads).
_FLOAT_DTYPE_ORDER = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Flat collectives (Apex's helpers, one flattened call per tensor type)
# --------------------------------------------------------------------------------------------------

def flatten(bucket: Sequence[Tensor]) -> Tensor:
    """Concatenate ``bucket`` (tensors of one dtype and device) into one contiguous 1-D tensor."""
    return torch.cat([tensor.reshape(-1) for tensor in bucket])


def unflatten(coalesced: Tensor, bucket: Sequence[Tensor]) -> List[Tensor]:
    """Split a tensor made by :func:`flatten` back into views shaped like the tensors of ``bucket``."""
    chunks = coalesced.split([tensor.numel() for tensor in bucket])
    return [chunk.view_as(tensor) for chunk, tensor in zip(chunks, bucket)]


def split_by_type(tensors: Iterable[Tensor]) -> "OrderedDict[str, List[Tensor]]":
    """Group tensors by ``Tensor.type()`` (dtype and device kind), in order of first appearance."""
    buckets: "OrderedDict[str, List[Tensor]]" = OrderedDict()
    for tensor in tensors:
        buckets.setdefault(tensor.type(), []).append(tensor)
    return buckets


def split_half_float_double(tensors: Iterable[Tensor]) -> List[List[Tensor]]:
    """Group floating-point tensors into half, bfloat16, float and double buckets (empty ones dropped).

    Apex kept only CUDA half/float/double tensors here; this version accepts any device and bfloat16.
    Each bucket must still live on one device for :func:`flatten`.
    """
    tensors = list(tensors)
    buckets = [[t for t in tensors if t.dtype == dtype] for dtype in _FLOAT_DTYPE_ORDER]
    return [bucket for bucket in buckets if bucket]


def apply_flat_dist_call(bucket: Sequence[Tensor], call: Callable[..., Any],
                         extra_args: Optional[Sequence[Any]] = None) -> None:
    """Run ``call`` (e.g. ``dist.broadcast``) once on the flattened ``bucket`` and copy the result back.

    Like Apex, a ``dist.all_reduce`` call is followed by a division by the world size, so it averages.

    Args:
        bucket: tensors of one dtype and device, updated in place.
        call: a collective taking the flat tensor first, e.g. ``dist.all_reduce`` or ``dist.broadcast``.
        extra_args: further positional arguments for ``call`` (``(0,)`` for a broadcast from rank 0).
    """
    coalesced = flatten(bucket)
    if extra_args is not None:
        call(coalesced, *extra_args)
    else:
        call(coalesced)
    if call is dist.all_reduce:
        coalesced /= dist.get_world_size()
    with torch.no_grad():
        _torch_compat.foreach_copy_(list(bucket), unflatten(coalesced, bucket))


def flat_dist_call(tensors: Iterable[Tensor], call: Callable[..., Any],
                   extra_args: Optional[Sequence[Any]] = None) -> None:
    """Apply :func:`apply_flat_dist_call` to each same-type group of ``tensors`` (Apex's semantics).

    Example: ``flat_dist_call([p.grad for p in model.parameters()], dist.all_reduce)`` averages the
    gradients over all processes with one collective per dtype.
    """
    for bucket in split_by_type(tensors).values():
        apply_flat_dist_call(bucket, call, extra_args)


def extract_tensors(maybe_tensor: Any, tensor_list: List[Tensor]) -> None:
    """Append every tensor found in a (possibly nested) iterable to ``tensor_list``, in order."""
    if torch.is_tensor(maybe_tensor):
        tensor_list.append(maybe_tensor)
        return
    if isinstance(maybe_tensor, (str, bytes)):
        return
    try:
        items = iter(maybe_tensor)
    except TypeError:
        return
    for item in items:
        extract_tensors(item, tensor_list)


# --------------------------------------------------------------------------------------------------
# Reducer
# --------------------------------------------------------------------------------------------------

class Reducer:
    """All-reduce (and average) gradients only when asked: Apex's manual alternative to DDP.

    Args:
        module_or_grads_list: a module, whose parameters are broadcast from rank 0 now and whose
            gradients :meth:`reduce` averages; or an iterable (possibly nested) of gradient tensors,
            which :meth:`reduce` averages in place (syncing the parameters is then the caller's job).
    """

    def __init__(self, module_or_grads_list: Any) -> None:
        if isinstance(module_or_grads_list, torch.nn.Module):
            self.module: Optional[torch.nn.Module] = module_or_grads_list
            flat_dist_call([p.detach() for p in self.module.parameters()], dist.broadcast, (0,))
        else:
            self.module = None
            self.grads: List[Tensor] = []
            extract_tensors(module_or_grads_list, self.grads)

    def reduce(self) -> None:
        """Average the gradients over all processes, in place (one all-reduce per dtype)."""
        if self.module is not None:
            grads = [p.grad.detach() for p in self.module.parameters() if p.grad is not None]
        else:
            grads = self.grads
        flat_dist_call(grads, dist.all_reduce)


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------------

@dataclass
class _AllreduceOptions:
    """What Apex's bucket all-reduce did besides summing; the state of :func:`_apex_allreduce_hook`."""

    process_group: Any
    world_size: int
    predivide_factor: float
    average: bool
    always_fp32: bool


def _apex_allreduce_hook(state: _AllreduceOptions, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook reproducing Apex's bucket all-reduce.

    Multiplies by ``1/predivide_factor``, all-reduces (in FP32 when asked and the bucket is FP16/BF16),
    then multiplies by ``predivide_factor/world_size`` unless averaging is off. Returns the bucket's own
    buffer, so DDP copies the result into ``.grad`` in the gradients' dtype.
    """
    grads = bucket.buffer()
    reduced = grads.float() if state.always_fp32 and grads.dtype in _LOW_PRECISION_DTYPES else grads
    if state.predivide_factor != 1.0:
        reduced.mul_(1.0 / state.predivide_factor)
    work = dist.all_reduce(reduced, group=state.process_group, async_op=True)

    def _finish(future: torch.futures.Future) -> Tensor:
        summed = future.value()[0]
        if state.average:
            summed.mul_(state.predivide_factor / state.world_size)
        if summed is not grads:
            grads.copy_(summed)
        return grads

    return work.get_future().then(_finish)


def _check_apex_options(delay_allreduce: bool, shared_param: Any, allreduce_trigger_params: Any,
                        num_allreduce_streams: int, allreduce_communicators: Any) -> None:
    """Raise Apex's errors for option combinations it rejected, in Apex's order."""
    different_streams = num_allreduce_streams > 1
    if allreduce_communicators:
        if len(allreduce_communicators[0]) != num_allreduce_streams:
            raise AssertionError("allreduce_communicators[0] must hold one process group per allreduce stream "
                                 "(num_allreduce_streams={}).".format(num_allreduce_streams))
        if len(allreduce_communicators[0]) != len(allreduce_communicators[1]):
            raise AssertionError("allreduce_communicators must be (process_groups, streams) of equal length.")
        if not different_streams:
            raise AssertionError("allreduce_communicators requires num_allreduce_streams > 1.")
    if different_streams and delay_allreduce:
        raise ValueError(_STREAMS_WITH_DELAY_MESSAGE)
    if shared_param is not None:
        raise ValueError(_SHARED_PARAM_MESSAGE)
    if allreduce_trigger_params is not None and delay_allreduce:
        raise ValueError(_TRIGGERS_WITH_DELAY_MESSAGE)


def _check_params_on_cuda_for_nccl(module: torch.nn.Module) -> None:
    if dist.get_backend() == "nccl" and not all(p.is_cuda for p in module.parameters()):
        raise AssertionError(_NCCL_NEEDS_CUDA_MESSAGE)


def _bucket_cap_mb(module: torch.nn.Module, message_size: int) -> float:
    """Apex counted bucket size in elements; torch counts MiB. Use the dominant gradient dtype's width."""
    numel_by_dtype: Counter = Counter()
    for param in module.parameters():
        if param.requires_grad:
            numel_by_dtype[param.dtype] += param.numel()
    element_size = max(numel_by_dtype, key=numel_by_dtype.__getitem__).itemsize if numel_by_dtype else 4
    return message_size * element_size / float(1 << 20)


def _single_cuda_device_ids(module: torch.nn.Module) -> Optional[List[int]]:
    """``[index]`` when all parameters sit on one CUDA device (torch DDP's single-device mode), else None."""
    devices = {param.device for param in module.parameters()}
    if len(devices) != 1:
        return None
    device = devices.pop()
    if device.type != "cuda":
        return None
    return [device.index if device.index is not None else torch.cuda.current_device()]


class DistributedDataParallel(_TorchDDP):
    """Apex's ``apex.parallel.DistributedDataParallel``, built on ``torch.nn.parallel.DistributedDataParallel``.

    Parameters are broadcast from rank 0 at construction; buffers are never synchronised (Apex did not,
    unlike torch's default). Gradients are all-reduced and averaged over the world during ``backward()``.
    Wrap the model *after* ``amp.initialize``.

    With the default options torch's built-in all-reduce runs: it divides by the world size *before*
    summing (Apex divided after). The mean is the same and an FP16 sum can no longer overflow, but FP16
    gradients near the subnormal range can underflow; ``allreduce_always_fp32=True`` avoids both.

    This class subclasses torch's DDP rather than wrapping one, so ``.module``, ``state_dict`` keys prefixed
    ``module.``, ``no_sync()``, comm hooks and every tool that unwraps torch's DDP keep working; unlike
    Apex's class, it passes ``isinstance(model, torch.nn.parallel.DistributedDataParallel)``.

    Args:
        module: the network; its parameters must already be on this process's device.
        message_size: elements per all-reduce bucket (converted to torch's ``bucket_cap_mb`` using the
            element size of the dtype holding most trainable parameters).
        delay_allreduce: let parameters receive no gradient in an iteration (Apex reduced everything at
            the end of backward; torch DDP overlaps but searches for unused parameters each forward).
        shared_param: removed in Apex; anything but None raises Apex's ``ValueError``.
        allreduce_trigger_params, retain_allreduce_buffers, num_allreduce_streams,
        allreduce_communicators, gradient_average_split_factor, prof: Apex's scheduling and
            profiling knobs; validated like Apex, then ignored (torch DDP schedules its own buckets).
        allreduce_always_fp32: all-reduce FP16/BF16 gradient buckets in FP32.
        gradient_average: divide the summed gradients by the world size (after the predivision).
        gradient_predivide_factor: multiply by ``1/f`` before the all-reduce and by ``f/world`` after.

    Raises:
        ValueError: for ``shared_param``, or ``delay_allreduce`` combined with trigger params or
            several streams (Apex's messages).
        AssertionError: on the NCCL backend when a parameter is not on a GPU (Apex's message).
    """

    def __init__(self, module: torch.nn.Module, message_size: int = 10000000, delay_allreduce: bool = False,
                 shared_param: Any = None, allreduce_trigger_params: Optional[Iterable[Tensor]] = None,
                 retain_allreduce_buffers: bool = False, allreduce_always_fp32: bool = False,
                 num_allreduce_streams: int = 1, allreduce_communicators: Any = None,
                 gradient_average: bool = True, gradient_predivide_factor: float = 1.0,
                 gradient_average_split_factor: Optional[float] = None, prof: bool = False) -> None:
        _check_apex_options(delay_allreduce, shared_param, allreduce_trigger_params, num_allreduce_streams,
                            allreduce_communicators)
        _check_params_on_cuda_for_nccl(module)
        with warnings.catch_warnings():
            # torch>=2.13 deprecates broadcast_buffers, but it is still the only switch that also skips the
            # buffer broadcast at construction (its own warning recommends it for rank-local buffers).
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            super().__init__(
                module,
                device_ids=_single_cuda_device_ids(module),
                broadcast_buffers=False,
                bucket_cap_mb=_bucket_cap_mb(module, message_size),
                find_unused_parameters=bool(delay_allreduce),
            )
        self.message_size = message_size
        self.delay_allreduce = delay_allreduce
        self.allreduce_trigger_params = allreduce_trigger_params
        self.retain_allreduce_buffers = retain_allreduce_buffers
        self.allreduce_always_fp32 = allreduce_always_fp32
        self.num_allreduce_streams = num_allreduce_streams
        self.allreduce_communicators = allreduce_communicators
        self.gradient_average = gradient_average
        self.gradient_predivide_factor = gradient_predivide_factor
        self.prof = prof
        self.world_size = float(dist.get_world_size(self.process_group))

        if allreduce_always_fp32 or gradient_predivide_factor != 1.0 or not gradient_average:
            self.register_comm_hook(
                _AllreduceOptions(
                    process_group=self.process_group,
                    world_size=dist.get_world_size(self.process_group),
                    predivide_factor=float(gradient_predivide_factor),
                    average=bool(gradient_average),
                    always_fp32=bool(allreduce_always_fp32),
                ),
                _apex_allreduce_hook,
            )
        # With the defaults torch's built-in C++ all-reduce (sum, then divide by world size) is Apex's math.

    def enable_allreduce(self) -> None:
        """Resume all-reducing gradients from the next forward pass on (undoes :meth:`disable_allreduce`)."""
        self.require_backward_grad_sync = True

    def disable_allreduce(self) -> None:
        """Stop all-reducing: backward passes after the next forward accumulate gradients locally.

        Same mechanism as torch's ``no_sync()``: the first backward after :meth:`enable_allreduce` (and a
        forward) all-reduces the locally accumulated gradients.
        """
        self.require_backward_grad_sync = False

    @property
    def _disable_allreduce(self) -> bool:
        # Apex's flag name, for scripts that inspect or set it directly.
        return not self.require_backward_grad_sync

    @_disable_allreduce.setter
    def _disable_allreduce(self, disabled: bool) -> None:
        self.require_backward_grad_sync = not disabled
