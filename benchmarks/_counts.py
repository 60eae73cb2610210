"""Deterministic host-work counters: Python function calls and aten ops per training step.

Wall-clock host timings on a shared machine swing by tens of percent between runs; these counts do
not, so they carry comparisons of host overhead between modes (and between versions of a mode).

* :func:`count_calls` counts function calls with ``sys.setprofile`` in the calling thread: ``python``
  (functions written in Python) and ``builtin`` (C functions called from Python), as cProfile counts
  them. Autograd runs backward on the calling thread on the CPU; on CUDA it runs on a device thread,
  so Python code called from backward (hooks) is not counted there.
* :func:`count_aten_ops` counts the aten operators dispatched, with a ``TorchDispatchMode`` (one per
  call, a ``_foreach_*`` over many tensors counting once).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class CallCounts:
    python: float  # per step
    builtin: float  # per step

    @property
    def total(self) -> float:
        return self.python + self.builtin


def count_calls(run_step: Callable[[int], object], steps: int, first: int = 0) -> CallCounts:
    """Python and builtin function calls per step over ``steps`` calls of ``run_step(first + i)``."""
    counts = {"call": 0, "c_call": 0}

    def profile(frame, event, arg):  # noqa: ARG001 - sys.setprofile's signature
        if event in counts:
            counts[event] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        for i in range(steps):
            run_step(first + i)
    finally:
        sys.setprofile(previous)
    # The loop's own calls of run_step (and setprofile's exit) are the same for every mode.
    return CallCounts(python=counts["call"] / steps, builtin=counts["c_call"] / steps)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(run_step: Callable[[int], object], steps: int, first: int = 0) -> float:
    """aten operators dispatched per step over ``steps`` calls of ``run_step(first + i)``."""
    counter = _OpCounter()
    with counter:
        for i in range(steps):
            run_step(first + i)
    return counter.ops / steps
