"""Triton kernels of the fused O2 step.

``nonfinite_kernel`` reads the scaled gradients and raises an overflow flag (it writes nothing else);
``adam_kernel`` and ``sgd_kernel`` read a half (or FP32) gradient, unscale it, update the FP32 master and
the optimizer's state, and write the half model weight, all in one pass over memory.

Every kernel is multi-tensor. Program ``i`` reads row ``i`` of a chunk table (tensor index, chunk index)
and that tensor's addresses from int64 tables of ``data_ptr()`` values (see ``plan.py``), so one launch
covers any number of tensors. Blocks that lie wholly inside a tensor are read and written without a mask,
and with ``ALIGNED`` the compiler is told every address is 16-byte aligned, so those accesses are 16-byte
vectors.

The arithmetic follows torch's fused CUDA kernels (``torch._fused_adam_``/``_fused_adamw_``,
``torch._fused_sgd_``) operation for operation: double precision where they compute in double, IEEE
division and square root where they compute in float, bias corrections rounded to float as they are.
The unscale is a float multiply by the inverse scale, as ``GradScaler.unscale_`` does before those
kernels run on already unscaled gradients.

This module imports Triton: only ``launch.py`` imports it, on the first fused step.
"""
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Columns of the tensor table: one int64 row per tensor (see plan.py).
_ROW = tl.constexpr(6)
_MASTER = tl.constexpr(0)
_STATE_A = tl.constexpr(1)  # Adam: exp_avg; SGD: momentum_buffer
_STATE_B = tl.constexpr(2)  # Adam: exp_avg_sq
_MODEL = tl.constexpr(3)  # the half model weight (0 when there is none)
_STEP = tl.constexpr(4)  # Adam: the address of the float32 ``step`` tensor on the device
_NUMEL = tl.constexpr(5)

_EXPONENT_BITS = tl.constexpr(0x7F800000)  # float32: all ones means inf or NaN


@triton.jit
def _address(table, index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    pointer = tl.load(table + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _pow(base, exponent, LIBDEVICE: tl.constexpr):
    # CUDA's pow(double, double) is libdevice's; Triton's interpreter has no libdevice.
    if LIBDEVICE:
        return libdevice.pow(base, exponent)
    else:
        return tl.exp(exponent * tl.log(base))


@triton.jit
def _chunk(chunks, tensors):
    """This program's tensor (index, table row, numel) and the element range [start, stop) of its chunk."""
    program = tl.program_id(0)
    tensor = tl.load(chunks + 2 * program)
    chunk = tl.load(chunks + 2 * program + 1)
    row = tensors + tensor.to(tl.int64) * _ROW
    numel = tl.load(row + _NUMEL)
    return tensor, row, numel, chunk


@triton.jit
def _nonfinite_block(grad, offset, count, inv_scale, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    if MASKED:
        g = tl.load(grad + offset + lanes, mask=lanes < count, other=0.0)
    else:
        g = tl.load(grad + offset + lanes)
    g = g.to(tl.float32) * inv_scale
    return ((g.to(tl.int32, bitcast=True) & _EXPONENT_BITS) == _EXPONENT_BITS).to(tl.int32)


@triton.jit
def nonfinite_kernel(tensors, grads, chunks, inv_scale_ptr, found_inf_ptr,
                     GRAD: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``found_inf = 1.0`` if any ``grad * inv_scale`` (in float) is inf or NaN; the grads are only read."""
    tensor, row, numel, chunk = _chunk(chunks, tensors)
    grad = _address(grads, tensor, GRAD, ALIGNED)
    inv_scale = tl.load(inv_scale_ptr)
    start = chunk.to(tl.int64) * CHUNK
    stop = tl.minimum(numel, start + CHUNK)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, CHUNK // BLOCK):
        offset = tl.multiple_of(start + i * BLOCK, BLOCK)
        if offset + BLOCK <= stop:
            bad |= _nonfinite_block(grad, offset, BLOCK, inv_scale, False, BLOCK)
        elif offset < stop:
            bad |= _nonfinite_block(grad, offset, stop - offset, inv_scale, True, BLOCK)
    if tl.max(bad, axis=0) != 0:
        tl.store(found_inf_ptr, 1.0)


@triton.jit
def _adam_block(master, exp_avg, exp_avg_sq, model, grad, offset, count, inv_scale, lr, beta1, beta2, eps,
                weight_decay, lr_wd, step_size, bias_correction2_sqrt,
                MASKED: tl.constexpr, WRITE_MODEL: tl.constexpr, DECOUPLED: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < count if MASKED else None
    p = tl.load(master + offset + lanes, mask=mask)
    g = tl.load(grad + offset + lanes, mask=mask).to(tl.float32) * inv_scale
    m = tl.load(exp_avg + offset + lanes, mask=mask)
    v = tl.load(exp_avg_sq + offset + lanes, mask=mask)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED:
            p64 = p.to(tl.float64)
            p = (p64 - lr_wd * p64).to(tl.float32)
        else:
            g = (g.to(tl.float64) + p.to(tl.float64) * weight_decay).to(tl.float32)
    g64 = g.to(tl.float64)
    m = (beta1 * m.to(tl.float64) + (1.0 - beta1) * g64).to(tl.float32)
    v = (beta2 * v.to(tl.float64) + (1.0 - beta2) * g64 * g64).to(tl.float32)
    denom = (tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt).to(tl.float64) + eps).to(tl.float32)
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(master + offset + lanes, p, mask=mask)
    tl.store(exp_avg + offset + lanes, m, mask=mask)
    tl.store(exp_avg_sq + offset + lanes, v, mask=mask)
    if WRITE_MODEL:
        tl.store(model + offset + lanes, p.to(model.dtype.element_ty), mask=mask)


@triton.jit
def adam_kernel(tensors, grads, chunks, done, host_steps, inv_scale_ptr, found_inf_ptr,
                lr: tl.float64, beta1: tl.float64, beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
                GRAD: tl.constexpr, MODEL: tl.constexpr, WRITE_MODEL: tl.constexpr, DECOUPLED: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ON_INF: tl.constexpr,
                DEVICE_STEPS: tl.constexpr, ALIGNED: tl.constexpr, LIBDEVICE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One Adam/AdamW step of one chunk of one tensor, as torch's fused kernel computes it.

    ``DEVICE_STEPS``: each tensor's ``step`` is a float32 device tensor; every program reads it and uses
    ``step + 1``, and the tensor's last program to finish (counted in ``done``) stores ``step + 1`` and
    resets its counter. Otherwise ``host_steps[tensor]`` holds the step, already advanced on the host.
    With ``SKIP_ON_INF`` a nonzero ``found_inf`` leaves everything, step counts included, untouched.
    """
    if SKIP_ON_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return
    tensor, row, numel, chunk = _chunk(chunks, tensors)
    master = _address(row, _MASTER, tl.float32, ALIGNED)
    exp_avg = _address(row, _STATE_A, tl.float32, ALIGNED)
    exp_avg_sq = _address(row, _STATE_B, tl.float32, ALIGNED)
    model = _address(row, _MODEL, MODEL, ALIGNED)
    grad = _address(grads, tensor, GRAD, ALIGNED)
    if DEVICE_STEPS:
        step_ptr = tl.load(row + _STEP).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr) + 1.0
    else:
        step = tl.load(host_steps + tensor)
    step64 = step.to(tl.float64)
    bias_correction1 = (1.0 - _pow(beta1, step64, LIBDEVICE)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - _pow(beta2, step64, LIBDEVICE)).to(tl.float32)  # f64: IEEE
    step_size = (lr / bias_correction1.to(tl.float64)).to(tl.float32)
    inv_scale = tl.load(inv_scale_ptr)
    lr_wd = lr * weight_decay

    start = chunk.to(tl.int64) * CHUNK
    stop = tl.minimum(numel, start + CHUNK)
    for i in range(0, CHUNK // BLOCK):
        offset = tl.multiple_of(start + i * BLOCK, BLOCK)
        if offset + BLOCK <= stop:
            _adam_block(master, exp_avg, exp_avg_sq, model, grad, offset, BLOCK, inv_scale, lr, beta1, beta2, eps,
                        weight_decay, lr_wd, step_size, bias_correction2_sqrt,
                        False, WRITE_MODEL, DECOUPLED, MAXIMIZE, HAS_WD, BLOCK)
        elif offset < stop:
            _adam_block(master, exp_avg, exp_avg_sq, model, grad, offset, stop - offset, inv_scale, lr, beta1, beta2, eps,
                        weight_decay, lr_wd, step_size, bias_correction2_sqrt,
                        True, WRITE_MODEL, DECOUPLED, MAXIMIZE, HAS_WD, BLOCK)

    if DEVICE_STEPS:
        chunks_of_tensor = tl.maximum(tl.cdiv(numel, CHUNK), 1)
        finished = tl.atomic_add(done + tensor, 1, sem="acq_rel") + 1
        if finished == chunks_of_tensor:  # every program of this tensor has read the old step
            tl.store(step_ptr, step)
            tl.store(done + tensor, 0)


@triton.jit
def _sgd_block(master, buf, model, grad, offset, count, inv_scale, lr, momentum, dampening, weight_decay,
               MASKED: tl.constexpr, WRITE_MODEL: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
               BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < count if MASKED else None
    p = tl.load(master + offset + lanes, mask=mask)
    g = tl.load(grad + offset + lanes, mask=mask).to(tl.float32) * inv_scale
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = (g.to(tl.float64) + weight_decay * p.to(tl.float64)).to(tl.float32)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            b64 = g.to(tl.float64)
        else:
            b64 = momentum * tl.load(buf + offset + lanes, mask=mask).to(tl.float64) + (1.0 - dampening) * g.to(tl.float64)
        tl.store(buf + offset + lanes, b64.to(tl.float32), mask=mask)
        if NESTEROV:
            g = (g.to(tl.float64) + momentum * b64).to(tl.float32)
        else:
            g = b64.to(tl.float32)
    p = (p.to(tl.float64) - lr * g.to(tl.float64)).to(tl.float32)
    tl.store(master + offset + lanes, p, mask=mask)
    if WRITE_MODEL:
        tl.store(model + offset + lanes, p.to(model.dtype.element_ty), mask=mask)


@triton.jit
def sgd_kernel(tensors, grads, chunks, inv_scale_ptr, found_inf_ptr,
               lr: tl.float64, momentum: tl.float64, dampening: tl.float64, weight_decay: tl.float64,
               GRAD: tl.constexpr, MODEL: tl.constexpr, WRITE_MODEL: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
               SKIP_ON_INF: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One SGD step (momentum, dampening, Nesterov, weight decay) of one chunk, as torch's fused kernel.

    ``FIRST_STEP``: the momentum buffers are new and take the gradient, as torch's first step does.
    """
    if SKIP_ON_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return
    tensor, row, numel, chunk = _chunk(chunks, tensors)
    master = _address(row, _MASTER, tl.float32, ALIGNED)
    buf = _address(row, _STATE_A, tl.float32, ALIGNED)
    model = _address(row, _MODEL, MODEL, ALIGNED)
    grad = _address(grads, tensor, GRAD, ALIGNED)
    inv_scale = tl.load(inv_scale_ptr)
    start = chunk.to(tl.int64) * CHUNK
    stop = tl.minimum(numel, start + CHUNK)
    for i in range(0, CHUNK // BLOCK):
        offset = tl.multiple_of(start + i * BLOCK, BLOCK)
        if offset + BLOCK <= stop:
            _sgd_block(master, buf, model, grad, offset, BLOCK, inv_scale, lr, momentum, dampening, weight_decay,
                       False, WRITE_MODEL, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WD, BLOCK)
        elif offset < stop:
            _sgd_block(master, buf, model, grad, offset, stop - offset, inv_scale, lr, momentum, dampening, weight_decay,
                       True, WRITE_MODEL, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WD, BLOCK)


TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PLACEHOLDER_DTYPE = tl.float16  # the model weight's type where none is written
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter runs the kernels
