"""Twin runs for the fused O2 kernels: the fused step against O2 written by hand in plain PyTorch.

The reference is the hand-written O2 pipeline: half gradients copied into FP32 master gradients,
``torch.amp.GradScaler.unscale_`` (check + unscale), torch's own optimizer on the masters (``fused=True``
unless asked otherwise) through ``GradScaler.step``/``update``, masters copied back to the half weights.
The fused side runs ``check_finite_`` and ``fused_adam_step``/``fused_sgd_step`` on copies of the same
tensors with the same gradients, and keeps its loss scale with ``torch._amp_update_scale_`` (the op
``GradScaler.update`` uses), so both see the same scale at every step.

Gradients are synthetic (``randn * scale`` rounded to the gradient dtype, drawn from a seeded generator),
so a difference never feeds back into later gradients. Overflows come from chosen steps (an inf or a NaN
written into one gradient) and from the scale itself: it grows every few clean steps until ``randn *
scale`` overflows FP16.

Imported by tests/test_fused_o2_kernels.py; run as a script under ``TRITON_INTERPRET=1`` it runs the
CPU scenarios of :data:`INTERPRETER_SCENARIOS` with Triton's interpreter and prints ``ok`` per scenario.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ampcompat.amp import fused_o2


@dataclass
class Param:
    """One parameter of a twin run: its shape, kind (``half``: FP32 master + half model weight; ``fp32``:
    an FP32 parameter stepped in place, as O2 keeps BatchNorm), param group and layout."""

    shape: Tuple[int, ...]
    kind: str = "half"
    group: int = 0
    channels_last: bool = False
    unaligned_grad: bool = False  # the gradient is a view 2 bytes into a larger buffer


@dataclass
class Twin:
    """A twin run's setup; ``hyper`` holds one dict of optimizer options per param group."""

    optimizer: str  # "adamw", "adam" or "sgd"
    params: List[Param]
    hyper: List[Dict]
    steps: int = 200
    half_dtype: torch.dtype = torch.float16
    reference_impl: str = "fused"  # or "foreach" (torch's default Adam: CPU step counts)
    inject: Dict[int, str] = field(default_factory=lambda: {5: "inf", 11: "nan", 12: "inf", 40: "nan"})
    init_scale: float = 2.0 ** 10
    growth_interval: int = 6
    scaling: bool = True  # False: no loss scale, no check (bf16 O5)
    lr_decay: float = 0.995  # the lr of every group changes every step, as under an LR scheduler
    chunk: int = fused_o2.plan.DEFAULT_CHUNK
    block: int = fused_o2.plan.DEFAULT_BLOCK
    rtol: float = 2e-5  # FP32 rounding, accumulated over the run
    seed: int = 0


@dataclass
class Result:
    skipped: int = 0
    compared: int = 0
    bitwise_equal: int = 0
    max_rel_diff: float = 0.0


def _initial_params(twin: Twin, device: str) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(twin.seed)
    out = []
    for p in twin.params:
        value = torch.randn(p.shape, generator=generator).to(device)
        if p.channels_last:
            value = value.contiguous(memory_format=torch.channels_last)
        out.append(value)
    return out


def _reference_optimizer(twin: Twin, masters: List[torch.Tensor]) -> torch.optim.Optimizer:
    groups = [dict(hyper, params=[m for m, p in zip(masters, twin.params) if p.group == g])
              for g, hyper in enumerate(twin.hyper)]
    impl = {"fused": True} if twin.reference_impl == "fused" else {"foreach": True}
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[twin.optimizer]
    return cls(groups, **impl)


def _zero_state(twin: Twin, master: torch.Tensor, device_steps: bool) -> Dict[str, torch.Tensor]:
    """What torch's Adam creates at its first step (the fused side's state starts the same)."""
    step = torch.zeros((), dtype=torch.float32, device=master.device) if device_steps else torch.tensor(0.0)
    return {"step": step, "exp_avg": torch.zeros_like(master, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(master, memory_format=torch.preserve_format)}


class _FusedSide:
    """The fused O2 step on its own copies of the masters, state and half weights: one plan per kind."""

    def __init__(self, twin: Twin, initial: List[torch.Tensor], device: str) -> None:
        self.twin = twin
        self.masters = [t.clone() for t in initial]
        self.model = [m.to(twin.half_dtype) if p.kind == "half" else m for m, p in zip(self.masters, twin.params)]
        device_steps = twin.reference_impl == "fused"
        self.state = [_zero_state(twin, m, device_steps) if twin.optimizer != "sgd" else {} for m in self.masters]
        self.plans: Dict[str, fused_o2.FusedPlan] = {}
        for kind, grad_dtype in (("half", twin.half_dtype), ("fp32", torch.float32)):
            groups = []
            for g in range(len(twin.hyper)):
                idx = self.indices(kind, g)
                masters = [self.masters[i] for i in idx]
                model = [self.model[i] for i in idx] if kind == "half" else None
                if twin.optimizer == "sgd":
                    buffers = [None] * len(idx) if twin.hyper[g].get("momentum", 0) else None
                    groups.append(fused_o2.SGDTensors(masters, buffers, model))
                else:
                    groups.append(fused_o2.AdamTensors(
                        masters, [self.state[i]["exp_avg"] for i in idx], [self.state[i]["exp_avg_sq"] for i in idx],
                        [self.state[i]["step"] for i in idx], model))
            if any(group.masters for group in groups):
                self.plans[kind] = fused_o2.FusedPlan(groups, grad_dtype, chunk=twin.chunk, block=twin.block,
                                                      steps_on_host=twin.reference_impl != "fused")
        self.scale = torch.full((1,), twin.init_scale, dtype=torch.float32, device=device)
        self.tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)

    def indices(self, kind: str, group: int) -> List[int]:
        return [i for i, p in enumerate(self.twin.params) if p.kind == kind and p.group == group]

    def snapshot(self) -> List[torch.Tensor]:
        tensors = self.masters + self.model + [t for s in self.state for t in s.values()]
        for plan in self.plans.values():
            tensors += [b for g in range(len(plan.groups)) for b in (plan.momentum_buffers(g) or [])]
        return [t.clone() for t in tensors]

    def step(self, grads: List[torch.Tensor], hyper: Sequence[Dict]) -> bool:
        """One fused step; returns whether it was skipped for an overflow."""
        for kind, plan in self.plans.items():
            reason = plan.set_grads([[grads[i] for i in self.indices(kind, g)] for g in range(len(hyper))])
            assert reason is None, reason
        if not self.twin.scaling:
            inv_scale = torch.ones(1, dtype=torch.float32, device=self.scale.device)
            self._launch(hyper, inv_scale, None)
            return False
        self.found_inf.zero_()
        inv_scale = self.scale.double().reciprocal().float()  # GradScaler.unscale_'s inverse
        for plan in self.plans.values():
            fused_o2.check_finite_(plan, inv_scale, self.found_inf)
        found = bool(self.found_inf.item())
        host_verdict = self.twin.reference_impl != "fused" or any(
            any(plan.first_step_pending) for plan in self.plans.values())
        before = self.snapshot() if found else None
        if not (host_verdict and found):
            self._launch(hyper, inv_scale, None if host_verdict else self.found_inf)
        torch._amp_update_scale_(self.scale, self.tracker, self.found_inf, 2.0, 0.5, self.twin.growth_interval)
        if found:
            after = self.snapshot()
            assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changed a tensor"
        return found

    def _launch(self, hyper, inv_scale, found_inf) -> None:
        for plan in self.plans.values():
            if self.twin.optimizer == "sgd":
                fused_o2.fused_sgd_step(plan, hyper, inv_scale=inv_scale, found_inf=found_inf)
            else:
                fused_o2.fused_adam_step(plan, hyper, decoupled=self.twin.optimizer == "adamw",
                                         inv_scale=inv_scale, found_inf=found_inf)

    def momentum_buffer(self, index: int) -> Optional[torch.Tensor]:
        kind, group = self.twin.params[index].kind, self.twin.params[index].group
        plan = self.plans[kind]
        buffers = plan.momentum_buffers(group)
        return None if buffers is None else buffers[self.indices(kind, group).index(index)]


class _ReferenceSide:
    """O2 by hand: FP32 masters stepped by torch's optimizer through GradScaler, copied to half weights."""

    def __init__(self, twin: Twin, initial: List[torch.Tensor], device: str) -> None:
        self.twin = twin
        self.masters = [t.clone().requires_grad_(True) for t in initial]
        self.model = [m.detach().to(twin.half_dtype) if p.kind == "half" else m
                      for m, p in zip(self.masters, twin.params)]
        self.optimizer = _reference_optimizer(twin, self.masters)
        self.scaler = torch.amp.GradScaler(device, init_scale=twin.init_scale, growth_interval=twin.growth_interval,
                                           enabled=twin.scaling)
        self.scaler.scale(torch.zeros((), device=device))  # GradScaler makes its scale tensor on first use

    def step(self, grads: List[torch.Tensor]) -> None:
        for master, grad, p in zip(self.masters, grads, self.twin.params):
            master.grad = torch.empty_like(master) if p.kind == "half" else grad.clone()
        half = [(m.grad, g) for m, g, p in zip(self.masters, grads, self.twin.params) if p.kind == "half"]
        if half:
            torch._foreach_copy_([d for d, _ in half], [s for _, s in half])
        self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        pairs = [(w, m) for w, m, p in zip(self.model, self.masters, self.twin.params) if p.kind == "half"]
        with torch.no_grad():
            if pairs:
                torch._foreach_copy_([w for w, _ in pairs], [m for _, m in pairs])
        for master in self.masters:
            master.grad = None

    def scale(self) -> float:
        return float(self.scaler.get_scale()) if self.twin.scaling else 1.0


def _grads(twin: Twin, step: int, scale: float, device: str) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 + twin.seed * 1000 + step)
    grads = []
    for i, p in enumerate(twin.params):
        dtype = twin.half_dtype if p.kind == "half" else torch.float32
        value = (torch.randn(p.shape, generator=generator) * scale).to(device, dtype)
        if p.channels_last:
            value = value.contiguous(memory_format=torch.channels_last)
        if p.unaligned_grad:  # same values, two bytes past a 16-byte boundary
            storage = torch.empty(value.numel() + 8, dtype=dtype, device=device)
            view = storage[1:1 + value.numel()].view(value.shape)
            view.copy_(value)
            value = view
        grads.append(value)
    what = twin.inject.get(step)
    if what is not None:
        target = max(range(len(grads)), key=lambda i: grads[i].numel())
        # the last element: in the largest tensor's last chunk, past 2**31 bytes in the slow test's
        grads[target].view(-1)[-1] = float("inf") if what == "inf" else float("nan")
    return grads


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, result: Result) -> None:
    expected = expected.detach()
    if actual.numel() == 0:
        return
    # Relative to the tensor's largest value: an element that cancelled to near zero keeps the absolute
    # rounding error of the larger values it was computed from.
    atol = rtol * float(expected.abs().max())
    flat_actual, flat_expected = actual.reshape(-1), expected.reshape(-1)  # same strides on both sides
    for start in range(0, actual.numel(), _COMPARE_PIECE):  # pieces: the slow test's tensor is 4 GiB
        a, e = flat_actual[start:start + _COMPARE_PIECE], flat_expected[start:start + _COMPARE_PIECE]
        result.compared += a.numel()
        result.bitwise_equal += int((a == e).sum())
        diff = (a.double() - e.double()).abs()
        result.max_rel_diff = max(result.max_rel_diff, float((diff / e.double().abs().clamp_min(1e-30)).max()))
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


_COMPARE_PIECE = 2 ** 26


def _compare_all(twin: Twin, fused: _FusedSide, ref: _ReferenceSide, result: Result, step: int) -> None:
    for i, p in enumerate(twin.params):
        where = f"step {step}, param {i} {p.shape}"
        _compare(f"master ({where})", fused.masters[i], ref.masters[i], twin.rtol, result)
        if p.kind == "half":
            # the half weight is the rounded master: compare it through the fused master
            assert torch.equal(fused.model[i], fused.masters[i].to(twin.half_dtype)), f"half weight ({where})"
        state = ref.optimizer.state.get(ref.masters[i], {})
        if twin.optimizer == "sgd":
            buffer = state.get("momentum_buffer")
            if buffer is not None:
                _compare(f"momentum_buffer ({where})", fused.momentum_buffer(i), buffer, twin.rtol, result)
        elif state:
            assert float(fused.state[i]["step"]) == float(state["step"]), f"step count ({where})"
            for key in ("exp_avg", "exp_avg_sq"):
                _compare(f"{key} ({where})", fused.state[i][key], state[key], twin.rtol, result)


def run_twin(twin: Twin, device: str) -> Result:
    """Run both sides for ``twin.steps`` steps; raise AssertionError at the first difference.

    Checked every step: the overflow verdict and the loss scale agree, and a skipped step leaves every
    fused-side tensor bitwise unchanged. Checked every 10 steps and at the end, parameter by parameter:
    masters, optimizer state and step counts agree (within ``twin.rtol``), half weights are the masters
    rounded.
    """
    initial = _initial_params(twin, device)
    fused, ref = _FusedSide(twin, initial, device), _ReferenceSide(twin, initial, device)
    result = Result()
    for step in range(twin.steps):
        scale = ref.scale()
        if twin.scaling:
            assert float(fused.scale) == scale, f"step {step}: loss scale {float(fused.scale)} != {scale}"
        grads = _grads(twin, step, scale, device)
        skipped = fused.step(grads, ref.optimizer.param_groups)
        ref.step(grads)
        result.skipped += skipped
        if twin.scaling:
            assert skipped == (ref.scale() < scale), f"step {step}: the overflow verdicts differ"
        if step % 10 == 9 or step == twin.steps - 1:
            _compare_all(twin, fused, ref, result, step)
        for group in ref.optimizer.param_groups:
            group["lr"] *= twin.lr_decay
    return result


# --- scenarios ------------------------------------------------------------------------------------------

MIXED_SHAPES = [Param((37,)), Param((0,)), Param((64, 33)), Param((1,)), Param((3, 5, 7), group=1),
                Param((2049,), group=1), Param((300,), kind="fp32"), Param((16,), kind="fp32", group=1)]
ADAMW_GROUPS = [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
                dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True)]
SGD_GROUPS = [dict(lr=0.05, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3),
              dict(lr=0.02, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True)]


def interpreter_scenarios() -> Dict[str, Twin]:
    """Small CPU runs for Triton's interpreter (slow: a few thousand elements, tens of steps)."""
    small = dict(steps=24, chunk=2048, block=256, inject={3: "inf", 9: "nan"}, growth_interval=4)
    return {
        "adamw": Twin("adamw", MIXED_SHAPES, ADAMW_GROUPS, **small),
        "adam_l2": Twin("adam", MIXED_SHAPES[:4], [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)],
                        **small),
        "adam_foreach_host_steps": Twin("adam", MIXED_SHAPES, ADAMW_GROUPS, reference_impl="foreach", **small),
        "sgd": Twin("sgd", MIXED_SHAPES, SGD_GROUPS, **dict(small, inject={4: "inf", 9: "nan"}, init_scale=2.0 ** 4)),
        "unaligned_grads": Twin("adamw", [Param((300,), unaligned_grad=True), Param((1029,))], ADAMW_GROUPS[:1],
                                **small),
    }


def main() -> int:
    for name, twin in interpreter_scenarios().items():
        result = run_twin(twin, "cpu")
        assert result.skipped >= len(twin.inject), (name, result)
        print(name, "ok", result.skipped, "skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
