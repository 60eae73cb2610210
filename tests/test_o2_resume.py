"""Resuming O2/O3/O5 runs.

The documented checkpoint ``{'model', 'optimizer', 'amp'}`` saved after 10 steps and loaded in a *fresh
Python process* (with ``torch.load(weights_only=True)``) must finish the run bitwise identical to never
stopping: ampcompat keeps the FP32 masters in ``optimizer.state_dict()``. Apex-era checkpoints (no masters
in the optimizer state) still load and rebuild the masters from the model, in either load order, and the
DeepLearningExamples BERT recipe that restores saved masters by hand keeps working.
"""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import _o2_resume_worker as worker
import ampcompat
from ampcompat import amp

MASTERS_KEY = "amp_master_params"
LEVELS = ("O2", "O3", "O5")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = {}  # device -> {case: (uninterrupted snapshot, resumed snapshot, saved amp state)}


def _assert_bitwise(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a, e), "{} #{} differs".format(what, i)


def _assert_snapshots_equal(actual, expected):
    _assert_bitwise(actual["params"], expected["params"], "model param")
    _assert_bitwise(actual["buffers"], expected["buffers"], "buffer")
    _assert_bitwise(actual["masters"], expected["masters"], "master")
    assert len(actual["state"]) == len(expected["state"])
    for got, want in zip(actual["state"], expected["state"]):
        assert set(got) == set(want)
        _assert_bitwise([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], "optimizer state")
    assert actual["amp"] == expected["amp"]


def _save_and_reload(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- the fresh-process resume -----------------------------------------------------------------------

CASES = [(level, opt, order) for level in LEVELS for opt in worker.OPTIMIZERS for order in worker.LOAD_ORDERS]


def _run_all_cases(device, directory):
    """Train every (level, optimizer) here, checkpoint at step 10, resume all cases in one fresh process."""
    uninterrupted, saved_amp, jobs = {}, {}, []
    for level in LEVELS:
        for optimizer_name in worker.OPTIMIZERS:
            ampcompat.reset()
            model, optimizer = worker.build(level, optimizer_name, device)
            worker.train(model, optimizer, level, 0, worker.CHECKPOINT_STEP, device)
            path = os.path.join(directory, "{}_{}.pt".format(level, optimizer_name))
            torch.save(worker.checkpoint(model, optimizer), path)
            saved_amp[level, optimizer_name] = amp.state_dict()
            worker.train(model, optimizer, level, worker.CHECKPOINT_STEP, worker.TOTAL_STEPS, device)
            uninterrupted[level, optimizer_name] = worker.snapshot(model, optimizer)
            for order in worker.LOAD_ORDERS:
                jobs.append({"checkpoint": path, "level": level, "optimizer": optimizer_name, "order": order,
                             "device": device, "threads": torch.get_num_threads(),
                             "out": os.path.join(directory, "{}_{}_{}.out.pt".format(level, optimizer_name, order))})
    ampcompat.reset()
    jobs_path = os.path.join(directory, "jobs.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, worker.__file__, jobs_path], env=env, cwd=_REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = {}
    for job in jobs:
        key = (job["level"], job["optimizer"])
        resumed = torch.load(job["out"], weights_only=True)
        results[key + (job["order"],)] = (uninterrupted[key], resumed, saved_amp[key])
    return results


@pytest.fixture
def resume_results(device, tmp_path_factory):
    if device not in _RESULTS:
        _RESULTS[device] = _run_all_cases(device, str(tmp_path_factory.mktemp("o2_resume_" + device)))
    return _RESULTS[device]


@pytest.mark.parametrize("level,optimizer_name,order", CASES)
def test_resume_in_a_fresh_process_is_bitwise_identical(level, optimizer_name, order, resume_results):
    uninterrupted, resumed, saved_amp = resume_results[level, optimizer_name, order]

    _assert_snapshots_equal(resumed, uninterrupted)
    assert all(bool(torch.isfinite(p).all()) for p in resumed["params"])
    if level == "O2":
        # The checkpoint carried a reduced loss scale, and the resumed half skipped a step of its own.
        assert saved_amp["loss_scaler0"]["loss_scale"] == 2.0 ** 15
        assert resumed["amp"]["loss_scaler0"]["loss_scale"] == 2.0 ** 14
    elif level == "O5":  # static 1.0 with master weights: counted, never checked
        assert resumed["amp"]["loss_scaler0"] == {"loss_scale": 1.0, "unskipped": worker.TOTAL_STEPS}
    else:  # O3's static 1.0 short-circuits scale_loss: the scaler is never updated
        assert resumed["amp"]["loss_scaler0"] == {"loss_scale": 1.0, "unskipped": 0}
    if level in ("O2", "O5"):
        assert all(m.dtype == torch.float32 for m in resumed["masters"])
        # Masters carry more precision than the half model: a rebuild from the model could not match.
        assert any(not torch.equal(m, m.to(p.dtype).float())
                   for m, p in zip(resumed["masters"], resumed["params"]) if p.dtype != torch.float32)


@pytest.mark.parametrize("level", ["O2", "O5"])
def test_optimizer_state_dict_carries_masters_and_loads_weights_only(level, device):
    model, optimizer = worker.build(level, "adamw", device)
    worker.train(model, optimizer, level, 0, 3, device)

    state = _save_and_reload(worker.checkpoint(model, optimizer))

    saved_masters = state["optimizer"][MASTERS_KEY]
    _assert_bitwise(saved_masters, [m.detach() for m in optimizer._amp_stash.all_fp32_from_fp16_params],
                    "saved master")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    scaler = amp._amp_state.loss_scalers[0]
    assert state["amp"] == {"loss_scaler0": {"loss_scale": scaler.loss_scale(), "unskipped": scaler._unskipped}}
    assert type(state["amp"]["loss_scaler0"]["loss_scale"]) is float


# --- Apex-era checkpoints ---------------------------------------------------------------------------

def _apex_era_checkpoint(device):
    """10 O2 steps; the checkpoint with the masters removed, as Apex saved it, and the live run."""
    model, optimizer = worker.build("O2", "sgd_momentum", device)
    worker.train(model, optimizer, "O2", 0, worker.CHECKPOINT_STEP, device)
    ckpt = _save_and_reload(worker.checkpoint(model, optimizer))
    del ckpt["optimizer"][MASTERS_KEY]
    return ckpt, model, optimizer


def _masters_match_model(model, optimizer):
    """Per parameter: does ``amp.master_params`` hold the model's weight (in FP32)? One group, model order."""
    masters, params = list(amp.master_params(optimizer)), list(model.parameters())
    assert len(masters) == len(params)
    return [torch.equal(m, p.float()) for m, p in zip(masters, params)]




@pytest.mark.parametrize("order", [
    "model_first",
    "optimizer_first",
])
def test_apex_era_checkpoint_rebuilds_masters_from_the_loaded_model(order, device):
    ckpt, _, _ = _apex_era_checkpoint(device)
    ampcompat.reset()
    model, optimizer = worker.build("O2", "sgd_momentum", device, seed=1)

    worker.load(model, optimizer, ckpt, order)

    for name, p in model.named_parameters():
        assert torch.equal(p.float(), ckpt["model"][name]), name
    assert all(_masters_match_model(model, optimizer))
    resaved = optimizer.state_dict()[MASTERS_KEY]
    _assert_bitwise(resaved, [p.float() for p in model.parameters() if p.dtype == torch.float16],
                    "re-saved master")


@pytest.mark.parametrize("order", worker.LOAD_ORDERS)
def test_apex_era_checkpoint_training_continues(order, device):
    ckpt, live_model, live_optimizer = _apex_era_checkpoint(device)
    # What Apex did on resume: masters re-derived from the (half) model weights, then training on.
    stash = live_optimizer._amp_stash
    with torch.no_grad():
        for master, p in zip(stash.all_fp32_from_fp16_params, stash.all_fp16_params):
            master.copy_(p)
    worker.train(live_model, live_optimizer, "O2", worker.CHECKPOINT_STEP, worker.TOTAL_STEPS, device)
    expected = worker.snapshot(live_model, live_optimizer)
    ampcompat.reset()
    model, optimizer = worker.build("O2", "sgd_momentum", device, seed=1)

    worker.load(model, optimizer, ckpt, order)
    worker.train(model, optimizer, "O2", worker.CHECKPOINT_STEP, worker.TOTAL_STEPS, device)

    _assert_snapshots_equal(worker.snapshot(model, optimizer), expected)


# --- the DeepLearningExamples BERT recipe -----------------------------------------------------------



@pytest.mark.parametrize("checkpoint_kind", [
    "ampcompat",
    "apex_era",
])
def test_bert_recipe_restores_saved_masters(checkpoint_kind, device):
    model, optimizer = worker.build("O2", "sgd_momentum", device)
    worker.train(model, optimizer, "O2", 0, worker.CHECKPOINT_STEP, device)
    ckpt = worker.checkpoint(model, optimizer)
    ckpt["master params"] = list(amp.master_params(optimizer))
    ckpt = _save_and_reload(ckpt)
    if checkpoint_kind == "apex_era":
        del ckpt["optimizer"][MASTERS_KEY]
    worker.train(model, optimizer, "O2", worker.CHECKPOINT_STEP, worker.TOTAL_STEPS, device)
    expected = worker.snapshot(model, optimizer)
    ampcompat.reset()

    # run_pretraining.py: FP32 model loaded before initialize; masters built by hand, state loaded, copied back.
    model = worker.make_model(device, seed=1)
    model.load_state_dict(ckpt["model"])
    optimizer = worker.OPTIMIZERS["sgd_momentum"](model.parameters())
    model, optimizer = amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    amp.load_state_dict(ckpt["amp"])
    optimizer._lazy_init_maybe_master_weights()
    optimizer._amp_stash.lazy_init_called = True
    optimizer.load_state_dict(ckpt["optimizer"])
    for param, saved_param in zip(amp.master_params(optimizer), ckpt["master params"]):
        param.data.copy_(saved_param.data)
    worker.train(model, optimizer, "O2", worker.CHECKPOINT_STEP, worker.TOTAL_STEPS, device)

    _assert_snapshots_equal(worker.snapshot(model, optimizer), expected)
