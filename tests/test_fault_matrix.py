"""Fault matrix: inf/NaN injected at seeded passes and parameters, every opt level and training pattern.

Each case trains a small MLP for a few steps twice: once through ampcompat, with inf, -inf or NaN
written into one element of one gradient at seeded backward passes, and once as a plain-PyTorch
reference that follows the level's precision recipe by hand (FP32; autocast; an FP16/BF16 model with
FP32 masters; a pure FP16 model), uses the closed-form loss scale, and simply leaves out every step
that had an injection. The ampcompat run must then show, at every step:

* the step is skipped exactly where a fault was injected (``_amp_stash.already_patched`` before
  ``step()``, Adam's per-parameter step count afterwards);
* every parameter, FP32 master and optimizer state tensor stays finite;
* every loss scaler follows the closed form: halved at each backward pass whose gradients held the
  fault (Apex counts per backward pass, not per step), ``_unskipped`` counting the clean passes;

and at the end its parameters (the masters for O2/O5) and optimizer state equal the reference's, bit
for bit on the CPU.

Axes (full cross product, 384 cases on the CPU; the default run takes a pairwise sample of 24, ``--full``
runs all): opt level O0-O5 x optimizer {SGD with momentum,
Adam, AdamW foreach, AdamW fused} x {1, 2 optimizers} x {1, 3 losses} x {plain, accumulation over
two micro-batches, ``delay_unscale`` on the first micro-batch, clipping through ``amp.master_params``}.
Levels whose default loss scale is a static 1.0 (O0, O3, O4, O5: no overflow detection, Apex's
semantics) run with ``loss_scale="dynamic"``; :func:`test_static_scale_above_one_detects_and_skips`
covers the documented fix for static scales above 1.
"""
from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ampcompat import amp

from _models import layer_norm_in_fp32, make_mlp
from _sampling import in_default_run, pairwise

LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")
OPTIMIZERS: Dict[str, Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    # eps=1e-3 keeps pure-FP16 (O3) Adam finite: 1e-8 rounds to 0 in fp16 and 0/0 appears for
    # gradients that are exactly zero, with or without ampcompat.
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-3),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-3, weight_decay=0.01, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-3, weight_decay=0.01, fused=True),
    # Not on the matrix's optimizer axis; used by the targeted fused-kernel tests below.
    "adam_fused": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-3, fused=True),
    "sgd_momentum_fused": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
}
MATRIX_OPTIMIZERS = ("sgd_momentum", "adam", "adamw_foreach", "adamw_fused")
MODES = ("plain", "accumulation", "delay_unscale", "clip")
STEPS = 6
MAX_NORM = 0.5
# The dynamic scale starts at min(2**16, max_loss_scale). 2**12 leaves headroom: six scaled FP16
# backward passes summed under delay_unscale overflow FP16 on their own at 2**16, and the closed form
# below only predicts the injected faults.
MAX_LOSS_SCALE = 2.0 ** 12
D_IN, D_HIDDEN, D_OUT, BATCH = 8, 16, 4, 16
FAULTS = (float("inf"), float("-inf"), float("nan"))

_HALF = {"O1": torch.float16, "O2": torch.float16, "O3": torch.float16,
         "O4": torch.bfloat16, "O5": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    level: str
    optimizer: str
    n_optimizers: int
    n_losses: int
    mode: str
    loss_scale: object = "dynamic"

    @property
    def micro_batches(self) -> int:
        return 2 if self.mode in ("accumulation", "delay_unscale") else 1

    @property
    def num_scalers(self) -> int:
        # Delayed gradients are summed while still scaled, so every pass of a delay_unscale window
        # must use one scale: the three losses share scaler 0 there.
        return 1 if self.mode == "delay_unscale" else self.n_losses

    def loss_id(self, k: int) -> int:
        return 0 if self.mode == "delay_unscale" else k

    @property
    def seed(self) -> int:
        return zlib.crc32(repr(self).encode())


@dataclass(frozen=True)
class Fault:
    step: int
    micro: int
    loss: int
    param: int  # index into model.parameters()
    element: int
    value: float


def _passes(case: Case) -> List[Tuple[int, int, int]]:
    return [(s, m, k) for s in range(STEPS) for m in range(case.micro_batches) for k in range(case.n_losses)]


def _is_delayed(case: Case, micro: int, k: int) -> bool:
    """delay_unscale: every pass of a window but the last keeps its gradients scaled."""
    return case.mode == "delay_unscale" and (micro, k) != (case.micro_batches - 1, case.n_losses - 1)


def _faults(case: Case, model: torch.nn.Module) -> List[Fault]:
    """Three seeded faults on passes of steps 0..STEPS-2 (the last step always trains)."""
    rng = random.Random(case.seed)
    candidates = [p for p in _passes(case) if p[0] < STEPS - 1]
    shapes = [p.numel() for p in model.parameters()]
    faults = []
    for s, m, k in sorted(rng.sample(candidates, 3)):
        param = rng.randrange(len(shapes))
        faults.append(Fault(s, m, k, param, rng.randrange(shapes[param]), rng.choice(FAULTS)))
    return faults


def _data(case: Case, device: str):
    g = torch.Generator().manual_seed(case.seed % 1000)
    data = {}
    for s, m, k in _passes(case):
        x = torch.randn(BATCH, D_IN, generator=g)
        y = torch.randint(0, D_OUT, (BATCH,), generator=g)
        data[(s, m, k)] = (x.to(device), y.to(device))
    return data


def _loss(k: int, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if k == 1:
        return F.cross_entropy(out, y, label_smoothing=0.1)
    if k == 2:
        return 0.1 * out.float().pow(2).mean() + F.cross_entropy(out, y)
    return F.cross_entropy(out, y)


def _split(params: List[torch.Tensor], n_optimizers: int) -> List[List[torch.Tensor]]:
    """fc1 + bn to the first optimizer, ln + fc2 to the second (MLP parameter order)."""
    if n_optimizers == 1:
        return [params]
    return [params[:4], params[4:]]


# --- the expected schedule, in closed form -----------------------------------------------------------

@dataclass
class Schedule:
    skipped: List[bool]  # per step
    scale_used: Dict[Tuple[int, int, int], float]  # scale each pass's loss is multiplied by
    scale_after: List[List[float]]  # per step, per scaler
    unskipped_after: List[List[int]]


def _schedule(case: Case, faults: List[Fault]) -> Schedule:
    """Halve a scaler at every non-delayed pass that sees a fault (its own or a delayed one's)."""
    faulty = {(f.step, f.micro, f.loss) for f in faults}
    dynamic = case.loss_scale == "dynamic"
    scales = [min(2.0 ** 16, MAX_LOSS_SCALE) if dynamic else float(case.loss_scale)] * case.num_scalers
    unskipped = [0] * case.num_scalers
    sched = Schedule([], {}, [], [])
    for s in range(STEPS):
        pending = False  # a fault in a delayed pass, not yet seen by a scaler
        skip = False
        for m in range(case.micro_batches):
            for k in range(case.n_losses):
                i = case.loss_id(k)
                sched.scale_used[(s, m, k)] = scales[i]
                pending = pending or (s, m, k) in faulty
                if _is_delayed(case, m, k):
                    continue
                if pending:
                    skip = True
                    unskipped[i] = 0
                    if dynamic:
                        scales[i] /= 2.0
                else:
                    unskipped[i] += 1
                pending = False
        sched.skipped.append(skip)
        sched.scale_after.append(list(scales))
        sched.unskipped_after.append(list(unskipped))
    return sched


# --- the plain-PyTorch reference -------------------------------------------------------------------

def _cast_like_o2(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.affine:
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.is_floating_point():
                t.data = t.data.to(dtype)


class Reference:
    """The level's recipe written out with plain PyTorch: no ampcompat anywhere."""

    def __init__(self, case: Case, model: torch.nn.Module, device: str) -> None:
        self.case, self.device = case, device
        self.model = model
        self.half = _HALF.get(case.level)
        self.masters_on = case.level in ("O2", "O5")
        if self.masters_on:
            _cast_like_o2(model, self.half)
        elif case.level == "O3":
            model.to(torch.float16)
        elif case.level in ("O1", "O4"):
            layer_norm_in_fp32(model)  # Apex's O1 list; native CPU autocast alone would run it in FP16
        params = list(model.parameters())
        self.stepped = [
            p.detach().clone().float().requires_grad_(True) if self.masters_on and p.dtype != torch.float32 else p
            for p in params
        ]
        self.pairs = [(p, m) for p, m in zip(params, self.stepped) if p is not m]
        self.optimizers = [OPTIMIZERS[case.optimizer](group) for group in _split(self.stepped, case.n_optimizers)]
        self.acc: Dict[int, Optional[torch.Tensor]] = {}

    def forward_loss(self, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        level = self.case.level
        if level in ("O1", "O4"):
            with torch.autocast(self.device, dtype=self.half):
                return _loss(k, self.model(x), y)
        if level in ("O2", "O3", "O5"):
            return _loss(k, self.model(x.to(self.half)).float(), y)
        return _loss(k, self.model(x), y)

    def backward(self, loss: torch.Tensor, scale: float, delayed: bool) -> None:
        (loss.float() * scale).backward()
        if delayed:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        assert _all_finite(grads), "the reference overflowed without an injected fault: lower MAX_LOSS_SCALE"
        inv = 1.0 / scale
        for p, stepped in zip(self.model.parameters(), self.stepped):
            if p.grad is None:
                continue
            new = p.grad.float() * inv if stepped is not p else p.grad * inv
            key = id(stepped)
            self.acc[key] = new if self.acc.get(key) is None else new + self.acc[key]
            p.grad = None

    def step(self, skip: bool) -> None:
        if not skip:
            for stepped in self.stepped:
                stepped.grad = self.acc.get(id(stepped))
            if self.case.mode == "clip":
                torch.nn.utils.clip_grad_norm_(self.stepped, MAX_NORM)
            for opt in self.optimizers:
                opt.step()
            with torch.no_grad():
                for p, master in self.pairs:
                    p.copy_(master)
        self.acc = {}
        for t in self.stepped + list(self.model.parameters()):
            t.grad = None


def _run_reference(case: Case, device: str, sched: Schedule, data) -> Reference:
    ref = Reference(case, make_mlp(device, seed=0, d_hidden=D_HIDDEN), device)
    for s in range(STEPS):
        for m in range(case.micro_batches):
            for k in range(case.n_losses):
                x, y = data[(s, m, k)]
                loss = ref.forward_loss(k, x, y)
                ref.backward(loss, sched.scale_used[(s, m, k)], _is_delayed(case, m, k))
        ref.step(sched.skipped[s])
    return ref


# --- the ampcompat run ------------------------------------------------------------------------------

def _injector(faults: List[Fault], index: int, where: Dict[str, Tuple[int, int, int]]):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        for f in faults:
            if f.param == index and (f.step, f.micro, f.loss) == where["pass"]:
                grad = grad.clone()
                grad.view(-1)[f.element] = f.value
        return grad
    return hook


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]


def _run_amp(case: Case, device: str, sched: Schedule, faults: List[Fault], data):
    model = make_mlp(device, seed=0, d_hidden=D_HIDDEN)
    opts = [OPTIMIZERS[case.optimizer](group) for group in _split(list(model.parameters()), case.n_optimizers)]
    amp.initialize(model, opts if case.n_optimizers > 1 else opts[0], opt_level=case.level,
                   loss_scale=case.loss_scale, num_losses=case.num_scalers, max_loss_scale=MAX_LOSS_SCALE,
                   verbosity=0)
    where = {"pass": None}
    hooks = [p.register_hook(_injector(faults, i, where)) for i, p in enumerate(model.parameters())]
    scalers = amp._amp_state.loss_scalers
    for s in range(STEPS):
        for m in range(case.micro_batches):
            for k in range(case.n_losses):
                where["pass"] = (s, m, k)
                x, y = data[(s, m, k)]
                loss = _loss(k, model(x), y)
                with amp.scale_loss(loss, opts, loss_id=case.loss_id(k),
                                    delay_unscale=_is_delayed(case, m, k)) as scaled:
                    assert scaled.item() == pytest.approx(loss.float().item() * sched.scale_used[(s, m, k)])
                    scaled.backward()
        assert [o._amp_stash.already_patched for o in opts] == [sched.skipped[s]] * len(opts), "step %d" % s
        if case.mode == "clip":
            torch.nn.utils.clip_grad_norm_(itertools.chain(*(amp.master_params(o) for o in opts)), MAX_NORM)
        before = [p.detach().clone() for o in opts for p in amp.master_params(o)]
        for o in opts:
            o.step()
        after = [p.detach() for o in opts for p in amp.master_params(o)]
        if sched.skipped[s]:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), "skipped step %d changed params" % s
        assert _all_finite(after) and _all_finite(model.parameters()), "non-finite params after step %d" % s
        assert all(_all_finite(_optimizer_tensors(o)) for o in opts), "non-finite optimizer state, step %d" % s
        assert [sc.loss_scale() for sc in scalers] == sched.scale_after[s], "scale after step %d" % s
        assert [sc._unskipped for sc in scalers] == sched.unskipped_after[s], "unskipped after step %d" % s
        for o in opts:
            o.zero_grad()
    for h in hooks:
        h.remove()
    return model, opts


def _tolerance(device: str) -> Dict[str, float]:
    """Both runs apply the same kernels to the same values in the same order: bitwise equal on the CPU.

    On a GPU, cuBLAS and the fused kernels may pick other reduction orders for the two runs, so there
    torch's default tolerances for each dtype apply.
    """
    return dict(rtol=0, atol=0) if device == "cpu" else {}


def check_case(case: Case, device: str, faults: Optional[List[Fault]] = None) -> None:
    probe = make_mlp(device, seed=0, d_hidden=D_HIDDEN)
    faults = _faults(case, probe) if faults is None else faults
    sched = _schedule(case, faults)
    assert any(sched.skipped) and not sched.skipped[-1]
    data = _data(case, device)
    ref = _run_reference(case, device, sched, data)
    model, opts = _run_amp(case, device, sched, faults, data)

    tol = _tolerance(device)
    stepped = [p for o in opts for p in amp.master_params(o)]
    ref_stepped = [p for o in ref.optimizers for p in o.param_groups[0]["params"]]
    assert [p.dtype for p in stepped] == [p.dtype for p in ref_stepped]
    for a, b in zip(stepped, ref_stepped):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, **tol)
    for o, ro in zip(opts, ref.optimizers):
        for p, rp in zip(o.param_groups[0]["params"], ro.param_groups[0]["params"]):
            state, ref_state = o.state[p], ro.state[rp]
            assert state.keys() == ref_state.keys()
            for key in state:
                torch.testing.assert_close(state[key], ref_state[key], **tol)
    if "adam" in case.optimizer:
        trained = STEPS - sum(sched.skipped)
        for o in opts:
            assert all(int(st["step"]) == trained for st in o.state.values())




def _case_id(c: Case) -> str:
    return "-".join(str(v) for v in (c.level, c.optimizer, "%dopt" % c.n_optimizers, "%dloss" % c.n_losses, c.mode))


ALL_CASES = [Case(*combo) for combo in itertools.product(LEVELS, MATRIX_OPTIMIZERS, (1, 2), (1, 3), MODES)]
# The default run takes a pairwise sample (24 of the 384 cases): every value of every axis, and every
# pair of values of two axes (each level with each optimizer, each mode, ...), appears at least once.
# ``--full`` runs all 384.
MATRIX_PARAMS = pairwise([pytest.param(c, id=_case_id(c)) for c in ALL_CASES],
                         axes=lambda c: (c.level, c.optimizer, c.n_optimizers, c.n_losses, c.mode))


@pytest.mark.parametrize("case", MATRIX_PARAMS)
def test_fault_matrix(case: Case) -> None:
    check_case(case, "cpu")


def test_the_default_sample_meets_every_level_with_every_fault_kind() -> None:
    sampled = [p.values[0] for p in MATRIX_PARAMS if in_default_run(p)]
    probe = make_mlp("cpu", seed=0, d_hidden=D_HIDDEN)
    seen = {(case.level, str(fault.value)) for case in sampled for fault in _faults(case, probe)}
    assert seen == {(level, str(value)) for level in LEVELS for value in FAULTS}
    assert len(sampled) < len(ALL_CASES)


# --- targeted: torch's fused kernels, which ampcompat lets skip a step on the device ------------------

def _skip_broken_torch_kernel(level: str, optimizer: str, device: str) -> None:
    if device == "cpu" and level == "O3" and optimizer == "sgd_momentum_fused":
        # O3 steps the FP16 params themselves, and torch 2.13's CPU fused SGD kernel leaves FP16/BF16
        # tensors of 16 or more elements unchanged (its vectorised path; shorter ones update). A torch
        # bug, seen with plain torch.optim.SGD(fused=True) alone: the plain-PyTorch reference cannot run.
        pytest.skip("torch's CPU fused SGD kernel does not update FP16 parameters")


@pytest.mark.parametrize("optimizer", ["adam_fused", "adamw_fused", "sgd_momentum_fused"])
@pytest.mark.parametrize("level", LEVELS)
def test_fused_step_after_two_faulty_passes_is_skipped(level, optimizer, device) -> None:
    """Gradient accumulation over two micro-batches that both overflow: one skipped step."""
    _skip_broken_torch_kernel(level, optimizer, device)
    case = Case(level, optimizer, 1, 1, "accumulation")
    check_case(case, device, faults=[Fault(1, 0, 0, 0, 0, float("inf")), Fault(1, 1, 0, 2, 1, float("nan"))])




@pytest.mark.parametrize("optimizer", [
    "adam_fused", "adamw_fused",
    "sgd_momentum_fused",
])
@pytest.mark.parametrize("level", LEVELS)
def test_fused_first_step_overflow(level, optimizer, device) -> None:
    """The very first step overflows (Apex's typical start at 2**16): the optimizer state must stay clean."""
    _skip_broken_torch_kernel(level, optimizer, device)
    case = Case(level, optimizer, 1, 1, "plain")
    check_case(case, device, faults=[Fault(0, 0, 0, 6, 3, float("inf"))])


CUDA_CASES = [Case(level, opt, 2, 3, mode) for level in LEVELS for opt in ("adamw_fused", "adam")
              for mode in ("plain", "delay_unscale", "clip")]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "-".join((c.level, c.optimizer, c.mode)))
def test_fault_matrix_cuda(case: Case) -> None:
    check_case(case, "cuda")


@pytest.mark.parametrize("level", LEVELS)
def test_static_scale_above_one_detects_and_skips(level, device) -> None:
    """The documented fix over Apex: a static scale other than 1 still detects inf/NaN and skips."""
    check_case(Case(level, "sgd_momentum", 1, 1, "plain", loss_scale=128.0), device)


@pytest.mark.parametrize("level", ["O0", "O3", "O4", "O5"])
def test_default_static_scale_one_does_not_detect(level) -> None:
    """Apex's semantics, kept and documented: at a static scale of 1.0 (the default of O0, O3, O4 and
    O5) nothing checks the gradients, so an inf reaches the parameters. Use loss_scale="dynamic" or a
    static scale above 1 to be protected."""
    model = make_mlp(seed=0, d_hidden=D_HIDDEN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    amp.initialize(model, opt, opt_level=level, verbosity=0)
    scaler = amp._amp_state.loss_scalers[0]
    assert (scaler.dynamic, scaler.loss_scale()) == (False, 1.0)
    model.fc1.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    x, y = torch.randn(BATCH, D_IN), torch.randint(0, D_OUT, (BATCH,))
    with amp.scale_loss(F.cross_entropy(model(x), y), opt) as scaled:
        scaled.backward()
    assert opt._amp_stash.already_patched is False
    opt.step()
    assert scaler.loss_scale() == 1.0
    assert not bool(torch.isfinite(model.fc1.weight).all())
