"""The training loop around a GradScaler: where gradients must be unscaled, and what else reaches the step.

Apex unscaled the gradients as each ``with amp.scale_loss(...)`` block ended, so any code between the
backward pass and ``optimizer.step()`` -- clipping, a gradient norm for the log, a check for NaN --
read true gradients. A ``torch.amp.GradScaler`` keeps them scaled until ``scaler.unscale_(optimizer)``
(or ``scaler.step``), and may unscale them only once per step. So for each backward pass the code that
runs after it is followed, statement by statement, to the optimizer step:

* when the step follows every backward pass (no gradient accumulation), one ``unscale_`` goes before the
  first statement on the way that may read gradients;
* when it does not (gradient accumulation: the step runs on some iterations only), statements that run
  on every iteration must not read gradients -- Apex gave them unscaled partial sums, which a GradScaler
  cannot -- and ``unscale_`` goes before the first reader among the statements that run only just
  before the step. One reader is the exception: clipping (``clip_grad_norm_``, ``clip_grad_value_``)
  commutes with the scale, so clipping the scaled partial sums at the threshold times the scale clips
  them as Apex clipped the unscaled ones (and the norm it returns, divided by the scale, is Apex's). Other
  reads through ``amp.master_params(optimizer)`` (a norm for the log) run with the gradients unscaled for
  them and put back after (:mod:`native_reads`).

"May read gradients" is decided from the text: a ``.grad`` attribute, ``amp.master_params(...)``, or a
call whose name mentions clipping, norms or gradients (``clip_grad_norm_``, ``get_grad_norm``). Other
backward passes that reach the step (``loss.backward()`` in the branch without amp) are fine only where
the GradScaler is off on their path.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .native_placement import Condition
from .native_reads import UnscaledRead, early_reads
from .syntax import Parents, block_of, walk_local

_READER_NAME = re.compile(r"clip|norm|grad", re.I)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module, ast.ClassDef)
_EXITS = (ast.Break, ast.Continue, ast.Return, ast.Raise)


def has_backward(statement: ast.AST) -> bool:
    """Whether ``statement`` runs a backward pass (``x.backward(...)``, FP16_Optimizer's ``backward(loss)``)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"
               for node in walk_local(statement))


def might_read_grads(statement: ast.AST, reads: Callable[[ast.AST], bool] = lambda node: False) -> bool:
    """Whether ``statement`` may read gradients (see the module docstring); ``reads`` adds node kinds."""
    for node in walk_local(statement):
        if isinstance(node, ast.Attribute) and node.attr == "grad" and isinstance(node.ctx, ast.Load):
            return True
        if reads(node):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name != "backward" and _READER_NAME.search(name):
                return True
    return False


@dataclass
class PathToStep:
    """What runs after a backward pass until the optimizer step.

    Attributes:
        every_time: statements that run after every run of the backward pass, before the step (or, when the
            step is not reached, to the end of the iteration).
        before_step: statements that run just before the step, on the iterations that reach it.
        step: the step statement reached, or ``None``.
        always: the step follows every run of the backward pass (or of the inner loop that runs it).
        repeated: statements after the backward pass inside an inner loop (once per micro-batch), when the
            path leaves that loop to reach the step.
    """

    every_time: List[ast.stmt] = field(default_factory=list)
    before_step: List[ast.stmt] = field(default_factory=list)
    repeated: List[ast.stmt] = field(default_factory=list)
    step: Optional[ast.stmt] = None
    always: bool = False


def path_to_step(start: ast.stmt, is_step: Callable[[ast.stmt], bool], parents: Parents,
                 conditions: Sequence[Condition] = ()) -> PathToStep:
    """Follow the statements after ``start`` to the first optimizer step (``is_step``) of its loop iteration.

    ``conditions``: what holds while the GradScaler is on; a branch they imply is taken does not make
    reaching the step conditional (it always runs when there is anything to unscale).
    """
    path = PathToStep()
    current: ast.stmt = start
    while True:
        block, index = block_of(current, parents)
        for sibling in block[index + 1 :]:
            step = _step_in(sibling, is_step)
            if step is not None:
                path.step = step
                path.before_step, conditional = _descend(sibling, step, parents, conditions)
                path.always = not conditional
                for item in path.before_step:  # a backward pass on the way down: only what follows it counts
                    if has_backward(item):
                        path.always = False
                        path.before_step = path.before_step[path.before_step.index(item) + 1 :]
                return path
            if has_backward(sibling) or _exits(sibling):
                return path
            path.every_time.append(sibling)
        owner = parents.get(current)
        if isinstance(owner, _LOOPS) and any(current is item for item in owner.body):
            # The end of an inner loop (micro-batches): what ran after the backward ran once per micro-batch;
            # the step, if it follows the loop, comes after the last one.
            path.repeated += path.every_time
            path.every_time = []
            current = owner
            continue
        if not isinstance(owner, (ast.If, ast.With, ast.AsyncWith, ast.Try)):
            return path
        if isinstance(owner, ast.Try) and not any(current is item for item in owner.body):
            return path
        current = owner


def _step_in(statement: ast.stmt, is_step: Callable[[ast.stmt], bool]) -> Optional[ast.stmt]:
    for node in walk_local(statement):
        if isinstance(node, ast.stmt) and is_step(node):
            return node
    return None


def _exits(statement: ast.stmt) -> bool:
    return any(isinstance(node, _EXITS) for node in walk_local(statement))


def _descend(container: ast.stmt, step: ast.stmt, parents: Parents,
             conditions: Sequence[Condition]) -> Tuple[List[ast.stmt], bool]:
    """The statements inside ``container`` that run before ``step`` on the way to it, and whether reaching it
    depends on a condition or a loop."""
    levels: List[ast.stmt] = []
    current: ast.stmt = step
    while current is not container:
        levels.append(current)
        parent = parents[current]
        while not isinstance(parent, ast.stmt):
            parent = parents[parent]
        current = parent  # type: ignore[assignment]
    before: List[ast.stmt] = []
    conditional = False
    for node in reversed(levels):
        owner = parents[node]
        if isinstance(owner, ast.If):
            conditional |= not implied(owner.test, any(node is item for item in owner.body), conditions)
        elif isinstance(owner, _LOOPS) or (isinstance(owner, ast.Try) and not any(node is item for item in owner.body)):
            conditional = True
        block, index = block_of(node, parents)
        before.extend(block[:index])
    if any(_exits(item) for item in before):
        conditional = True
    return before, conditional


_CLIPS = {"clip_grad_norm_": ("max_norm", "total_norm"), "clip_grad_norm": ("max_norm", "total_norm"),
          "clip_grad_value_": ("clip_value", None)}
"""Clipping functions (by name): the threshold's keyword, and whether they return a norm."""


@dataclass(frozen=True)
class ScaledClip:
    """A clipping call that may run on scaled gradients: clip at ``threshold`` times the scale instead.

    Attributes:
        call: the clipping call.
        threshold: its threshold argument (``max_norm``, ``clip_value``).
        returns_norm: the statement keeps the norm the call returns (divide it by the scale).
    """

    call: ast.Call
    threshold: ast.expr
    returns_norm: bool


def scaled_clip(statement: ast.stmt) -> Optional[ScaledClip]:
    """``statement`` as a clipping call that can run on scaled gradients, or ``None`` if it is anything else.

    Only a statement that is the call alone (``clip_grad_norm_(params, 1.0)``, ``norm = clip_grad_norm_(...)``)
    qualifies, so nothing else in it reads the gradients.
    """
    if isinstance(statement, ast.Expr):
        call, keeps = statement.value, False
    elif isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
            and isinstance(statement.targets[0], ast.Name):
        call, keeps = statement.value, True
    else:
        return None
    if not isinstance(call, ast.Call):
        return None
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in _CLIPS or any(isinstance(item, ast.Starred) for item in call.args) \
            or any(keyword.arg is None for keyword in call.keywords):
        return None
    keyword_name, norm = _CLIPS[name]
    threshold = call.args[1] if len(call.args) > 1 else \
        next((keyword.value for keyword in call.keywords if keyword.arg == keyword_name), None)
    if threshold is None or any(isinstance(node, ast.Attribute) and node.attr == "grad"
                                for node in ast.walk(call)):
        return None
    return ScaledClip(call, threshold, keeps and norm is not None)


@dataclass
class Unscaling:
    """Where ``unscale_`` calls go (``before[id(statement)]``: the statement and the step it serves), the
    clipping that runs on scaled gradients instead (``scaled_clips``), the reads that run with the gradients
    unscaled for them (``unscaled_reads``, with the step they precede: :mod:`native_reads`), and what cannot
    be made to read true gradients."""

    before: Dict[int, Tuple[ast.stmt, ast.stmt]] = field(default_factory=dict)
    scaled_clips: List[ScaledClip] = field(default_factory=list)
    unscaled_reads: List[Tuple[UnscaledRead, ast.stmt]] = field(default_factory=list)
    blockers: List[Tuple[ast.AST, str]] = field(default_factory=list)


def plan_unscaling(backwards: Sequence[ast.stmt], is_step: Callable[[ast.stmt], bool], parents: Parents,
                   reads: Callable[[ast.AST], bool], conditions: Sequence[Condition] = (),
                   master_of: Callable[[ast.AST], Optional[ast.expr]] = lambda node: None) -> Unscaling:
    """Where gradients must be unscaled for code between ``backwards`` and the steps to read what it read
    under Apex (see the module docstring); ``conditions`` hold while the GradScaler is on; ``master_of`` gives
    the optimizer of an ``amp.master_params(optimizer)`` call (``None`` for other nodes)."""
    result = Unscaling()
    paths: List[PathToStep] = []
    for backward in backwards:
        path = path_to_step(backward, is_step, parents, conditions)
        paths.append(path)
        every_time = [item for item in path.every_time if might_read_grads(item, reads)]
        before_step = [item for item in path.before_step if might_read_grads(item, reads)]
        repeated = [item for item in path.repeated if might_read_grads(item, reads)]
        if repeated or (every_time and not (path.step is not None and path.always)):
            # Reads that run before every step is certain: clipping can run on the scaled partial sums.
            early = early_reads(repeated + every_time, lambda node: might_read_grads(node, reads), scaled_clip,
                                master_of)
            if path.step is not None and early is not None:
                result.scaled_clips += [clip for clip in early.clips
                                        if all(clip.call is not known.call for known in result.scaled_clips)]
                result.unscaled_reads += [(read, path.step) for read in early.reads if all(
                    read.statement is not known.statement for known, _ in result.unscaled_reads)]
                repeated, every_time = [], []
        if repeated:
            result.blockers.append((repeated[0], "this reads gradients after each backward pass of a loop of micro-"
                                                 "batches: Apex had unscaled them, a GradScaler unscales once per "
                                                 "step; read them after the loop, or rewrite by hand"))
            continue
        if every_time and not (path.step is not None and path.always):
            result.blockers.append((every_time[0], "this reads gradients after a backward pass that is not always "
                                                   "followed by optimizer.step() (gradient accumulation): Apex had "
                                                   "unscaled them, a GradScaler unscales once per step; read them "
                                                   "just before the step, or rewrite by hand"))
            continue
        readers = every_time + before_step
        if readers and path.step is not None:
            result.before[id(readers[0])] = (readers[0], path.step)
    chosen = set(result.before)
    for backward, path in zip(backwards, paths):
        on_path = [item for item in path.repeated + path.every_time + path.before_step if id(item) in chosen]
        if len(on_path) > 1:
            result.blockers.append((on_path[1], "gradients are read in more than one place between the backward "
                                                "pass and the optimizer step, which would unscale them twice; "
                                                "rewrite by hand"))
    return result


def scheduler_steps(step: ast.stmt, parents: Parents, text_of: Callable[[ast.AST], str]) -> List[ast.stmt]:
    """The learning-rate scheduler steps that follow ``step`` in its block (``scheduler.step()``,
    ``lr_scheduler.step_update(n)``): under a GradScaler they should advance only when the optimizer did."""
    block, index = block_of(step, parents)
    found = []
    for sibling in block[index + 1 :]:
        if isinstance(sibling, ast.Expr) and isinstance(sibling.value, ast.Call) \
                and isinstance(sibling.value.func, ast.Attribute) \
                and sibling.value.func.attr in ("step", "step_update") \
                and "sched" in text_of(sibling.value.func.value).lower():
            found.append(sibling)
    return found


def unscaled_backwards(scopes: Iterable[ast.AST], scaled: Set[int], conditions: Sequence[Condition],
                       parents: Parents) -> List[ast.Call]:
    """Backward passes in ``scopes`` that the GradScaler did not scale and that can run while it is on.

    Args:
        scopes: the functions whose optimizer steps become ``scaler.step``.
        scaled: ``id()`` of the calls that are (or become) scaled backward passes.
        conditions: the conditions the GradScaler is enabled under (empty: always on).
        parents: the file's parent links.
    """
    found = []
    for scope in scopes:
        for node in walk_local(scope):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward" \
                    and id(node) not in scaled and not _scaler_off(node, conditions, parents):
                found.append(node)
    return found


def _scaler_off(node: ast.AST, conditions: Sequence[Condition], parents: Parents) -> bool:
    """Whether ``node`` only runs where one of ``conditions`` is false."""
    child: ast.AST = node
    parent = parents.get(child)
    while parent is not None and not isinstance(parent, _FUNCTIONS):
        if isinstance(parent, ast.If) and child is not parent.test:
            branch = any(child is item for item in parent.body)
            test, holds = _unnegated(parent.test, branch)
            if any(condition.matches(test, not holds) for condition in conditions):
                return True
        child, parent = parent, parents.get(parent)
    return False


def implied(test: ast.expr, holds: bool, conditions: Sequence[Condition]) -> bool:
    """Whether ``conditions`` imply that ``test`` is ``holds`` (``a and b`` is false where ``not a`` holds)."""
    test, holds = _unnegated(test, holds)
    if any(condition.matches(test, holds) for condition in conditions):
        return True
    if isinstance(test, ast.BoolOp):
        parts = [implied(value, holds, conditions) for value in test.values]
        conjunction = isinstance(test.op, ast.And)
        return all(parts) if conjunction == holds else any(parts)
    return False


def _unnegated(test: ast.expr, holds: bool) -> Tuple[ast.expr, bool]:
    while isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test, holds = test.operand, not holds
    return test, holds
