"""What a benchmark report must say about where it ran: command, device, versions, date."""
from __future__ import annotations

import datetime
import platform
import shlex
import sys
from typing import Optional

import torch


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's model name (from /proc/cpuinfo where available)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def ampcompat_version() -> Optional[str]:
    """ampcompat's version, or ``None`` when it does not import (the native modes still run)."""
    try:
        import ampcompat  # noqa: PLC0415
    except Exception:
        return None
    return getattr(ampcompat, "__version__", None)


def run_metadata(device: torch.device) -> dict:
    """Command line, date (UTC), device, and the library versions and settings that move the numbers."""
    meta = {
        "command": "python " + " ".join(shlex.quote(arg) for arg in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ampcompat": ampcompat_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["cudnn"] = torch.backends.cudnn.version()
        meta["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return meta
