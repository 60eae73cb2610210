"""``--to-native``: what becomes of each Apex import once the uses have been rewritten.

Every name an Apex import binds gets one of four outcomes, each reported at the import's line:

* **removed** -- nothing needs the name any more, and the import is of names ampcompat provides;
* **bound natively** -- the name is still needed (used in the file, in ``__all__``, imported by another
  scanned file, or bound inside a ``try`` whose ``except`` catches ``ImportError``) and a torch object
  can stand in for it (:data:`catalogue.NATIVE_BINDINGS`): ``from torch.nn import LayerNorm``;
* **kept on ampcompat** -- still needed, with no drop-in torch object: pointed at ampcompat, so it runs;
* **left as it was** -- what cannot be mapped (the Apex modules ampcompat refuses at import, like
  ``apex.transformer`` or ``apex.contrib.sparsity``; an unused ``import amp_C``): never deleted, never
  changed.

A name bound in a ``try`` block keeps its ``except`` fallback working: the fallback is not touched, and
the ``try`` body still binds the name.
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Set, Tuple

from . import catalogue
from .edits import Edit
from .exports import STAR, listed_in_all
from .plan import RewritePlan
from .rewrite_imports import import_alias_replacement, import_statement_edits
from .scanner import Use
from .syntax import block_of

_REMOVE, _NATIVE, _AMPCOMPAT, _LEAVE, _OTHER = "remove", "native", "ampcompat", "leave", "other"
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class _Decision:
    action: str
    alias: ast.alias
    local: str
    api: str = ""
    why: str = ""
    native: str = ""


def align_imports(plan: RewritePlan, still_used: Set[str], exported: AbstractSet[str]) -> None:
    """Decide every Apex import of the file, queue the edits, and note each outcome.

    Args:
        plan: the file's rewrite plan (its converted uses are final).
        still_used: names the file still reads once converted uses are gone.
        exported: names other scanned files import from this one (``STAR`` for a star import).
    """
    result = plan.result
    public = listed_in_all(result.source.tree)
    import_uses: Dict[int, List[Use]] = {}
    for use in result.uses:
        if use.kind == "import":
            import_uses.setdefault(id(use.node), []).append(use)
    # A name whose uses here are not all rewritten keeps its Apex meaning: a torch stand-in could
    # reject what those uses pass (SyncBatchNorm(..., channel_last=True)).
    unconverted = {use.local_name for use in result.uses if use.kind != "import" and not plan.is_converted(use)}
    converted = {use.local_name for use in result.uses if use.kind != "import" and plan.is_converted(use)}
    removals: List[ast.stmt] = []
    for node in result.nodes:
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) not in import_uses:
            continue
        fallback = _in_import_fallback(node, plan)
        decisions = [_decide(node, alias, import_uses[id(node)], still_used | _star_supplied(plan, node, still_used),
                             exported, public, fallback, unconverted, converted) for alias in node.names]
        actions = {decision.action for decision in decisions}
        for decision in decisions:
            _note(plan, node, decision)
        if actions <= {_AMPCOMPAT, _OTHER}:
            import_statement_edits(plan.text, node, plan.edits, [])
        elif actions <= {_REMOVE}:
            removals.append(node)
        elif actions <= {_LEAVE, _OTHER}:
            continue
        else:
            plan.replace(node, _regenerated(plan, node, decisions))
    _remove_statements(plan, removals)


def _decide(node: ast.stmt, alias: ast.alias, uses: List[Use], still_used: Set[str], exported: AbstractSet[str],
            public: Set[str], fallback: bool, unconverted: Set[str], converted: Set[str]) -> _Decision:
    if isinstance(node, ast.Import):
        local = alias.asname or alias.name.split(".")[0]
        mapped = catalogue.apex_module(alias.name)
    else:
        local = alias.asname or alias.name
        mapped = catalogue.apex_module(node.module or "")
    if mapped is None:
        return _Decision(_OTHER, alias, local)
    use = next((u for u in uses if u.local_name == local), None)
    api = use.api if use is not None else mapped[0]
    if mapped[1] == "ampcompat":
        needed = _needed(local, alias, still_used, exported, public, fallback)
        return _Decision(_OTHER if needed else _REMOVE, alias, local, api, "nothing uses it any more")
    module_path = alias.name if isinstance(node, ast.Import) else node.module or ""
    refusal = catalogue.refused_import(module_path, None if isinstance(node, ast.Import) else alias.name)
    if refusal:
        return _Decision(_LEAVE, alias, local, api, refusal)
    target, problem = catalogue.provided_module(module_path)
    reasons = _needed(local, alias, still_used, exported, public, fallback)
    if not reasons:
        if local in converted and target is not None:
            return _Decision(_REMOVE, alias, local, api, "every use of it here is now plain PyTorch")
        if target is None or isinstance(node, ast.Import):
            return _Decision(_LEAVE, alias, local, api, "nothing in this file uses it, but a module import can matter "
                             "for its side effects or as a check that Apex is there: remove it by hand if nothing "
                             "needs it" if target is not None else problem)
        return _Decision(_REMOVE, alias, local, api, "nothing in this file or the scanned tree uses it")
    native = catalogue.NATIVE_BINDINGS.get(api, "") if alias.name != "*" and local not in unconverted else ""
    if native:
        return _Decision(_NATIVE, alias, local, api, reasons, native)
    if target is None:
        return _Decision(_LEAVE, alias, local, api, f"{reasons}; {problem}")
    return _Decision(_AMPCOMPAT, alias, local, api, reasons)


def _needed(local: str, alias: ast.alias, still_used: Set[str], exported: AbstractSet[str], public: Set[str],
            fallback: bool) -> str:
    """Why the name must stay bound (empty if it need not)."""
    if alias.name == "*":
        return "it supplies names still used here" if STAR in still_used else ""
    reasons = []
    if local in still_used:
        reasons.append(f"`{local}` is still used in this file")
    if local in public:
        reasons.append(f"`{local}` is listed in `__all__`")
    if local in exported or (STAR in exported and not local.startswith("_")):
        reasons.append(f"another scanned file imports `{local}` from this one")
    if fallback:
        reasons.append(f"`{local}` is bound in a `try` whose `except` handles ImportError")
    return "; ".join(reasons)


def _star_supplied(plan: RewritePlan, node: ast.stmt, still_used: Set[str]) -> Set[str]:
    """``{STAR}`` when ``node`` is ``from M import *`` and a name it supplies is still read, else empty."""
    if not (isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names)):
        return set()
    module = (catalogue.apex_module(node.module or "") or ("",))[0]
    supplied = {name for name, binding in plan.result.bindings.items()
                if binding.module == module and binding.qualname == f"{module}.{name}"}
    explicit = {alias.asname or alias.name for n in plan.result.nodes if isinstance(n, ast.ImportFrom)
                for alias in n.names if alias.name != "*"}
    return {STAR} if (supplied - explicit) & still_used else set()


def _in_import_fallback(node: ast.stmt, plan: RewritePlan) -> bool:
    """Whether ``node`` lies in the body of a ``try`` with an ``except`` that catches ``ImportError``."""
    child: ast.AST = node
    parent = plan.parents.get(child)
    while parent is not None:
        if isinstance(parent, ast.Try) and any(child is statement for statement in parent.body):
            if any(_catches_import_error(handler) for handler in parent.handlers):
                return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return False
        child, parent = parent, plan.parents.get(parent)
    return False


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = {t.attr if isinstance(t, ast.Attribute) else t.id if isinstance(t, ast.Name) else "" for t in types}
    return bool(names & _IMPORT_ERRORS)


def _native_statement(local: str, path: str) -> str:
    module, _, name = path.rpartition(".")
    if _is_module(module):
        return f"from {module} import {name}" + (f" as {local}" if local != name else "")
    return f"{local} = {path}"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _regenerated(plan: RewritePlan, node: ast.stmt, decisions: List[_Decision]) -> str:
    """The statement(s) replacing ``node``: ``; ``-joined simple statements, valid wherever ``node`` was."""
    statements: List[str] = []
    if isinstance(node, ast.Import):
        kept = []
        for decision in decisions:
            if decision.action in (_LEAVE, _OTHER):
                kept.append(ast.unparse(decision.alias))
            elif decision.action == _AMPCOMPAT:
                name = import_alias_replacement(decision.alias.name, decision.alias.asname) or decision.alias.name
                kept.append(f"{name} as {decision.alias.asname}" if decision.alias.asname else name)
        if kept:
            statements.append("import " + ", ".join(kept))
    else:
        assert isinstance(node, ast.ImportFrom)
        left = [ast.unparse(d.alias) for d in decisions if d.action in (_LEAVE, _OTHER)]
        moved = [ast.unparse(d.alias) for d in decisions if d.action == _AMPCOMPAT]
        if left:
            statements.append(f"from {node.module} import {', '.join(left)}")
        if moved:
            statements.append(f"from {catalogue.ampcompat_module(node.module or '')} import {', '.join(moved)}")
    for decision in decisions:
        if decision.action == _NATIVE:
            statement = _native_statement(decision.local, decision.native)
            plan.uses_torch |= not statement.startswith("from ")
            statements.append(statement)
    return "; ".join(statements) if statements else "pass"


def _note(plan: RewritePlan, node: ast.stmt, decision: _Decision) -> None:
    spelled = ast.unparse(decision.alias)
    what = f"`import {spelled}`" if isinstance(node, ast.Import) else f"`{spelled}` from `{node.module}`"
    if decision.action == _REMOVE:
        plan.note(node, f"removed {what}: {decision.why}")
    elif decision.action == _NATIVE:
        plan.note(node, f"{what} now binds `{decision.native}` ({decision.why})")
    elif decision.action == _AMPCOMPAT:
        plan.note(node, f"{what} now comes from ampcompat: {decision.why}, and plain PyTorch has no drop-in "
                        "equivalent")
    elif decision.action == _LEAVE:
        plan.note(node, f"left {what} as it was: {decision.why}")


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
