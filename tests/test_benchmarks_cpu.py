"""CPU smoke tests of the benchmarks: every mode trains, the reports hold every number they promise.

``benchmarks/convergence.py`` and ``benchmarks/speed.py`` run once each (``--device cpu --tiny``) in a
subprocess, exactly as documented; their JSON and Markdown are then checked. The shared pieces
(corpus, model, sync counter, mode recipes) are also tested directly. Benchmark modules are loaded by
path under private names, since ``tests/`` has modules of the same short names.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
CONVERGENCE_MODES = ["fp32", "native_fp16", "native_bf16", "O0", "O1", "O2", "O3", "O4", "O5"]
SPEED_MODES = ["fp32", "native_fp16", "native_bf16", "pure_fp16", "manual_o2", "O1", "O2", "O2_unfused", "O3",
               "O5"]
TINY_STEPS = 40  # convergence.py's tiny configuration
# The tests that run a benchmark script (a subprocess training every mode) are left to --full: a few
# seconds each. The shared pieces and the hand-written O2 baseline are tested directly, in every run.
RUNS_A_BENCHMARK = pytest.mark.slow


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench_models = _load("_models")
bench_modes = _load("_modes")
bench_syncs = _load("_syncs")


def _run(script: str, args, tmp_path: Path):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(BENCH / script)] + args, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


# --------------------------------------------------------------------------------------------------
# convergence.py
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convergence(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    proc = _run("convergence.py", ["--device", "cpu", "--tiny", "--json", str(out / "conv.json"),
                                   "--markdown", str(out / "conv.md")], out)
    return {"stdout": proc.stdout, "report": json.loads((out / "conv.json").read_text()),
            "markdown": (out / "conv.md").read_text()}


@RUNS_A_BENCHMARK
def test_convergence_every_mode_learns(convergence):
    modes = convergence["report"]["modes"]
    assert sorted(modes) == sorted(CONVERGENCE_MODES)
    for mode, result in modes.items():
        assert result["error"] is None, (mode, result["error"])
        assert math.isfinite(result["final_val_loss"]), mode
        assert result["final_val_loss"] < result["initial_val_loss"] - 0.5, (mode, result["val_loss"])
        assert all(math.isfinite(x) for x in result["train_loss"]), mode


@RUNS_A_BENCHMARK
def test_convergence_json_schema(convergence):
    report = convergence["report"]
    meta = report["meta"]
    for key in ("command", "date", "device", "torch", "python", "config", "corpus", "parameters"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__
    assert "--tiny" in meta["command"]
    assert meta["config"]["steps"] == TINY_STEPS
    assert meta["corpus"]["train_files"] > meta["corpus"]["val_files"] > 0
    interval = meta["config"]["eval_interval"]
    for mode, result in report["modes"].items():
        assert len(result["train_loss"]) == TINY_STEPS
        assert len(result["loss_scale"]) == TINY_STEPS
        steps = [step for step, _ in result["val_loss"]]
        assert steps == list(range(0, TINY_STEPS + 1, interval)), mode
        assert result["initial_val_loss"] == result["val_loss"][0][1]
        assert result["final_val_loss"] == result["val_loss"][-1][1]
        assert result["skipped_steps"] == len(result["skipped_at"])
        assert all(0 <= s < TINY_STEPS for s in result["skipped_at"])
        assert result["ms_per_step"] > 0
    summary = {row["mode"]: row for row in report["summary"]}
    assert [row["mode"] for row in report["summary"]] == CONVERGENCE_MODES
    assert summary["fp32"]["rel_diff_vs_fp32"] == 0.0
    fp32_final = report["modes"]["fp32"]["final_val_loss"]
    for mode, row in summary.items():
        expected = (report["modes"][mode]["final_val_loss"] - fp32_final) / fp32_final
        assert row["rel_diff_vs_fp32"] == pytest.approx(expected)


@RUNS_A_BENCHMARK
def test_convergence_loss_scale_traces_follow_each_mode(convergence):
    modes = convergence["report"]["modes"]
    for mode in ("fp32", "native_bf16"):
        assert set(modes[mode]["loss_scale"]) == {None}, mode
    for mode in ("O0", "O3", "O4", "O5"):  # static scale of 1: never skips
        assert set(modes[mode]["loss_scale"]) == {1.0}, mode
        assert modes[mode]["skipped_steps"] == 0, mode
    for mode in ("native_fp16", "O1", "O2"):  # dynamic: 2**16 halved once per skipped step
        scales = modes[mode]["loss_scale"]
        assert all(math.log2(s).is_integer() and s <= 2.0 ** 16 for s in scales), mode
        assert scales[-1] == 2.0 ** 16 / 2 ** modes[mode]["skipped_steps"], mode


@RUNS_A_BENCHMARK
def test_convergence_uses_the_same_data_and_initial_weights_for_every_mode(convergence):
    modes = convergence["report"]["modes"]
    initial = {mode: result["initial_val_loss"] for mode, result in modes.items()}
    for mode, value in initial.items():  # same weights, same validation batches; only the dtype differs
        assert value == pytest.approx(initial["fp32"], abs=2e-3), mode
    # O0 is FP32 math: its curve is FP32's up to summation order in the gradient-norm clip.
    torch.testing.assert_close(torch.tensor(modes["O0"]["train_loss"]), torch.tensor(modes["fp32"]["train_loss"]),
                               rtol=1e-4, atol=1e-4)
    # O1 is fp16 autocast + dynamic loss scaling, like native_fp16: the curves agree closely.
    torch.testing.assert_close(torch.tensor(modes["O1"]["train_loss"]),
                               torch.tensor(modes["native_fp16"]["train_loss"]), rtol=1e-3, atol=1e-3)


@RUNS_A_BENCHMARK
def test_convergence_prints_and_writes_the_summary_table(convergence):
    for text in (convergence["stdout"], convergence["markdown"]):
        assert "| mode | final val loss | rel. diff vs FP32 | skipped steps |" in text
        for mode in CONVERGENCE_MODES:
            assert f"\n| {mode} |" in text, mode
    markdown, meta = convergence["markdown"], convergence["report"]["meta"]
    assert f"- command: `{meta['command']}`" in markdown
    assert meta["device"] in markdown and meta["torch"] in markdown and meta["date"] in markdown
    assert "O4/O5 are bf16 and use no loss scaling" in markdown


# --------------------------------------------------------------------------------------------------
# speed.py
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speed(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    proc = _run("speed.py", ["--device", "cpu", "--tiny", "--json", str(out / "speed.json"),
                             "--markdown", str(out / "speed.md")], out)
    return {"stdout": proc.stdout, "report": json.loads((out / "speed.json").read_text()),
            "markdown": (out / "speed.md").read_text()}


@RUNS_A_BENCHMARK
def test_speed_json_has_every_workload_and_mode(speed):
    report = speed["report"]
    assert report["modes"] == SPEED_MODES
    assert list(report["workloads"]) == ["gpt", "resnet", "mlp", "cifar_resnet18", "overhead"]
    for name, section in report["workloads"].items():
        if section["skipped"]:
            assert name == "resnet" and "torchvision" in section["skipped"]
            assert bench_models.torchvision_or_none() is None
            continue
        assert list(section["modes"]) == SPEED_MODES, name
        for mode, record in section["modes"].items():
            assert record["error"] is None, (name, mode, record["error"])


@RUNS_A_BENCHMARK
def test_speed_training_records(speed):
    for name in ("gpt", "mlp", "cifar_resnet18"):
        section = speed["report"]["workloads"][name]
        assert section["parameters"] > 0
        native = section["modes"]["native_fp16"]["median_ms"]
        floor = section["modes"]["pure_fp16"]["median_ms"]
        for mode, r in section["modes"].items():
            assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"], (name, mode)
            assert r["throughput"] == pytest.approx(section["items_per_step"] / (r["median_ms"] / 1e3))
            assert r["vs_native_fp16"] == pytest.approx(r["median_ms"] / native)
            assert r["vs_floor"] == pytest.approx(r["median_ms"] / floor)
            assert r["syncs_per_step"] is None and r["peak_mem_bytes"] is None  # CUDA-only numbers
            assert r["host_reads_per_step"] >= 0
            assert math.isfinite(r["final_loss"]), (name, mode)
        optimizers = {r["optimizer"] for r in section["modes"].values()}
        assert optimizers == ({"SGD(foreach)"} if name == "cifar_resnet18" else {"AdamW(fused)"}), name
        dtypes = {mode: r["param_dtype"] for mode, r in section["modes"].items()}
        assert dtypes["pure_fp16"] == dtypes["O2"] == dtypes["O3"] == "float16"
        assert dtypes["O5"] == "bfloat16" and dtypes["O1"] == dtypes["fp32"] == "float32"
        if name == "cifar_resnet18":  # SGD keeps no step counter to count skipped steps by
            assert section["modes"]["O2"]["skipped_steps"] is None
            continue
        assert isinstance(section["modes"]["native_fp16"]["skipped_steps"], int)  # from the optimizer step count
        assert isinstance(section["modes"]["O2"]["skipped_steps"], int)


@RUNS_A_BENCHMARK
def test_speed_o2_modes_record_the_path_their_exits_took(speed):
    """O2 says how its exits reached the update (the CPU has no fused step: today's path, and why);
    O2_unfused is O2 with AMPCOMPAT_FUSED_O2=0 set around amp.initialize; both print against manual_o2."""
    for name in ("gpt", "mlp", "cifar_resnet18"):
        modes = speed["report"]["workloads"][name]["modes"]
        assert modes["O2"]["paths"]["unfused_reason"] == "the fused O2 kernels run on CUDA devices, not on cpu"
        assert modes["O2_unfused"]["paths"]["unfused_reason"] == "turned off by AMPCOMPAT_FUSED_O2=0"
        assert modes["O2_unfused"]["paths"]["unscale_paths"]["fast"] > 0
        assert modes["native_fp16"]["paths"] is None
        for r in modes.values():
            assert r["vs_manual_o2"] == pytest.approx(r["median_ms"] / modes["manual_o2"]["median_ms"])
            assert "optimizer_gpu_ms" not in r  # the optimizer phase is timed on CUDA only
    assert "| vs native fp16 | vs pure-fp16 floor | vs manual_o2 |" in speed["markdown"]
    assert os.environ.get("AMPCOMPAT_FUSED_O2") is None  # (in this process; speed.py restores it after each mode)


def test_optimizer_traffic_counts_each_pipelines_bytes_per_parameter():
    traffic = _load("_traffic")
    params = [torch.zeros(10, dtype=torch.float16), torch.zeros(3)]  # a half weight, an FP32 (BatchNorm) one
    assert traffic.optimizer_bytes(params, "manual_o2") == 10 * 48 + 3 * 36
    assert traffic.optimizer_bytes(params, "O2") == 10 * 30 + 3 * 36  # the fused step
    assert traffic.optimizer_bytes(params, "O2_unfused") == traffic.optimizer_bytes(params, "manual_o2")
    assert traffic.optimizer_bytes(params, "pure_fp16") == 10 * 14 + 3 * 28
    assert traffic.optimizer_bytes(params, "native_fp16") is None
    assert traffic.optimizer_bytes(params, "O2", adamw=False) is None


@RUNS_A_BENCHMARK
def test_speed_reports_host_work_per_step_for_every_mode(speed):
    """Calls and aten ops per step (counted) and every phase's host time, in the JSON and the Markdown."""
    for name in ("gpt", "mlp", "cifar_resnet18"):
        section = speed["report"]["workloads"][name]
        for mode, r in section["modes"].items():
            assert r["calls_per_step"] > r["python_calls_per_step"] > 0, (name, mode)
            assert r["aten_ops_per_step"] > 0, (name, mode)
            assert set(r["phases_us"]) == {"forward_us", "enter_us", "backward_us", "exit_us", "step_us",
                                           "zero_grad_us"}
            assert all(v > 0 for v in r["phases_us"].values()), (name, mode)
        table = speed["markdown"].split(f"## {name}:", 1)[1].split("\n## ", 1)[0].split("Host work per step", 1)[1]
        for mode, r in section["modes"].items():
            assert f"\n| {mode} | {r['calls_per_step']:.0f} | {r['python_calls_per_step']:.0f} | " in table
    counts = speed["report"]["workloads"]["mlp"]["modes"]
    # The same loop counted twice gives the same numbers: pure fp16 does strictly less than O2.
    assert counts["pure_fp16"]["aten_ops_per_step"] < counts["O2"]["aten_ops_per_step"]


@RUNS_A_BENCHMARK
def test_speed_baseline_package_is_timed_in_the_same_run(tmp_path):
    """--baseline-path: a worker importing ampcompat from another folder adds `<mode>@base` rows.

    Here the baseline is this checkout itself, so its deterministic counts must equal the modes' own.
    """
    proc = _run("speed.py", ["--device", "cpu", "--tiny", "--workloads", "mlp,cifar_resnet18", "--modes",
                             "native_fp16,O2", "--rounds", "2", "--baseline-path", str(REPO),
                             "--baseline-workloads", "mlp", "--json", str(tmp_path / "b.json"),
                             "--markdown", str(tmp_path / "b.md")], tmp_path)
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["meta"]["baseline_package"] == str(REPO / "ampcompat")
    mlp = report["workloads"]["mlp"]
    assert list(mlp["modes"]) == ["native_fp16", "O2", "O2@base"]
    base, own = mlp["modes"]["O2@base"], mlp["modes"]["O2"]
    assert base["error"] is None and len(base["round_medians_ms"]) == 2
    assert base["vs_native_fp16"] == pytest.approx(base["median_ms"] / mlp["modes"]["native_fp16"]["median_ms"])
    for key in ("calls_per_step", "python_calls_per_step", "aten_ops_per_step"):
        assert base[key] == own[key], key
    assert list(report["workloads"]["cifar_resnet18"]["modes"]) == ["native_fp16", "O2"]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("[mlp] O2@base")]
    assert len(printed) == 2
    assert "| O2@base |" in (tmp_path / "b.md").read_text()


@RUNS_A_BENCHMARK
def test_speed_gpt_batch_sets_the_batch_in_the_parent_and_the_baseline_worker(tmp_path):
    """--gpt-batch: the GPT workload (and the baseline worker's copy of it) runs that many sequences a step."""
    _run("speed.py", ["--device", "cpu", "--tiny", "--workloads", "gpt", "--modes", "O2", "--rounds", "1",
                      "--gpt-batch", "3", "--baseline-path", str(REPO), "--baseline-workloads", "gpt",
                      "--json", str(tmp_path / "g.json")], tmp_path)
    gpt = json.loads((tmp_path / "g.json").read_text())["workloads"]["gpt"]
    assert gpt["config"]["batch_size"] == 3 and gpt["items_per_step"] == 3 * gpt["config"]["model"]["seq_len"]
    assert gpt["modes"]["O2"]["error"] is None and gpt["modes"]["O2@base"]["error"] is None
    # the worker timed the same model and batch: the same first-step loss
    assert gpt["modes"]["O2@base"]["final_loss"] == gpt["modes"]["O2"]["final_loss"]


@RUNS_A_BENCHMARK
def test_speed_overhead_records(speed):
    section = speed["report"]["workloads"]["overhead"]
    for mode, r in section["modes"].items():
        for key in ("forward_us", "enter_us", "backward_us", "exit_us", "step_us", "zero_grad_us"):
            assert r[key] > 0, (mode, key)
        assert r["total_us"] == pytest.approx(r["enter_us"] + r["exit_us"] + r["step_us"])


@RUNS_A_BENCHMARK
def test_speed_markdown_is_ready_for_the_docs(speed):
    markdown = speed["markdown"]
    meta = speed["report"]["meta"]
    assert f"`{meta['command']}`" in markdown and "--tiny" in meta["command"]
    assert meta["device"] in markdown and torch.__version__ in markdown and meta["date"] in markdown
    for name in ("gpt", "mlp", "cifar_resnet18", "overhead"):
        table = markdown.split(f"## {name}:", 1)[1].split("\n## ", 1)[0]
        for mode in SPEED_MODES:
            assert f"\n| {mode} |" in table, (name, mode)
    assert "## resnet:" in markdown


_FAIL_ONE_MODE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import {script} as bench
real = bench.make_recipe
def make_recipe(name, *args, **kwargs):
    if name == "O2":
        raise RuntimeError("CUDA out of memory (injected)")
    return real(name, *args, **kwargs)
bench.make_recipe = make_recipe
sys.exit(bench.main(sys.argv[2:]))
"""


def _run_with_o2_failing(script: str, args, tmp_path: Path):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-c", _FAIL_ONE_MODE.format(script=script), str(BENCH)] + args,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@RUNS_A_BENCHMARK
def test_speed_records_a_failing_mode_and_goes_on(tmp_path):
    proc = _run_with_o2_failing("speed", ["--device", "cpu", "--tiny", "--workloads", "mlp", "--modes",
                                          "native_fp16,O2,pure_fp16", "--json", str(tmp_path / "s.json"),
                                          "--markdown", str(tmp_path / "s.md")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    modes = json.loads((tmp_path / "s.json").read_text())["workloads"]["mlp"]["modes"]
    assert modes["O2"] == {"error": "RuntimeError: CUDA out of memory (injected)",
                           "description": bench_modes.MODE_DESCRIPTIONS["O2"]}
    assert modes["native_fp16"]["error"] is None and modes["pure_fp16"]["error"] is None
    assert modes["pure_fp16"]["vs_native_fp16"] > 0
    markdown = (tmp_path / "s.md").read_text()
    assert "| O2 | failed |" in markdown and "- O2: RuntimeError: CUDA out of memory (injected)" in markdown


@RUNS_A_BENCHMARK
def test_speed_mlp_statistics_pool_interleaved_rounds(speed):
    import statistics

    section = speed["report"]["workloads"]["mlp"]
    assert section["rounds"] == 6 and speed["report"]["workloads"]["gpt"]["rounds"] == 1
    for mode, record in section["modes"].items():
        assert len(record["round_medians_ms"]) == 6, mode
        times = record["step_times_ms"]
        assert len(times) == 6 * section["steps"]
        assert record["median_ms"] == statistics.median(times)
        assert record["min_ms"] == min(times) and record["max_ms"] == max(times)
    rounds_printed = [line for line in speed["stdout"].splitlines() if line.startswith("[mlp] O2 ")]
    assert [line.endswith(f"(round {i}/6)") for i, line in enumerate(rounds_printed, 1)] == [True] * 6
    assert "6 rounds (modes interleaved)" in speed["markdown"]


@RUNS_A_BENCHMARK
def test_speed_profile_steps_add_a_kernel_table_to_every_timed_mode(tmp_path):
    _run("speed.py", ["--device", "cpu", "--tiny", "--workloads", "mlp,overhead", "--modes", "pure_fp16,O2",
                      "--profile-steps", "2", "--json", str(tmp_path / "p.json")], tmp_path)
    workloads = json.loads((tmp_path / "p.json").read_text())["workloads"]
    for mode in ("pure_fp16", "O2"):
        table = workloads["mlp"]["modes"][mode]["top_kernels"]
        assert table[-1]["name"] == "(all kernels)"
        rows = table[:-1]
        assert rows and all(r["ms_per_step"] > 0 and r["calls_per_step"] > 0 for r in rows)
        assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
        assert table[-1]["ms_per_step"] >= sum(r["ms_per_step"] for r in rows) * 0.999
    assert "top_kernels" not in workloads["overhead"]["modes"]["O2"]


@RUNS_A_BENCHMARK
def test_convergence_records_a_failing_mode_and_exits_nonzero(tmp_path):
    proc = _run_with_o2_failing("convergence", ["--device", "cpu", "--tiny", "--steps", "4", "--modes",
                                                "fp32,O2,O5", "--json", str(tmp_path / "c.json")], tmp_path)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["modes"]["O2"]["error"] == "RuntimeError: CUDA out of memory (injected)"
    assert report["modes"]["fp32"]["error"] is None and report["modes"]["O5"]["error"] is None
    assert len(report["modes"]["O5"]["train_loss"]) == 4
    assert "[O2] FAILED: RuntimeError: CUDA out of memory (injected)" in proc.stdout
    assert [row["mode"] for row in report["summary"]] == ["fp32", "O2", "O5"]


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def test_corpus_split_is_by_file_and_deterministic():
    first, second = bench_models.load_stdlib_corpus(max_files=40), bench_models.load_stdlib_corpus(max_files=40)
    assert not set(first.train_files) & set(first.val_files)
    assert len(first.val_files) == 4 and len(first.train_files) == 36
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.train.dtype == torch.uint8


def test_byte_batches_are_seeded_and_shifted_by_one():
    data = torch.arange(1000, dtype=torch.int64) % 251
    a = bench_models.byte_batches(data.to(torch.uint8), 4, 16, seed=7)
    b = bench_models.byte_batches(data.to(torch.uint8), 4, 16, seed=7)
    c = bench_models.byte_batches(data.to(torch.uint8), 4, 16, seed=8)
    (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    assert xa.shape == (4, 16) and xa.dtype == torch.int64


def test_gpt_is_causal_and_ties_its_embeddings():
    torch.manual_seed(0)
    config = bench_models.GPTConfig(seq_len=12, n_layer=2, n_head=2, d_model=16)
    model = bench_models.GPT(config).eval()
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, 12, 256)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])
    assert model.head.weight is model.wte.weight
    untied = bench_models.count_parameters(bench_models.GPT(bench_models.GPTConfig(
        seq_len=12, n_layer=2, n_head=2, d_model=16, tie_weights=False)))
    assert untied - bench_models.count_parameters(model) == 256 * 16


def test_sync_counter_counts_host_reads_of_tensor_values():
    t = torch.arange(4.0)
    with bench_syncs.count_host_syncs(torch.device("cpu")) as count:
        t.sum().item()
        if t.any():
            pass
        float(t[1])
        t.tolist()
        (t * 2).add_(1)  # arithmetic reads nothing back
    assert count.cuda_syncs is None
    assert count.host_reads_by_kind == {"item": 1, "__bool__": 1, "__float__": 1, "tolist": 1}
    assert count.host_reads == 4
    assert "item" not in vars(torch.Tensor)  # the wrappers are gone again
    assert torch.Tensor.item is torch._C.TensorBase.item


def test_mode_names_are_checked():
    assert bench_modes.parse_modes(" O2,fp32 ") == ["O2", "fp32"]
    with pytest.raises(ValueError, match=r"Unknown mode\(s\) \['O9'\]"):
        bench_modes.parse_modes("O2,O9")
    with pytest.raises(ValueError, match="Unknown mode 'fp8'"):
        bench_modes.make_recipe("fp8", torch.nn.Linear(2, 2), bench_modes.make_adamw_factory(1e-3),
                                torch.device("cpu"))


@pytest.mark.parametrize("mode", ["native_fp16", "manual_o2", "O1", "O2"])
def test_recipes_report_a_skipped_step_on_inf(mode):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    recipe = bench_modes.make_recipe(mode, model, bench_modes.make_adamw_factory(1e-2),
                                     torch.device("cpu"), track_skips=True)
    try:
        before = [p.detach().float().clone() for p in model.parameters()]
        targets = torch.zeros(3, dtype=torch.long)
        recipe.train_step(torch.full((3, 4), float("inf")), targets, torch.nn.functional.cross_entropy)
        assert recipe.last_step_skipped and recipe.loss_scale() == 2.0 ** 15
        for old, new in zip(before, model.parameters()):
            assert torch.equal(old, new.float())
        recipe.train_step(torch.ones(3, 4), targets, torch.nn.functional.cross_entropy)
        assert not recipe.last_step_skipped and recipe.loss_scale() == 2.0 ** 15
        assert not torch.equal(before[0], model.weight.float())
    finally:
        recipe.close()


@pytest.mark.parametrize("fused", [False, True], ids=["adamw_foreach", "adamw_fused"])
def test_hand_written_o2_baseline_trains_exactly_like_ampcompat_o2(fused):
    """The speed benchmark's ``manual_o2`` is a fair O2 baseline only if it is the same algorithm."""
    config = bench_models.GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (2, 17), generator=generator)] * 6  # one batch: the loss must fall
    runs = {}
    for mode in ("manual_o2", "O2"):
        torch.manual_seed(0)
        recipe = bench_modes.make_recipe(mode, bench_models.GPT(config),
                                         bench_modes.make_adamw_factory(1e-2, weight_decay=0.1, fused=fused),
                                         torch.device("cpu"))
        try:
            losses = [recipe.train_step(b[:, :-1], b[:, 1:], bench_models.lm_loss, clip_norm=1.0) for b in batches]
            runs[mode] = (torch.stack(losses), [p.detach().clone() for p in recipe.model.parameters()],
                          recipe.loss_scale())
        finally:
            recipe.close()
    (manual_losses, manual_params, manual_scale), (amp_losses, amp_params, amp_scale) = runs["manual_o2"], runs["O2"]
    assert manual_losses[-1] < manual_losses[0]
    assert torch.equal(manual_losses, amp_losses)
    assert manual_scale == amp_scale
    for a, b in zip(manual_params, amp_params):
        assert a.dtype == b.dtype and torch.equal(a, b)


# --- benchmarks/to_native_e2e.py ---------------------------------------------------------------------------------
E2E_RECIPE = REPO / "tests" / "fixtures" / "to_native_e2e" / "imagenet_recipe.py"


@pytest.mark.slow
def test_to_native_e2e_driver_runs_both_and_agrees_on_a_cpu_recipe(tmp_path):
    """The GPU driver, on a CPU stand-in with main_amp.py's command line: it converts the copy, runs the original
    under ampcompat and the conversion with Apex and ampcompat blocked, and compares the printed losses."""
    keep = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(BENCH / "to_native_e2e.py"), str(E2E_RECIPE), "--steps", "3",
                           "--batch-size", "4", "--keep", str(keep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    original = [float(x) for x in lines[-3].split(":", 1)[1].split()]
    converted = [float(x) for x in lines[-2].split(":", 1)[1].split()]
    assert len(original) == len(converted) == 3 and original == converted
    assert lines[-1] == "steps: 3 and 3; largest relative difference: 0; AGREE within 0.01"
    native = (keep / "native" / "imagenet_recipe.py").read_text()
    assert "scaler.scale(loss).backward()" in native and "apex" not in native.split('"""', 2)[2]
    assert E2E_RECIPE.read_text() == (keep / "original" / "imagenet_recipe.py").read_text()


def test_to_native_e2e_driver_reports_a_disagreement():
    e2e = _load("to_native_e2e")
    assert e2e.compare([1.0, 2.0], [1.0, 2.0], 0.0) == (True, 0.0)
    agree, worst = e2e.compare([1.0, 2.0], [1.0, 2.1], 0.01)
    assert not agree and worst == pytest.approx(0.1 / 2.1)
    assert e2e.compare([1.0], [1.0, 1.0], 1.0)[0] is False and e2e.compare([], [], 1.0)[0] is False
    assert e2e.losses("Epoch: [0][1]\tLoss 1.2500000000 (1.2500)\tPrec@1 3\nLoss 0.5 (0.5)") == [1.25, 0.5]
