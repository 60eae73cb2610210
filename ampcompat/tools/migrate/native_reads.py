"""Gradient reads between the backward passes of gradient accumulation, made to see what Apex showed them.

Apex unscaled the gradients as each ``with amp.scale_loss(...)`` block ended, so a statement after every
micro-batch's backward pass -- ``grad_norm = get_grad_norm(amp.master_params(optimizer))`` for the log
(Swin's 2021 ``main.py``) -- read the unscaled partial sums. A GradScaler keeps them scaled until the
step and can unscale only once per step. Clipping has its own conversion (:func:`native_loop.scaled_clip`:
clip the scaled sums at the threshold times the scale); any other statement that reads the gradients
through ``amp.master_params(optimizer)`` runs inside ``with unscaled_gradients(scaler, optimizer):``,
a small context manager added to the file:

* on entry, each of the optimizer's parameters gets a new ``.grad`` tensor, the scaled gradient divided
  by ``scaler.get_scale()`` (a power of two: exactly Apex's unscaled partial sum);
* on exit, the scaled gradient tensor goes back where it was. If the statement changed the unscaled
  gradient (``Tensor._version`` counts in-place writes) or replaced it, the change is carried over,
  multiplied by the scale, into the original tensor: the statement acted on unscaled gradients, as under Apex.

So a reader sees what it saw under Apex whatever it computes (not only a norm, which ``/ scale`` would have
fixed), a reader that writes gradients writes what Apex's would have, and the gradients the step later
unscales are bit for bit the ones it would have had without the read. A disabled GradScaler (scale 1,
O0 at run time) skips all of it.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Callable, Generic, List, Optional, Sequence, Tuple, TypeVar

from . import native_checkpoint
from .plan import RewritePlan

HELPER = "unscaled_gradients"
"""The context manager's name (or a fresh variant where the file already uses it)."""

NOTE = ("this reads gradients after every backward pass of gradient accumulation, where Apex had unscaled the partial "
        "sums and a GradScaler has not: it now runs inside {helper}(...), added to this file, which shows it the "
        "gradients divided by the scale and puts the scaled ones back after it (reading the scale on the host "
        "at each call)")

_SIMPLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)

Clip = TypeVar("Clip")


@dataclass(frozen=True)
class UnscaledRead:
    """A statement to run with the gradients of ``optimizer`` unscaled.

    Attributes:
        statement: the statement.
        optimizer: the optimizer its ``amp.master_params(...)`` names.
    """

    statement: ast.stmt
    optimizer: ast.expr


@dataclass
class EarlyReads(Generic[Clip]):
    """How each gradient read between a backward pass and a later step is converted."""

    clips: List[Clip]
    reads: List[UnscaledRead]


def early_reads(statements: Sequence[ast.stmt], might_read: Callable[[ast.AST], bool],
                clip_of: Callable[[ast.stmt], Optional[Clip]], master_of: Callable[[ast.AST], Optional[ast.expr]]
                ) -> Optional[EarlyReads[Clip]]:
    """Sort the statements that run after a backward pass of gradient accumulation into clips that run on the
    scaled gradients (``clip_of``) and reads to run under :data:`HELPER`; ``None`` if some read is neither.

    An ``if`` whose test reads no gradients is looked into (``if clip: clip_grad_norm_(...) else: norm(...)``).

    Args:
        statements: the statements that run after the backward pass, before the step is certain.
        might_read: whether a node may read gradients.
        clip_of: the clipping conversion of a statement, or ``None``.
        master_of: for an ``amp.master_params(optimizer)`` call, its optimizer; ``None`` for any other node.
    """
    found: EarlyReads[Clip] = EarlyReads([], [])

    def visit(statement: ast.stmt) -> bool:
        if not might_read(statement):
            return True
        clip = clip_of(statement)
        if clip is not None:
            found.clips.append(clip)
            return True
        if isinstance(statement, ast.If) and not might_read(statement.test):
            return all([visit(item) for item in statement.body + statement.orelse])
        read = unscaled_read(statement, master_of)
        if read is None:
            return False
        found.reads.append(read)
        return True

    return found if all([visit(statement) for statement in statements]) else None


def unscaled_read(statement: ast.stmt, master_of: Callable[[ast.AST], Optional[ast.expr]]) -> Optional[UnscaledRead]:
    """``statement`` as a read the helper can run, or ``None``.

    It must be a simple statement (no block: nothing in it runs a backward pass or steps), read the gradients
    through ``amp.master_params(optimizer)`` of one optimizer, and touch no ``.grad`` attribute itself (those
    could belong to parameters the helper does not unscale).
    """
    if not isinstance(statement, _SIMPLE):
        return None
    optimizers: List[ast.expr] = []
    for node in ast.walk(statement):
        if isinstance(node, ast.Attribute) and node.attr == "grad":
            return None
        if isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return None
        optimizer = master_of(node)
        if optimizer is not None:
            optimizers.append(optimizer)
    if not optimizers or len({ast.unparse(optimizer) for optimizer in optimizers}) != 1:
        return None
    return UnscaledRead(statement, optimizers[0])


def helper_lines(name: str) -> List[str]:
    """The context manager's source at module level (it needs ``contextlib`` imported)."""
    return [
        "@contextlib.contextmanager",
        f"def {name}(scaler, optimizer):",
        '    """The optimizer\'s gradients divided by the GradScaler\'s scale while the block runs (what Apex\'s amp',
        "    showed after each backward pass); the scaled ones are put back after it, with any change the block made",
        '    multiplied by the scale."""',
        "    scale = scaler.get_scale()",
        "    if not scaler.is_enabled() or scale == 1.0:",
        "        yield",
        "        return",
        '    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]',
        "    scaled = [p.grad for p in params]",
        "    unscaled = [grad / scale for grad in scaled]",
        "    versions = [grad._version for grad in unscaled]",
        "    for param, grad in zip(params, unscaled):",
        "        param.grad = grad",
        "    try:",
        "        yield",
        "    finally:",
        "        for param, grad, shown, version in zip(params, scaled, unscaled, versions):",
        "            if param.grad is not None and (param.grad is not shown or shown._version != version):",
        "                grad.copy_(param.grad.detach() * scale)  # the block changed it: keep the change, scaled",
        "            if param.grad is not None:",
        "                param.grad = grad",
    ]


def apply(plan: RewritePlan, reads: Sequence[Tuple[UnscaledRead, str]]) -> None:
    """Run each read under the helper (with its scaler's expression), and add the helper to the file once."""
    if not reads:
        return
    helper = plan.fresh_name(HELPER)
    for read, scaler in reads:
        optimizer = plan.text.segment(read.optimizer)
        plan.wrap_in_block(read.statement, read.statement, f"with {helper}({scaler}, {optimizer}):")
        plan.note(read.statement, NOTE.format(helper=helper))
    plan.modules.add("contextlib")
    native_checkpoint.add_helper(plan, helper, [read.statement for read, _ in reads], helper_lines(helper))
