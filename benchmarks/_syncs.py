"""Count the host syncs a piece of training code makes, honestly.

Two counters run together:

* **CUDA syncs** (CUDA only): PyTorch's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``)
  makes every synchronizing CUDA call inside ATen warn — ``.item()``, ``bool(tensor)``, ``.cpu()`` and
  other device-to-host copies, blocking host-to-device copies such as ``torch.tensor(x, device="cuda")``,
  ``nonzero`` — and the warnings are counted. Explicit ``torch.cuda.synchronize()``,
  ``Stream.synchronize()`` and ``Event.synchronize()`` calls are counted once each as well (whether or not
  the debug mode also reports them).
* **Host reads** (any device): Python-level calls that pull a tensor's value to the host — ``item``,
  ``tolist``, ``bool()``, ``float()``, ``int()``, ``index``, ``numpy`` and, on CUDA, blocking ``cpu()`` /
  ``.to("cpu")`` copies — counted by temporarily wrapping those ``torch.Tensor`` methods. On CUDA only
  tensors off the CPU count. On a CPU-only machine every value read counts, as the proxy for what would
  be a sync on a GPU; device moves are not counted there (they are no-ops on a CPU tensor).
"""
from __future__ import annotations

import collections
import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional

import torch

_SYNC_WARNING = "synchronizing CUDA operation"
_VALUE_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@dataclass
class SyncCount:
    """Totals over the counted region.

    Attributes:
        cuda_syncs: synchronizing CUDA calls (``None`` when the device is not CUDA).
        host_reads: Python-level reads of tensor values into the host.
        host_reads_by_kind: ``host_reads`` split by method name (e.g. ``{"item": 3}``).
    """

    cuda_syncs: Optional[int]
    host_reads: int
    host_reads_by_kind: Dict[str, int] = field(default_factory=dict)


def _blocking_copy_to_cpu(args, kwargs) -> bool:
    positional_flags = [arg for arg in args[1:] if isinstance(arg, bool)]
    if kwargs.get("non_blocking") or (positional_flags and positional_flags[0]):
        return False
    candidates = list(args[:1]) + [kwargs.get("device")]
    for arg in candidates:
        if isinstance(arg, str) and arg.split(":")[0] == "cpu":
            return True
        if isinstance(arg, torch.device) and arg.type == "cpu":
            return True
    return False


@contextlib.contextmanager
def _patched(owner, name: str, replacement) -> Iterator[None]:
    had_own = name in vars(owner)
    original = vars(owner)[name] if had_own else None
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def count_host_syncs(device: torch.device) -> Iterator[SyncCount]:
    """Context manager yielding a :class:`SyncCount` that is filled in when the block exits.

    Args:
        device: the device the counted code trains on; decides whether CUDA syncs are counted and
            whether host reads of CPU tensors count.
    """
    on_cuda = device.type == "cuda"
    reads: collections.Counter = collections.Counter()
    explicit = {"calls": 0, "their_warnings": 0}
    result = SyncCount(cuda_syncs=None, host_reads=0)

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            if not on_cuda or self.device.type != "cpu":
                reads[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    original_to, original_cpu = torch.Tensor.to, torch.Tensor.cpu

    def counting_to(self, *args, **kwargs):
        if self.device.type != "cpu" and _blocking_copy_to_cpu(args, kwargs):
            reads["to(cpu)"] += 1
        return original_to(self, *args, **kwargs)

    def counting_cpu(self, *args, **kwargs):
        if self.device.type != "cpu":
            reads["cpu"] += 1
        return original_cpu(self, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        for name in _VALUE_READS:
            stack.enter_context(_patched(torch.Tensor, name, counting(name, getattr(torch.Tensor, name))))
        log = None
        if on_cuda:
            stack.enter_context(_patched(torch.Tensor, "to", counting_to))
            stack.enter_context(_patched(torch.Tensor, "cpu", counting_cpu))
            log = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")

            def explicit_sync(original: Callable) -> Callable:
                def wrapper(*args, **kwargs):
                    before = len(log)
                    try:
                        return original(*args, **kwargs)
                    finally:
                        explicit["calls"] += 1
                        explicit["their_warnings"] += sum(
                            _SYNC_WARNING in str(w.message) for w in log[before:])

                return wrapper

            stack.enter_context(_patched(torch.cuda, "synchronize", explicit_sync(torch.cuda.synchronize)))
            for cls in (torch.cuda.Stream, torch.cuda.Event):
                stack.enter_context(_patched(cls, "synchronize", explicit_sync(cls.synchronize)))
            previous_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, previous_mode)
        yield result
        if on_cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
            warned = sum(_SYNC_WARNING in str(w.message) for w in log)
            result.cuda_syncs = warned - explicit["their_warnings"] + explicit["calls"]
    result.host_reads = sum(reads.values())
    result.host_reads_by_kind = dict(reads)
