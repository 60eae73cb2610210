"""The fused O2 step inside amp's O2 step (``ampcompat.amp.fused_master_weights``): its twins, paths and fallbacks.

* Triton's interpreter (CPU tensors, in a subprocess; skipped without triton): every twin of
  ``_o2_fused_step_twins.py`` against O2 written by hand, a few steps each; under ``slow``, 200 steps
  of each optimizer and 40 of each pattern.
* Everywhere, Triton or not: which strategy ``amp.initialize`` chooses and why (the CPU takes today's
  path; the switch; which optimizers and options are covered), and, with the kernels stubbed out
  (``_fused_o2_stub.py``), the path each pattern takes, that no FP32 master gradient exists after a fused
  exit, and that a kernel failing to compile falls back to today's path with one warning and the same
  results.
* CUDA (``cuda`` marker): every twin in process at full length (240 steps of each optimizer), the
  optimizer phase's peak memory against the unfused path, host work and syncs per step, a real kernel
  failing to compile.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import _fused_o2_stub as stub
import _o2_fused_step_twins as twins
from ampcompat import amp
from ampcompat.amp.fused_master_weights import FusedMasterWeights
from ampcompat.amp.fused_o2 import coverage
from ampcompat.amp.master_weights import MasterWeights
from ampcompat.optimizers import FusedAdam, FusedLAMB, FusedSGD

# Triton importable and not older than the kernels' verified floor (coverage.MIN_TRITON)
HAS_TRITON = importlib.util.find_spec("triton") is not None and coverage.triton_version_error() is None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton >= 3.2: pip install triton")
TESTS = Path(__file__).resolve().parent

# Triton's interpreter rounds float32 to bfloat16 by truncation (CUDA rounds to nearest): O5 on CUDA only.
CPU_SCENARIOS = [name for name in twins.SCENARIOS if name != "o5_bf16"]
OPTIMIZER_SCENARIOS = ["adamw_fused", "adam_foreach", "sgd_foreach", "sgd_fused", "fused_adam", "fused_sgd", "o5_bf16"]


@pytest.fixture(autouse=True)
def _switch_and_failure_restored():
    yield
    coverage.set_enabled(None)
    coverage._failure = None  # a kernel failure a test planted turned the fused step off for the process


def _interpreted(steps: int, names) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    env.pop(coverage.ENV_VAR, None)
    out = subprocess.run([sys.executable, str(TESTS / "_o2_fused_step_twins.py"), str(steps), *names],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if len(line.split()) > 1}
    return {name: lines.get(name) or f"{name} MISSING\n{out.stdout}\n{out.stderr}" for name in names}


@pytest.fixture(scope="module")
def interpreted_twins():
    return _interpreted(6, CPU_SCENARIOS)


@needs_triton
@pytest.mark.parametrize("name", CPU_SCENARIOS)
def test_twin_under_tritons_interpreter(name, interpreted_twins):
    line = interpreted_twins[name]
    assert line.split()[1] == "ok", line


@needs_triton
@pytest.mark.slow
def test_long_twins_under_tritons_interpreter():
    optimizers = [n for n in OPTIMIZER_SCENARIOS if n in CPU_SCENARIOS]
    results = _interpreted(200, optimizers)
    results.update(_interpreted(40, [n for n in CPU_SCENARIOS if n not in optimizers]))
    failed = [line for line in results.values() if line.split()[1] != "ok"]
    assert not failed, "\n".join(failed)


# --- which strategy, and why ------------------------------------------------------------------------------

def _mlp(device="cpu", batchnorm=True):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12)] + ([nn.BatchNorm1d(12)] if batchnorm else []) + [nn.ReLU(), nn.Linear(12, 3)]
    return nn.Sequential(*layers).to(device)


def _initialize(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), device="cpu", opt_level="O2",
                **kwargs):
    model = _mlp(device, **kwargs)
    model, opt = amp.initialize(model, optimizer(model.parameters()), opt_level=opt_level, verbosity=0)
    return model, opt


def _train(model, opt, steps=1, device="cpu", between=None, **block):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 6, device=device), torch.randint(0, 3, (5,), device=device)
        with amp.scale_loss(nn.functional.cross_entropy(model(x), y), opt, **block) as scaled:
            scaled.backward()
        if between is not None:
            between()
        opt.step()
        opt.zero_grad()


def test_the_cpu_takes_todays_path_and_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, opt = _initialize()
    stash = opt._amp_stash
    assert type(stash) is MasterWeights
    assert stash.unfused_reason == "the fused O2 kernels run on CUDA devices, not on cpu"
    _train(model, opt, steps=3)
    assert stash.unscale_paths == {"fast": 3, "general": 0}


def test_the_switch_and_the_environment_choose_the_unfused_strategy(monkeypatch):
    stub.install(monkeypatch)
    monkeypatch.delenv(coverage.ENV_VAR, raising=False)
    assert type(_initialize()[1]._amp_stash) is FusedMasterWeights
    monkeypatch.setenv(coverage.ENV_VAR, "0")
    stash = _initialize()[1]._amp_stash
    assert type(stash) is MasterWeights and stash.unfused_reason == "turned off by AMPCOMPAT_FUSED_O2=0"
    coverage.set_enabled(True)  # the Python switch wins over the environment
    assert type(_initialize()[1]._amp_stash) is FusedMasterWeights
    coverage.set_enabled(False)
    monkeypatch.delenv(coverage.ENV_VAR)
    stash = _initialize()[1]._amp_stash
    assert stash.unfused_reason == "turned off by ampcompat.amp.fused_o2.set_enabled(False)"
    with pytest.raises(TypeError, match="True, False or None"):
        coverage.set_enabled("no")


def test_o0_to_o4_never_get_the_fused_strategy(monkeypatch):
    stub.install(monkeypatch)
    for level in ("O0", "O1", "O3"):
        amp_state_reset()
        assert not isinstance(_initialize(opt_level=level)[1]._amp_stash, MasterWeights)
    amp_state_reset()
    assert type(_initialize(opt_level="O5")[1]._amp_stash) is FusedMasterWeights


def amp_state_reset():
    import ampcompat

    ampcompat.reset()


class _AdamWithItsOwnStep(FusedAdam):
    def step(self, closure=None):
        return super().step(closure)


def _two_decays(params):
    params = list(params)
    return torch.optim.Adam([{"params": params[:1]}, {"params": params[1:], "decoupled_weight_decay": True}])


@pytest.mark.parametrize("make,expected", [
    (lambda p: torch.optim.AdamW(p, fused=True), coverage.UpdateRule("adam", True)),
    (lambda p: torch.optim.Adam(p, foreach=True), coverage.UpdateRule("adam", False)),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), coverage.UpdateRule("sgd")),
    (lambda p: FusedAdam(p), coverage.UpdateRule("adam", True)),
    (lambda p: FusedAdam(p, adam_w_mode=False, weight_decay=0.1), coverage.UpdateRule("adam", False)),
    (lambda p: FusedSGD(p, lr=0.1, momentum=0.9, weight_decay=0.1), coverage.UpdateRule("sgd")),
    (lambda p: FusedSGD(p, lr=0.1, wd_after_momentum=True), coverage.UpdateRule("sgd")),  # no decay: same math
    (lambda p: FusedAdam(p, max_grad_norm=1.0), "2019 API"),
    (lambda p: FusedAdam(p, capturable=True), "capturable"),
    (lambda p: FusedAdam(p, bias_correction=False), "without bias correction"),
    (lambda p: _AdamWithItsOwnStep(p), "_AdamWithItsOwnStep replaces FusedAdam.step"),
    (lambda p: FusedSGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, wd_after_momentum=True), "wd_after_momentum"),
    (lambda p: torch.optim.AdamW(p, amsgrad=True), "amsgrad=True"),
    (_two_decays, "mix Adam's and AdamW's weight decay"),
    (lambda p: FusedLAMB(p), "FusedLAMB is not an optimizer the fused O2 step covers"),
    (lambda p: torch.optim.RMSprop(p), "RMSprop is not an optimizer the fused O2 step covers"),
])
def test_which_optimizers_the_fused_step_covers(make, expected, monkeypatch):
    stub.install(monkeypatch)
    rule = coverage.update_rule(make(_mlp().parameters()))
    if isinstance(expected, str):
        assert isinstance(rule, str) and expected in rule
        stash = _initialize(make)[1]._amp_stash  # amp.initialize gives it the unfused strategy, saying why
        assert type(stash) is MasterWeights and expected in stash.unfused_reason
    else:
        assert rule == expected


# --- the path each pattern takes (kernels stubbed) --------------------------------------------------------

def _paths(opt):
    return dict(opt._amp_stash.unscale_paths)


def test_a_fused_exit_leaves_no_master_gradient_and_fp32_grads_as_todays_path_does(monkeypatch):
    """After a fused exit no FP32 master gradient exists (the memory the fused step saves); the FP32
    parameters' gradients (BatchNorm) are unscaled in place, bitwise as on today's path."""
    launches = stub.install(monkeypatch)
    grads = {}
    for fused in (True, False):
        coverage.set_enabled(fused)
        model, opt = _initialize()
        _train(model, opt)  # torch makes its state
        launches.clear()
        torch.manual_seed(5)
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        with amp.scale_loss(nn.functional.cross_entropy(model(x), y), opt) as scaled:
            scaled.backward()
        stash = opt._amp_stash
        masters = stash._plan.masters
        if fused:
            assert all(m.grad is None for m in masters) and launches == ["nonfinite_kernel"]
            assert stash.unfused_reason is None
        grads[fused] = [p.grad.clone() for p in stash._plan.fp32]
        opt.step()
        if fused:
            assert launches == ["nonfinite_kernel", "adam_kernel", "adam_kernel"]  # half plan, FP32 plan
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def _register_hook(opt, calls):
    return opt.register_step_pre_hook(lambda *args: calls.append("hook"))


@pytest.mark.parametrize("pattern", ["plain", "clip", "apex_master_list", "delay_unscale", "accumulate",
                                     "delay_overflow_check", "hook", "hook_after_exit", "missing_grad",
                                     "load_state_dict_after_exit", "add_param_group_after_exit",
                                     "zero_grad_after_exit"])
def test_the_path_each_pattern_takes(pattern, monkeypatch):
    launches = stub.install(monkeypatch)
    model, opt = _initialize()
    _train(model, opt)  # the first step is always unfused: torch makes its state
    stash = opt._amp_stash
    assert stash.unfused_reason.startswith("the optimizer has not created its state")
    before = _paths(opt)
    launches.clear()
    calls = []
    torch.manual_seed(3)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def block(**kwargs):
        with amp.scale_loss(nn.functional.cross_entropy(model(x), y), opt, **kwargs) as scaled:
            scaled.backward()

    if pattern == "delay_unscale":
        block(delay_unscale=True)
    elif pattern == "hook":
        _register_hook(opt, calls)
    elif pattern == "missing_grad":
        model[0].weight.requires_grad_(False)  # frozen after initialize: no gradient for its master
    if pattern == "delay_overflow_check":
        block(delay_overflow_check=True)
    else:
        block()
    if pattern == "accumulate":
        block()
    if pattern == "clip":
        torch.nn.utils.clip_grad_norm_(amp.master_params(opt), 1.0)
    elif pattern == "apex_master_list":
        assert all(m.grad is not None for m in stash.all_fp32_from_fp16_params)
    elif pattern == "hook_after_exit":
        _register_hook(opt, calls)
    elif pattern == "load_state_dict_after_exit":
        opt.load_state_dict(opt.state_dict())
    elif pattern == "add_param_group_after_exit":
        opt.add_param_group({"params": list(nn.Linear(2, 2).half().parameters())})
    elif pattern == "zero_grad_after_exit":
        opt.zero_grad()
    reason = stash.unfused_reason
    masters_have_grads = all(m.grad is not None for m in stash._plan.masters)
    opt.step()
    delta = {k: v - before.get(k, 0) for k, v in _paths(opt).items() if v != before.get(k, 0)}
    expected = {
        "plain": ({"fused": 1}, None, ["nonfinite_kernel", "adam_kernel", "adam_kernel"]),
        "clip": ({"fused": 1, "materialised": 1}, None, ["nonfinite_kernel"]),
        "apex_master_list": ({"fused": 1, "materialised": 1}, None, ["nonfinite_kernel"]),
        "delay_unscale": ({"fast": 1}, "the block follows delay_unscale or uses delay_overflow_check", []),
        "accumulate": ({"fused": 1, "materialised": 1, "general": 1},
                       "the exit adds onto gradients of an earlier block, or spans several devices or dtypes",
                       ["nonfinite_kernel"]),
        "delay_overflow_check": ({"fast": 1}, "the block follows delay_unscale or uses delay_overflow_check", []),
        "hook": ({"fast": 1}, "optimizer step hooks are registered (the fused step would not run them)", []),
        "hook_after_exit": ({"fused": 1, "materialised": 1}, None, ["nonfinite_kernel"]),
        "missing_grad": ({"general": 1}, "a parameter has no gradient, or a sparse one", []),
        "load_state_dict_after_exit": ({"fused": 1, "materialised": 1}, None, ["nonfinite_kernel"]),
        "add_param_group_after_exit": ({"fused": 1, "materialised": 1}, None, ["nonfinite_kernel"]),
        "zero_grad_after_exit": ({"fused": 1}, None, ["nonfinite_kernel"]),
    }[pattern]
    assert (delta, reason, launches) == expected
    assert masters_have_grads == (pattern not in ("plain", "hook_after_exit", "load_state_dict_after_exit",
                                                  "add_param_group_after_exit", "zero_grad_after_exit",
                                                  "missing_grad"))
    assert calls == (["hook"] if pattern.startswith("hook") else [])  # the hooks ran: torch's own step did


def test_sparse_gradients_take_todays_path(monkeypatch):
    stub.install(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    model, opt = amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O2", verbosity=0)
    for _ in range(2):
        with amp.scale_loss(model(torch.tensor([1, 2, 3])).float().sum(), opt) as scaled:
            scaled.backward()
        opt.step()
        opt.zero_grad()
    assert opt._amp_stash.unfused_reason == "a parameter has no gradient, or a sparse one"
    assert _paths(opt)["fused"] == 0


def test_a_copy_of_the_optimizer_builds_its_own_tables_and_keeps_a_waiting_update(monkeypatch):
    """deepcopy between the exit and step(): the waiting update becomes master gradients first (both
    optimizers then step them as today's path does, bitwise); a copy never launches on the original's
    tensors: it starts without tables and builds its own."""
    stub.install(monkeypatch)
    results = {}
    for fused in (True, False):
        coverage.set_enabled(fused)
        model, opt = _initialize()
        _train(model, opt)  # (a fused step would change nothing here: the kernels are stubs)
        torch.manual_seed(4)
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        with amp.scale_loss(nn.functional.cross_entropy(model(x), y), opt) as scaled:
            scaled.backward()
        twin = copy.deepcopy({"model": model, "opt": opt})
        copied = twin["opt"]
        if fused:
            assert opt._amp_stash.unscale_paths["materialised"] == 1 and copied._amp_stash._fused.plans is None
        opt.step()
        copied.step()
        results[fused] = [t.detach().clone() for o in (opt, copied) for t in amp.master_params(o)]
        if fused:
            _train(twin["model"], copied)  # the copy's next exit is fused, on tables of its own tensors
            plans = copied._amp_stash._fused.plans
            assert copied._amp_stash.unscale_paths["fused"] == 2 and plans.is_current(copied)  # (counts copied)
            assert plans._plans[0].tensor_table[0, 0].item() == copied._amp_stash._plan.masters[0].data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))


# --- a kernel that cannot compile --------------------------------------------------------------------------

@pytest.mark.parametrize("failing", ["nonfinite_kernel", "adam_kernel"])
def test_a_kernel_that_fails_to_compile_falls_back_with_one_warning_and_todays_results(failing, monkeypatch):
    """The check (at the exit) or the update (at the step) cannot compile: one warning for the process,
    that exit or step and every later one take today's path, and two optimizers train exactly as with the
    fused step switched off."""
    stub.install(monkeypatch, fail_compile=RuntimeError("Failed to find C compiler"), failing=(failing,))
    results = {}
    for fused in (True, False):
        coverage.set_enabled(fused)
        runs = [_initialize(), _initialize(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for model, opt in runs:
                _train(model, opt, steps=4)
        messages = [str(w.message) for w in caught if "fused O2 kernel failed" in str(w.message)]
        if fused:
            assert len(messages) == 1 and "Failed to find C compiler" in messages[0]
            assert all("Failed to find C compiler" in opt._amp_stash.unfused_reason for _, opt in runs)
            later = _initialize()[1]._amp_stash  # off for optimizers initialized later too
            assert type(later) is MasterWeights and "Failed to find C compiler" in later.unfused_reason
        results[fused] = [t.detach().clone() for model, opt in runs
                          for t in list(model.parameters()) + list(amp.master_params(opt))]
        coverage._failure = None
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))


# --- CUDA ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", list(twins.SCENARIOS))
def test_twin_on_cuda(name):
    steps = 240 if name in OPTIMIZER_SCENARIOS else 60
    result = twins.SCENARIOS[name]("cuda", steps)
    print(name, json.dumps(result))


def _gpt_like(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512), nn.LayerNorm(512),
                         nn.Linear(512, 1000)).to(device)


@pytest.mark.cuda
def test_cuda_optimizer_phase_peak_memory_has_no_master_gradients():
    """From the end of backward to the end of step(), the fused step allocates no FP32 master gradient:
    its peak is at least 3.5 bytes per parameter below the unfused path's (4 bytes: the master gradients)."""
    peaks = {}
    for fused in (True, False):
        amp_state_reset()
        coverage.set_enabled(fused)
        model = _gpt_like("cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model, opt = amp.initialize(model, opt, opt_level="O2", verbosity=0)
        x = torch.randn(64, 512, device="cuda")
        for step in range(3):
            with amp.scale_loss(model(x).float().pow(2).mean(), opt) as scaled:
                scaled.backward()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            opt.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            opt.zero_grad(set_to_none=True)
        peaks[fused] = peak
        assert opt._amp_stash.unscale_paths.get("fused", 0) == (2 if fused else 0)
        params = sum(p.numel() for p in model.parameters())
    saved = (peaks[False] - peaks[True]) / params
    print(f"optimizer phase peak: fused {peaks[True] / params:.2f} B/param, unfused {peaks[False] / params:.2f}")
    assert saved >= 3.5, saved




@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["adamw_fused", "sgd_foreach"])
def test_cuda_host_work_per_step_fused_against_todays_path(optimizer):
    """A steady O2 step with the real Triton launches against today's path: no more aten ops, and no host
    sync with torch's fused AdamW. Python calls are printed, not pinned: Triton's launcher is Python (tens of
    calls per launch), where today's path dispatches aten ops (each costlier); the path's own calls are pinned
    with the launches stubbed (tests/test_host_overhead.py::test_fused_o2_step_host_work_is_no_more_than_todays_o2)."""
    import _counters as counters

    make = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
            "sgd_foreach": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)}[optimizer]
    counts = {}
    for fused in (True, False):
        amp_state_reset()
        coverage.set_enabled(fused)
        model, opt = _initialize(make, device="cuda")
        x, y = torch.randn(5, 6, device="cuda"), torch.randint(0, 3, (5,), device="cuda")

        def step(_):
            with amp.scale_loss(nn.functional.cross_entropy(model(x), y), opt) as scaled:
                scaled.backward()
            opt.step()
            opt.zero_grad()

        for i in range(4):
            step(i)
        calls, ops = counters.count_calls(step, 6), counters.count_aten_ops(step, 6)
        with counters.count_host_syncs(torch.device("cuda")) as syncs:
            for i in range(3):
                step(i)
        counts[fused] = (calls.python, calls.total, ops, syncs.cuda_syncs)
        assert opt._amp_stash.unscale_paths.get("fused", 0) == (18 if fused else 0)
    print(f"{optimizer}: fused (python calls, all calls, aten ops, syncs) {counts[True]}, today's {counts[False]}")
    assert counts[True][2] <= counts[False][2], counts
    if optimizer == "adamw_fused":
        assert counts[True][3] == counts[False][3] == 0, counts


@pytest.mark.cuda
def test_cuda_a_real_kernel_failing_to_compile_falls_back(monkeypatch):
    from ampcompat.amp.fused_o2 import launch

    kernels = launch.kernels()

    def cannot_compile(*args, **kwargs):
        raise RuntimeError("planted: ptxas not found")

    monkeypatch.setattr(kernels.adam_kernel, "warmup", cannot_compile)
    results = {}
    for fused in (True, False):
        amp_state_reset()
        coverage.set_enabled(fused)
        model, opt = _initialize(device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, opt, steps=4, device="cuda")
        if fused:
            assert sum("planted: ptxas not found" in str(w.message) for w in caught) == 1
            assert _paths(opt) == {"fast": 3, "general": 0, "fused": 1, "materialised": 1}
        results[fused] = [t.detach().clone() for t in list(model.parameters()) + list(amp.master_params(opt))]
        coverage._failure = None
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))


@pytest.mark.cuda
def test_cuda_speed_benchmark_reports_the_optimizer_phase(tmp_path):
    """``benchmarks/speed.py`` on CUDA (tiny sizes): the optimizer phase of every O2-family mode is timed,
    its bytes counted by the path taken, its bandwidth set against the copy bandwidth; O2 took the fused path."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(TESTS.parent / "benchmarks" / "speed.py"), "--device", "cuda", "--tiny",
                           "--workloads", "gpt,mlp", "--modes", "native_fp16,manual_o2,O2,O2_unfused,pure_fp16",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["copy_bandwidth_Bps"] > 1e11
    for name in ("gpt", "mlp"):
        modes = report["workloads"][name]["modes"]
        assert all(r["error"] is None for r in modes.values()), modes
        o2, unfused = modes["O2"], modes["O2_unfused"]
        assert o2["paths"]["unscale_paths"]["fused"] > 0 and o2["paths"]["unfused_reason"] is None
        assert unfused["paths"]["unscale_paths"]["fast"] > 0 and "fused" not in unfused["paths"]["unscale_paths"]
        params = modes["O2"]["parameters"]
        for mode in ("manual_o2", "O2", "O2_unfused", "pure_fp16"):
            r = modes[mode]
            assert r["optimizer_gpu_ms"] > 0 and r["optimizer_GBps"] > 0 and r["optimizer_vs_copy_bw"] > 0, mode
        assert o2["optimizer_bytes"] < unfused["optimizer_bytes"] == modes["manual_o2"]["optimizer_bytes"]
        assert modes["native_fp16"].get("optimizer_bytes") is None
        # the unfused path's FP32 master gradients (4 B/param) are allocated in the phase, the fused path's are not
        assert (unfused["optimizer_peak_bytes"] - o2["optimizer_peak_bytes"]) / params >= 3.0  # tiny: small blocks
    assert "Optimizer phase (end of backward to end of `step()`" in proc.stdout


def test_a_triton_older_than_the_verified_floor_turns_the_fused_step_off_naming_both_versions(monkeypatch):
    """Triton 3.0 (torch 2.4's) computes wrong updates under its interpreter: below the floor, unfused O2."""
    fake = types.ModuleType("triton")
    fake.__version__ = "3.0.0"
    monkeypatch.setitem(sys.modules, "triton", fake)
    reason = coverage.triton_version_error()
    assert reason is not None and "3.0.0" in reason and coverage.MIN_TRITON in reason
    fake.__version__ = coverage.MIN_TRITON
    assert coverage.triton_version_error() is None
    fake.__version__ = "3.6.0+git1234"
    assert coverage.triton_version_error() is None
