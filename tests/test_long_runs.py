"""Long runs: thousands of steps with bursts of overflows, per opt level.

What must hold over a long run (the failure modes of NVIDIA/apex#318 and of leaky caches):

* memory is flat after warm-up: no growth of Python objects, of the process RSS, of amp's own
  containers (the loss scaler's inverse-scale cache, the optimizer's stash lists, O1's forward-region
  stack) and, on a GPU, of allocated CUDA memory;
* the loss scale follows the closed form through every burst and recovers to its ceiling;
* exactly one "Gradient overflow" line per skipped step, and no warnings at all;
* a scale driven down by a source of NaN that never goes away warns once and never crashes.

The 5,000-step runs are marked ``slow`` (about 8 s per level on one CPU core, 50 s in all): the
default run leaves them out; ``python -m pytest -q --full tests/test_long_runs.py`` runs them.
"""
from __future__ import annotations

import collections
import gc
import warnings
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from ampcompat import amp

from _models import batches, make_mlp
from _sampling import each_value

LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")
LONG_STEPS = 5000
WARM_UP = 1000
MAX_SCALE = 2.0 ** 12  # ceiling, so that "recovered" means "back at the ceiling"
WINDOW = 2000  # Apex's scale_window: the default, untouched
BURSTS = (range(600, 602), range(4700, 4703))  # overflowing steps




def expected_scales(steps: int, overflow_steps: set, start: float, ceiling: float, window: int) -> List[float]:
    """Apex's rule, written out: halve on an overflowing pass, double after ``window`` clean ones."""
    scale, clean, out = start, 0, []
    for step in range(steps):
        if step in overflow_steps:
            scale, clean = scale / 2.0, 0
        else:
            clean += 1
            if clean == window:
                scale, clean = min(ceiling, scale * 2.0), 0
        out.append(scale)
    return out


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _amp_containers(opt) -> Dict[str, int]:
    """Sizes of every list amp keeps per optimizer and per scaler; they must not grow."""
    from ampcompat.amp import o1_autocast as autocast_scope

    stash = opt._amp_stash
    sizes = {"stash." + k: len(v) for k, v in vars(stash).items() if isinstance(v, (list, collections.deque))}
    sizes.update({"plan." + k: len(v) for k, v in vars(stash._plan).items() if isinstance(v, list)})
    for i, scaler in enumerate(amp._amp_state.loss_scalers):
        sizes["scaler%d.inv_scale_cache" % i] = len(scaler._inv_scale_cache)
    sizes["o1_forward_regions"] = len(getattr(autocast_scope._tls, "regions", ()))
    return sizes


def _memory(device: str, opt) -> Tuple[int, int, int, Dict[str, int]]:
    gc.collect()
    cuda = torch.cuda.memory_allocated() if device == "cuda" else 0
    return _rss_kib(), len(gc.get_objects()), cuda, _amp_containers(opt)


def _long_run(level: str, device: str, capsys) -> None:
    model = make_mlp(device, d_hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp.initialize(model, opt, opt_level=level, loss_scale="dynamic", max_loss_scale=MAX_SCALE)
    capsys.readouterr()
    data = batches(16, device)
    overflow_steps = {s for burst in BURSTS for s in burst}
    scaler = amp._amp_state.loss_scalers[0]
    scales, skipped, overflowed = [], [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(LONG_STEPS):
            x, y = data[step % len(data)]
            loss = F.cross_entropy(model(x), y)
            if step in overflow_steps:
                loss = loss * float("nan")
            with amp.scale_loss(loss, opt) as scaled:
                scaled.backward()
                # The scaled gradients as backward left them, before amp unscales and checks them.
                overflowed.append(not all(bool(torch.isfinite(p.grad).all())
                                          for p in model.parameters() if p.grad is not None))
            skipped.append(opt._amp_stash.already_patched)
            opt.step()
            opt.zero_grad()
            scales.append(scaler.loss_scale())
            if step == WARM_UP:
                warm = _memory(device, opt)
    end = _memory(device, opt)

    skipped_steps = [s for s, skip in enumerate(skipped) if skip]
    # Exactly the steps whose scaled gradients held an inf/NaN are skipped: every injected step, and any
    # step where the FP16 gradients overflow for real once the scale has grown back (which ones depends on
    # the device and the torch release: O1 on the CPU at step 3281 with torch 2.13, where LayerNorm's FP32
    # backward hands a large gradient to the FP16 layers; O2 at step 2743 with torch 2.4; O3 on an H100).
    assert skipped_steps == [s for s, bad in enumerate(overflowed) if bad]
    assert set(overflow_steps) <= set(skipped_steps)
    want = expected_scales(LONG_STEPS, set(skipped_steps), MAX_SCALE, MAX_SCALE, WINDOW)
    assert scales == want
    if set(skipped_steps) == overflow_steps:  # (a real FP16 overflow in between delays the recovery)
        assert scales[BURSTS[1].start - 1] == MAX_SCALE  # recovered from the first burst
    assert all(bool(torch.isfinite(p).all()) for p in list(model.parameters()) + list(amp.master_params(opt)))

    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(skipped_steps)
    assert all(line.startswith("Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to ")
               for line in out)
    assert [str(w.message) for w in caught] == []

    rss_growth_kib = end[0] - warm[0]
    assert rss_growth_kib < 8 * 1024, "RSS grew by %d KiB over %d steps" % (rss_growth_kib, LONG_STEPS - WARM_UP)
    assert end[1] - warm[1] < 100, "Python objects grew by %d" % (end[1] - warm[1])
    assert end[2] == warm[2], "CUDA memory grew from %d to %d bytes" % (warm[2], end[2])
    bounded = {k for k in end[3] if k.endswith("inv_scale_cache")}  # one entry per scale seen, capped
    assert {k: v for k, v in end[3].items() if k not in bounded} == \
        {k: v for k, v in warm[3].items() if k not in bounded}
    assert end[3]["o1_forward_regions"] == 0
    assert all(end[3][k] <= 8 for k in bounded)


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_5000_steps_memory_flat_scale_recovers_no_repeated_messages(level, capsys):
    _long_run(level, "cpu", capsys)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("level", LEVELS)
def test_5000_steps_memory_flat_cuda(level, capsys):
    _long_run(level, "cuda", capsys)


def test_expected_scales_closed_form_helper():
    """The reference rule itself, on a case small enough to check by hand."""
    got = expected_scales(9, {1, 2}, start=8.0, ceiling=8.0, window=3)
    assert got == [8.0, 4.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 8.0]


# --- a scale collapsing below 1 --------------------------------------------------------------------

def _collapse(level: str, overflows: int, window: int, recover_steps: int, fused: bool = False):
    """``overflows`` NaN passes in a row from 2**16, then clean passes with a short growth window.

    ``fused``: AdamW(fused=True), whose steps ampcompat skips on the device (the scale is updated there).
    """
    model = make_mlp(d_hidden=16)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if fused
           else torch.optim.SGD(model.parameters(), lr=0.01))
    amp.initialize(model, opt, opt_level=level, loss_scale="dynamic", max_loss_scale=2.0 ** 16, verbosity=0)
    scaler = amp._amp_state.loss_scalers[0]
    scaler._scale_seq_len = window  # Apex's private growth window, which legacy code also sets
    data = batches(4)
    scales = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(overflows + recover_steps):
            x, y = data[step % len(data)]
            loss = F.cross_entropy(model(x), y)
            if step < overflows:
                loss = loss * float("nan")
            with amp.scale_loss(loss, opt) as scaled:
                scaled.backward()
            opt.step()
            opt.zero_grad()
            scales.append(scaler.loss_scale())
    assert all(bool(torch.isfinite(p).all()) for p in list(model.parameters()) + list(amp.master_params(opt)))
    return scales, [w for w in caught if issubclass(w.category, RuntimeWarning)], caught


@pytest.mark.parametrize("level, fused", each_value(  # 324 steps each: every level and both paths by default
    [pytest.param(level, fused, id=f"{level}-{'fused_adamw' if fused else 'sgd'}")
     for level in LEVELS for fused in (False, True)], axes=lambda level, fused: (level, fused)))
def test_scale_below_one_warns_once_then_recovers(level, fused):
    scales, below, caught = _collapse(level, overflows=24, window=10, recover_steps=300, fused=fused)
    assert scales == expected_scales(324, set(range(24)), 2.0 ** 16, 2.0 ** 16, 10)
    assert min(scales) == 2.0 ** -8 and scales[-1] == 2.0 ** 16
    assert len(below) == 1 and "fell below 1" in str(below[0].message)
    assert len(caught) == 1


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adamw"])
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_nan_source_that_never_goes_away_does_not_crash(level, fused):
    """apex#318: a model that produces NaN at every step. Apex decayed the scale to 1e-205 silently;
    ampcompat warns once and keeps skipping, with a positive scale whose inverse is a float32."""
    scales, below, caught = _collapse(level, overflows=200, window=2000, recover_steps=0, fused=fused)
    assert len(below) == 1 and len(caught) == 1
    assert scales[-1] > 0.0 and 1.0 / scales[-1] <= torch.finfo(torch.float32).max
