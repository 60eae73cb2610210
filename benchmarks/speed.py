"""Speed benchmark: every precision mode side by side, in one process, on the same workloads.

Modes (see ``_modes.py``): FP32; native fp16 autocast + GradScaler; native bf16 autocast; a pure-fp16
model with the optimizer stepping its fp16 weights (no masters, no scaler: the floor for O2); and
ampcompat O1, O2, O3, O5 (O0/O4 on request). Every mode uses AdamW with the fused kernel where the
device has one, builds its model fresh from the same seed, and is timed after a warm-up.

Workloads:
    gpt       GPT-style 124M (12 layers, 768 wide, 12 heads, vocab 50304, seq 1024, batch 8, SDPA).
    resnet    torchvision ResNet-50, channels_last, batch 128, 224x224 (skipped without torchvision).
    mlp       4 x 256 ReLU MLP, batch 64: host time per step dominates, so per-step overhead shows.
              Host-bound timings drift with the machine, so its modes run in 6 interleaved rounds.
    cifar_resnet18
              ResNet-18 for 32x32 images (the CIFAR research scripts' network), batch 128, SGD with
              momentum: a legacy research loop, host-sensitive on a fast GPU. 6 interleaved rounds.
    overhead  host microseconds spent in loss scaling + ``step()`` (entering/leaving ``amp.scale_loss``
              vs ``GradScaler.scale/step/update``) on a tiny model; forward and backward excluded.

Per mode: median step time and spread (CUDA events per step, no synchronisation between steps; on
CPU ``perf_counter``), throughput, peak memory (reset per mode), and host syncs per step (counted on
separate steps, see ``_syncs.py``). Ratios to native fp16 autocast and to the pure-fp16 floor come from
the same run. A mode that fails (e.g. out of memory) is recorded with its error and the run goes on.

Host work per step, beside the times: Python function calls and aten ops per step (deterministic,
``_counts.py``, counted on extra steps in the first round) and host microseconds per phase (forward,
``scale_loss`` enter, backward, ``scale_loss`` exit, step, zero_grad; medians over ``--phase-steps``
extra steps, each begun on an idle device so no phase waits for the GPU's queue).

``--baseline-path DIR`` times a second copy of ampcompat (the package folder ``DIR/ampcompat``, e.g. an
older commit) in the same run: a worker process importing it measures the ampcompat modes of the
``--baseline-workloads`` as ``O1@base``, ``O2@base``..., interleaved with the others round by round.

Examples::

    python benchmarks/speed.py --json out/speed.json --markdown out/speed.md      # GPU, ~2-3 minutes
    python benchmarks/speed.py --device cpu --tiny                                 # smoke test
    python benchmarks/speed.py --workloads gpt --modes native_fp16,pure_fp16,O2 --steps 100
    python benchmarks/speed.py --workloads gpt,mlp --modes native_fp16,O1,O2 --baseline-path /tmp/old
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_REPO = Path(__file__).resolve().parent.parent
# A baseline worker (--package-path DIR) imports ampcompat from DIR; otherwise the checkout's is used,
# so the benchmark runs from a checkout without installing.
_PACKAGE_PATH = sys.argv[sys.argv.index("--package-path") + 1] if "--package-path" in sys.argv[:-1] else None
if _PACKAGE_PATH is not None:
    sys.path.insert(1, str(Path(_PACKAGE_PATH).resolve()))
elif str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

from _env import run_metadata  # noqa: E402
from _counts import count_aten_ops, count_calls  # noqa: E402
from _models import GPT, GPT2_124M, CifarResNet18, GPTConfig, build_mlp, build_resnet, count_parameters  # noqa: E402
from _models import lm_loss  # noqa: E402
from _models import torchvision_or_none  # noqa: E402
from _modes import AMPCOMPAT_LEVELS, ALL_MODES, MODE_DESCRIPTIONS, make_adamw_factory, make_recipe  # noqa: E402
from _modes import parse_modes  # noqa: E402
from _syncs import count_host_syncs  # noqa: E402
from _traffic import copy_bandwidth, optimizer_bytes  # noqa: E402

DEFAULT_MODES = ("fp32", "native_fp16", "native_bf16", "pure_fp16", "manual_o2", "O1", "O2", "O2_unfused", "O3",
                 "O5")
WORKLOADS = ("gpt", "resnet", "mlp", "cifar_resnet18", "overhead")
BASELINE_SUFFIX = "@base"
PHASES = ("forward_us", "enter_us", "backward_us", "exit_us", "step_us", "zero_grad_us")
REFERENCE_MODE = "native_fp16"
FLOOR_MODE = "pure_fp16"
MANUAL_O2_MODE = "manual_o2"
SIZES = ("full", "small", "tiny")


@dataclass
class Workload:
    """A model, its synthetic batches and loss, at one size."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.device, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable
    items_per_step: int
    unit: str
    config: dict
    channels_last: bool = False
    default_steps: int = 50
    default_warmup: int = 10
    default_rounds: int = 1
    optimizer: str = "adamw"  # or "sgd_momentum"


def _classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


def gpt_workload(size: str, batch_size: Optional[int] = None) -> Workload:
    config, batch = {
        "full": (GPT2_124M, 8),
        "small": (GPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=64), 4),
        "tiny": (GPTConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=32), 2),
    }[size]
    batch = batch_size or batch

    def make_batch(device, generator):
        tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=generator)
        tokens = tokens.to(device)
        return tokens[:, :-1], tokens[:, 1:]

    title = (f"GPT-style, {config.n_layer} layers x {config.d_model} wide, {config.n_head} heads, "
             f"vocab {config.vocab_size}, seq {config.seq_len}, batch {batch}")
    return Workload("gpt", title, lambda: GPT(config), make_batch, lm_loss, batch * config.seq_len, "tokens/s",
                    {"model": config.as_dict(), "batch_size": batch})


def resnet_workload(size: str) -> Workload:
    batch, pixels = {"full": (128, 224), "small": (4, 32), "tiny": (2, 32)}[size]
    tiny = size != "full"
    classes = 10 if tiny else 1000

    def make_batch(device, generator):
        images = torch.randn(batch, 3, pixels, pixels, generator=generator)
        labels = torch.randint(0, classes, (batch,), generator=generator)
        return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)

    name = "ResNet-18 (10 classes)" if tiny else "ResNet-50"
    return Workload("resnet", f"torchvision {name}, channels_last, batch {batch}, {pixels}x{pixels}",
                    lambda: build_resnet(tiny), make_batch, _classification_loss, batch, "images/s",
                    {"model": name, "batch_size": batch, "pixels": pixels}, channels_last=True)


def mlp_workload(size: str) -> Workload:
    width, depth, batch = {"full": (256, 4, 64), "small": (256, 4, 64), "tiny": (32, 4, 8)}[size]

    def make_batch(device, generator):
        inputs = torch.randn(batch, width, generator=generator)
        return inputs.to(device), torch.randint(0, 10, (batch,), generator=generator).to(device)

    return Workload("mlp", f"MLP {depth} x {width} (ReLU), batch {batch}: overhead-bound",
                    lambda: build_mlp(width, depth, width, 10), make_batch, _classification_loss, batch,
                    "samples/s", {"width": width, "depth": depth, "batch_size": batch},
                    default_steps=200, default_warmup=20, default_rounds=6)


def cifar_resnet18_workload(size: str) -> Workload:
    batch, width = {"full": (128, 64), "small": (8, 16), "tiny": (2, 4)}[size]

    def make_batch(device, generator):
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        return images.to(device), torch.randint(0, 10, (batch,), generator=generator).to(device)

    return Workload("cifar_resnet18", f"CIFAR ResNet-18 (width {width}), batch {batch}, 32x32, SGD momentum",
                    lambda: CifarResNet18(width), make_batch, _classification_loss, batch, "images/s",
                    {"model": "CifarResNet18", "width": width, "batch_size": batch, "pixels": 32,
                     "optimizer": "SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)"},
                    default_steps=100, default_warmup=10, default_rounds=6, optimizer="sgd_momentum")


def overhead_workload(size: str) -> Workload:
    width, batch = 32, 8

    def make_batch(device, generator):
        inputs = torch.randn(batch, width, generator=generator)
        return inputs.to(device), torch.randint(0, 10, (batch,), generator=generator).to(device)

    iterations = 20 if size == "tiny" else 200
    return Workload("overhead", "Host time of loss scaling + step() (tiny 2 x 32 MLP, batch 8)",
                    lambda: build_mlp(width, 2, width, 10), make_batch, _classification_loss, batch,
                    "samples/s", {"width": width, "depth": 2, "batch_size": batch},
                    default_steps=iterations, default_warmup=5)


_WORKLOAD_BUILDERS = {"gpt": gpt_workload, "resnet": resnet_workload, "mlp": mlp_workload,
                      "cifar_resnet18": cifar_resnet18_workload, "overhead": overhead_workload}


def _build_workload(name: str, size: str, args) -> Workload:
    """The workload ``name`` at ``size``, with the GPT batch of ``--gpt-batch`` where one was given."""
    if name == "gpt":
        return gpt_workload(size, args.gpt_batch)
    return _WORKLOAD_BUILDERS[name](size)


# --------------------------------------------------------------------------------------------------
# Measuring one mode
# --------------------------------------------------------------------------------------------------


def _release_memory(device: torch.device) -> None:
    """Free the previous mode's model and optimizer before the next is built (and its peak measured)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _prepare(workload: Workload, mode: str, device: torch.device, seed: int):
    torch.manual_seed(seed)
    with device:  # initialise the weights on the device itself (seconds saved per mode for GPT-124M)
        model = workload.build()
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if workload.optimizer == "sgd_momentum":  # as the research scripts write it: torch's default (foreach)
        optimizer_factory = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,  # noqa: E731
                                                      weight_decay=5e-4)
    else:
        optimizer_factory = make_adamw_factory(lr=1e-4, weight_decay=0.01, eps=1e-5)
    # No per-step skip tracking while timing: reading a loss scale is a host sync that native modes do not pay.
    recipe = make_recipe(mode, model, optimizer_factory, device, track_skips=False)
    generator = torch.Generator().manual_seed(seed)
    batches = [workload.make_batch(device, generator) for _ in range(4)]
    return recipe, batches, count_parameters(recipe.model)


def _optimizer_step_count(optimizer: torch.optim.Optimizer) -> Optional[float]:
    """AdamW's own step counter: skipped steps (inf/NaN gradients) do not advance it, in any mode."""
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return None


def _time_steps(run_step: Callable[[int], torch.Tensor], steps: int, device: torch.device):
    """Per-step times in ms (CUDA events, or perf_counter on CPU) and the wall time of all steps."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        for i in range(steps):
            starts[i].record()
            loss = run_step(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - began
        return [s.elapsed_time(e) for s, e in zip(starts, ends)], wall, loss
    times = []
    began = time.perf_counter()
    for i in range(steps):
        step_began = time.perf_counter()
        loss = run_step(i)
        times.append(1e3 * (time.perf_counter() - step_began))
    return times, time.perf_counter() - began, loss


@contextlib.contextmanager
def _training_steps(workload: Workload, mode: str, device: torch.device, seed: int):
    """``mode`` prepared on ``workload``: yields (recipe, run_step(i), parameter count, batches); closes the
    recipe."""
    _release_memory(device)
    recipe, batches, parameters = _prepare(workload, mode, device, seed)
    try:
        def run_step(i: int) -> torch.Tensor:
            inputs, targets = batches[i % len(batches)]
            return recipe.train_step(inputs, targets, workload.loss_fn)

        yield recipe, run_step, parameters, batches
    finally:
        recipe.close()


def _profile_kernels(run_step: Callable[[int], torch.Tensor], steps: int, device: torch.device,
                     top: int = 40) -> List[dict]:
    """Device time per step of the ``top`` most expensive kernels (by name), over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for i in range(steps):
            run_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(getattr(e, attr, 0.0), e.count, e.key) for e in prof.key_averages()]
    rows = [r for r in rows if r[0] > 0]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    out = [{"name": name[:120], "ms_per_step": t / 1e3 / steps, "calls_per_step": n / steps}
           for t, n, name in rows[:top]]
    out.append({"name": "(all kernels)", "ms_per_step": total / 1e3 / steps,
                "calls_per_step": sum(r[1] for r in rows) / steps})
    return out


def profile_training(workload: Workload, mode: str, device: torch.device, steps: int, warmup: int,
                     seed: int) -> List[dict]:
    """Kernel time per step of ``mode``'s most expensive kernels (run after all timing: once a profiler
    has been attached, kernel launches stay slower for the rest of the process)."""
    with _training_steps(workload, mode, device, seed) as (_, run_step, _, _):
        for i in range(warmup):
            run_step(i)
        return _profile_kernels(run_step, steps, device)


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    kind = "fused" if optimizer.defaults.get("fused") else "foreach"
    return f"{type(optimizer).__name__}({kind})"


def phase_times(recipe, batches, loss_fn: Callable, device: torch.device, steps: int) -> Dict[str, float]:
    """Median host microseconds of each phase of a training step, over ``steps`` steps.

    Each step starts on an idle device (one synchronisation before it, none inside), so a phase's time
    is the host's own work: launching kernels, Python, and any sync the phase itself makes.
    """
    phases: Dict[str, List[float]] = {key: [] for key in PHASES}
    clock = time.perf_counter
    for i in range(steps):
        inputs, targets = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = clock()
        with recipe.autocast():
            loss = loss_fn(recipe.model(recipe.cast_inputs(inputs)), targets)
        t1 = clock()
        scaled = recipe.scaled(loss)
        t2 = clock()
        scaled.backward()
        t3 = clock()
        recipe.after_backward()
        t4 = clock()
        recipe.step()
        t5 = clock()
        recipe.zero_grad()
        t6 = clock()
        for key, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))):
            phases[key].append(1e6 * (b - a))
    return {key: statistics.median(values) for key, values in phases.items()}


_TRAFFIC_VARIANTS = {"manual_o2": "manual_o2", "pure_fp16": "pure_fp16", "O2_unfused": "O2_unfused"}


def optimizer_phase(recipe, batches, workload: Workload, device: torch.device, steps: int) -> dict:
    """The optimizer phase of ``steps`` training steps, from the end of backward to the end of ``step()``:
    its device time (CUDA events, median), the bytes it must move (``_traffic.py``, by the path the mode
    took) and its peak memory above what was allocated at the end of backward (FP32 master gradients show
    here; the whole step's peak is usually the forward's activations)."""
    times, peaks = [], []
    for i in range(steps):
        inputs, targets = batches[i % len(batches)]
        torch.cuda.synchronize(device)
        with recipe.autocast():
            loss = workload.loss_fn(recipe.model(recipe.cast_inputs(inputs)), targets)
        recipe.scaled(loss).backward()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        recipe.after_backward()
        recipe.step()
        end.record()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        times.append(start.elapsed_time(end))
        recipe.zero_grad()
    paths = recipe.paths()
    variant = _TRAFFIC_VARIANTS.get(recipe.name)
    if recipe.name in ("O2", "O5"):  # by the path the exits took (a package without the fused step: unfused)
        variant = "O2" if paths is not None and paths["unscale_paths"].get("fused") else "O2_unfused"
    params = [p for p in recipe.model.parameters() if p.requires_grad]
    nbytes = optimizer_bytes(params, variant, adamw=workload.optimizer == "adamw") if variant else None
    return {"optimizer_gpu_ms": statistics.median(times), "optimizer_bytes": nbytes,
            "optimizer_peak_bytes": max(peaks), "paths": paths}


def host_counts(run_step: Callable[[int], torch.Tensor], steps: int) -> dict:
    """Python calls (all, and those of Python functions) and aten ops per training step."""
    calls = count_calls(run_step, steps)
    return {"calls_per_step": calls.total, "python_calls_per_step": calls.python,
            "aten_ops_per_step": count_aten_ops(run_step, steps)}


def measure_training(workload: Workload, mode: str, device: torch.device, steps: int, warmup: int,
                     sync_steps: int, seed: int, count_steps: int = 0, phase_steps: int = 0) -> dict:
    """Time ``steps`` training steps of ``mode`` after ``warmup``; count syncs on ``sync_steps`` more,
    host work on ``count_steps`` more (none if 0) and phase times on ``phase_steps`` more."""
    with _training_steps(workload, mode, device, seed) as (recipe, run_step, parameters, batches):
        for i in range(warmup):
            run_step(i)
        steps_before = _optimizer_step_count(recipe.optimizer)
        times, wall, last_loss = _time_steps(run_step, steps, device)
        steps_after = _optimizer_step_count(recipe.optimizer)
        skipped = None if steps_before is None else steps - int(steps_after - steps_before)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        with count_host_syncs(device) as syncs:
            for i in range(sync_steps):
                run_step(i)
        median = statistics.median(times)
        record = {
            "step_times_ms": times,
            "median_ms": median,
            "p10_ms": _percentile(times, 0.1),
            "p90_ms": _percentile(times, 0.9),
            "min_ms": min(times),
            "max_ms": max(times),
            "mean_wall_ms": 1e3 * wall / steps,
            "throughput": workload.items_per_step / (median / 1e3),
            "peak_mem_bytes": peak,
            "syncs_per_step": None if syncs.cuda_syncs is None else syncs.cuda_syncs / sync_steps,
            "host_reads_per_step": syncs.host_reads / sync_steps,
            "host_reads_by_kind": syncs.host_reads_by_kind,
            "skipped_steps": skipped,
            "final_loss": float(last_loss),
            "parameters": parameters,
            "param_dtype": str(next(recipe.model.parameters()).dtype).replace("torch.", ""),
            "optimizer": _optimizer_name(recipe.optimizer),
            "error": None,
        }
        if count_steps:
            record.update(host_counts(run_step, count_steps))
        if phase_steps:
            record["phases_us"] = phase_times(recipe, batches, workload.loss_fn, device, phase_steps)
            if device.type == "cuda":
                record.update(optimizer_phase(recipe, batches, workload, device, phase_steps))
        record.setdefault("paths", recipe.paths())
        return record


def measure_overhead(workload: Workload, mode: str, device: torch.device, iterations: int, warmup: int,
                     seed: int) -> dict:
    """Median host microseconds of each phase of a step (the loss scaling and step ones summed)."""
    _release_memory(device)
    recipe, batches, parameters = _prepare(workload, mode, device, seed)
    try:
        phase_times(recipe, batches, workload.loss_fn, device, warmup)
        result = phase_times(recipe, batches, workload.loss_fn, device, iterations)
        result["total_us"] = result["enter_us"] + result["exit_us"] + result["step_us"]
        result["parameters"] = parameters
        result["error"] = None
        return result
    finally:
        recipe.close()


# --------------------------------------------------------------------------------------------------
# The run, the ratios and the report
# --------------------------------------------------------------------------------------------------


def _error_record(error: BaseException) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"error": f"{type(error).__name__}: {message[:300]}"}


def add_ratios(modes: Dict[str, dict], copy_bw: Optional[float] = None) -> None:
    """Add ``vs_native_fp16``, ``vs_floor`` and ``vs_manual_o2`` (step time / reference step time) to every
    timed mode; where the optimizer phase was measured, its achieved bandwidth (``optimizer_GBps``, and
    ``optimizer_vs_copy_bw`` against ``copy_bw``) and its peak memory against manual_o2's per parameter."""
    def median_of(name):
        record = modes.get(name) or {}
        return record.get("median_ms")

    for key, reference in (("vs_native_fp16", median_of(REFERENCE_MODE)), ("vs_floor", median_of(FLOOR_MODE)),
                           ("vs_manual_o2", median_of(MANUAL_O2_MODE))):
        for record in modes.values():
            if record.get("median_ms") is not None:
                record[key] = record["median_ms"] / reference if reference else None
    manual_peak = (modes.get(MANUAL_O2_MODE) or {}).get("optimizer_peak_bytes")
    for record in modes.values():
        nbytes, ms = record.get("optimizer_bytes"), record.get("optimizer_gpu_ms")
        if nbytes and ms:
            record["optimizer_GBps"] = nbytes / (ms / 1e3) / 1e9
            record["optimizer_vs_copy_bw"] = nbytes / (ms / 1e3) / copy_bw if copy_bw else None
        if manual_peak is not None and record.get("optimizer_peak_bytes") is not None and record.get("parameters"):
            record["optimizer_peak_below_manual_o2_B_per_param"] = \
                (manual_peak - record["optimizer_peak_bytes"]) / record["parameters"]


def describe(mode: str) -> str:
    """A mode's description; a baseline mode (``O2@base``) is the same recipe on the baseline package."""
    if mode.endswith(BASELINE_SUFFIX):
        return MODE_DESCRIPTIONS[mode[: -len(BASELINE_SUFFIX)]] + ", baseline package (--baseline-path)"
    return MODE_DESCRIPTIONS[mode]


class BaselineWorker:
    """A ``speed.py --serve`` process importing ampcompat from ``path``: measures modes on request.

    One worker serves the whole run (one interpreter start), so its modes can be interleaved with the
    parent's round by round at the cost of a JSON line each way.
    """

    def __init__(self, path: str, args) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--package-path", str(path),
                   "--device", args.device] + (["--tiny"] if args.tiny else []) \
            + (["--gpt-batch", str(args.gpt_batch)] if args.gpt_batch else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.package = self._reply()["ampcompat"]

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        raise RuntimeError(f"the baseline worker exited with status {self.proc.wait()}")

    def measure(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


_REPLY = "@@speed-worker "


def serve(args) -> int:
    """The worker side of :class:`BaselineWorker`: one JSON request per stdin line, one reply each."""
    import ampcompat  # noqa: PLC0415 - the copy this worker was started to measure

    wanted = Path(args.package_path).resolve()
    if Path(ampcompat.__file__).resolve().parent.parent != wanted:
        raise SystemExit(f"the baseline worker imported {ampcompat.__file__}, not the package under {wanted}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = "tiny" if args.tiny else ("full" if device.type == "cuda" else "small")
    print(_REPLY + json.dumps({"ampcompat": str(Path(ampcompat.__file__).parent)}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        workload = _build_workload(request.pop("workload"), size, args)
        try:
            record = measure_training(workload, device=device, **request)
        except Exception as error:
            record = _error_record(error)
        finally:
            _release_memory(device)
        print(_REPLY + json.dumps(record), flush=True)
    return 0


def run_workload(workload: Workload, modes: List[str], device: torch.device, args,
                 baseline: Optional[BaselineWorker] = None) -> dict:
    steps = args.steps or workload.default_steps
    warmup = workload.default_warmup if args.warmup is None else args.warmup
    section = {"title": workload.title, "config": workload.config, "unit": workload.unit,
               "items_per_step": workload.items_per_step, "steps": steps, "warmup": warmup,
               "skipped": None, "modes": {}}
    if workload.name == "resnet" and torchvision_or_none() is None:
        section["skipped"] = "torchvision is not importable"
        print(f"[{workload.name}] skipped: torchvision is not importable")
        return section
    rounds = 1 if workload.name == "overhead" else (args.rounds or workload.default_rounds)
    section["rounds"] = rounds
    if baseline is not None and workload.name in args.baseline_workloads:
        modes = modes + [m + BASELINE_SUFFIX for m in modes if m in AMPCOMPAT_LEVELS]
        section["baseline_package"] = baseline.package
    per_mode: Dict[str, List[dict]] = {mode: [] for mode in modes}
    for round_index in range(rounds):  # modes interleaved, so drift in the machine hits every mode alike
        for mode in modes:
            if per_mode[mode] and per_mode[mode][-1].get("error"):
                continue
            began = time.perf_counter()
            try:
                if workload.name == "overhead":
                    record = measure_overhead(workload, mode, device, steps, warmup, args.seed)
                else:
                    request = dict(steps=steps, warmup=warmup, sync_steps=args.sync_steps, seed=args.seed,
                                   count_steps=args.count_steps if round_index == 0 else 0,
                                   phase_steps=args.phase_steps)
                    if mode.endswith(BASELINE_SUFFIX):
                        record = baseline.measure(workload=workload.name, mode=mode[: -len(BASELINE_SUFFIX)],
                                                  **request)
                    else:
                        record = measure_training(workload, mode, device, **request)
            except Exception as error:  # one failing mode (OOM, missing feature) must not stop the others
                record = _error_record(error)
            finally:
                _release_memory(device)
            per_mode[mode].append(record)
            label = f" (round {round_index + 1}/{rounds})" if rounds > 1 else ""
            print(f"[{workload.name}] {mode:12s} {_one_line(record)}  ({time.perf_counter() - began:.1f}s){label}")
    for mode, records in per_mode.items():
        record = records[-1] if records[-1].get("error") else _merge_rounds(records, workload.items_per_step)
        record["description"] = describe(mode)
        section["modes"][mode] = record
    if workload.name != "overhead":
        add_ratios(section["modes"], getattr(args, "copy_bw", None))

    counts = [r["parameters"] for r in section["modes"].values() if r.get("parameters")]
    section["parameters"] = counts[0] if counts else None
    return section


def _merge_rounds(records: List[dict], items_per_step: int) -> dict:
    """One record from several rounds of a mode: statistics over all rounds' steps pooled; host counts
    from the round that took them, phase times the median of the rounds'."""
    if len(records) == 1:
        return records[0]
    merged = dict(records[-1])
    times = [t for r in records for t in r["step_times_ms"]]
    median = statistics.median(times)
    merged.update(
        step_times_ms=times, median_ms=median, p10_ms=_percentile(times, 0.1), p90_ms=_percentile(times, 0.9),
        min_ms=min(times), max_ms=max(times), throughput=items_per_step / (median / 1e3),
        mean_wall_ms=statistics.mean(r["mean_wall_ms"] for r in records),
        round_medians_ms=[r["median_ms"] for r in records],
        skipped_steps=None if any(r["skipped_steps"] is None for r in records)
        else sum(r["skipped_steps"] for r in records),
    )
    peaks = [r["peak_mem_bytes"] for r in records if r["peak_mem_bytes"] is not None]
    merged["peak_mem_bytes"] = max(peaks) if peaks else None
    for record in records:
        for key in ("calls_per_step", "python_calls_per_step", "aten_ops_per_step"):
            if key in record:
                merged[key] = record[key]
    phases = [r["phases_us"] for r in records if "phases_us" in r]
    if phases:
        merged["phases_us"] = {key: statistics.median(p[key] for p in phases) for key in PHASES}
    optimizer_ms = [r["optimizer_gpu_ms"] for r in records if r.get("optimizer_gpu_ms") is not None]
    if optimizer_ms:
        merged["optimizer_gpu_ms"] = statistics.median(optimizer_ms)
    return merged


def _one_line(record: dict) -> str:
    if record.get("error"):
        return "FAILED " + record["error"]
    if "total_us" in record:
        return f"scaling+step {record['total_us']:.0f} us (backward {record['backward_us']:.0f} us)"
    syncs = record["syncs_per_step"]
    syncs = f"{syncs:g}" if syncs is not None else f"n/a (host reads {record['host_reads_per_step']:g})"
    return (f"median {record['median_ms']:.3f} ms (p10 {record['p10_ms']:.3f}, p90 {record['p90_ms']:.3f}); "
            f"syncs/step {syncs}; loss {record['final_loss']:.4g}")


def _cell(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) + suffix


def markdown_report(report: dict) -> str:
    """All sections as Markdown tables, headed by the command, device, versions and date."""
    meta = report["meta"]
    lines = ["# ampcompat speed benchmark", "",
             f"- command: `{meta['command']}`",
             f"- device: {meta['device']} ({meta['device_type']}); torch {meta['torch']}"
             + (f", CUDA {meta['cuda']}, cuDNN {meta['cudnn']}" if meta.get("cuda") else "")
             + f"; Python {meta['python']}; ampcompat {meta['ampcompat']}",
             f"- date: {meta['date']}",
             f"- FP32 matmul precision: {meta['float32_matmul_precision']}; optimizer: AdamW, fused kernel "
             "where the device has one; ratios are step-time ratios from this one run (lower is faster)",
             ""]
    for name, section in report["workloads"].items():
        lines += [f"## {name}: {section['title']}", ""]
        if section.get("skipped"):
            lines += [f"Skipped: {section['skipped']}.", ""]
            continue
        if name == "overhead":
            lines += ["Host microseconds per step (medians), forward excluded. Loss scaling = entering and "
                      "leaving `amp.scale_loss` (unscale + inf/NaN check + scale update), or "
                      "`GradScaler.scale`; step = `optimizer.step()` or `GradScaler.step` + `update`.", "",
                      "| mode | enter (scale) µs | backward µs | exit (unscale) µs | step µs | scaling + step µs |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for mode, r in section["modes"].items():
                if r.get("error"):
                    lines.append(f"| {mode} | failed: {r['error']} | | | | |")
                    continue
                lines.append(f"| {mode} | {r['enter_us']:.1f} | {r['backward_us']:.1f} | {r['exit_us']:.1f} "
                             f"| {r['step_us']:.1f} | {r['total_us']:.1f} |")
            lines.append("")
            continue
        on_cuda = meta["device_type"] == "cuda"
        sync_header = "syncs/step" if on_cuda else "host reads/step"
        parameters = section.get("parameters")
        size = f"; {parameters:,} parameters" if parameters else ""
        rounds = section.get("rounds", 1)
        timed = (f"{rounds} rounds (modes interleaved) of {section['steps']} timed steps, each after "
                 f"{section['warmup']} warm-up steps; statistics over all rounds' steps"
                 if rounds > 1 else f"{section['steps']} timed steps after {section['warmup']} warm-up steps")
        lines += [f"{timed}{size}.", "",
                  f"| mode | median ms/step | p10-p90 ms | {section['unit']} | peak GiB | {sync_header} "
                  f"| vs native fp16 | vs pure-fp16 floor | vs manual_o2 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        notes = []
        for mode, r in section["modes"].items():
            if r.get("error"):
                lines.append(f"| {mode} | failed | | | | | | | |")
                notes.append(f"{mode}: {r['error']}")
                continue
            syncs = r["syncs_per_step"] if on_cuda else r["host_reads_per_step"]
            peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
            lines.append(
                f"| {mode} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | {r['throughput']:,.0f} "
                f"| {_cell(peak)} | {_cell(syncs, 'g')} | {_cell(r.get('vs_native_fp16'), '.2f', 'x')} "
                f"| {_cell(r.get('vs_floor'), '.2f', 'x')} | {_cell(r.get('vs_manual_o2'), '.3f', 'x')} |")
            if r.get("skipped_steps"):
                notes.append(f"{mode}: {r['skipped_steps']} of the timed steps were skipped (inf/NaN gradients)")
            if not math.isfinite(r["final_loss"]):
                notes.append(f"{mode}: loss became {r['final_loss']} (speed only; see convergence.py)")
        lines.append("")
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
        lines += _optimizer_phase_table(section, meta.get("copy_bandwidth_Bps"))
        lines += _host_work_table(section)
    lines += ["Modes: " + "; ".join(f"`{m}` {MODE_DESCRIPTIONS[m]}" for m in report["modes"]) + ".", ""]
    if any(m.endswith(BASELINE_SUFFIX) for section in report["workloads"].values() for m in section["modes"]):
        lines += [f"`<mode>{BASELINE_SUFFIX}`: the same mode on the baseline package "
                  f"(`--baseline-path`, imported from `{report['meta'].get('baseline_package')}`).", ""]
    return "\n".join(lines)


def _optimizer_phase_table(section: dict, copy_bw: Optional[float]) -> List[str]:
    """The optimizer phase of each mode (end of backward to end of ``step()``): device time, bytes moved,
    achieved bandwidth against the device's copy bandwidth, peak memory above the end of backward."""
    rows = [(mode, r) for mode, r in section["modes"].items() if r.get("optimizer_gpu_ms") is not None]
    if not rows:
        return []
    copy = f"{copy_bw / 1e9:.0f} GB/s" if copy_bw else "not measured"
    lines = [f"Optimizer phase (end of backward to end of `step()`, device time, median): bytes it must move "
             f"(`_traffic.py`), achieved bandwidth against the device-to-device copy ({copy}), its peak memory "
             "above the end of backward, and how O2's exits took their path.", "",
             "| mode | optimizer ms | GB moved | GB/s | % of copy BW | peak B/param | below manual_o2 B/param | path |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for mode, r in rows:
        nbytes, params = r.get("optimizer_bytes"), r.get("parameters")
        paths = r.get("paths") or {}
        taken = ", ".join(f"{k} {v}" for k, v in (paths.get("unscale_paths") or {}).items() if v)
        if paths.get("unfused_reason"):
            taken += f" (unfused: {paths['unfused_reason']})"
        lines.append(
            f"| {mode} | {r['optimizer_gpu_ms']:.3f} | {_cell(nbytes / 1e9 if nbytes else None, '.2f')} "
            f"| {_cell(r.get('optimizer_GBps'), '.0f')} | {_cell(_percent(r.get('optimizer_vs_copy_bw')), '.0f', '%')} "
            f"| {_cell(r['optimizer_peak_bytes'] / params if params else None, '.1f')} "
            f"| {_cell(r.get('optimizer_peak_below_manual_o2_B_per_param'), '.1f')} | {taken or '-'} |")
    return lines + [""]


def _percent(fraction: Optional[float]) -> Optional[float]:
    return None if fraction is None else 100 * fraction


def _host_work_table(section: dict) -> List[str]:
    """Python calls and aten ops per step (counted) and host µs per phase (medians), one row per mode."""
    rows = [(mode, r) for mode, r in section["modes"].items() if not r.get("error")]
    if not any("calls_per_step" in r or "phases_us" in r for _, r in rows):
        return []
    lines = ["Host work per step: function calls (all / Python-level, `sys.setprofile`) and aten ops "
             "(`TorchDispatchMode`), counted; host µs per phase, medians over steps begun on an idle device.", "",
             "| mode | calls | Python calls | aten ops | forward µs | scale_loss enter µs | backward µs "
             "| scale_loss exit µs | step µs | zero_grad µs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, r in rows:
        phases = r.get("phases_us") or {}
        cells = [_cell(r.get("calls_per_step"), ".0f"), _cell(r.get("python_calls_per_step"), ".0f"),
                 _cell(r.get("aten_ops_per_step"), ".0f")] + [_cell(phases.get(key), ".0f") for key in PHASES]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated: " + ", ".join(ALL_MODES))
    parser.add_argument("--steps", type=int, help="timed steps per mode (default: per workload)")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (default: per workload)")
    parser.add_argument("--sync-steps", type=int, default=3, help="extra steps over which syncs are counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int,
                        help="repeat every mode this many times, interleaved (default: per workload; mlp 5)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after timing, profile this many steps per mode; the JSON gets each mode's top kernels")
    parser.add_argument("--count-steps", type=int, default=3,
                        help="extra steps (first round) over which Python calls and aten ops are counted; 0: none")
    parser.add_argument("--phase-steps", type=int, default=10,
                        help="extra steps per round whose phases (forward, scale_loss, ...) are timed; 0: none")
    parser.add_argument("--baseline-path",
                        help="also time the ampcompat modes with the package DIR/ampcompat (e.g. an older commit)")
    parser.add_argument("--baseline-workloads", default="gpt,mlp",
                        help="the workloads --baseline-path applies to (default: gpt,mlp)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a baseline worker
    parser.add_argument("--package-path", help=argparse.SUPPRESS)  # read at import time (see the top)
    parser.add_argument("--tiny", action="store_true", help="minimal sizes and step counts (CPU tests)")
    parser.add_argument("--gpt-batch", type=int, default=None,
                        help="GPT batch size instead of the workload's (8 at full size); e.g. 1, where the optimizer "
                             "phase rather than the forward's activations sets the step's peak memory")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--markdown", help="write the tables (for docs/benchmarks.md) here")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    args.workloads = workloads
    args.baseline_workloads = [w.strip() for w in args.baseline_workloads.split(",") if w.strip()]
    for flag in ("count_steps", "phase_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must not be negative")
    for flag in ("steps", "sync_steps", "gpt_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must not be negative")
    try:
        args.modes = parse_modes(args.modes)
    except ValueError as error:
        parser.error(str(error))
    if args.tiny:
        args.steps = args.steps or 3
        args.warmup = 1 if args.warmup is None else args.warmup
        args.sync_steps = 1
        args.count_steps = min(args.count_steps, 1)
        args.phase_steps = min(args.phase_steps, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = "tiny" if args.tiny else ("full" if device.type == "cuda" else "small")
    report = {"meta": run_metadata(device), "size": size, "modes": args.modes, "workloads": {}}
    print(f"device: {report['meta']['device']}; torch {torch.__version__}; sizes: {size}; "
          f"modes: {', '.join(args.modes)}")
    args.copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    report["meta"]["copy_bandwidth_Bps"] = args.copy_bw
    if args.copy_bw:
        print(f"device-to-device copy bandwidth: {args.copy_bw / 1e9:.0f} GB/s (read + write)")
    workloads = {name: _build_workload(name, size, args) for name in args.workloads}
    baseline = BaselineWorker(args.baseline_path, args) if args.baseline_path else None
    if baseline is not None:
        report["meta"]["baseline_package"] = baseline.package
        print(f"baseline package: {baseline.package}")
    try:
        for name, workload in workloads.items():
            print(f"== {name}: {workload.title}")
            report["workloads"][name] = run_workload(workload, args.modes, device, args, baseline)
            if args.json:  # keep what is finished if a later workload is cut short
                _write(args.json, json.dumps(report, indent=1))
    finally:
        if baseline is not None:
            baseline.close()
    if args.profile_steps:  # last: an attached profiler slows every later kernel launch in the process
        for name, workload in workloads.items():
            section = report["workloads"][name]
            if name == "overhead" or section.get("skipped"):
                continue
            for mode, record in section["modes"].items():
                if not record.get("error") and not mode.endswith(BASELINE_SUFFIX):
                    record["top_kernels"] = profile_training(workload, mode, device, args.profile_steps,
                                                             min(section["warmup"], 3), args.seed)
    markdown = markdown_report(report)
    if args.json:
        _write(args.json, json.dumps(report, indent=1))
    if args.markdown:
        _write(args.markdown, markdown)
    print()
    print(markdown)
    return 0


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
