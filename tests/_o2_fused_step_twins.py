"""Twin runs for the fused O2 step: ``amp.initialize(opt_level="O2")`` + ``scale_loss`` + ``step`` against O2
written by hand in plain PyTorch, pattern by pattern, with the path amp took asserted at every step.

The model is a few linear heads side by side and a BatchNorm (kept FP32 at O2), trained on a loss linear in
their outputs: the gradients do not depend on the weights, so both sides see the same gradients even
where their weights differ by rounding, and a difference never feeds back. The hand-written side is the
O2 loop a user would write: the half model, FP32 masters stepped by torch's optimizer (``fused=True`` where
the amp side's is fused), ``torch.amp.GradScaler`` on the masters, the masters copied back
(:class:`HandO2`); for patterns GradScaler cannot express (two ``scale_loss`` blocks before one step, two
loss scales) the same loop with Apex's per-block unscale and scale update written out (:class:`HandO2Blocks`).

Overflows are injected (the loss times inf or NaN at chosen steps) and occur on their own: the scale grows
every few clean steps until the half gradients overflow. Checked at every step: the loss scale and the
overflow verdict agree, a skipped step leaves every amp tensor bitwise unchanged, and the path amp took
(``unscale_paths``); every few steps and at the end, parameter by parameter: FP32 masters, optimizer state
and step counts within FP32 rounding, half weights equal to the masters rounded.

Imported by tests/test_o2_fused_step.py (in process on CUDA). Run as a script it runs the named scenarios
on the CPU (under ``TRITON_INTERPRET=1``, Triton's interpreter runs the kernels) and prints one line per
scenario: ``<name> ok <paths as JSON>`` or ``<name> FAILED <message>``.
"""
from __future__ import annotations

import copy
import json
import sys
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ampcompat import amp
from ampcompat.amp.fused_o2 import coverage
from ampcompat.optimizers import FusedAdam, FusedSGD

D_IN, BATCH, WINDOW = 8, 4, 6
INIT_SCALE = 2.0 ** 16
INJECT = {2: "inf", 9: "nan", 10: "inf"}


class Heads(nn.Module):
    """Linear heads side by side and a BatchNorm, outputs concatenated (FP32 out, as O2 casts them)."""

    def __init__(self, widths: Sequence[int] = (16, 33), batchnorm: bool = True) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(D_IN, w) for w in widths)
        self.bn = nn.BatchNorm1d(D_IN) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [head(x) for head in self.heads] + ([self.bn(x)] if self.bn is not None else [])
        return torch.cat(outs, 1).float()

    def width(self) -> int:
        return sum(h.out_features for h in self.heads) + (D_IN if self.bn is not None else 0)


def _cast(model: nn.Module, half: torch.dtype) -> nn.Module:
    model.to(half)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.float()
    return model


OPTIMIZERS: Dict[str, Callable] = {
    "adamw_fused": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_foreach": lambda groups: torch.optim.Adam(groups, lr=1e-2, weight_decay=0.05, foreach=True),
    "sgd_foreach": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_fused": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, fused=True),
    "fused_adam": lambda groups: FusedAdam(groups, lr=1e-2, weight_decay=0.1),
    "fused_sgd": lambda groups: FusedSGD(groups, lr=0.05, momentum=0.9, dampening=0.1),
}
#: The hand-written side's optimizer for each: torch's own, with the same arithmetic.
REFERENCE = dict(OPTIMIZERS, fused_adam=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=True),
                 fused_sgd=lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, dampening=0.1))


def _groups(params: List[torch.Tensor]) -> List[dict]:
    """Two param groups with different hyper-parameters (the first head; the rest, without weight decay)."""
    return [dict(params=params[:2]), dict(params=params[2:], lr=3e-3, weight_decay=0.0)]


class Data:
    """Inputs and the loss's fixed weights, per step; the injected overflows."""

    def __init__(self, model: Heads, device: str, inject: Dict[int, str], seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = [torch.randn(BATCH, D_IN, generator=generator).to(device) for _ in range(5)]
        self.weights = [(torch.randn(BATCH, model.width(), generator=generator) * 0.02).to(device) for _ in range(3)]
        self.inject = inject

    def loss(self, model: nn.Module, step: int, part: int = 0) -> torch.Tensor:
        x = self.inputs[(step + part) % len(self.inputs)]
        loss = (model(x) * self.weights[(step + 2 * part) % len(self.weights)]).sum()
        what = self.inject.get(step) if part == 0 else None
        return loss * float(what) if what else loss


class AmpSide:
    """The amp run: ``amp.initialize`` at ``opt_level`` on a copy of the model (scale window shortened)."""

    def __init__(self, model: Heads, optimizer: str, opt_level: str = "O2", num_losses: int = 1,
                 loss_scale="dynamic") -> None:
        self.model = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](_groups(list(self.model.parameters())))
        self.model, self.opt = amp.initialize(self.model, opt, opt_level=opt_level, num_losses=num_losses,
                                              loss_scale=loss_scale, verbosity=0)
        for scaler in amp._amp_state.loss_scalers:
            scaler._scale_seq_len = WINDOW
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.99)

    def block(self, loss: torch.Tensor, **kwargs) -> None:
        with amp.scale_loss(loss, self.opt, **kwargs) as scaled:
            scaled.backward()

    def step(self) -> bool:
        """Step (and the LR scheduler); returns whether the step was skipped, checking it changed nothing."""
        skipped = self.opt._amp_stash.already_patched  # (reads the device flag: a test may sync)
        before = self.tensors() if skipped else None
        self.opt.step()
        self.scheduler.step()
        if skipped:
            changed = [i for i, (a, b) in enumerate(zip(before, self.tensors())) if not torch.equal(a, b)]
            assert not changed, f"a skipped step changed amp tensors {changed}"
        self.opt.zero_grad()
        return skipped

    def masters(self) -> List[torch.Tensor]:
        return [p for group in self.opt.param_groups for p in group["params"]]

    def tensors(self) -> List[torch.Tensor]:
        state = [t for p in self.masters() for t in self.opt.state[p].values() if isinstance(t, torch.Tensor)]
        return [t.detach().clone() for t in self.masters() + list(self.model.parameters()) + state]

    def paths(self) -> Dict[str, int]:
        return dict(self.opt._amp_stash.unscale_paths)

    def scale(self, loss_id: int = 0) -> float:
        return amp._amp_state.loss_scalers[loss_id].loss_scale()


class HandO2:
    """O2 by hand: half model, FP32 masters stepped by torch's optimizer through GradScaler, copied back."""

    def __init__(self, model: Heads, optimizer: str, device: str, half: torch.dtype = torch.float16,
                 scaling: bool = True) -> None:
        self.model = _cast(copy.deepcopy(model), half)
        self.half = half
        self.params = list(self.model.parameters())
        self.masters = [p.detach().float().requires_grad_(True) if p.dtype == half else p for p in self.params]
        self.opt = REFERENCE[optimizer](_groups(self.masters))
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.99)
        self.scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE, growth_interval=WINDOW, enabled=scaling)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.half)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def masters_grads(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                m.grad = p.grad.float()

    def step(self, clip: float = 0.0) -> None:
        self.masters_grads()
        self.scaler.unscale_(self.opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.ordered_masters(), clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.finish()

    def finish(self) -> None:
        self.scheduler.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)
        for t in self.params + self.masters:
            t.grad = None

    def ordered_masters(self) -> List[torch.Tensor]:
        return [p for group in self.opt.param_groups for p in group["params"]]

    def scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def loss(self, data: Data, step: int, part: int = 0) -> torch.Tensor:
        return data.loss(lambda x: self.model(self.input(x)), step, part)


class HandO2Blocks(HandO2):
    """:class:`HandO2` with Apex's rules written out: every ``scale_loss`` block unscales its own gradients
    with its loss's scale into the accumulated FP32 gradients and updates that scale; the step is skipped
    if any block since the last step overflowed."""

    def __init__(self, *args, num_losses: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self.masters[0].device
        self.scales = [torch.full((1,), INIT_SCALE, device=device) for _ in range(num_losses)]
        self.trackers = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(num_losses)]
        self.accumulated: List[Optional[torch.Tensor]] = [None] * len(self.params)
        self.overflowed = False

    def block(self, loss: torch.Tensor, loss_id: int = 0) -> None:
        scale = self.scales[loss_id]
        (loss.float() * scale).backward()
        grads = [p.grad.float() if p.grad.dtype != torch.float32 else p.grad.clone() for p in self.params]
        found = torch.zeros(1, device=scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, scale.double().reciprocal().float())
        for i, g in enumerate(grads):
            self.accumulated[i] = g if self.accumulated[i] is None else self.accumulated[i] + g
            self.params[i].grad = None
        torch._amp_update_scale_(scale, self.trackers[loss_id], found, 2.0, 0.5, WINDOW)
        self.overflowed = self.overflowed or bool(found)

    def step(self, clip: float = 0.0) -> None:
        if not self.overflowed:
            for m, g in zip(self.masters, self.accumulated):
                m.grad = g
            self.opt.step()
        self.accumulated = [None] * len(self.params)
        self.overflowed = False
        self.finish()

    def scale(self, loss_id: int = 0) -> float:
        return float(self.scales[loss_id])


# --- comparing --------------------------------------------------------------------------------------------

def compare(side: AmpSide, hand: HandO2, rtol: float, where: str) -> None:
    """Masters, optimizer state and step counts within ``rtol`` (relative to each tensor's largest value);
    amp's half weights the masters rounded."""
    for i, (a, h) in enumerate(zip(side.masters(), hand.ordered_masters())):
        _close(f"{where}: master {i}", a, h, rtol)
        state_a, state_h = side.opt.state[a], hand.opt.state[h]
        assert sorted(state_a) == sorted(state_h), f"{where}: state keys {sorted(state_a)} != {sorted(state_h)}"
        for key in state_h:
            if key == "step":
                assert float(state_a[key]) == float(state_h[key]), f"{where}: step count of master {i}"
            else:
                _close(f"{where}: {key} of master {i}", state_a[key], state_h[key], rtol)
    for i, (p, m) in enumerate(zip(side.opt._amp_stash.all_fp16_params, side.opt._amp_stash._plan.masters)):
        assert torch.equal(p, m.detach().to(p.dtype)), f"{where}: half weight {i} is not its master rounded"


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    expected = expected.detach()
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_scales(side: AmpSide, hand: HandO2, step: int, loss_ids=(0,)) -> None:
    for loss_id in loss_ids:
        expected = hand.scale(loss_id) if isinstance(hand, HandO2Blocks) else hand.scale()
        assert side.scale(loss_id) == expected, f"step {step}: loss scale {side.scale(loss_id)} != {expected}"


class PathLog:
    """The path each step took: the change of ``unscale_paths`` since the last call, as one word."""

    def __init__(self, side: AmpSide) -> None:
        self.side = side
        self.last = side.paths()
        self.steps: List[str] = []

    def record(self) -> str:
        now = self.side.paths()
        taken = "+".join(k for k in sorted(now) if now[k] != self.last.get(k, 0)) or "none"
        self.last = now
        self.steps.append(taken)
        return taken


def _fused_paths(steps: int, first_unfused: int = 1) -> List[str]:
    return ["fast"] * first_unfused + ["fused"] * (steps - first_unfused)


# --- scenarios --------------------------------------------------------------------------------------------

def run_plain(device: str, steps: int, optimizer: str = "adamw_fused", rtol: float = 2e-5,
              batchnorm: bool = True, opt_level: str = "O2", inject: Optional[Dict[int, str]] = None) -> dict:
    """The O2 loop unchanged: one block, one step; fused from the second step on (torch makes its state in
    the first)."""
    torch.manual_seed(0)
    model = Heads(batchnorm=batchnorm).to(device)
    half = torch.bfloat16 if opt_level == "O5" else torch.float16
    scaling = opt_level == "O2"
    data = Data(model, device, INJECT if inject is None else inject)
    side = AmpSide(model, optimizer, opt_level, loss_scale="dynamic" if scaling else 1.0)
    hand = HandO2(model, optimizer, device, half=half, scaling=scaling)
    log = PathLog(side)
    skipped = 0
    for step in range(steps):
        if scaling:
            _check_scales(side, hand, step)
        side.block(data.loss(side.model, step))
        log.record()
        hand.backward(hand.loss(data, step))
        was_skipped = side.step()
        hand.step()
        skipped += was_skipped
        if step % 4 == 3 or step == steps - 1:
            compare(side, hand, rtol, f"step {step}")
    if scaling:
        assert skipped >= len([s for s in data.inject if s < steps]), f"only {skipped} steps skipped"
    fused = coverage.switched_off_reason() is None
    assert log.steps == (_fused_paths(steps) if fused else ["fast"] * steps), log.steps
    return {"paths": side.paths(), "skipped": skipped, "reason": side.opt._amp_stash.unfused_reason}


def _twin(device: str, hand_class=None, inject: Optional[Dict[int, str]] = None, num_losses: int = 1):
    """The model, data, both sides and the path log of a scenario with fused AdamW."""
    torch.manual_seed(0)
    model = Heads().to(device)
    data = Data(model, device, INJECT if inject is None else inject)
    extra = {"num_losses": num_losses} if num_losses != 1 else {}
    side = AmpSide(model, "adamw_fused", **extra)
    hand = (hand_class or HandO2)(model, "adamw_fused", device, **extra)
    return model, data, side, hand, PathLog(side)


def run_clip_on_master_params(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """``clip_grad_norm_(amp.master_params(opt), ...)`` between the exit and the step: master gradients are
    made for it, and that step is the unfused one."""
    model, data, side, hand, log = _twin(device)
    for step in range(steps):
        _check_scales(side, hand, step)
        side.block(data.loss(side.model, step))
        torch.nn.utils.clip_grad_norm_(amp.master_params(side.opt), 0.05)
        log.record()
        side.step()
        hand.backward(hand.loss(data, step))
        hand.step(clip=0.05)
        compare(side, hand, rtol, f"step {step}")
    assert log.steps == ["fast"] + ["fused+materialised"] * (steps - 1), log.steps
    return {"paths": side.paths()}


def run_delay_unscale(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """Gradient accumulation with ``delay_unscale=True``: the last block of a step follows a delayed one
    and takes the unfused path."""
    model, data, side, hand, log = _twin(device)
    for step in range(steps):
        _check_scales(side, hand, step)
        side.block(data.loss(side.model, step, part=1), delay_unscale=True)
        side.block(data.loss(side.model, step))
        log.record()
        side.step()
        hand.backward(hand.loss(data, step, part=1))
        hand.backward(hand.loss(data, step))
        hand.step()
        compare(side, hand, rtol, f"step {step}")
    assert log.steps == ["fast"] * steps, log.steps
    return {"paths": side.paths()}


def run_accumulate(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """Two ``scale_loss`` blocks before one step (each unscaled at its exit): the first block's fused
    gradients become master gradients when the second begins; the step is unfused."""
    model, data, side, hand, log = _twin(device, HandO2Blocks)
    for step in range(steps):
        _check_scales(side, hand, step)
        side.block(data.loss(side.model, step))
        side.block(data.loss(side.model, step, part=1))
        log.record()
        side.step()
        hand.block(hand.loss(data, step))
        hand.block(hand.loss(data, step, part=1))
        hand.step()
        compare(side, hand, rtol, f"step {step}")
    assert log.steps == ["fast+general"] + ["fused+general+materialised"] * (steps - 1), log.steps
    return {"paths": side.paths()}


def run_two_losses(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """Two losses with their own loss scalers on one optimizer (``num_losses=2``), one block each, one step;
    then a step with loss 1 alone: fused, unscaled by loss 1's scale."""
    model, data, side, hand, log = _twin(device, HandO2Blocks, num_losses=2)
    for step in range(steps):
        _check_scales(side, hand, step, loss_ids=(0, 1))
        alone = step % 3 == 2
        if not alone:
            side.block(data.loss(side.model, step), loss_id=0)
            hand.block(hand.loss(data, step), loss_id=0)
        side.block(data.loss(side.model, step, part=1), loss_id=1)
        hand.block(hand.loss(data, step, part=1), loss_id=1)
        log.record()
        side.step()
        hand.step()
        compare(side, hand, rtol, f"step {step}")
    expected = ["fast+general"] + ["fused" if s % 3 == 2 else "fused+general+materialised" for s in range(1, steps)]
    assert log.steps == expected, log.steps
    return {"paths": side.paths()}


def run_add_param_group(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """A param group added mid-run: the step after it is unfused (torch makes the new group's state),
    the next ones fused again, over every group."""
    model, data, side, hand, log = _twin(device, inject={1: "inf"})
    extra = nn.Linear(D_IN, 5).to(device)
    side_extra, hand_extra = _cast(copy.deepcopy(extra), torch.float16), _cast(copy.deepcopy(extra), torch.float16)
    added_at = steps // 2
    for step in range(steps):
        if step == added_at:
            side.opt.add_param_group({"params": list(side_extra.parameters()), "lr": 5e-3})
            masters = [p.detach().float().requires_grad_(True) for p in hand_extra.parameters()]
            hand.params += list(hand_extra.parameters())
            hand.masters += masters
            hand.opt.add_param_group({"params": masters, "lr": 5e-3})
        _check_scales(side, hand, step)
        x = data.inputs[step % len(data.inputs)]
        with_extra = step >= added_at
        loss = data.loss(side.model, step) + (side_extra(x.half()).float().sum() * 0.01 if with_extra else 0)
        side.block(loss)
        log.record()
        side.step()
        hand.backward(hand.loss(data, step) + (hand_extra(x.half()).float().sum() * 0.01 if with_extra else 0))
        hand.step()
        compare(side, hand, rtol, f"step {step}")
    expected = _fused_paths(steps)
    expected[added_at] = "fast"
    assert log.steps == expected, log.steps
    return {"paths": side.paths()}


def run_resume(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """A checkpoint round trip (model, optimizer with masters, amp state) mid-run: the resumed run is
    bitwise the uninterrupted one, fused from its first step (the state came with the checkpoint)."""
    torch.manual_seed(0)
    model = Heads().to(device)
    data = Data(model, device, INJECT)
    stop = steps // 2

    def train(side: AmpSide, first: int, last: int) -> PathLog:
        log = PathLog(side)
        for step in range(first, last):
            side.block(data.loss(side.model, step))
            log.record()
            side.step()
        return log

    whole = AmpSide(model, "adamw_fused")
    train(whole, 0, stop)
    checkpoint = copy.deepcopy({"model": whole.model.state_dict(), "optimizer": whole.opt.state_dict(),
                                "amp": amp.state_dict(), "scheduler": whole.scheduler.state_dict()})
    train(whole, stop, steps)
    expected = [t.clone() for t in whole.tensors()]
    expected_scale = whole.scale()

    resumed = AmpSide(model, "adamw_fused")
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.opt.load_state_dict(checkpoint["optimizer"])
    amp.load_state_dict(checkpoint["amp"])
    for scaler in amp._amp_state.loss_scalers:
        scaler._scale_seq_len = WINDOW
    resumed.scheduler.load_state_dict(checkpoint["scheduler"])
    log = train(resumed, stop, steps)
    actual = resumed.tensors()
    assert len(actual) == len(expected)
    different = [i for i, (a, b) in enumerate(zip(actual, expected)) if not torch.equal(a, b)]
    assert not different, f"the resumed run differs from the uninterrupted one in tensors {different}"
    assert resumed.scale() == expected_scale
    assert log.steps == ["fused"] * (steps - stop), log.steps
    return {"paths": resumed.paths()}


def run_kill_switch(device: str, steps: int, rtol: float = 2e-5) -> dict:
    """``fused_o2.set_enabled(False)`` before ``amp.initialize``: the unfused strategy, saying why."""
    coverage.set_enabled(False)
    try:
        result = run_plain(device, steps, rtol=rtol)
    finally:
        coverage.set_enabled(None)
    assert result["paths"] == {"fast": steps, "general": 0}, result
    assert "set_enabled(False)" in result["reason"], result
    return result


def run_kernel_failure(device: str, steps: int, rtol: float = 2e-5, fail_at: int = 3) -> dict:
    """An update kernel fails as a compile failure would (launch ``fail_at`` of the Adam kernel; a step with
    BatchNorm launches it twice, the half parameters' plan first): one warning, that step and every later
    one take the unfused path, and the run still matches the hand-written one. ``fail_at=3``: nothing of
    step 2 had run; ``fail_at=2``: step 1's half parameters were updated, its FP32 ones were not."""
    from ampcompat.amp.fused_o2 import launch

    calls = {"n": 0}
    original = launch._launch_all

    def failing(k, kernel, plan, *args, **kwargs):
        if kernel is k.adam_kernel:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise RuntimeError("planted compile failure")
        return original(k, kernel, plan, *args, **kwargs)

    launch._launch_all = failing
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, data, side, hand, log = _twin(device, inject={})
            for step in range(steps):
                side.block(data.loss(side.model, step))
                log.record()
                side.step()
                hand.backward(hand.loss(data, step))
                hand.step()
                compare(side, hand, rtol, f"step {step}")
            reason = side.opt._amp_stash.unfused_reason
    finally:
        launch._launch_all = original
        coverage._failure = None  # the process-wide switch the failure turned off
    messages = [str(w.message) for w in caught if "fused O2 kernel failed" in str(w.message)]
    assert len(messages) == 1 and "planted compile failure" in messages[0], messages
    failed_step = (fail_at + 1) // 2
    after = ["fast"] * (steps - failed_step - 1)
    if fail_at % 2 and after:  # the half parameters' plan failed: their master gradients were made at the step
        after[0] = "fast+materialised"
    assert log.steps == _fused_paths(failed_step + 1) + after, log.steps
    assert "planted compile failure" in reason, reason
    return {"paths": side.paths()}


SCENARIOS: Dict[str, Callable[[str, int], dict]] = {
    "adamw_fused": run_plain,
    "adam_foreach": lambda device, steps: run_plain(device, steps, "adam_foreach", rtol=1e-4),
    "sgd_foreach": lambda device, steps: run_plain(device, steps, "sgd_foreach"),
    "sgd_fused": lambda device, steps: run_plain(device, steps, "sgd_fused"),
    "fused_adam": lambda device, steps: run_plain(device, steps, "fused_adam"),
    "fused_sgd": lambda device, steps: run_plain(device, steps, "fused_sgd"),
    "o5_bf16": lambda device, steps: run_plain(device, steps, "adamw_fused", opt_level="O5", inject={}),
    "clip_on_master_params": run_clip_on_master_params,
    "delay_unscale": run_delay_unscale,
    "accumulate": run_accumulate,
    "two_losses": run_two_losses,
    "add_param_group": run_add_param_group,
    "resume": run_resume,
    "kill_switch": run_kill_switch,
    "kernel_failure": run_kernel_failure,
    "kernel_failure_partial": lambda device, steps: run_kernel_failure(device, steps, fail_at=2),
}


def main(argv: List[str]) -> int:
    """``<steps> <name>...``: run the named scenarios on the CPU, one line each."""
    steps, names = int(argv[0]), argv[1:]
    torch.set_num_threads(1)
    failed = 0
    for name in names:
        import ampcompat

        ampcompat.reset()
        try:
            result = SCENARIOS[name]("cpu", steps)
            print(name, "ok", json.dumps(result, sort_keys=True), flush=True)
        except Exception as error:  # noqa: BLE001 - reported per scenario, the others still run
            failed += 1
            message = "".join(traceback.format_exception_only(type(error), error)).strip().replace("\n", " | ")
            print(name, "FAILED", message[:2000], flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
