"""``benchmarks/_counts.py`` (Python calls and aten ops per step) and ``benchmarks/_syncs.py`` (host syncs),
loaded by path for the tests that pin host work: tests/ has modules of the benchmarks' short names, so
they cannot be imported by name."""
import importlib.util
import sys
from pathlib import Path


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        "_bench" + name, Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


_counts = _load("_counts")
count_aten_ops, count_calls = _counts.count_aten_ops, _counts.count_calls
count_host_syncs = _load("_syncs").count_host_syncs
