"""Plain-PyTorch optimizer classes ``--to-native`` writes into a file where torch has no exact counterpart.

torch's ``Adam``/``AdamW`` always bias-correct and cannot clip inside ``step()``, and torch has no LARC.
Rather than keep such a call on ampcompat, the converter adds a short class to the file that reproduces
the Apex object's semantics exactly as ampcompat implements them (``ampcompat.optimizers.FusedAdam`` with
``bias_correction=False``, ``adam_w_mode`` and the 2019 keywords; ``ampcompat.parallel.LARC``), and the call
constructs that class with the same arguments. The class goes in once per file, at module level right
after the leading imports, under a name the file does not use (``_ApexFusedAdam``, ``_ApexLARC``).

The texts below are the generated code itself: :func:`class_text` returns them for tests, which run them
against ampcompat's implementations. Like all code ``--to-native`` writes, they never name ``apex`` or
``ampcompat`` (a converted file is checked for both words).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .alias_line import top_of_module
from .callargs import NOT_LITERAL
from .plan import RewritePlan
from .syntax import binds_module, is_docstring

_NAME = "__CLASS__"


@dataclass(frozen=True)
class InlineClass:
    """One class the converter can add to a file.

    Attributes:
        apex: what it reproduces, for the report (``FusedAdam``).
        wanted_name: the class name it gets unless the file already uses that name.
        source: the class text, with ``__CLASS__`` for its name.
        modules: the modules it refers to besides ``torch`` (imported at the top when the file lacks them).
    """

    apex: str
    wanted_name: str
    source: str
    modules: Tuple[str, ...] = ()


FUSED_ADAM = InlineClass("FusedAdam", "_ApexFusedAdam", '''\
class __CLASS__(torch.optim.Optimizer):
    """Apex's ``FusedAdam`` in plain PyTorch, written into this file by the ``--to-native`` migration.

    It reproduces Apex's FusedAdam semantics for what torch's Adam/AdamW cannot express, so this file needs
    neither Apex nor a compatibility layer for it: ``bias_correction=False``, ``adam_w_mode`` (decoupled weight
    decay; else L2 added to the gradient), and the 2019 keywords ``max_grad_norm`` (each param group's
    gradients divided by ``(norm + 1e-6) / max_grad_norm`` where that exceeds 1) and ``eps_inside_sqrt``
    (``sqrt(v + eps)``). With a 2019 keyword eps is not bias-corrected and the weight decay is scaled by the
    step size, as in that release. Gradients are used as they are: under ``scaler.step(optimizer)`` they
    arrive unscaled, and a step with inf/NaN gradients never runs. State per parameter: ``step``,
    ``exp_avg``, ``exp_avg_sq`` (FP32 for FP16/BF16 parameters), so earlier checkpoints load.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, *, set_grad_none=True, eps_inside_sqrt=False, max_grad_norm=0.0):
        self.legacy_math = bool(eps_inside_sqrt) or max_grad_norm != 0  # Apex's 2019 arithmetic
        if self.legacy_math and not adam_w_mode:
            raise ValueError("FusedAdam: eps_inside_sqrt/max_grad_norm (the 2019 API) cannot be combined with "
                             "adam_w_mode=False")
        if max_grad_norm < 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        if self.legacy_math:
            defaults["max_grad_norm"] = max_grad_norm
        super().__init__(params, defaults)
        self.set_grad_none = set_grad_none
        self.eps_inside_sqrt = bool(eps_inside_sqrt)
        self.adam_w_mode = bool(adam_w_mode)

    def zero_grad(self, set_to_none=None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else bool(set_to_none))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if any(p.grad.is_sparse for p in params):
                    raise RuntimeError("FusedAdam does not support sparse gradients, please consider "
                                       "SparseAdam instead")
                divisor = self._clip_divisor(group, params)
                for p in params:
                    self._update(group, p, divisor)
        return loss

    def _clip_divisor(self, group, params):
        """What the 2019 max_grad_norm clipping divides the group's gradients by (1.0: no clipping)."""
        max_grad_norm = group.get("max_grad_norm", 0.0)
        if not self.legacy_math or max_grad_norm <= 0 or not params:
            return 1.0
        device = params[0].grad.device
        norms = [torch.linalg.vector_norm(p.grad, 2, dtype=torch.float32).to(device) for p in params]
        clip = (float(torch.linalg.vector_norm(torch.stack(norms), 2)) + 1e-6) / max_grad_norm
        return clip if clip > 1 else 1.0

    def _update(self, group, p, divisor):
        state = self.state[p]
        weight = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p  # FP32 math for half parameters
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):  # load_state_dict casts them to a half parameter's dtype
            if state[key].dtype != weight.dtype:
                state[key] = state[key].to(weight.dtype)
        state["step"] = torch.tensor(float(state["step"]) + 1, dtype=torch.float32)
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = p.grad.to(exp_avg.dtype)
        if divisor != 1.0:
            grad = grad / divisor
        if not self.adam_w_mode and weight_decay != 0:
            grad = grad.add(weight, alpha=weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step if group["bias_correction"] else 1.0
        bias_correction2 = 1 - beta2 ** step if group["bias_correction"] else 1.0
        if self.legacy_math:
            denom = (exp_avg_sq + eps).sqrt() if self.eps_inside_sqrt else exp_avg_sq.sqrt().add_(eps)
            update = exp_avg / denom
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        else:
            denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
            update = (exp_avg / bias_correction1).div_(denom)
            step_size = lr
        if self.adam_w_mode and weight_decay != 0:
            update.add_(weight, alpha=weight_decay)
        weight.add_(update, alpha=-step_size)
        if weight is not p:
            p.copy_(weight)
''', modules=("math",))


LARC = InlineClass("LARC", "_ApexLARC", '''\
class __CLASS__:
    """Apex's ``LARC`` optimizer wrapper in plain PyTorch, written into this file by the ``--to-native`` migration.

    It reproduces Apex's LARC semantics, so this file needs neither Apex nor a compatibility layer for it. It
    wraps any optimizer; before each of its steps every gradient is rescaled by its parameter's local rate
    ``trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)``: with ``clip=True`` by
    ``min(local / lr, 1)``, else by ``local``, after adding ``weight_decay * p`` to it. The group's weight
    decay is 0 during the wrapped step (it is in the gradient already). A parameter whose weight or gradient
    norm is zero is stepped unchanged and without weight decay. ``state``, ``param_groups``, ``defaults``,
    ``state_dict()``, ``load_state_dict()``, ``zero_grad()`` and ``add_param_group()`` are the wrapped
    optimizer's (so ``torch.amp.GradScaler`` can unscale and step it).
    """

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    def __repr__(self):
        return repr(self.optim)

    @property
    def state(self):
        return self.optim.state

    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optim.param_groups = value

    @property
    def defaults(self):
        return self.optim.defaults

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=None):
        if set_to_none is None:
            self.optim.zero_grad()
        else:
            self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved_decays = []
        try:
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                saved_decays.append((group, "weight_decay" in group, weight_decay))
                group["weight_decay"] = 0
                with torch.no_grad():
                    self._rescale_grads(group, weight_decay)
            result = self.optim.step()
        finally:
            for group, had_decay, weight_decay in saved_decays:
                if had_decay:
                    group["weight_decay"] = weight_decay
                else:
                    del group["weight_decay"]
        return loss if closure is not None else result

    def _rescale_grads(self, group, weight_decay):
        for p in group["params"]:
            if p.grad is None:
                continue
            param_norm = torch.linalg.vector_norm(p).float()
            grad_norm = torch.linalg.vector_norm(p.grad).float()
            if param_norm == 0 or grad_norm == 0:
                continue
            local_rate = self.trust_coefficient * param_norm / (grad_norm + param_norm * weight_decay + self.eps)
            if self.clip:
                local_rate = torch.clamp(local_rate / group["lr"], max=1.0)
            if weight_decay != 0:
                p.grad.add_(p * weight_decay)
            p.grad.mul_(local_rate)
''')


def class_text(inline: InlineClass, name: Optional[str] = None) -> str:
    """The class definition as written into files, named ``name`` (default: its wanted name)."""
    return inline.source.replace(_NAME, name or inline.wanted_name)


def add_class(plan: RewritePlan, inline: InlineClass, call: ast.AST) -> Optional[str]:
    """Add ``inline``'s class to the file of ``plan`` (once) and return the name ``call`` constructs it by.

    The class goes at module level after the leading imports and after the module-level imports of the
    modules it needs (``torch`` and those it names are imported at the top where the file has no such
    import). Returns ``None`` where that place is not before ``call`` at run time (a module-level call
    above it), or where the module has no such place: the caller keeps the call as it was.
    """
    name = plan.fresh_name(inline.wanted_name)
    if name in plan.helpers_added:
        return name if _runs_after(plan, call, plan.helpers_added[name]) else None
    place = _after_imports(plan, ("torch",) + inline.modules)
    if place is None or not _runs_after(plan, call, place[0]):
        return None
    offset, newline, next_line_blank = place
    plan.helpers_added[name] = offset
    text = class_text(inline, name).replace("\n", newline)
    plan.insert_at(offset, newline + newline + text + (newline if next_line_blank else newline + newline))
    plan.modules.update(inline.modules)
    plan.uses_torch = True
    return name


def added_note(inline: InlineClass, name: str, why: str) -> str:
    """The report's note at a call now constructing ``name``."""
    return (f"`{inline.apex}` became `{name}`: {why}, so a plain-PyTorch class reproducing Apex's {inline.apex} "
            f"semantics (as ampcompat runs them) was added to this file after its imports")


def _after_imports(plan: RewritePlan, modules: Tuple[str, ...]) -> Optional[Tuple[int, str, bool]]:
    """Where the class goes: ``(offset, line break, whether the line there is blank)``, or ``None``.

    That is after the leading imports (the docstring, imports and ``try``/``if`` blocks holding only
    imports at the top of the module) and after every module-level ``import`` of ``modules``; at the top of
    the module (below leading comments) when there is neither.
    """
    tree = plan.result.source.tree
    text = plan.text
    last: Optional[ast.stmt] = None
    for index, statement in enumerate(tree.body):
        if not ((index == 0 and is_docstring(statement)) or _only_imports(statement)):
            break
        last = statement
    for module in modules:
        binding = next((s for s in tree.body if binds_module(s, module)), None)
        if binding is not None and (last is None or binding.lineno > last.lineno):
            last = binding
    if last is None:
        top = top_of_module(text, tree)
        if top is None:
            return None
        offset, lineno = top
        return offset, text.newline(min(lineno, len(text.line_starts))), False
    if not text.owns_lines(last):
        return None
    end = last.end_lineno  # type: ignore[assignment]
    offset = text.line_end(end)
    next_line_blank = end < len(text.line_starts) and not text.line(end + 1).strip()
    return offset, text.newline(end), next_line_blank


def _runs_after(plan: RewritePlan, call: ast.AST, offset: int) -> bool:
    """Whether ``call`` runs after module-level code at ``offset`` has: it is in a function, or below it."""
    node = call
    while plan.parents.get(node) is not None and not isinstance(plan.parents.get(node), ast.Module):
        node = plan.parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return plan.text.span(node)[0] >= offset


def _only_imports(node: ast.stmt) -> bool:
    """An import, or a ``try``/``if`` whose blocks hold only imports (and ``pass``/``raise``/assignments of
    fallbacks in its handlers)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Try):
        handlers = [statement for handler in node.handlers for statement in handler.body]
        return all(_only_imports(s) for s in node.body) and all(
            _only_imports(s) or isinstance(s, (ast.Pass, ast.Raise, ast.Assign)) for s in handlers + node.orelse)
    if isinstance(node, ast.If):
        return all(_only_imports(s) for s in node.body + node.orelse)
    return False


# --- the converters' side: which calls get a class ----------------------------------------------------
_KEEP = "; keep ampcompat.optimizers.FusedAdam or rewrite by hand"


def inline_fused_adam(call: Any) -> Optional[str]:
    """Rewrite an Apex ``FusedAdam(...)`` call (``native_calls._Call``, checked there) to the added class
    where torch's Adam/AdamW cannot express it exactly.

    Returns:
        ``None`` when the call was not touched because torch's optimizers express it (the caller
        rewrites it to them), ``""`` when it now constructs the added class, else why it stays on
        ampcompat.
    """
    bias_correction = call.value("bias_correction", True)
    legacy = {name: call.value(name, default) for name, default in (("eps_inside_sqrt", False), ("max_grad_norm", 0))}
    legacy_on = any(value is not NOT_LITERAL and bool(value) for value in legacy.values())
    legacy_unknown = [name for name, value in legacy.items() if value is NOT_LITERAL]
    if bias_correction is NOT_LITERAL and not legacy_on:
        return "bias_correction is only known at run time, and torch's Adam always corrects" + _KEEP
    corrects = bias_correction is NOT_LITERAL or bool(bias_correction)
    if corrects and not legacy_on and not legacy_unknown:
        return None  # torch.optim.Adam/AdamW
    if legacy_unknown and corrects and not legacy_on:
        return (f"{legacy_unknown[0]} is only known at run time: with bias_correction=True, Apex's 2019 arithmetic "
                "(with it) and today's (without) differ" + _KEEP)
    if (legacy_on or legacy_unknown) and not call.is_default("adam_w_mode", True):
        return ("Apex's 2019 keywords (eps_inside_sqrt, max_grad_norm) with adam_w_mode=False: ampcompat's FusedAdam "
                "raises ValueError for that combination" + _KEEP)
    if not call.is_default("capturable", False):
        return "capturable=True with arguments torch's Adam cannot express" + _KEEP
    name = add_class(call.plan, FUSED_ADAM, call.call)
    if name is None:
        return ("no place for a plain-PyTorch FusedAdam class above this module-level call (it runs before the file's "
                "imports end, or the first statement shares its line): move it below them and rerun" + _KEEP)
    _construct(call, name, drop=("amsgrad", "capturable", "master_weights"))
    why = ("torch's Adam/AdamW cannot clip inside step() (max_grad_norm) or place eps and weight decay as Apex's "
           "2019 FusedAdam did" if legacy_on or legacy_unknown else "torch's Adam/AdamW always bias-correct")
    call.plan.note(call.use.node, added_note(FUSED_ADAM, name, why))
    return ""


def inline_larc(call: Any) -> Optional[str]:
    """Rewrite an Apex ``LARC(...)`` call (``native_calls._Call``) to the added class; ``None`` when done,
    else why it stays on ampcompat."""
    problem = call.problem(shared_positional=4)
    if problem:
        return problem
    name = add_class(call.plan, LARC, call.call)
    if name is None:
        return ("no place for a plain-PyTorch LARC class above this module-level call (it runs before the file's "
                "imports end, or the first statement shares its line): move it below them and rerun; keep "
                "ampcompat's LARC or rewrite by hand")
    _construct(call, name)
    call.plan.note(call.use.node, added_note(LARC, name, "torch has no LARC wrapper"))
    return None


def _construct(call: Any, name: str, drop: Tuple[str, ...] = ()) -> None:
    """Make ``call`` construct ``name``: only the callee changes (the arguments keep their layout) unless
    arguments the class does not take (``drop``, all of them at their defaults) must go."""
    if any(call.arg(argument) is not None for argument in drop):
        call.rewrite(name, drop=drop)
    else:
        call.plan.replace(call.call.func, name)
