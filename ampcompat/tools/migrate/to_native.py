"""The ``--to-native`` codemod: rewrite Apex patterns to plain PyTorch, with TODOs where it is not mechanical.

The amp recipe is handled by :mod:`native_amp`, the other surfaces by :mod:`native_calls`, and then
the imports by :mod:`native_imports` (a name still needed stays bound -- natively where a torch object
can stand in, else on ampcompat -- and every removed or untouched import is reported);
``import torch`` is added when the new code needs it. If the rewritten text does not parse (a bug),
the file is left as it was and a note says so -- a partial rewrite is never written.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import AbstractSet, Optional, Set, Tuple

from .edits import Edit
from .native_amp import convert_amp
from .native_calls import convert_calls
from .native_imports import align_imports
from .plan import RewritePlan
from .rewrite_imports import Note
from .scanner import ScanResult
from .sources import parses


@dataclass(frozen=True)
class NativeRewrite:
    """The outcome for one file.

    Attributes:
        text: the new text (the old one when nothing could be converted).
        notes: the ``TODO(ampcompat)`` comments left, positioned in the original file.
        converted: how many Apex uses are now plain PyTorch.
    """

    text: str
    notes: Tuple[Note, ...]
    converted: int


def to_native(result: ScanResult, exported: AbstractSet[str] = frozenset()) -> NativeRewrite:
    """Rewrite a scanned file's Apex uses to plain PyTorch where that is mechanical.

    Args:
        result: the scan of the file.
        exported: names other files of the scanned tree import from this one (kept bound).

    Returns:
        The new text, the TODOs left, and the number of uses converted.
    """
    if not result.uses:
        return NativeRewrite(result.source.text, (), 0)
    plan = RewritePlan(result)
    convert_amp(plan)
    convert_calls(plan)
    align_imports(plan, _names_still_read(plan), exported)
    if plan.uses_torch and not _binds_torch(result.source.tree):
        _add_torch_import(plan)
    try:
        text: Optional[str] = plan.render()
    except ValueError:  # two rewrites claimed the same text
        text = None
    if text is None or not parses(text):
        note = Note(1, 1, "not rewritten: the native rewrite of this file came out invalid (please report this "
                          "as an ampcompat bug); use --write to move it to ampcompat instead")
        return NativeRewrite(result.source.text, (note,), 0)
    notes = sorted(plan.todo_notes() + plan.notes, key=lambda note: (note.line, note.col))
    return NativeRewrite(text, tuple(notes), len(plan.converted))


# --- imports -----------------------------------------------------------------------------------------
def _names_still_read(plan: RewritePlan) -> Set[str]:
    """Names the file still reads once the converted uses are gone."""
    gone = {id(_root_name(use.node)) for use in plan.result.uses if plan.is_converted(use)}
    return {node.id for node in plan.result.nodes
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in gone}


def _root_name(node: ast.AST) -> ast.AST:
    """``amp`` in ``amp.initialize(...)`` / ``apex.parallel.X``: the name a use goes through."""
    if isinstance(node, ast.Call):
        node = node.func
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def _binds_torch(tree: ast.Module) -> bool:
    """Whether the module's top level binds the name ``torch`` to the torch package."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname is None and alias.name.split(".")[0] == "torch") or (
                        alias.asname == "torch" and alias.name == "torch"):
                    return True
    return False


def _add_torch_import(plan: RewritePlan) -> None:
    body = plan.result.source.tree.body
    index = 0
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        index = 1
    while index < len(body) and isinstance(body[index], ast.ImportFrom) and body[index].module == "__future__":
        index += 1
    if index < len(body) and body[index].col_offset == 0:
        plan.insert_lines_before(body[index], ["import torch"])
        return
    end = len(plan.text.text)
    newline = plan.text.newline(1)
    separator = newline if plan.text.text and not plan.text.text.endswith(("\n", "\r")) else ""
    plan.edits.append(Edit(end, end, separator + "import torch" + newline))
