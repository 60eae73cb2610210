"""The address tables one fused O2 step launches with, built once per set of tensors.

A :class:`FusedPlan` covers one optimizer's parameters of one (device, gradient dtype): its param groups
in order, each a list of FP32 masters with their optimizer state and, for half parameters, the model
weights the kernel writes. On the device it holds

* the tensor table: one int64 row per tensor (master, state, state, model weight, ``step``, numel);
* the chunk table: one (tensor index, chunk index) row per program, a tensor of ``numel`` elements
  taking ``ceil(numel / chunk)`` rows (an empty tensor one, so its ``step`` still advances);
* the gradients' table: one address per tensor, uploaded again only when an address changed (the
  caching allocator usually hands a fresh gradient the address of the last one).

Nothing here imports Triton. The tables hold addresses, not references: the plan keeps the tensors
alive, and :meth:`FusedPlan.is_current` says whether any of them has moved since (``.data`` assigned,
``set_``): then build a new plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch

DEFAULT_CHUNK = 16384  # elements one program updates
DEFAULT_BLOCK = 1024  # elements one loop iteration of a program touches
DEFAULT_NUM_WARPS = 4  # with a block of 1024: 8 elements, 16 bytes of half gradient, per thread
_ALIGNMENT = 16  # bytes: the vector width the kernels load with when every address allows it
_ROW = 6  # columns of the tensor table (see kernels.py)
_HALF_TYPES = (torch.float16, torch.bfloat16)


class AdamTensors(NamedTuple):
    """One param group's tensors for an Adam/AdamW step (``model_weights`` None for FP32 params)."""

    masters: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_sqs: Sequence[torch.Tensor]
    steps: Sequence[torch.Tensor]
    model_weights: Optional[Sequence[torch.Tensor]] = None


class SGDTensors(NamedTuple):
    """One param group's tensors for an SGD step; ``momentum_buffers`` None (or all None before the first
    step with momentum, when the plan allocates them) or one FP32 buffer per master."""

    masters: Sequence[torch.Tensor]
    momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None
    model_weights: Optional[Sequence[torch.Tensor]] = None


@dataclass
class _Segment:
    """Where one param group lies in the tables: its tensors and its rows of the chunk table."""

    first_tensor: int
    tensor_count: int
    chunks: Optional[torch.Tensor]  # this group's rows of the chunk table (a view), None when empty
    chunk_count: int


class FusedPlan:
    """Device tables for the fused step of one optimizer's tensors on one (device, gradient dtype).

    Args:
        groups: one :class:`AdamTensors` or :class:`SGDTensors` per param group (all of one kind; a group
            with no tensors of this device and dtype is an empty entry, so indices match param groups).
        grad_dtype: the gradients' dtype: the model weights' half dtype, or ``torch.float32`` for FP32
            params stepped in place (their masters are the params, no model weight is written).
        chunk: elements per program (a multiple of ``block``).
        block: elements per loop iteration of a program.
        num_warps: warps per program.
        steps_on_host: Adam's ``step`` counts are CPU tensors the host advances (torch's default Adam),
            not device tensors the kernel advances (fused Adam). None: decided by where they are (only
            Triton's interpreter, whose "device" is the CPU, needs it said).

    Raises:
        ValueError: for tensors the kernels cannot step (not FP32 masters and state, mismatched shapes or
            layouts, mixed devices, Adam ``step`` tensors neither all float32 on the device nor all on the CPU,
            momentum buffers given for some tensors of a group only); the message names the problem.
    """

    def __init__(self, groups: Sequence, grad_dtype: torch.dtype, chunk: int = DEFAULT_CHUNK,
                 block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_NUM_WARPS,
                 steps_on_host: Optional[bool] = None) -> None:
        if chunk % block or block & (block - 1):
            raise ValueError(f"chunk ({chunk}) must be a multiple of block ({block}), a power of two.")
        if grad_dtype not in _HALF_TYPES + (torch.float32,):
            raise ValueError(f"The fused step reads float16, bfloat16 or float32 gradients, not {grad_dtype}.")
        kinds = {type(group) for group in groups}
        if len(kinds) != 1 or not kinds <= {AdamTensors, SGDTensors}:
            raise ValueError("A fused plan takes AdamTensors for every param group, or SGDTensors for every one.")
        self.kind = "adam" if kinds == {AdamTensors} else "sgd"
        self.grad_dtype = grad_dtype
        self.writes_model = grad_dtype in _HALF_TYPES
        self.chunk, self.block, self.num_warps = chunk, block, num_warps
        self.groups = [self._with_buffers(group) for group in groups] if self.kind == "sgd" else list(groups)
        self.first_step_pending = [False] * len(self.groups)
        if self.kind == "sgd":
            self.first_step_pending = [self._buffers_are_new(group) for group in groups]
        self._masters: List[torch.Tensor] = [m for group in self.groups for m in group.masters]
        self.device = self._masters[0].device if self._masters else torch.device("cpu")
        if any(m.device != self.device for m in self._masters):
            raise ValueError("The fused step runs per device: give one plan the tensors of one device.")
        self.steps: List[torch.Tensor] = [s for group in self.groups for s in group.steps] if self.kind == "adam" else []
        self.device_steps = self._step_placement(self.steps, steps_on_host)
        rows: List[List[int]] = []
        chunk_rows: List[List[int]] = []
        self._tensors: List[torch.Tensor] = []  # every tensor the tables point into, kept alive here
        for group in self.groups:
            for index, master in enumerate(group.masters):
                row, kept = self._row(group, index)
                for chunk_index in range(max(1, -(-master.numel() // chunk))):
                    chunk_rows.append([len(rows), chunk_index])
                rows.append(row)
                self._tensors += kept
        self.tensor_count = len(rows)
        self._addresses = [t.data_ptr() for t in self._tensors]
        self.static_aligned = all(a % _ALIGNMENT == 0 for a in self._addresses)
        self.tensor_table = torch.tensor(rows or [[0] * _ROW], dtype=torch.int64).to(self.device)
        self.chunk_table = torch.tensor(chunk_rows or [[0, 0]], dtype=torch.int32).to(self.device)
        self.done = torch.zeros(max(1, len(rows)), dtype=torch.int32, device=self.device)
        self.segments = self._segments()
        self.chunk_count = len(chunk_rows)
        self.grad_table: Optional[torch.Tensor] = None
        self.grads_aligned = False
        self.aligned = False  # every address, the gradients' included, 16-byte aligned: vector accesses
        self._grad_addresses: Optional[List[int]] = None
        self.compiled: set = set()  # the launcher's record of the kernel specialisations already compiled

    # --- building ------------------------------------------------------------------------------------

    def _with_buffers(self, group: SGDTensors) -> SGDTensors:
        buffers = group.momentum_buffers
        if buffers is None or all(b is not None for b in buffers):
            return group
        if any(b is not None for b in buffers):
            raise ValueError("Momentum buffers exist for some parameters of a param group and not for others; "
                             "the fused SGD step needs all or none.")
        return group._replace(momentum_buffers=[torch.empty_like(m) for m in group.masters])

    @staticmethod
    def _buffers_are_new(group: SGDTensors) -> bool:
        buffers = group.momentum_buffers
        return bool(buffers) and all(b is None for b in buffers)

    def _row(self, group, index: int):
        master = group.masters[index]
        if master.dtype != torch.float32:
            raise ValueError(f"The fused step updates FP32 masters; got a {master.dtype} one.")
        if master.is_sparse or not _dense(master):
            raise ValueError("The fused step needs dense, non-overlapping masters.")
        if self.kind == "adam":
            state = [group.exp_avgs[index], group.exp_avg_sqs[index]]
        else:
            state = [group.momentum_buffers[index]] if group.momentum_buffers is not None else []
        for tensor in state:
            self._check_like(tensor, master, torch.float32, "optimizer state")
        model = None
        if self.writes_model:
            if group.model_weights is None:
                raise ValueError(f"{self.grad_dtype} gradients come with the model's half weights; pass model_weights.")
            model = group.model_weights[index]
            self._check_like(model, master, self.grad_dtype, "model weight")
        elif group.model_weights is not None:
            raise ValueError("FP32 parameters are stepped in place: pass no model_weights with float32 gradients.")
        addresses = [t.data_ptr() if t is not None else 0 for t in (state + [None, None])[:2]]
        step = group.steps[index] if self.kind == "adam" and self.device_steps else None
        step_address = step.data_ptr() if step is not None else 0
        row = [master.data_ptr()] + addresses + [model.data_ptr() if model is not None else 0, step_address,
                                                  master.numel()]
        kept = [master] + state + [t for t in (model, step) if t is not None]
        return row, kept

    @staticmethod
    def _check_like(tensor: torch.Tensor, master: torch.Tensor, dtype: torch.dtype, what: str) -> None:
        if tensor.dtype != dtype or tensor.device != master.device:
            raise ValueError(f"A {what} is {tensor.dtype} on {tensor.device}; the fused step needs {dtype} "
                             f"on {master.device}.")
        if tensor.shape != master.shape or tensor.stride() != master.stride() or not _dense(tensor):
            raise ValueError(f"A {what} differs from its master in shape or memory layout; the fused step reads "
                             "them element by element in storage order.")

    def _step_placement(self, steps: List[torch.Tensor], on_host: Optional[bool]) -> bool:
        """True for float32 ``step`` tensors on the plan's device (fused Adam's), False for CPU ones the host
        advances (the default Adam's)."""
        on_cpu = all(s.device.type == "cpu" and s.numel() == 1 for s in steps)
        if on_host or (on_host is None and self.device.type != "cpu" and steps and on_cpu):
            if not on_cpu:
                raise ValueError("steps_on_host=True needs every step count on the CPU.")
            return False
        if all(s.device == self.device and s.dtype == torch.float32 and s.numel() == 1 for s in steps):
            return True
        raise ValueError("Adam's step counts must all be float32 tensors on the parameters' device (fused or "
                         "capturable Adam) or all CPU tensors (the default implementation).")

    def _segments(self) -> List[_Segment]:
        segments, first_tensor, first_chunk = [], 0, 0
        for group in self.groups:
            count = len(group.masters)
            chunks = sum(max(1, -(-m.numel() // self.chunk)) for m in group.masters)
            view = self.chunk_table[first_chunk:first_chunk + chunks] if chunks else None
            segments.append(_Segment(first_tensor, count, view, chunks))
            first_tensor += count
            first_chunk += chunks
        return segments

    # --- per step ------------------------------------------------------------------------------------

    def is_current(self) -> bool:
        """Whether every tensor the tables point into is still where it was (one ``data_ptr()`` each)."""
        return [t.data_ptr() for t in self._tensors] == self._addresses

    def momentum_buffers(self, group: int) -> Optional[Sequence[torch.Tensor]]:
        """The momentum buffers of param group ``group`` (those the plan allocated included), for the optimizer's state."""
        return self.groups[group].momentum_buffers if self.kind == "sgd" else None

    def set_grads(self, grads: Sequence[Sequence[Optional[torch.Tensor]]]) -> Optional[str]:
        """Point the gradients' table at this step's gradients, one list per param group.

        Returns:
            None when the kernels can read them; else why not (a missing or sparse gradient, one laid out
            unlike its master), and the caller takes the unfused path for this step.
        """
        flat = [g for group in grads for g in group]
        if len(flat) != self.tensor_count:
            return f"{len(flat)} gradients for {self.tensor_count} parameters"
        try:
            addresses = [g.data_ptr() for g in flat]
        except (AttributeError, RuntimeError, NotImplementedError):  # None, or a sparse gradient
            return "a parameter has no gradient, or a sparse one"
        if addresses != self._grad_addresses:
            for grad, master in zip(flat, self._masters):
                if (grad.dtype != self.grad_dtype or grad.device != self.device or grad.shape != master.shape
                        or grad.stride() != master.stride() or not (grad.is_contiguous() or _dense(grad))):
                    return "a gradient's dtype, device or memory layout differs from its parameter's master"
            table = torch.tensor(addresses or [0], dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self.grad_table = table.to(self.device, non_blocking=True)
            self._grad_addresses = addresses
            self.grads_aligned = not any([a % _ALIGNMENT for a in addresses])
            self.aligned = self.static_aligned and self.grads_aligned
        return None


def _dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots of storage, in any order."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
