"""Resuming from a damaged or foreign checkpoint, and from a process killed at any point.

Each faulty checkpoint (cut short, an amp entry missing a key or holding a value of the wrong type, a
``torch.amp.GradScaler`` state, another ``num_losses``) is either refused at load time with a clear
error, leaving the running state as it was, or converted by Apex's rules; after it, training goes on
with a finite, correct loss scale. Then the real thing: an O2 run saving ``{model, optimizer, amp}``
atomically every few steps is SIGKILLed at seeded points (inside a step, after it, half-way through
writing a checkpoint, right after one) and resumed from its last checkpoint; its final parameters,
master weights, optimizer state and amp state equal an uninterrupted run's bit for bit.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import _kill_resume_worker as worker
import _o2_resume_worker as run
import ampcompat
from ampcompat import amp

from _amp_snapshot import differences, snapshot

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS, SAVE_EVERY = 24, 4

needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _live_run(steps: int = 3, device: str = "cpu"):
    """The O2 run after ``steps`` steps, and its checkpoint as bytes."""
    model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, device)
    run.train(model, opt, worker.LEVEL, 0, steps, device)
    buffer = io.BytesIO()
    torch.save(run.checkpoint(model, opt), buffer)
    return model, opt, buffer.getvalue()


def _loaded(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _next_step_scale(model, opt, step: int) -> float:
    """Train one step; return the scale its loss was multiplied by (read from the scaled loss itself)."""
    x, y = run.batch(step, "cpu", spikes=False)
    loss = F.mse_loss(model(x), y)
    with amp.scale_loss(loss, opt) as scaled:
        scale = (scaled / loss.float()).item()
        scaled.backward()
    opt.step()
    opt.zero_grad()
    return scale


# --- damaged and foreign checkpoints ---------------------------------------------------------------------

def test_checkpoint_cut_short_fails_to_load_and_changes_nothing(tmp_path):
    model, opt, data = _live_run()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data[: len(data) // 2])
    saved_amp = amp.state_dict()
    before = snapshot([model], [opt])
    with pytest.raises(Exception):  # torch.load's own error for a torn file
        run.load(model, opt, torch.load(path, weights_only=True), "model_first")
    assert differences(before, snapshot([model], [opt])) == []
    assert amp.state_dict() == saved_amp
    assert _next_step_scale(model, opt, 3) == saved_amp["loss_scaler0"]["loss_scale"]


@pytest.mark.parametrize("fault,error,message", [
    ("missing_unskipped", ValueError, r"entry 'loss_scaler0' has no 'unskipped'"),
    ("missing_loss_scale", ValueError, r"entry 'loss_scaler0' has no 'loss_scale'"),
    ("string_scale", TypeError, r"loss_scale must be a number, found '65536' \(str\)"),
    ("zero_scale", ValueError, r"loss_scale must be a finite number above 0, found 0\.0"),
    ("nan_scale", ValueError, r"loss_scale must be a finite number above 0, found nan"),
    ("float_unskipped_with_fraction", ValueError, r"unskipped must be a whole number of at least 0, found 0\.5"),
])
def test_checkpoint_with_a_bad_amp_entry_is_refused_at_load_time(fault, error, message):
    _, _, data = _live_run()
    ckpt = _loaded(data)
    entry = ckpt["amp"]["loss_scaler0"]
    if fault.startswith("missing_"):
        del entry[fault[len("missing_"):]]
    else:
        field, value = {"string_scale": ("loss_scale", "65536"), "zero_scale": ("loss_scale", 0.0),
                        "nan_scale": ("loss_scale", float("nan")),
                        "float_unskipped_with_fraction": ("unskipped", 0.5)}[fault]
        entry[field] = value
    ampcompat.reset()
    model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, "cpu", seed=1)
    fresh_amp = amp.state_dict()
    with pytest.raises(error, match=message):
        run.load(model, opt, ckpt, "model_first")
    # The model and optimizer came in (the user's order loads them first); the scale did not change and
    # training goes on with the fresh run's scale, never with the damaged one.
    assert amp.state_dict() == fresh_amp
    assert _next_step_scale(model, opt, 3) == fresh_amp["loss_scaler0"]["loss_scale"]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_grad_scaler_checkpoint_is_refused_with_the_converter_named_then_converts():
    """A native-AMP checkpoint's GradScaler state in the amp slot: refused, then converted and trained on."""
    gs = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gs.load_state_dict(dict(gs.state_dict(), _growth_tracker=7))
    native_state = _loaded(_checkpoint_bytes({"scaler": gs.state_dict()}))["scaler"]
    model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, "cpu")
    fresh_amp = amp.state_dict()
    with pytest.raises(RuntimeError, match=r"GradScaler state dict.*ampcompat\.grad_scaler_to_amp_state"):
        amp.load_state_dict(native_state)
    assert amp.state_dict() == fresh_amp

    amp.load_state_dict(ampcompat.grad_scaler_to_amp_state(native_state))

    assert amp.state_dict() == {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 7}}
    assert _next_step_scale(model, opt, 1) == 1024.0
    assert amp.state_dict() == {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 8}}  # Apex's count goes on


def _checkpoint_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


TWO_LOSSES = {"loss_scaler0": {"loss_scale": 512.0, "unskipped": 3},
              "loss_scaler1": {"loss_scale": 256.0, "unskipped": 4}}


@pytest.mark.parametrize("num_losses", [1, 3])
def test_checkpoint_from_another_num_losses_loads_by_position_with_apex_messages(num_losses, capsys):
    model = run.make_model("cpu")
    opt = run.OPTIMIZERS[worker.OPTIMIZER](model.parameters())
    amp.initialize(model, opt, opt_level=worker.LEVEL, num_losses=num_losses, verbosity=1)
    capsys.readouterr()

    amp.load_state_dict(_loaded(_checkpoint_bytes(TWO_LOSSES)))

    out = capsys.readouterr().out
    expected = ["Warning: state_dict contains 2 entries, while {} loss_scalers are used".format(num_losses)]
    if num_losses == 1:
        expected.append("Skipping loss_scaler[1], since num_losses was set to 1")
    assert out.splitlines() == expected
    state = amp.state_dict()
    assert [state["loss_scaler%d" % i] for i in range(min(num_losses, 2))] == list(TWO_LOSSES.values())[:num_losses]
    if num_losses == 3:
        assert state["loss_scaler2"] == {"loss_scale": 65536.0, "unskipped": 0}  # not in the file: kept
    assert _next_step_scale(model, opt, 1) == 512.0


def test_empty_amp_state_loads_with_apex_warning_and_changes_nothing(capsys):
    """A disabled GradScaler (or disabled amp) saves ``{}``: Apex loaded it with a warning and no change."""
    model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, "cpu")
    amp._amp_state.verbosity = 1
    fresh_amp = amp.state_dict()
    amp.load_state_dict({})
    assert capsys.readouterr().out == "Warning: state_dict contains 0 entries, while 1 loss_scalers are used\n"
    assert amp.state_dict() == fresh_amp


def test_disabled_amp_saves_an_empty_state_and_ignores_a_valid_one():
    model = run.make_model("cpu")
    opt = run.OPTIMIZERS[worker.OPTIMIZER](model.parameters())
    amp.initialize(model, opt, enabled=False)
    assert amp.state_dict() == {}
    amp.load_state_dict(TWO_LOSSES)  # nothing to restore into
    assert amp.state_dict() == {}
    with pytest.raises(TypeError, match="expects the dict amp.state_dict"):
        amp.load_state_dict("garbage")


def test_static_scalers_count_loaded_into_a_dynamic_scaler_does_not_stall_growth():
    """A static scaler counts clean passes forever (Apex); a dynamic one grows when its count *reaches*
    2000, so 3999 loaded as-is would never grow again before an overflow. It keeps 3999 % 2000 = 1999."""
    model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, "cpu")
    amp.load_state_dict({"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 3999}})
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 1024.0, "unskipped": 1999}
    assert _next_step_scale(model, opt, 1) == 1024.0
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 2048.0, "unskipped": 0}


# --- killed and resumed ------------------------------------------------------------------------------------

_UNINTERRUPTED = {}


def _uninterrupted(device: str):
    if device not in _UNINTERRUPTED:
        ampcompat.reset()
        model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, device)
        run.train(model, opt, worker.LEVEL, 0, TOTAL_STEPS, device)
        _UNINTERRUPTED[device] = run.snapshot(model, opt)
        ampcompat.reset()
    return _UNINTERRUPTED[device]


def _start_worker(directory: str, device: str, die_at=None, pause: float = 0.0) -> subprocess.Popen:
    config = os.path.join(directory, "config.json")
    with open(config, "w") as f:
        json.dump({"directory": directory, "device": device, "total_steps": TOTAL_STEPS,
                   "save_every": SAVE_EVERY, "die_at": die_at, "pause": pause}, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [_REPO_ROOT, os.path.join(_REPO_ROOT, "tests"), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, worker.__file__, config], cwd=_REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, expect_killed: bool) -> str:
    out, err = process.communicate(timeout=300)
    if expect_killed:
        assert process.returncode == -signal.SIGKILL, (process.returncode, err[-3000:])
    else:
        assert process.returncode == 0, err[-3000:]
    return out


def _kill_point(rng: random.Random, start: int, phase: str):
    """A seeded step, at or after ``start``, at which a worker resumed from ``start`` dies in ``phase``.

    The checkpoint phases are placed on a step that writes one; the others within the next two saves.
    """
    if phase in ("mid_save", "after_save"):
        saves = [s for s in range(start, TOTAL_STEPS) if (s + 1) % SAVE_EVERY == 0]
        return [rng.choice(saves[:2]), phase]
    return [rng.randrange(start, min(start + 2 * SAVE_EVERY, TOTAL_STEPS)), phase]


def _last_saved_step(directory: str) -> int:
    path = os.path.join(directory, worker.CHECKPOINT)
    return torch.load(path, weights_only=True)["step"] if os.path.exists(path) else 0


def _assert_equal_to_uninterrupted(resumed, device: str) -> None:
    want = _uninterrupted(device)
    assert differences(want, resumed) == []
    assert resumed["amp"]["loss_scaler0"]["loss_scale"] == 2.0 ** 14  # both overflows happened, once each


@needs_sigkill
def test_killed_run_resumes_bitwise(device, tmp_path):
    """One worker SIGKILLed at a seeded point after its first checkpoint; this process resumes from it."""
    rng = random.Random(23)
    die_at = _kill_point(rng, SAVE_EVERY, rng.choice(worker.PHASES))
    _finish(_start_worker(str(tmp_path), device, die_at), expect_killed=True)
    saved = _last_saved_step(str(tmp_path))
    assert SAVE_EVERY <= saved <= die_at[0] + 1

    ampcompat.reset()
    model, opt = run.build(worker.LEVEL, worker.OPTIMIZER, device, seed=1)
    run.load(model, opt, torch.load(tmp_path / worker.CHECKPOINT, map_location=device, weights_only=True),
             "model_first")
    run.train(model, opt, worker.LEVEL, saved, TOTAL_STEPS, device)

    _assert_equal_to_uninterrupted(run.snapshot(model, opt), device)


def _kill_from_outside(directory: str, device: str, rng: random.Random) -> None:
    """Start a worker and SIGKILL it from here at a seeded step (it pauses between steps, so the signal
    lands while it trains or saves, wherever it happens to be)."""
    start = _last_saved_step(directory)
    target = rng.randrange(start + 1, min(start + 2 * SAVE_EVERY, TOTAL_STEPS - 2))
    process = _start_worker(directory, device, pause=0.05)
    for line in process.stdout:  # "step N" after each step
        if int(line.split()[1]) >= target:
            process.send_signal(signal.SIGKILL)
            break
    _finish(process, expect_killed=True)


@needs_sigkill
@pytest.mark.slow
def test_killed_repeatedly_resumes_bitwise(device, tmp_path):
    """Killed five times, once in each phase and once from outside (seeded order and steps), each time
    resumed by a new process from its last checkpoint, until a last process finishes the run."""
    directory = str(tmp_path)
    rng = random.Random(2323)
    plan = list(worker.PHASES) + ["from_outside"]
    rng.shuffle(plan)
    for phase in plan:
        if phase == "from_outside":
            _kill_from_outside(directory, device, rng)
        else:
            die_at = _kill_point(rng, _last_saved_step(directory), phase)
            _finish(_start_worker(directory, device, die_at), expect_killed=True)
        assert not os.path.exists(os.path.join(directory, "final.pt"))
    assert _last_saved_step(directory) > 0
    _finish(_start_worker(directory, device), expect_killed=False)
    _assert_equal_to_uninterrupted(torch.load(os.path.join(directory, "final.pt"), weights_only=True), device)
