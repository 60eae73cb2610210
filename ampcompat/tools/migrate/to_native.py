"""The ``--to-native`` codemod: rewrite Apex patterns to plain PyTorch, with TODOs where it is not mechanical.

The amp recipe is handled by :mod:`native_amp`, the other surfaces by :mod:`native_calls`. Then the
imports are brought in line: an Apex import whose names are no longer used is removed, one whose
names are still used (where a TODO was left) is pointed at ampcompat, so the result always runs;
``import torch`` is added when the new code needs it. If the rewritten text does not parse (a bug),
the file is left as it was and a note says so -- a partial rewrite is never written.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Optional, Set, Tuple

from . import catalogue
from .edits import Edit
from .native_amp import convert_amp
from .native_calls import convert_calls
from .plan import RewritePlan
from .rewrite_imports import Note, import_alias_replacement, import_statement_edits
from .scanner import ScanResult
from .sources import parses
from .syntax import block_of


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
    _align_imports(plan)
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
    return NativeRewrite(text, tuple(plan.todo_notes()), len(plan.converted))


# --- imports -----------------------------------------------------------------------------------------
def _align_imports(plan: RewritePlan) -> None:
    """Drop Apex imports nothing uses any more; point the still-used ones at ampcompat."""
    result = plan.result
    still_used = _names_still_read(plan)
    removals: List[ast.stmt] = []
    for node in result.nodes:
        if isinstance(node, ast.Import):
            keep = [_keeps(alias, alias.asname or alias.name.split(".")[0], still_used, result) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and catalogue.apex_module(node.module or ""):
            keep = [_keeps_from(node, alias, still_used, result) for alias in node.names]
        else:
            continue
        if all(flag is not False for flag in keep):
            import_statement_edits(plan.text, node, plan.edits, [])
        elif any(keep):
            plan.replace(node, _regenerated(node, keep))
        else:
            removals.append(node)
    _remove_statements(plan, removals)


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


def _keeps(alias: ast.alias, local: str, still_used: Set[str], result: ScanResult):
    """``None`` for a non-Apex alias, else whether the name it binds is still used."""
    if catalogue.apex_module(alias.name) is None or local not in result.bindings:
        return None
    return local in still_used


def _keeps_from(node: ast.ImportFrom, alias: ast.alias, still_used: Set[str], result: ScanResult):
    if alias.name == "*":
        module = catalogue.apex_module(node.module)[0]  # type: ignore[arg-type,index]
        return any(result.bindings[name].qualname.startswith(module + ".") for name in still_used
                   if name in result.bindings)
    local = alias.asname or alias.name
    if local not in result.bindings:
        return None
    return local in still_used


def _regenerated(node: ast.stmt, keep: List[object]) -> str:
    """The import statement with only the aliases still needed, Apex modules pointed at ampcompat."""
    parts = []
    if isinstance(node, ast.Import):
        for alias, flag in zip(node.names, keep):
            if flag is None or (flag and catalogue.apex_module(alias.name)[1] == "ampcompat"):  # type: ignore[index]
                parts.append(ast.unparse(alias))
            elif flag:
                name = import_alias_replacement(alias.name, alias.asname) or alias.name
                parts.append(f"{name} as {alias.asname}" if alias.asname else name)
        return "import " + ", ".join(parts)
    assert isinstance(node, ast.ImportFrom)
    module = catalogue.ampcompat_module(node.module) or node.module  # type: ignore[arg-type]
    kept = [ast.unparse(alias) for alias, flag in zip(node.names, keep) if flag is not False]
    return f"from {module} import {', '.join(kept)}"


def _remove_statements(plan: RewritePlan, statements: List[ast.stmt]) -> None:
    """Remove import statements; a block they would leave empty keeps a ``pass``.

    Runs of removed lines that sat between blank lines take one of those blank lines with them, so
    a removed import paragraph does not leave a double gap.
    """
    by_block: Dict[int, List[ast.stmt]] = {}
    blocks: Dict[int, List[ast.stmt]] = {}
    for statement in statements:
        block, _ = block_of(statement, plan.parents)
        by_block.setdefault(id(block), []).append(statement)
        blocks[id(block)] = block
    whole_lines: List[ast.stmt] = []
    for key, removed in by_block.items():
        empties_block = len(removed) == len(blocks[key])
        for index, statement in enumerate(removed):
            if (empties_block and index == 0) or not plan.text.owns_lines(statement):
                plan.replace(statement, "pass")
            else:
                whole_lines.append(statement)
    for first, last in _line_runs(sorted(whole_lines, key=lambda s: s.lineno)):
        text = plan.text
        start_line = first.lineno
        if 1 < start_line and last.end_lineno < len(text.line_starts) and not text.line(start_line - 1).strip() \
                and not text.line(last.end_lineno + 1).strip():  # type: ignore[operator]
            start_line -= 1
        end = text.line_end(last.end_lineno)  # type: ignore[arg-type]
        plan.edits.append(Edit(text.line_start(start_line), end, ""))


def _line_runs(statements: List[ast.stmt]) -> List[Tuple[ast.stmt, ast.stmt]]:
    """Group statements on consecutive lines: ``[(first, last), ...]``."""
    runs: List[Tuple[ast.stmt, ast.stmt]] = []
    for statement in statements:
        if runs and statement.lineno == runs[-1][1].end_lineno + 1:  # type: ignore[operator]
            runs[-1] = (runs[-1][0], statement)
        else:
            runs.append((statement, statement))
    return runs


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
