"""A stand-in for the fused O2 kernels, so the fused step's host side runs on the CPU without Triton.

``install(monkeypatch)`` makes ``fused_o2.coverage`` answer that the kernels can run on every device and
puts a module of stub kernels where ``fused_o2.launch`` looks for Triton's: each launch is recorded and
changes nothing (the kernels' arithmetic is tested under Triton's interpreter and on CUDA). With
``fail_compile`` the stubs raise it when asked to compile (Triton's ``warmup``), as a machine without a C
compiler for Triton's launcher would. Used to count the host work of the fused path, to pin which path
each pattern takes, and to inject kernel failures.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch

from ampcompat.amp.fused_o2 import coverage, launch


class StubKernel:
    """``kernel[grid](*args, **options)`` records a launch; ``kernel.warmup(...)`` compiles (or fails)."""

    def __init__(self, name: str, launches: List[str], fail_compile: Optional[BaseException]) -> None:
        self.name = name
        self.launches = launches
        self.fail_compile = fail_compile

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **options) -> None:
        self.launches.append(self.name)

    def warmup(self, *args, grid, **options) -> None:
        if self.fail_compile is not None:
            raise self.fail_compile


def install(monkeypatch, fail_compile: Optional[BaseException] = None,
            failing: tuple = ("nonfinite_kernel", "adam_kernel", "sgd_kernel")) -> List[str]:
    """Stub the kernels for the rest of the test; returns the list the launches are recorded in.

    Args:
        fail_compile: raised by the ``failing`` kernels' compilation (the launcher compiles first only
            outside the interpreter, so the stub module then says it is not interpreted).
    """
    launches: List[str] = []
    module = types.SimpleNamespace(
        TRITON_DTYPES={torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"},
        PLACEHOLDER_DTYPE="fp16", INTERPRETED=fail_compile is None,
        **{name: StubKernel(name, launches, fail_compile if name in failing else None)
           for name in ("nonfinite_kernel", "adam_kernel", "sgd_kernel")})
    monkeypatch.setattr(launch, "_kernels", module)
    monkeypatch.setattr(coverage, "unavailable_reason", lambda device: coverage.failure_reason())
    monkeypatch.setattr(coverage, "_failure", None)
    return launches
