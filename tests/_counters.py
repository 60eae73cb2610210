"""``benchmarks/_counts.py`` (Python calls and aten ops per step), loaded by path for the tests that pin host
work: tests/ has modules of the benchmarks' short names, so it cannot be imported by name."""
import importlib.util
import sys
from pathlib import Path


def _load():
    spec = importlib.util.spec_from_file_location(
        "_bench_counts", Path(__file__).resolve().parent.parent / "benchmarks" / "_counts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


_counts = _load()
count_aten_ops, count_calls = _counts.count_aten_ops, _counts.count_calls
