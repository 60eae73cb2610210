"""The ``--to-native`` codemod: rewrite Apex patterns to plain PyTorch, with TODOs where it is not mechanical.

The amp recipe is handled by :mod:`native_amp`, the other surfaces by :mod:`native_calls`, and then
the imports by :mod:`native_imports` (a binding still needed stays bound -- natively where a torch
object can stand in, else on ampcompat -- and every removed or untouched import is reported).

Checks for Apex by name (:mod:`guards`) keep their answers. If the file stays on ampcompat for
something, it keeps ``apex`` registered the way ``--write`` does (the alias line of :mod:`alias_line`,
added if the file imported Apex or checks for it, guarded if its Apex imports were optional). If nothing
in it uses Apex or ampcompat any more, an alias line left by ``--write`` is removed, and each check is
replaced by the answer it gave under ampcompat where only its truth value is used, or else reported
as now answering "no Apex".

``import torch`` (and ``import functools``) are added when the new code needs them, after the
docstring, ``__future__`` imports and leading comments. If the rewritten text does not parse (a bug),
the file is left as it was and the outcome says so -- a partial rewrite is never written.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import AbstractSet, List, Optional, Tuple

from . import guards
from .alias_line import ALIAS_STATEMENTS, alias_line_removal, alias_line_text, top_of_module
from .native_amp import convert_amp
from .native_calls import convert_calls
from .native_fp16_optimizer import convert_fp16_optimizers
from .native_levels import LevelChoice
from .native_imports import ImportOutcome, align_imports
from .plan import RewritePlan
from .rewrite_imports import Note, apex_imports_are_optional
from .scanner import ScanResult, Use
from .native_wrappers import NO_WRAPPERS, WrapperContext, convert_callers, convert_wrappers
from .sources import parses
from .syntax import binds_module

_FAILED = ("not rewritten: the native rewrite of this file came out invalid (please report this as an ampcompat "
           "bug); use --write to move it to ampcompat instead")


@dataclass(frozen=True)
class NativeRewrite:
    """The outcome for one file.

    Attributes:
        text: the new text (the old one when nothing could be converted).
        notes: the ``TODO(ampcompat)`` comments left and the outcome of each import, positioned in the
            original file.
        converted: how many Apex uses are now plain PyTorch (rewritten, or reaching a torch object now bound
            at their import).
        failed: why the file could not be rewritten (``""`` when it could).
        on_ampcompat: the new text still needs ampcompat.
        imports_apex: the new text still imports ``apex`` (or one of its compiled modules).
        level_unknown: the amp calls stayed on ampcompat at an ``opt_level`` only known at run time, with no
            ``--opt-level`` given.
    """

    text: str
    notes: Tuple[Note, ...]
    converted: int
    failed: str = ""
    on_ampcompat: bool = False
    imports_apex: bool = False
    level_unknown: bool = False


def to_native(result: ScanResult, exported: AbstractSet[str] = frozenset(),
              choice: Optional[LevelChoice] = None, wrappers: WrapperContext = NO_WRAPPERS) -> NativeRewrite:
    """Rewrite a scanned file's Apex uses to plain PyTorch where that is mechanical.

    Args:
        result: the scan of the file.
        exported: names other files of the scanned tree import from this one (kept bound).
        choice: what ``--opt-level`` said about opt levels only known at run time (``None``: not given).
        wrappers: the scaler wrapper classes this file defines or builds that convert with their partners in
            the scanned tree (:mod:`native_wrappers`).

    Returns:
        The new text, the notes, and the number of uses converted.
    """
    if not result.uses and not result.alias_statements:
        return NativeRewrite(result.source.text, (), 0)
    plan = RewritePlan(result)
    convert_wrappers(plan, wrappers)
    convert_callers(plan, wrappers, choice)
    amp = convert_amp(plan, choice)
    convert_fp16_optimizers(plan)
    convert_calls(plan)
    outcome = align_imports(plan, exported)
    alias = _keep_checks_answering(plan, outcome)
    top = _top_insertion(plan, alias)
    try:
        text: Optional[str] = plan.render(top)
    except ValueError:  # two rewrites claimed the same text
        text = None
    if text is None or not parses(text):
        return NativeRewrite(result.source.text, (Note(1, 1, _FAILED),), 0, failed=_FAILED,
                             on_ampcompat=True, imports_apex=any(u.kind == "import" and u.via == "apex"
                                                                 for u in result.uses))
    notes = sorted(plan.todo_notes() + plan.notes, key=lambda note: (note.line, note.col))
    return NativeRewrite(text, tuple(notes), len(plan.converted) + outcome.rebound, "",
                         outcome.on_ampcompat or bool(alias), outcome.imports_apex, amp.level_unknown)


# --- checks for Apex by name and the alias line --------------------------------------------------------
def _keep_checks_answering(plan: RewritePlan, outcome: ImportOutcome) -> str:
    """Keep every check for Apex by name answering as it did under ampcompat; the alias line text to add."""
    result = plan.result
    checks = [use for use in result.uses if use.kind in ("string", "check")]
    imported_apex = any(use.kind == "import" and use.via == "apex" for use in result.uses)
    if outcome.on_ampcompat:
        for check in checks:
            plan.note(check.node, f"checks for Apex by name (`{_spelled(plan, check)}`): it still finds Apex "
                                  "through the alias line at the top of this file")
        if result.alias_statements or not (imported_apex or checks):
            return ""
        place = top_of_module(plan.text, result.source.tree)
        if place is None:
            plan.notes.append(Note(1, 1, f"could not place `{ALIAS_STATEMENTS}` at the top of this module: add it "
                                         "there by hand, or checks for Apex by name will not find it"))
            return ""
        plan.notes.append(Note(place[1], 1, f"added `{ALIAS_STATEMENTS}` above this line: this file stays on "
                                            "ampcompat, so `apex` stays importable and registered and checks for "
                                            "Apex by name still find it"))
        return alias_line_text(plan.text.newline(1), guarded=apex_imports_are_optional(result))
    if result.alias_statements:
        plan.edits.append(alias_line_removal(plan.text, result.alias_statements))
        plan.notes.append(Note(result.alias_statements[0].lineno, 1, f"removed `{ALIAS_STATEMENTS}`: nothing in "
                                                                      "this file uses Apex or ampcompat any more"))
    for check in checks:
        if not plan.is_superseded(check.node):  # gone with the code it guarded
            _answer_check(plan, check)
    return ""


def _answer_check(plan: RewritePlan, check: Use) -> None:
    """Replace a check by the answer it gave under ampcompat, or report that it now finds no Apex."""
    spelled = _spelled(plan, check)
    found = guards.find_check(check.node, guards.import_origins(plan.result.nodes), lambda module: True)
    answer = guards.answer_under_ampcompat(found, plan.parents) if found is not None else None
    if answer is None:
        plan.todo(check.node, f"`{spelled}` looked for Apex by name; nothing here uses Apex or ampcompat any more, so "
                              "this check now answers False (finds no Apex): make what it guards unconditional, or "
                              "delete it")
        return
    value = "True" if answer.value else "False"
    plan.replace(answer.node, value)
    plan.todo(check.node, f"this was `{spelled}`, which found Apex under ampcompat; the Apex path is now plain "
                          f"PyTorch, so it is {value} (simplify the code it guards)")


def _spelled(plan: RewritePlan, use: Use) -> str:
    spelled = " ".join(plan.text.segment(use.node).split())
    return spelled if len(spelled) <= 60 else spelled[:57] + "..."


# --- imports the new code needs ------------------------------------------------------------------------
def _top_insertion(plan: RewritePlan, alias: str) -> Optional[Tuple[int, str]]:
    """``(offset, text)``: the alias line and the imports the rewritten code refers to, at the top."""
    tree = plan.result.source.tree
    modules: List[str] = sorted(module for module in plan.modules if not _binds(tree, module))
    if plan.uses_torch and not _binds(tree, "torch"):
        modules.append("torch")
    if not modules and not alias:
        return None
    place = top_of_module(plan.text, tree)
    if place is None:  # the first statement shares its line: append at the end instead (still module level)
        end = len(plan.text.text)
        newline = plan.text.newline(1)
        separator = newline if plan.text.text and not plan.text.text.endswith(("\n", "\r")) else ""
        return end, separator + alias + "".join(f"import {module}{newline}" for module in modules)
    offset, lineno = place
    newline = plan.text.newline(min(lineno, len(plan.text.line_starts)))
    separator = newline if offset == len(plan.text.text) and plan.text.text \
        and not plan.text.text.endswith(("\n", "\r")) else ""
    return offset, separator + alias + "".join(f"import {module}{newline}" for module in modules)


def _binds(tree: ast.Module, module: str) -> bool:
    """Whether the module's top level binds ``module``'s name to that module."""
    return any(binds_module(statement, module) for statement in tree.body)
