"""The fused O2 kernels (``ampcompat.amp.fused_o2``) against O2 written by hand, and their tables and guards.

* CUDA (``cuda`` marker): twin runs of 200+ steps (``_fused_o2_twins.py``) against the hand-written O2
  pipeline with torch's fused AdamW/Adam/SGD (and the default foreach Adam, whose step counts live on the
  CPU), with overflows injected and occurring naturally, mixed shapes (odd, empty, 3-D, channels-last),
  several param groups with different hyper-parameters and a changing lr, FP32 params stepped in place,
  bf16 without loss scaling, unaligned gradients; host work per step counted (no aten op, Python calls
  independent of the number of tensors); under ``slow``, one tensor larger than 2**31 bytes.
* Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, in a subprocess): the same twins, small.
  Skipped with "needs triton" where Triton is not installed (CI's default install has none).
* Everywhere: availability and coverage answers, the tables' layout and when they are rebuilt, and the
  plan's refusals of tensors the kernels cannot step.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _fused_o2_twins as twins
from _fused_o2_twins import ADAMW_GROUPS, MIXED_SHAPES, SGD_GROUPS, Param, Twin, run_twin
from ampcompat.amp import fused_o2
from ampcompat.amp.fused_o2 import AdamTensors, FusedPlan, SGDTensors, coverage

# Triton importable and not older than the kernels' verified floor (coverage.MIN_TRITON)
HAS_TRITON = importlib.util.find_spec("triton") is not None and coverage.triton_version_error() is None
TESTS = Path(__file__).resolve().parent


# --- availability and coverage ----------------------------------------------------------------------

def test_importing_ampcompat_and_the_fused_package_does_not_import_triton():
    code = "import sys, ampcompat, ampcompat.amp.fused_o2; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_is_unavailable_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in fused_o2.unavailable_reason("cpu")
    assert "CUDA" in fused_o2.unavailable_reason("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_cuda_is_unavailable_without_cuda():
    assert fused_o2.unavailable_reason("cuda") == "CUDA is not available"


def _params(n=2):
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


@pytest.mark.parametrize("build", [
    lambda p: torch.optim.Adam(p), lambda p: torch.optim.AdamW(p, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, foreach=False, maximize=True), lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-3)),
])
def test_adam_forms_are_covered(build):
    assert fused_o2.adam_not_covered(build(_params())) is None


def _with_lr(optimizer, lr):
    optimizer.param_groups[0]["lr"] = lr  # a device tensor lr the constructor would read on the host
    return optimizer


class _OwnStepAdam(torch.optim.Adam):
    def step(self, closure=None):
        return super().step(closure)


@pytest.mark.parametrize("build,reason", [
    (lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad=True"),
    (lambda p: torch.optim.Adam(p, capturable=True), "capturable=True"),
    (lambda p: torch.optim.Adam(p, differentiable=True), "differentiable=True"),
    (lambda p: _with_lr(torch.optim.Adam(p), torch.tensor(1e-3, device="meta")), "lr is a tensor on meta"),
    (lambda p: _OwnStepAdam(p), "_OwnStepAdam is not torch.optim.Adam"),
    (lambda p: torch.optim.SGD(p, lr=0.1), "SGD is not torch.optim.Adam"),
])
def test_adam_options_the_kernel_lacks_are_refused_with_the_reason(build, reason):
    assert reason in fused_o2.adam_not_covered(build(_params()))


def test_sgd_coverage():
    assert fused_o2.sgd_not_covered(torch.optim.SGD(_params(), lr=0.1, momentum=0.9, nesterov=True)) is None
    assert "differentiable" in fused_o2.sgd_not_covered(torch.optim.SGD(_params(), lr=0.1, differentiable=True))
    assert "is not torch.optim.SGD" in fused_o2.sgd_not_covered(torch.optim.Adam(_params()))


def test_decoupled_weight_decay_follows_the_class_and_the_group_flag():
    adamw, adam = torch.optim.AdamW(_params()), torch.optim.Adam(_params())
    assert fused_o2.decoupled_weight_decay(adamw, adamw.param_groups[0])
    assert not fused_o2.decoupled_weight_decay(adam, adam.param_groups[0])
    assert fused_o2.decoupled_weight_decay(adam, dict(adam.param_groups[0], decoupled_weight_decay=True))


# --- tables -------------------------------------------------------------------------------------------

def _adam_group(shapes, half=torch.float16):
    masters = [torch.randn(s) for s in shapes]
    return AdamTensors(masters, [torch.zeros_like(m) for m in masters], [torch.zeros_like(m) for m in masters],
                       [torch.zeros(()) for _ in masters], [m.to(half) for m in masters])


def test_tables_hold_each_tensors_addresses_and_one_chunk_row_per_chunk():
    groups = [_adam_group([(5,), (0,), (40,)]), _adam_group([(17,)])]
    plan = FusedPlan(groups, torch.float16, chunk=16, block=8)
    expected_rows = []
    for group in groups:
        for i, m in enumerate(group.masters):
            expected_rows.append([m.data_ptr(), group.exp_avgs[i].data_ptr(), group.exp_avg_sqs[i].data_ptr(),
                                  group.model_weights[i].data_ptr(), group.steps[i].data_ptr(), m.numel()])
    assert plan.tensor_table.tolist() == expected_rows
    # 5 -> 1 chunk, empty -> 1 (its step still advances), 40 -> 3, 17 -> 2
    assert plan.chunk_table.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1]]
    assert [s.chunks.tolist() for s in plan.segments] == [plan.chunk_table[:5].tolist(), plan.chunk_table[5:].tolist()]
    assert plan.is_current()


def test_the_gradients_table_is_uploaded_again_only_when_an_address_changes():
    group = _adam_group([(5,), (9,)])
    plan = FusedPlan([group], torch.float16)
    grads = [torch.randn(m.shape).half() for m in group.masters]
    assert plan.set_grads([grads]) is None
    table = plan.grad_table
    assert table.tolist() == [g.data_ptr() for g in grads]
    assert plan.set_grads([list(grads)]) is None and plan.grad_table is table
    fresh = [grads[0], torch.randn(9).half()]
    assert plan.set_grads([fresh]) is None and plan.grad_table is not table
    assert plan.grad_table.tolist() == [g.data_ptr() for g in fresh]


def test_a_moved_tensor_makes_the_plan_stale():
    group = _adam_group([(5,), (9,)])
    plan = FusedPlan([group], torch.float16)
    group.exp_avgs[1].data = torch.zeros(9)
    assert not plan.is_current()


@pytest.mark.parametrize("grads,reason", [
    (lambda g: [g[0], None], "no gradient"),
    (lambda g: [g[0], g[1].float()], "differs"),
    (lambda g: [g[0], torch.randn(18).half()[::2]], "differs"),
    (lambda g: [g[0]], "1 gradients for 2 parameters"),
    (lambda g: [g[0], g[1].to_sparse()], "sparse"),
])
def test_gradients_the_kernels_cannot_read_are_refused_for_the_step(grads, reason):
    group = _adam_group([(5,), (9,)])
    plan = FusedPlan([group], torch.float16)
    good = [torch.randn(5).half(), torch.randn(9).half()]
    assert reason in plan.set_grads([grads(good)])
    assert plan.set_grads([good]) is None


def test_a_gradient_laid_out_unlike_its_master_is_refused():
    master = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    group = AdamTensors([master], [torch.zeros_like(master)], [torch.zeros_like(master)], [torch.zeros(())],
                        [master.half()])
    plan = FusedPlan([group], torch.float16)
    assert "layout" in plan.set_grads([[torch.randn(2, 3, 4, 5).half()]])
    assert plan.set_grads([[torch.randn(2, 3, 4, 5).half().contiguous(memory_format=torch.channels_last)]]) is None


@pytest.mark.parametrize("change,message", [
    (lambda g: g._replace(masters=[g.masters[0].double()]), "FP32 masters"),
    (lambda g: g._replace(exp_avgs=[torch.zeros(4)]), "shape or memory layout"),
    (lambda g: g._replace(exp_avg_sqs=[torch.zeros(5).half()]), "optimizer state"),
    (lambda g: g._replace(model_weights=None), "pass model_weights"),
    (lambda g: g._replace(steps=[torch.zeros((), dtype=torch.float64)]), "step counts"),
])
def test_tensors_the_kernels_cannot_step_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        FusedPlan([change(_adam_group([(5,)]))], torch.float16)


def test_fp32_params_take_no_model_weights_and_momentum_buffers_are_all_or_none():
    masters = [torch.randn(4), torch.randn(3)]
    with pytest.raises(ValueError, match="no model_weights"):
        FusedPlan([SGDTensors(masters, None, [m.half() for m in masters])], torch.float32)
    with pytest.raises(ValueError, match="all or none"):
        FusedPlan([SGDTensors(masters, [torch.zeros(4), None])], torch.float32)
    plan = FusedPlan([SGDTensors(masters, [None, None]), SGDTensors([torch.randn(2)], None)], torch.float32)
    buffers = plan.momentum_buffers(0)
    assert [b.shape for b in buffers] == [m.shape for m in masters] and plan.momentum_buffers(1) is None
    assert plan.first_step_pending == [True, False]


def test_steps_on_host_leaves_the_step_column_empty():
    group = _adam_group([(5,), (3,)])
    assert FusedPlan([group], torch.float16).device_steps  # CPU "device" steps: Triton's interpreter
    plan = FusedPlan([group], torch.float16, steps_on_host=True)
    assert not plan.device_steps and [row[4] for row in plan.tensor_table.tolist()] == [0, 0]


_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _ready_plan(**options):
    group = _adam_group([(5,)])
    plan = FusedPlan([group], torch.float16, **options)
    plan.set_grads([[torch.randn(5).half()]])
    return plan, group


@pytest.mark.parametrize("call,error,message", [
    (lambda plan: fused_o2.fused_adam_step(plan, [_HYPER, _HYPER], decoupled=True, inv_scale=torch.ones(1),
                                           found_inf=None), ValueError, "2 sets of hyper-parameters for 1"),
    (lambda plan: fused_o2.fused_sgd_step(plan, [_HYPER], inv_scale=torch.ones(1), found_inf=None),
     ValueError, "built from SGDTensors"),
    (lambda plan: fused_o2.fused_adam_step(plan, [dict(_HYPER, lr=torch.tensor(1e-3, device="meta"))],
                                           decoupled=True, inv_scale=torch.ones(1), found_inf=None),
     ValueError, "lr is a tensor on meta"),
])
def test_launch_arguments_are_checked_before_anything_runs(call, error, message):
    plan, group = _ready_plan()
    with pytest.raises(error, match=message):
        call(plan)


def test_no_launch_without_gradients():
    plan = FusedPlan([_adam_group([(5,)])], torch.float16)
    with pytest.raises(RuntimeError, match="set_grads"):
        fused_o2.check_finite_(plan, torch.ones(1), torch.zeros(1))


def test_host_step_counts_need_the_verdict_on_the_host():
    plan, group = _ready_plan(steps_on_host=True)
    with pytest.raises(ValueError, match="decide the overflow on the host"):
        fused_o2.fused_adam_step(plan, [_HYPER], decoupled=True, inv_scale=torch.ones(1), found_inf=torch.zeros(1))
    assert [float(s) for s in group.steps] == [0.0]  # refused before any step count moved


def test_sgd_first_step_needs_the_verdict_on_the_host_and_momentum_must_match_the_plan():
    masters = [torch.randn(4)]
    plan = FusedPlan([SGDTensors(masters, [None], [masters[0].half()])], torch.float16)
    plan.set_grads([[torch.randn(4).half()]])
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    with pytest.raises(ValueError, match="first momentum step"):
        fused_o2.fused_sgd_step(plan, [hyper], inv_scale=torch.ones(1), found_inf=torch.zeros(1))
    with pytest.raises(ValueError, match="momentum 0.0 but its fused plan was built with momentum buffers"):
        fused_o2.fused_sgd_step(plan, [dict(hyper, momentum=0.0)], inv_scale=torch.ones(1), found_inf=None)
    assert plan.first_step_pending == [True]


# --- Triton's interpreter (CPU) -----------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON, reason="needs triton >= 3.2: pip install triton")
def test_twins_under_tritons_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    out = subprocess.run([sys.executable, str(TESTS / "_fused_o2_twins.py")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[:2] for line in out.stdout.splitlines()] == [
        [name, "ok"] for name in twins.interpreter_scenarios()]


# --- CUDA twin runs ----------------------------------------------------------------------------------

cuda = pytest.mark.cuda

CUDA_SHAPES = MIXED_SHAPES + [Param((8, 16, 3, 3), channels_last=True), Param((70_001,)),
                              Param((33, 3, 1, 1), channels_last=True, kind="fp32")]


def _check(result: twins.Result, twin: Twin) -> None:
    assert result.skipped >= len(twin.inject)  # the injected ones, and those the growing scale caused
    print(f"{twin.optimizer}: {result.skipped} skipped, {result.bitwise_equal}/{result.compared} elements "
          f"bitwise equal, max relative difference {result.max_rel_diff:.3g}")


@cuda
@pytest.mark.parametrize("optimizer,groups", [("adamw", ADAMW_GROUPS), ("adam", ADAMW_GROUPS), ("sgd", SGD_GROUPS)])
def test_cuda_twin_against_hand_written_o2(optimizer, groups):
    twin = Twin(optimizer, CUDA_SHAPES, groups, steps=240, inject={0: "inf", 5: "inf", 11: "nan", 12: "inf", 90: "nan"}
                if optimizer != "sgd" else {5: "inf", 11: "nan", 12: "inf", 90: "nan"})
    _check(run_twin(twin, "cuda"), twin)


@cuda
def test_cuda_twin_default_adam_with_cpu_step_counts():
    # torch's foreach Adam computes in float where the fused kernel uses double: agreement within rounding
    twin = Twin("adam", CUDA_SHAPES, ADAMW_GROUPS, steps=200, reference_impl="foreach", rtol=1e-4)
    _check(run_twin(twin, "cuda"), twin)


@cuda
def test_cuda_twin_bf16_without_loss_scaling():
    twin = Twin("adamw", CUDA_SHAPES, ADAMW_GROUPS, steps=200, half_dtype=torch.bfloat16, scaling=False, inject={})
    _check(run_twin(twin, "cuda"), twin)


@cuda
def test_cuda_twin_unaligned_gradients_and_small_chunks():
    shapes = [Param((300,), unaligned_grad=True), Param((1029,)), Param((4097,), group=1, unaligned_grad=True)]
    twin = Twin("adamw", shapes, ADAMW_GROUPS, steps=200, chunk=2048, block=512)
    _check(run_twin(twin, "cuda"), twin)


def _steady_step(plan, grads, groups, inv_scale, found_inf):
    def run(_):
        plan.set_grads([grads])
        found_inf.zero_()
        fused_o2.check_finite_(plan, inv_scale, found_inf)
        fused_o2.fused_adam_step(plan, groups, decoupled=True, inv_scale=inv_scale, found_inf=found_inf)
    return run


@cuda
def test_cuda_host_work_per_step_is_flat_in_the_number_of_tensors():
    import _counters as counters

    calls, ops = {}, {}
    for count in (4, 64):
        group = AdamTensors(*[[torch.zeros(257, device="cuda") for _ in range(count)] for _ in range(3)],
                            [torch.zeros((), device="cuda") for _ in range(count)],
                            [torch.zeros(257, device="cuda", dtype=torch.float16) for _ in range(count)])
        plan = FusedPlan([group], torch.float16)
        grads = [torch.zeros(257, device="cuda", dtype=torch.float16) for _ in range(count)]
        hyper = [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)]
        run = _steady_step(plan, grads, hyper, torch.ones(1, device="cuda"), torch.zeros(1, device="cuda"))
        run(0)  # compile and upload the gradients' table
        calls[count] = counters.count_calls(run, steps=3)
        ops[count] = counters.count_aten_ops(run, steps=3)
    print("host calls per fused step (python, builtin):", {n: (c.python, c.builtin) for n, c in calls.items()})
    assert calls[4].python == calls[64].python
    assert ops[4] == ops[64] == 1  # found_inf.zero_(): the check and the step dispatch no aten op




@cuda
@pytest.mark.slow
def test_cuda_tensor_larger_than_2_to_the_31_bytes():
    n = 2 ** 30 + 3  # its FP16 gradient alone is 2 GiB + 6 bytes
    twin = Twin("adamw", [Param((n,)), Param((5,))], ADAMW_GROUPS[:1], steps=4, inject={2: "inf"},
                init_scale=2.0 ** 8, lr_decay=1.0)
    _check(run_twin(twin, "cuda"), twin)
