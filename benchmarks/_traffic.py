"""Memory traffic of the O2 optimizer phase: the bytes each pipeline must move, and the copy bandwidth to
compare them with. Shared by ``speed.py`` (the optimizer phase of a whole training step) and
``fused_o2_step.py`` (the phase alone), so both count alike.

Bytes per parameter and step with AdamW, reads + writes, each stage one pass over its tensors:

    manual_o2 / O2_unfused, half param: copy the fp16 grad into an FP32 master grad 2+4, unscale 4+4,
        fused AdamW on the master (grad, master, exp_avg, exp_avg_sq) 16+12, master -> fp16 weight 4+2 = 48
    manual_o2 / O2_unfused, FP32 param (BatchNorm): unscale 4+4, AdamW 16+12 = 36
    O2 (fused step), half param: read-only overflow check 2, one kernel (2+4+4+4) + (4+4+4+2) = 30
    O2 (fused step), FP32 param: unscaled in place 4+4 (as the unfused path), the kernel 16+12 = 36
    fused (``fused_o2_step.py``'s kernels alone), FP32 param: check 4, kernel 16+12 = 32
    pure_fp16 (no masters): fused AdamW on the fp16 tensors 8+6 = 14; FP32 param 28

Other optimizers (SGD's several foreach passes) have no single count: None.
"""
from __future__ import annotations

import statistics
from typing import Iterable, Optional

import torch

#: ``variant -> (bytes per half parameter, bytes per FP32 parameter)`` for AdamW (see the module docstring).
ADAMW_BYTES_PER_PARAM = {
    "manual_o2": (48, 36),
    "O2_unfused": (48, 36),
    "O2": (30, 36),
    "fused": (30, 32),
    "pure_fp16": (14, 28),
}


def optimizer_bytes(params: Iterable[torch.Tensor], variant: str, adamw: bool = True) -> Optional[float]:
    """Bytes ``variant``'s optimizer phase must read and write per step over ``params`` (the model's trainable
    parameters: half ones and FP32 ones); None for a variant or optimizer without a count."""
    per = ADAMW_BYTES_PER_PARAM.get(variant) if adamw else None
    if per is None:
        return None
    per_half, per_fp32 = per
    return float(sum(p.numel() * (per_fp32 if p.dtype == torch.float32 else per_half) for p in params))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[3:])
