"""Checkpoints under ``--to-native``: the GradScaler's state where Apex's was, and a loader for old ones.

``amp.state_dict()`` becomes ``scaler.state_dict()`` under the same key, so new checkpoints hold the
GradScaler's own state. ``amp.load_state_dict(x)`` becomes ``scaler.load_state_dict(grad_scaler_state(x))``,
where ``grad_scaler_state`` is a small function added once to the file: it recognises Apex's format
(``{"loss_scaler0": {"loss_scale": ..., "unskipped": ...}}``) and builds the GradScaler's dict from it
(Apex's factor 2 and growth window of 2000 were fixed), and passes a GradScaler's own state through. The
converted program needs nothing but torch to read checkpoints written before the migration.
"""
from __future__ import annotations

import ast
from typing import List, Optional, Sequence

from .plan import RewritePlan

HELPER = "grad_scaler_state"
"""The name the loader is given (or a fresh variant where the file already uses it)."""


def helper_lines(name: str) -> List[str]:
    """The loader's source, one line per item, at module level."""
    return [
        f"def {name}(state, loss_id=0):",
        '    """GradScaler state from a checkpoint: Apex\'s amp.state_dict() ({"loss_scaler0": {"loss_scale": ...,',
        '    "unskipped": ...}}) is converted; a GradScaler\'s own state dict is returned unchanged."""',
        '    entry = state.get("loss_scaler%d" % loss_id) if isinstance(state, dict) else None',
        "    if not isinstance(entry, dict):",
        "        return state",
        '    return {"scale": float(entry["loss_scale"]), "growth_factor": 2.0, "backoff_factor": 0.5,',
        '            "growth_interval": 2000, "_growth_tracker": int(entry["unskipped"])}',
    ]


def add_helper(plan: RewritePlan, name: str, sites: Sequence[ast.AST], source: Optional[List[str]] = None) -> None:
    """Insert the loader (or the function ``source`` defines) at module level, before the first function or
    class, or before the first module-level statement that reaches one of ``sites`` -- whichever comes first.
    A name already added to the file is not added again."""
    if name in plan.helpers_added:
        return
    tree = plan.result.source.tree
    anchor = None
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or any(
                _contains(statement, site) for site in sites):
            anchor = statement
            break
    newline = plan.text.newline(1)
    lines = helper_lines(name) if source is None else list(source)
    if anchor is None:  # nothing after the imports: the loader goes at the end
        end = len(plan.text.text)
        separator = newline if plan.text.text and not plan.text.text.endswith(("\n", "\r")) else ""
        plan.helpers_added[name] = end
        plan.insert_at(end, separator + newline + newline + "".join(line + newline for line in lines))
        return
    first_line = min([anchor.lineno] + [d.lineno for d in getattr(anchor, "decorator_list", [])])
    while first_line > 1 and plan.text.line(first_line - 1).lstrip().startswith("#"):
        first_line -= 1  # the comment above a function belongs to it
    blank = 0
    while blank < 2 and first_line - blank > 1 and not plan.text.line(first_line - blank - 1).strip():
        blank += 1
    lines = [""] * (2 - blank if first_line > 1 else 0) + lines + ["", ""]
    plan.helpers_added[name] = plan.text.line_start(first_line)
    plan.insert_at(plan.text.line_start(first_line), "".join(line + newline for line in lines))


def _contains(statement: ast.stmt, node: ast.AST) -> bool:
    return any(child is node for child in ast.walk(statement))
