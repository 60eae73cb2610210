"""``--to-native`` for ``apex.pyprof``: its start-up call goes, with a note on the native way to profile.

``pyprof.nvtx.init()`` (and the older ``pyprof.init()``) patched torch's functions to emit NVTX ranges carrying
their arguments' shapes, for Nsight Systems' timeline; it changed nothing the program computes. ampcompat does
not provide ``apex.pyprof`` (Apex moved it out in 2020), so a file calling it could not run without Apex. The
call is removed (a block left empty gets ``pass``) and reported: natively, run the profiled region under
``torch.autograd.profiler.emit_nvtx(record_shapes=True)``, which NVIDIA's scripts usually have around it already.
The import goes with its last read (:mod:`native_imports`). Other pyprof APIs (``pyprof.parse``,
``pyprof.prof``: the post-processing of a profile) keep a ``TODO(ampcompat)``.
"""
from __future__ import annotations

import ast
from typing import Dict

from .plan import RewritePlan

INIT_CALLS = ("apex.pyprof.nvtx.init", "apex.pyprof.init")
"""pyprof's start-up calls, by catalogued name."""

REMOVED_NOTE = (
    "removed `{call}`: apex.pyprof only added NVTX ranges with argument shapes for Nsight, training is unchanged; "
    "natively, run the profiled region under `torch.autograd.profiler.emit_nvtx(record_shapes=True)`"
)


def convert_profiling(plan: RewritePlan) -> Dict[int, str]:
    """Remove the file's ``pyprof.nvtx.init()`` statements.

    Returns:
        The start-up calls (by id of their use node) that stay, with why, for their TODO comment.
    """
    reasons: Dict[int, str] = {}
    for use in plan.result.uses:
        if use.api not in INIT_CALLS or use.kind != "call" or not use.exclusive or plan.is_converted(use):
            continue
        call = use.node
        statement = plan.statement(call)
        spelled = " ".join(plan.text.segment(call).split())
        if not (isinstance(statement, ast.Expr) and statement.value is call):
            reasons[id(call)] = (f"the result of `{spelled}` is used here; drop the call by hand (pyprof only added "
                                 "NVTX ranges; natively: torch.autograd.profiler.emit_nvtx(record_shapes=True))")
            continue
        if not plan.text.owns_lines(statement):
            reasons[id(call)] = f"`{spelled}` shares its line with other code; put it on a line of its own"
            continue
        if not all(_inert(node) for node in ast.walk(call) if node is not call and isinstance(node, ast.expr)):
            reasons[id(call)] = (f"`{spelled}` computes its arguments (a call): removing it would skip that; drop it "
                                 "by hand")
            continue
        plan.remove_statement(statement)
        plan.note(call, REMOVED_NOTE.format(call=spelled))
        plan.mark_converted(use)
    return reasons


def _inert(node: ast.expr) -> bool:
    """Evaluating ``node`` has no effect worth keeping (names, attributes, literals, operators, displays)."""
    return not isinstance(node, (ast.Call, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom, ast.ListComp,
                                 ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda))
