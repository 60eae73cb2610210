"""Benchmark: the O2 optimizer phase alone, hand-written vs ampcompat vs the fused O2 kernels.

Every variant starts from the same FP32 model (same seed), is fed the same synthetic half gradients (a
fixed pool, assigned to ``p.grad`` before each step as backward would) and runs the same steps:

    manual_o2   O2 by hand (``_modes.ManualO2``): ``_foreach_copy_`` into FP32 master grads,
                ``GradScaler.unscale_``, the optimizer on the masters, ``_foreach_copy_`` back.
    O2          today's ampcompat: ``amp.initialize(opt_level="O2")``, a ``scale_loss`` block's exit, step.
    fused       ``ampcompat.amp.fused_o2``: the read-only overflow check, the device-side loss-scale update,
                one fused kernel per (device, gradient dtype, param group); no FP32 master gradient.
    pure_fp16   the optimizer stepping the half parameters (no masters, no scaling): a floor.

Workloads (the parameter shapes of ``speed.py``'s models and its optimizers): ``gpt`` (GPT-124M,
fused AdamW), ``resnet50`` (channels_last, fused AdamW; BatchNorm FP32 as O2 keeps it), ``mlp`` and
``cifar_resnet18`` (host-bound; the latter with torch's default SGD with momentum).

Reported per workload and variant: median ms per step (CUDA events around ``--steps`` consecutive steps,
variants interleaved over ``--rounds`` rounds), the bytes the variant must move per step (counted per
parameter, below) and the achieved bandwidth against a measured device-to-device copy, peak memory of
the variant built alone (bytes per parameter: weights, gradients, masters, state, temporaries), host
microseconds per step on an idle GPU, Python calls and aten ops per step; and how far the masters of
``O2`` and ``fused`` are from ``manual_o2``'s after all steps (bitwise-equal fraction, max relative
difference). ``--sweep`` adds fused variants with other chunk/block/warp settings, and the fused
variant's check and update kernels timed alone.

Bytes per parameter and step: ``_traffic.py`` (shared with ``speed.py``). Here ``O2`` is ampcompat O2
as ``speed.py`` runs it (the fused step where it applies: the variant counts the path it took).

Examples::

    python benchmarks/fused_o2_step.py                       # GPU: all workloads, ~2 minutes
    python benchmarks/fused_o2_step.py --workloads gpt --sweep --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

from _counts import count_aten_ops, count_calls  # noqa: E402
from _env import run_metadata  # noqa: E402
from _traffic import copy_bandwidth, optimizer_bytes  # noqa: E402
from _models import GPT, GPT2_124M, CifarResNet18, build_mlp, build_resnet  # noqa: E402
from _modes import Ampcompat, ManualO2, PureFP16, _MasterView, cast_model_keep_batchnorm  # noqa: E402

WORKLOADS = ("gpt", "resnet50", "mlp", "cifar_resnet18")
VARIANTS = ("manual_o2", "O2", "fused", "pure_fp16")
GRAD_STD = 1e-3  # synthetic gradients: N(0, GRAD_STD) times the loss scale, rounded to fp16
INIT_SCALE = 2.0 ** 16


def _build(workload: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with device:
        model = {"gpt": lambda: GPT(GPT2_124M), "resnet50": lambda: build_resnet(False),
                 "mlp": lambda: build_mlp(256, 4, 256, 10), "cifar_resnet18": lambda: CifarResNet18(64)}[workload]()
    if workload == "resnet50":
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer_factory(workload: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    if workload == "cifar_resnet18":  # as speed.py: torch's default (foreach) SGD
        return lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-5, fused=True)


def _grad_pool(model: nn.Module, scale: float) -> List[torch.Tensor]:
    """One synthetic gradient per trainable parameter, in its dtype and layout (same values for every variant)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    pool = []
    for p in model.parameters():
        values = torch.randn(p.shape, generator=generator, device=p.device) * (GRAD_STD * scale)
        pool.append(torch.empty_like(p).copy_(values))
    return pool


class _Variant:
    """A variant's model and optimizer, and its optimizer phase as one callable step."""

    name = ""

    def __init__(self, workload: str, device: torch.device) -> None:
        self.device = device
        self.model_params: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []
        self._fp32_grads: Optional[List[torch.Tensor]] = None

    def assign_grads(self) -> None:
        """Set ``p.grad`` as backward would. FP32 gradients get their values back first: the unfused
        variants unscale them in place (a small copy; BatchNorm parameters only), in every variant alike."""
        if self._fp32_grads is None:
            self._fp32_grads = [g for g in self.grads if g.dtype == torch.float32]
            self._fp32_values = [g.clone() for g in self._fp32_grads]
        if self._fp32_grads:
            torch._foreach_copy_(self._fp32_grads, self._fp32_values)
        for p, g in zip(self.model_params, self.grads):
            p.grad = g

    def step(self) -> None:
        raise NotImplementedError

    def masters(self) -> Optional[List[torch.Tensor]]:
        """The FP32 values the optimizer steps, in model parameter order (None for pure fp16)."""
        return None

    def close(self) -> None:
        pass


class _RecipeVariant(_Variant):
    """A ``_modes`` recipe driven through its after_backward / step / zero_grad phases."""

    def __init__(self, workload: str, device: torch.device) -> None:
        super().__init__(workload, device)
        self.recipe = self.make(_build(workload, device), _optimizer_factory(workload), device)
        self.model_params = [p for p in self.recipe.model.parameters() if p.requires_grad]
        self.grads = _grad_pool(self.recipe.model, INIT_SCALE if self.name != "pure_fp16" else 1.0)
        self.loss = torch.zeros((), device=device, requires_grad=True)

    def step(self) -> None:
        self.recipe.scaled(self.loss)  # enters amp.scale_loss for O2; a no-op for the others
        self.assign_grads()
        self.recipe.after_backward()
        self.recipe.step()
        self.recipe.zero_grad()

    def close(self) -> None:
        self.recipe.close()


class ManualVariant(_RecipeVariant):
    name = "manual_o2"
    make = staticmethod(ManualO2)

    def masters(self):
        return self.recipe.masters


class AmpcompatVariant(_RecipeVariant):
    name = "O2"
    make = staticmethod(lambda model, factory, device: Ampcompat("O2", model, factory, device))

    def masters(self):
        return list(self.recipe.amp.master_params(self.recipe.optimizer))


class PureVariant(_RecipeVariant):
    name = "pure_fp16"
    make = staticmethod(PureFP16)


class FusedVariant(_Variant):
    """The fused O2 step as phase 2 will run it: grads read from ``p.grad``, one plan per gradient dtype.

    The loss scale lives on the device: the inverse scale is taken before the scale is updated from this
    step's overflow flag, as the ``scale_loss`` exit will do.
    """

    name = "fused"

    def __init__(self, workload: str, device: torch.device, chunk: Optional[int] = None,
                 block: Optional[int] = None, num_warps: Optional[int] = None) -> None:
        super().__init__(workload, device)
        from ampcompat.amp import fused_o2  # noqa: PLC0415

        self.f = fused_o2
        model = cast_model_keep_batchnorm(_build(workload, device), torch.float16)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        self._masters = [p.detach().float().requires_grad_(True) if p.dtype == torch.float16 else p
                         for p in self.model_params]
        self.optimizer = _optimizer_factory(workload)(_MasterView([n for n, _ in named], self._masters))
        self.grads = _grad_pool(model, INIT_SCALE)
        self.adam = isinstance(self.optimizer, torch.optim.Adam)
        reason = fused_o2.adam_not_covered(self.optimizer) if self.adam else fused_o2.sgd_not_covered(self.optimizer)
        assert reason is None, reason
        options = {k: v for k, v in dict(chunk=chunk, block=block, num_warps=num_warps).items() if v is not None}
        model_of = {id(m): p for m, p in zip(self._masters, self.model_params)}
        self.plans, self.plan_params = [], []
        for dtype in (torch.float16, torch.float32):
            groups, params = [], []
            for group in self.optimizer.param_groups:
                masters = [m for m in group["params"] if model_of[id(m)].dtype == dtype]
                model = [model_of[id(m)] for m in masters] if dtype == torch.float16 else None
                groups.append(self._tensors(group, masters, model))
                params.append([model_of[id(m)] for m in masters])
            if any(p for p in params):
                self.plans.append(fused_o2.FusedPlan(groups, dtype, **options))
                self.plan_params.append(params)
        if not self.adam:  # the buffers the plans allocated become torch's state
            for plan in self.plans:
                for g, group in enumerate(plan.groups):
                    for m, b in zip(group.masters, plan.momentum_buffers(g) or []):
                        self.optimizer.state[m]["momentum_buffer"] = b
        self.scale = torch.full((1,), INIT_SCALE, device=device)
        self.tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros(1, device=device)
        self.decoupled = self.adam and fused_o2.decoupled_weight_decay(self.optimizer, self.optimizer.param_groups[0])

    def _tensors(self, group: dict, masters: List[torch.Tensor], model: Optional[List[torch.Tensor]]):
        if not self.adam:
            return self.f.SGDTensors(masters, [None] * len(masters) if group["momentum"] else None, model)
        fused = bool(group.get("fused"))
        for m in masters:  # what torch's Adam creates at its first step
            self.optimizer.state[m].update(
                step=torch.zeros((), dtype=torch.float32, device=m.device) if fused else torch.tensor(0.0),
                exp_avg=torch.zeros_like(m, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(m, memory_format=torch.preserve_format))
        state = [self.optimizer.state[m] for m in masters]
        return self.f.AdamTensors(masters, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                                  [s["step"] for s in state], model)

    def step(self) -> None:
        self.assign_grads()
        f = self.f
        for plan, params in zip(self.plans, self.plan_params):
            reason = plan.set_grads([[p.grad for p in group] for group in params])
            assert reason is None, reason
        self.found_inf.zero_()
        inv_scale = self.scale.double().reciprocal_().float()
        for plan in self.plans:
            f.check_finite_(plan, inv_scale, self.found_inf)
        torch._amp_update_scale_(self.scale, self.tracker, self.found_inf, 2.0, 0.5, 2000)
        # CPU step counts (default Adam) and SGD's first momentum step need the verdict on the host.
        host_verdict = (not self.plans[0].device_steps) if self.adam else any(
            any(plan.first_step_pending) for plan in self.plans)
        found_inf = self.found_inf
        if host_verdict:
            if self.found_inf.item():
                return self._zero_grad()
            found_inf = None
        for plan in self.plans:
            if self.adam:
                f.fused_adam_step(plan, self.optimizer.param_groups, decoupled=self.decoupled,
                                  inv_scale=inv_scale, found_inf=found_inf)
            else:
                f.fused_sgd_step(plan, self.optimizer.param_groups, inv_scale=inv_scale, found_inf=found_inf)
        self._zero_grad()

    def _zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None

    def masters(self):
        return self._masters

    def kernels_alone(self) -> Dict[str, Callable[[], None]]:
        """The check and the update launches on their own, gradients already set (for --sweep)."""
        self.assign_grads()
        for plan, params in zip(self.plans, self.plan_params):
            plan.set_grads([[p.grad for p in group] for group in params])
        inv = torch.full((1,), 1.0 / INIT_SCALE, device=self.device)
        zero = torch.zeros(1, device=self.device)

        def check():
            for plan in self.plans:
                self.f.check_finite_(plan, inv, zero)

        def update():
            for plan in self.plans:
                self.f.fused_adam_step(plan, self.optimizer.param_groups, decoupled=self.decoupled,
                                       inv_scale=inv, found_inf=zero)
        return {"fused: check alone": check, "fused: update alone": update} if self.adam else {}


_VARIANT_CLASSES = {cls.name: cls for cls in (ManualVariant, AmpcompatVariant, FusedVariant, PureVariant)}


def _traffic_variant(variant: _Variant, name: str) -> str:
    """The byte count's name for ``variant``: ampcompat's O2 counts the path its exits took."""
    if name == "O2":
        return "O2" if variant.recipe.optimizer._amp_stash.unscale_paths.get("fused") else "O2_unfused"
    return name.split("[")[0]


def _release(device: torch.device) -> None:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(workload: str, variant: str, device: torch.device, steps: int = 3) -> int:
    """Peak memory of ``variant`` built alone and stepped: its weights, gradients, masters and state, and
    the step's temporaries (the FP32 model it was built from, already freed, not counted)."""
    _release(device)
    base = torch.cuda.memory_allocated(device)
    v = _VARIANT_CLASSES[variant](workload, device)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        v.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    v.close()
    del v
    _release(device)
    return peak


def _time_block(step: Callable[[], None], steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def _host_us(step: Callable[[], None], device: torch.device, steps: int = 15) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        step()
        times.append(1e6 * (time.perf_counter() - began))
    return statistics.median(times)


def _agreement(masters: List[torch.Tensor], reference: List[torch.Tensor]) -> Dict[str, float]:
    equal = total = 0
    worst = 0.0
    for a, b in zip(masters, reference):
        a, b = a.detach(), b.detach()
        equal += int((a == b).sum())
        total += a.numel()
        if a.numel():
            scale = float(b.abs().max()) or 1.0
            worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
    return {"bitwise_equal_fraction": equal / max(total, 1), "max_diff_rel_to_max": worst}


def run_workload(workload: str, device: torch.device, args, copy_bw: float) -> Dict[str, dict]:
    steps, rounds = args.steps or (10 if workload in ("gpt", "resnet50") else 40), args.rounds
    names = list(args.variants)
    peaks = {name: peak_bytes(workload, name, device) for name in names} if workload in ("gpt", "resnet50") else {}
    variants: Dict[str, _Variant] = {name: _VARIANT_CLASSES[name](workload, device) for name in names}
    if args.sweep and "fused" in variants:
        for chunk, block, warps in ((65536, 1024, 4), (16384, 2048, 8), (4096, 1024, 4), (65536, 4096, 8)):
            variants[f"fused[{chunk},{block},{warps}]"] = FusedVariant(workload, device, chunk, block, warps)
    for v in variants.values():  # warm-up: compile the kernels, allocate the state
        for _ in range(3):
            v.step()
    extra: Dict[str, Callable[[], None]] = {}
    if args.sweep and "fused" in variants:  # on a copy of its own: these launches step its masters
        alone = FusedVariant(workload, device)
        alone.step()
        extra = alone.kernels_alone()
    times: Dict[str, List[float]] = {name: [] for name in list(variants) + list(extra)}
    for _ in range(rounds):
        for name, v in variants.items():
            times[name].append(_time_block(v.step, steps))
        for name, launch in extra.items():
            times[name].append(_time_block(launch, steps))
    n_params = sum(p.numel() for p in variants[names[0]].model_params)
    adam = workload != "cifar_resnet18"
    params = variants[names[0]].model_params
    results: Dict[str, dict] = {}
    for name in times:
        median = statistics.median(times[name])
        record = {"median_ms": median, "min_ms": min(times[name]), "max_ms": max(times[name])}
        if name in variants:
            v = variants[name]
            nbytes = optimizer_bytes(params, _traffic_variant(v, name), adam)
            record.update(bytes_per_step=nbytes, host_us=_host_us(v.step, device))
            if nbytes:
                record["achieved_GBps"] = nbytes / (median / 1e3) / 1e9
                record["fraction_of_copy_bw"] = nbytes / (median / 1e3) / copy_bw
            calls = count_calls(lambda _i: v.step(), 3)
            record.update(python_calls=calls.python, builtin_calls=calls.builtin,
                          aten_ops=count_aten_ops(lambda _i: v.step(), 3))
            if name.split("[")[0] in peaks:
                record["peak_bytes_per_param"] = peaks[name] / n_params
        results[name] = record
    reference = variants.get("manual_o2")
    if reference is not None:  # every variant took the same steps from the same start
        for name, v in variants.items():
            if name != "manual_o2" and v.masters() is not None:
                results[name].update(_agreement(v.masters(), reference.masters()))
    for v in variants.values():
        v.close()
    results["_meta"] = {"parameters": n_params, "tensors": len(params), "steps_per_sample": steps, "rounds": rounds}
    del variants
    _release(device)
    return results


def _table(all_results: Dict[str, Dict[str, dict]], copy_bw: float) -> str:
    lines = [f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)",
             "| workload | variant | ms/step | x manual | GB/s | % copy BW | peak B/param | host us | py calls | aten ops |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for workload, results in all_results.items():
        base = results.get("manual_o2", {}).get("median_ms")
        for name, r in results.items():
            if name.startswith("_"):
                continue
            cells = [workload, name, f"{r['median_ms']:.3f}", f"{r['median_ms'] / base:.3f}" if base else "-",
                     f"{r['achieved_GBps']:.0f}" if "achieved_GBps" in r else "-",
                     f"{100 * r['fraction_of_copy_bw']:.0f}%" if "fraction_of_copy_bw" in r else "-",
                     f"{r['peak_bytes_per_param']:.1f}" if "peak_bytes_per_param" in r else "-",
                     f"{r['host_us']:.0f}" if "host_us" in r else "-",
                     f"{r['python_calls']:.0f}" if "python_calls" in r else "-",
                     f"{r['aten_ops']:.0f}" if "aten_ops" in r else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    agreement = [f"{w}/{n}: {r['bitwise_equal_fraction']:.6f} bitwise equal, max diff {r['max_diff_rel_to_max']:.2e}"
                 for w, rs in all_results.items() for n, r in rs.items() if "bitwise_equal_fraction" in r]
    return "\n".join(lines + ["masters vs manual_o2 after all steps: " + "; ".join(agreement)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=0, help="steps per timed sample (default: by workload)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="also other chunk/block/warp settings, kernels alone")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if not torch.cuda.is_available():
        print("fused_o2_step.py times CUDA kernels: no CUDA device here.")
        return 1
    device = torch.device("cuda")
    from ampcompat.amp import fused_o2  # noqa: PLC0415

    reason = fused_o2.unavailable_reason(device)
    if reason is not None:
        print(f"The fused O2 kernels cannot run here: {reason}.")
        return 1
    copy_bw = copy_bandwidth(device)
    all_results = {}
    for workload in [w for w in args.workloads.split(",") if w]:
        all_results[workload] = run_workload(workload, device, args, copy_bw)
        print(json.dumps({workload: all_results[workload]}, indent=1), flush=True)
    report = {"meta": run_metadata(device), "copy_bandwidth_Bps": copy_bw, "results": all_results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(_table(all_results, copy_bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
