"""``python -m ampcompat doctor``: what this environment offers mixed-precision training.

Reports the Python, torch and ampcompat versions; every device torch can use, with the autocast
dtypes that actually work there (found by running one small matmul under ``torch.autocast``, not by
reading tables); which ``fused=True`` optimizers and fused AMP kernels run on each device; and
whether a real NVIDIA Apex is installed, which of its modules exist, and whether it imports.

Apex is located without importing it (``PathFinder`` over ``sys.path``, which also ignores
ampcompat's own import alias); the import itself is tried in a separate Python process, so an Apex
that crashes on import (``torch._six``, a missing CUDA extension) cannot take this report down.

Every check reads as ``{"status": "ok"}`` or ``{"status": "missing" | "fails", "reason": ...}`` in the
JSON report. torch is imported only once the report is made, so ``doctor --help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from .._version import __version__

if TYPE_CHECKING:
    import torch

# One check's outcome: {"status": "ok"}, or {"status": "missing" | "fails", "reason": "RuntimeError: ..."}.
Check = Dict[str, str]

_AUTOCAST_DTYPES = ("float16", "bfloat16")
_FUSED_OPTIMIZERS = ("Adam", "AdamW", "SGD", "Adagrad")
_APEX_SUBPACKAGES = ("amp", "fp16_utils", "parallel", "optimizers", "normalization", "multi_tensor_apply",
                     "contrib", "transformer")
_APEX_EXTENSIONS = ("amp_C", "apex_C", "fused_layer_norm_cuda", "syncbn")
_REMOVED_FROM_APEX = ("amp", "fp16_utils", "parallel")
_IMPORT_TIMEOUT_S = 120
_IMPORT_PROBE = (
    "import importlib, json, sys\n"
    "result = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        importlib.import_module(name)\n"
    "        result[name] = {'status': 'ok'}\n"
    "    except BaseException as exc:\n"
    "        result[name] = {'status': 'fails', 'reason': type(exc).__name__ + ': ' + str(exc)}\n"
    "print(json.dumps(result))\n"
)


@dataclass
class DeviceReport:
    """One device: its name and what mixed precision can use there."""

    device: str
    name: str
    autocast_dtypes: List[str]
    fused_optimizers: Dict[str, Check]
    fused_amp_kernels: Check


@dataclass
class ApexReport:
    """What is installed under the name ``apex``.

    Attributes:
        location: the package folder, or ``None`` if no ``apex`` is installed.
        nvidia: whether it is NVIDIA's Apex (it has one of Apex's subpackages).
        modules: Apex's subpackages and extension modules -> whether they exist on disk.
        imports: module -> ``{"status": "ok"}`` or ``{"status": "fails", "reason": the error}``.
    """

    location: Optional[str] = None
    nvidia: bool = False
    modules: Dict[str, bool] = field(default_factory=dict)
    imports: Dict[str, Check] = field(default_factory=dict)


@dataclass
class Diagnosis:
    """Everything ``doctor`` reports."""

    ampcompat: str
    python: str
    torch: str
    torch_cuda: Optional[str]
    devices: List[DeviceReport]
    apex: ApexReport


def _devices() -> List[torch.device]:
    import torch

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(torch.device("mps"))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [torch.device("xpu", index) for index in range(xpu.device_count())]
    return devices


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if device.type == "cpu":
        return platform.processor() or platform.machine()
    return device.type


def _autocast_dtypes(device: torch.device) -> List[str]:
    """The dtypes a matmul under ``torch.autocast(device.type, dtype)`` really produces."""
    import torch

    working = []
    for name in _AUTOCAST_DTYPES:
        dtype = getattr(torch, name)
        try:
            a = torch.ones(4, 4, device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns, then disables autocast, for an unsupported dtype
                with torch.autocast(device.type, dtype=dtype):
                    produced = torch.mm(a, a).dtype
        except (RuntimeError, ValueError, TypeError):
            continue
        if produced == dtype:
            working.append(name)
    return working


def _fused_optimizers(device: torch.device) -> Dict[str, Check]:
    """Optimizer name -> whether a ``fused=True`` step runs on ``device`` (the error it raised if not)."""
    import torch

    results: Dict[str, Check] = {}
    for name in _FUSED_OPTIMIZERS:
        try:
            param = torch.nn.Parameter(torch.ones(4, device=device))
            param.grad = torch.ones(4, device=device)
            getattr(torch.optim, name)([param], lr=0.1, fused=True).step()
            results[name] = _check("ok")
        except Exception as exc:  # each torch version words its refusals differently
            results[name] = _check("missing", _first_line(exc))
    return results


def _fused_amp_kernels(device: torch.device) -> Check:
    """Whether the fused unscale/inf-check kernel GradScaler and ampcompat use runs on ``device``."""
    import torch

    from .. import _torch_compat

    try:
        found_inf = torch.zeros(1, device=device)
        grads = [torch.tensor([1.0, float("inf")], device=device)]
        _torch_compat.amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones(1, device=device))
        if found_inf.item() != 1.0:
            return _check("missing", "the kernel ran but did not flag an inf")
    except Exception as exc:  # missing kernel: NotImplementedError, RuntimeError or AttributeError
        return _check("missing", _first_line(exc))
    return _check("ok")


def _check(status: str, reason: str = "") -> Check:
    return {"status": status, "reason": reason} if reason else {"status": status}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def find_apex(run_import: Callable[[Sequence[str]], Dict[str, Check]]) -> ApexReport:
    """Locate an installed ``apex`` and its modules without importing it, then try the imports.

    Args:
        run_import: imports the given module names in a fresh process and returns name -> outcome.
    """
    spec = importlib.machinery.PathFinder.find_spec("apex")
    if spec is None or not spec.submodule_search_locations:
        return ApexReport()
    locations = list(spec.submodule_search_locations)
    report = ApexReport(location=locations[0])
    for name in _APEX_SUBPACKAGES:
        report.modules[name] = importlib.machinery.PathFinder.find_spec(f"apex.{name}", locations) is not None
    report.nvidia = any(report.modules[name] for name in _APEX_SUBPACKAGES)
    for name in _APEX_EXTENSIONS:
        report.modules[name] = importlib.machinery.PathFinder.find_spec(name) is not None
    wanted = ["apex"] + [f"apex.{name}" for name in _APEX_SUBPACKAGES if report.modules[name]]
    report.imports = run_import(wanted)
    return report


def _import_in_subprocess(names: Sequence[str]) -> Dict[str, Check]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
    env.pop("AMPCOMPAT_APEX_ALIAS", None)  # the real Apex, not ampcompat's stand-in
    try:
        proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *names], env=env, capture_output=True,
                              text=True, timeout=_IMPORT_TIMEOUT_S)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {name: _check("fails", f"importing took longer than {_IMPORT_TIMEOUT_S} s") for name in names}
    except (ValueError, IndexError):  # the process died before printing (e.g. a crash in a CUDA extension)
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {name: _check("fails", tail) for name in names}


def diagnose(run_import: Callable[[Sequence[str]], Dict[str, Check]] = _import_in_subprocess) -> Diagnosis:
    """Collect the report (runs a few tiny ops on every device)."""
    import torch

    devices = [
        DeviceReport(str(device), _device_name(device), _autocast_dtypes(device), _fused_optimizers(device),
                     _fused_amp_kernels(device))
        for device in _devices()
    ]
    return Diagnosis(__version__, platform.python_version(), torch.__version__, torch.version.cuda, devices,
                     find_apex(run_import))


def render_text(diagnosis: Diagnosis) -> str:
    """The human-readable report."""
    cuda = f"CUDA {diagnosis.torch_cuda}" if diagnosis.torch_cuda else "no CUDA in this build"
    lines = [f"ampcompat {diagnosis.ampcompat}, Python {diagnosis.python}, torch {diagnosis.torch} ({cuda})", ""]
    lines.append("Devices:")
    for device in diagnosis.devices:
        lines.append(f"  {device.device}: {device.name}")
        lines.append(f"    autocast dtypes: {', '.join(device.autocast_dtypes) or 'none'}")
        fused = [name for name, check in device.fused_optimizers.items() if _passed(check)]
        lines.append(f"    fused optimizers (fused=True): {', '.join(fused) or 'none'}")
        for name, check in device.fused_optimizers.items():
            if not _passed(check):
                lines.append(f"      {name}: unavailable ({check['reason']})")
        kernels = device.fused_amp_kernels
        lines.append("    fused AMP unscale/inf-check kernel: "
                     + ("available" if _passed(kernels) else f"unavailable ({kernels['reason']})"))
    if not any(device.device.startswith("cuda") for device in diagnosis.devices):
        lines.append("  cuda: " + ("no GPU found" if diagnosis.torch_cuda else "this torch build has no CUDA"))
    lines += [""] + _apex_lines(diagnosis.apex)
    return "\n".join(lines) + "\n"


def _apex_lines(apex: ApexReport) -> List[str]:
    if apex.location is None:
        return ["NVIDIA Apex: not installed (ampcompat stands in for it: `python -m ampcompat run script.py`)"]
    if not apex.nvidia:
        return [f"apex: {apex.location} is not NVIDIA Apex (it has none of Apex's subpackages; `pip install apex` "
                "installs an unrelated 2013 package of that name)"]
    lines = [f"NVIDIA Apex: {apex.location}"]
    lines.append("  import apex: " + _import_outcome(apex.imports["apex"], works="works", fails="fails: "))
    for name in _APEX_SUBPACKAGES:
        module = f"apex.{name}"
        if not apex.modules.get(name):
            removed = name in _REMOVED_FROM_APEX
            state = "missing (removed from Apex in 2025; ampcompat provides it)" if removed else "missing"
        else:
            state = _import_outcome(apex.imports[module], works="imports", fails="present, import fails: ")
        lines.append(f"  {module}: {state}")
    for name in _APEX_EXTENSIONS:
        lines.append(f"  {name} (compiled extension): {'present' if apex.modules.get(name) else 'missing'}")
    return lines


def _passed(check: Check) -> bool:
    return check["status"] == "ok"


def _import_outcome(check: Check, works: str, fails: str) -> str:
    return works if _passed(check) else fails + check["reason"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``doctor``.

    Args:
        argv: the arguments after ``doctor`` (default: ``sys.argv[1:]``).

    Returns:
        0 (the report is informational), 2 for a usage error.
    """
    parser = argparse.ArgumentParser(prog="python -m ampcompat doctor",
                                     description="Report torch, devices, autocast dtypes, fused kernels and Apex.")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    diagnosis = diagnose()
    if args.format == "json":
        sys.stdout.write(json.dumps(asdict(diagnosis), indent=2) + "\n")
    else:
        sys.stdout.write(render_text(diagnosis))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
