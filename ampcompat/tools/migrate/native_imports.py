"""``--to-native``: what becomes of each Apex import once the uses have been rewritten.

Every name an Apex import binds gets one of four outcomes, each reported at the import's line:

* **removed** -- nothing needs the binding any more, and the import is of names ampcompat provides;
* **bound natively** -- the binding is still needed (a read it reaches was not rewritten, it is in
  ``__all__``, or another scanned file imports it) and a torch object can stand in for it with every read it reaches: a drop-in
  (:data:`catalogue.NATIVE_BINDINGS`: ``from torch.nn import LayerNorm``), or a ``functools.partial``
  that keeps Apex's defaults (:data:`catalogue.NATIVE_PARTIALS`) where every read is a call passing
  no more positional arguments than both share;
* **kept on ampcompat** -- still needed, with no torch object standing in: pointed at ampcompat, so it runs;
* **left as it was** -- what cannot be mapped (the Apex modules ampcompat refuses at import, like
  ``apex.transformer``; Apex's compiled extensions; an unused ``import amp_C``): never deleted.

Which reads a binding reaches comes from the file's scopes (:mod:`scopes`): a function-local import
of torch's ``amp`` is not a read of the module's Apex ``amp``. A name bound in a ``try`` block keeps
its ``except`` fallback working: the fallback is not touched, and the ``try`` body still binds the name.
Comments inside a removed or replaced multi-line import are kept, on lines of their own.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, Dict, List, Optional, Set, Tuple

from . import catalogue, provided
from .callargs import has_starred
from .edits import Edit
from .exports import STAR, listed_in_all
from .plan import RewritePlan
from .rewrite_imports import import_alias_replacement, import_statement_edits
from .scanner import Use, catches_import_error
from .syntax import block_of, root_name, stored_names

_REMOVE, _NATIVE, _AMPCOMPAT, _LEAVE, _OTHER = "remove", "native", "ampcompat", "leave", "other"


@dataclass(frozen=True)
class ImportOutcome:
    """What the file imports once its imports are aligned.

    Attributes:
        on_ampcompat: an import still needs ampcompat (an import pointed at it, or an Apex module left
            as it was that only ampcompat's alias provides).
        imports_apex: an import of ``apex``, ``amp_C``, ``apex_C`` or an Apex extension is left as it was.
    """

    on_ampcompat: bool
    imports_apex: bool
    rebound: int = 0
    """Uses left as written that now reach a torch object, bound natively at their import."""


@dataclass(frozen=True)
class _Decision:
    action: str
    alias: ast.alias
    local: str
    api: str = ""
    why: str = ""
    native: str = ""
    on_ampcompat: bool = False
    names: Tuple[str, ...] = ()
    """For ``from apex import *`` kept on ampcompat: the names still needed (imported by name instead)."""
    reads: int = 0
    """For a native binding: how many reads of the name it now serves."""


def align_imports(plan: RewritePlan, exported: AbstractSet[str]) -> ImportOutcome:
    """Decide every Apex import of the file, queue the edits, and note each outcome.

    Args:
        plan: the file's rewrite plan (its converted uses are final).
        exported: names other scanned files import from this one (``STAR`` for a star import).
    """
    result = plan.result
    public = listed_in_all(result.source.tree)
    import_uses: Dict[int, List[Use]] = {}
    for use in result.uses:
        if use.kind == "import":
            import_uses.setdefault(id(use.node), []).append(use)
    gone = {id(root_name(use.node)) for use in result.uses if plan.is_converted(use)}
    removals: List[ast.stmt] = []
    on_ampcompat = imports_apex = False
    rebound = 0
    for node in result.nodes:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if id(node) not in import_uses:
            on_ampcompat |= _imports_ampcompat(node)  # ``import ampcompat``, ``from ampcompat.x import helper``
            continue
        context = _Context(plan, node, gone, exported, public)
        decisions = [context.decide(alias) for alias in node.names]
        actions = {decision.action for decision in decisions}
        on_ampcompat |= any(decision.on_ampcompat for decision in decisions)
        rebound += sum(decision.reads for decision in decisions if decision.action == _NATIVE)
        imports_apex |= any(decision.action == _LEAVE for decision in decisions)
        for decision in decisions:
            _note(plan, node, decision)
        if actions <= {_AMPCOMPAT, _OTHER} and not any(decision.names for decision in decisions):
            import_statement_edits(plan.text, node, plan.edits, [])
        elif actions <= {_REMOVE}:
            removals.append(node)
        elif actions <= {_LEAVE, _OTHER}:
            continue
        else:
            _replace_statement(plan, node, _regenerated(plan, node, decisions))
    _remove_statements(plan, _with_disposable_tries(plan, removals))
    return ImportOutcome(on_ampcompat, imports_apex, rebound)


def disposable_import_try(statement: ast.stmt, removed: Callable[[ast.stmt], bool]) -> bool:
    """Whether a ``try`` exists only for imports that go away: its body is such imports (``removed``), its
    handlers catch ``ImportError`` and bind nothing but the names those imports bound (``amp = None``),
    or raise or print. Under ampcompat the imports succeeded and the handler never ran; natively there is
    nothing left to try."""
    if not isinstance(statement, ast.Try) or statement.orelse or statement.finalbody:
        return False
    if not all(isinstance(item, ast.Pass) or removed(item) for item in statement.body):
        return False
    names = {(alias.asname or alias.name).split(".")[0] for item in statement.body
             if isinstance(item, (ast.Import, ast.ImportFrom)) for alias in item.names}
    return all(catches_import_error(handler) and all(stored_names(item) <= names for item in handler.body)
               for handler in statement.handlers)


def _with_disposable_tries(plan: RewritePlan, removals: List[ast.stmt]) -> List[ast.stmt]:
    """``removals``, with each ``try`` that only held some of them (see :func:`disposable_import_try`) in
    their place."""
    removed = {id(statement) for statement in removals}
    tries: List[ast.stmt] = []
    for statement in removals:
        owner = plan.parents.get(statement)
        if isinstance(owner, ast.Try) and not any(owner is known for known in tries) \
                and disposable_import_try(owner, lambda item: id(item) in removed) and plan.text.owns_lines(owner):
            tries.append(owner)
    inside = {id(item) for owner in tries for item in owner.body}
    return [statement for statement in removals if id(statement) not in inside] + tries


def _imports_ampcompat(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "ampcompat" for alias in node.names)
    return isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "ampcompat"


class _Context:
    """What one import statement's names are still needed for."""

    def __init__(self, plan: RewritePlan, node: ast.stmt, gone: Set[int], exported: AbstractSet[str],
                 public: Set[str]) -> None:
        self.plan = plan
        self.node = node
        self.gone = gone
        self.exported = exported
        self.public = public
        scopes = plan.result.scopes
        assert scopes is not None
        self.scopes = scopes
        self.at_module_level = scopes.scope_of(node) is scopes.module

    def decide(self, alias: ast.alias) -> _Decision:
        node = self.node
        if isinstance(node, ast.Import):
            local = alias.asname or alias.name.split(".")[0]
            if alias.name in catalogue.EXTENSION_MODULES:
                return _Decision(_LEAVE, alias, local, alias.name, catalogue.extension_advice(alias.name)[0])
            mapped = catalogue.apex_module(alias.name)
        else:
            local = alias.asname or alias.name
            extension = (node.module or "").split(".")[0]  # type: ignore[attr-defined]
            if extension in catalogue.EXTENSION_MODULES:
                return _Decision(_LEAVE, alias, local, extension, catalogue.extension_advice(extension)[0])
            mapped = catalogue.apex_module(node.module or "")  # type: ignore[attr-defined]
        if mapped is None:
            return _Decision(_OTHER, alias, local)
        definitions = self.scopes.definitions_at(alias)
        reads = [read for d in definitions for read in self.scopes.reads_of(d) if id(read) not in self.gone]
        converted = any(id(read) in self.gone for d in definitions for read in self.scopes.reads_of(d))
        api = self._api(alias, local, mapped[0])
        reasons = self._needed(local, alias, reads) or self._loads_a_submodule_for(alias)
        if mapped[1] == "ampcompat":
            stand_in = self.plan.stand_ins.get(api)
            if reasons and stand_in and all(self._accepts(stand_in, read, {}, None) for read in reads):
                return _Decision(_NATIVE, alias, local, api, reasons, stand_in, reads=len(reads))
            return _Decision(_OTHER if reasons else _REMOVE, alias, local, api, "nothing uses it any more",
                             on_ampcompat=bool(reasons))
        module_path = alias.name if isinstance(node, ast.Import) else node.module or ""  # type: ignore[attr-defined]
        refusal = catalogue.refused_import(module_path, None if isinstance(node, ast.Import) else alias.name)
        if refusal and (reasons or not converted):
            return _Decision(_LEAVE, alias, local, api, refusal)
        target, problem = catalogue.provided_module(module_path)
        if not reasons:
            if converted and (target is not None or refusal):  # a refused module's reads were all rewritten
                return _Decision(_REMOVE, alias, local, api, "every use of it here is now plain PyTorch")
            if target is None:
                return _Decision(_LEAVE, alias, local, api, problem)
            if isinstance(node, ast.Import):
                return _Decision(_LEAVE, alias, local, api, "nothing in this file uses it, but a module import can "
                                 "matter for its side effects or as a check that Apex is there: remove it by hand if "
                                 "nothing needs it", on_ampcompat=True)
            return _Decision(_REMOVE, alias, local, api, "nothing in this file or the scanned tree uses it")
        native = self._stand_in(alias, local, api, reads) if alias.name != "*" else ""
        if native:
            return _Decision(_NATIVE, alias, local, api, reasons, native, reads=len(reads))
        if target is None:
            return _Decision(_LEAVE, alias, local, api, f"{reasons}; {problem}")
        names: Tuple[str, ...] = ()
        if alias.name == "*" and module_path == "apex":  # a star import of ampcompat binds ampcompat's __all__
            names = tuple(sorted({read.id for read in reads}))
        return _Decision(_AMPCOMPAT, alias, local, api, reasons, on_ampcompat=True, names=names)

    def _loads_a_submodule_for(self, alias: ast.alias) -> str:
        """``import ampcompat.mlp, ampcompat as apex`` (what ``--write`` makes of ``import apex.mlp``): the
        dotted part loads the submodule that reads of ``apex.mlp`` go through, so it stays with its partner."""
        node = self.node
        if not (isinstance(node, ast.Import) and "." in alias.name and alias.asname is None):
            return ""
        root = alias.name.split(".")[0]
        for partner in node.names:
            if partner.name == root and partner.asname:
                reads = [read for d in self.scopes.definitions_at(partner) for read in self.scopes.reads_of(d)
                         if id(read) not in self.gone]
                if reads:
                    return f"it loads `{alias.name}` for `{partner.asname}`, still used in this file"
        return ""

    def _api(self, alias: ast.alias, local: str, module: str) -> str:
        uses = [use for use in self.plan.result.uses if use.kind == "import" and use.node is self.node
                and use.local_name == local]
        return uses[0].api if uses else module

    def _needed(self, local: str, alias: ast.alias, reads: List[ast.Name]) -> str:
        """Why the name must stay bound (empty if it need not)."""
        reasons = []
        if reads:
            lines = sorted({read.lineno for read in reads})
            where = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            what = "it supplies names" if alias.name == "*" else f"`{local}` is"
            reasons.append(f"{what} still used in this file (line {where})")
        if alias.name == "*":
            return "; ".join(reasons)
        if self.at_module_level and local in self.public:
            reasons.append(f"`{local}` is listed in `__all__`")
        if self.at_module_level and (local in self.exported or (STAR in self.exported and not local.startswith("_"))):
            reasons.append(f"another scanned file imports `{local}` from this one")
        return "; ".join(reasons)

    def _stand_in(self, alias: ast.alias, local: str, api: str, reads: List[ast.Name]) -> str:
        """The torch expression the name can be bound to for every read it reaches, or ``""``."""
        exported = self.at_module_level and (local in self.exported or local in self.public
                                              or (STAR in self.exported and not local.startswith("_")))
        drop_in = self.plan.stand_ins.get(api) or catalogue.NATIVE_BINDINGS.get(api)
        if drop_in is not None and all(self._accepts(drop_in, read, {}, None) for read in reads):
            return drop_in
        partial = catalogue.NATIVE_PARTIALS.get(api)
        if partial is not None and not exported and reads:
            target, defaults, positional = partial
            keywords = dict(defaults)
            if all(self._accepts(target, read, keywords, positional) for read in reads):
                keyword_text = ", ".join(f"{name}={value}" for name, value in defaults)
                return f"functools.partial({target}, {keyword_text})"
        return ""

    def _accepts(self, target: str, read: ast.Name, fixed: Dict[str, str], positional: Optional[int]) -> bool:
        """Whether ``read`` can go through ``target`` (a torch dotted name) with ``fixed`` keywords added.

        A call is checked against the torch object's signature; any other read (passing the class on,
        ``isinstance``) only works with the object itself, not a partial.
        """
        parent = self.plan.parents.get(read)
        if isinstance(parent, ast.ClassDef) and any(read is base for base in parent.bases):
            return False  # a subclass keeps Apex's class (its behaviour differs from torch's under autocast)
        if not (isinstance(parent, ast.Call) and parent.func is read):
            return positional is None
        value = _torch_object(target)
        if value is None or has_starred(parent):
            return False
        if positional is not None and len(parent.args) > positional:
            return False
        keywords = [k.arg for k in parent.keywords if k.arg is not None]
        keywords += [name for name in fixed if name not in keywords]
        return provided.call_problem(value, len(parent.args), keywords, False) is None


def _torch_object(dotted: str) -> Any:
    """The object a dotted ``torch...`` name stands for, or ``None``."""
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        try:
            owner = _torch_object(module)
        except RecursionError:
            return None
        return getattr(owner, name, None) if owner is not None else None


def _native_statement(local: str, path: str) -> str:
    if path.startswith("functools.partial("):
        return f"{local} = {path}"
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
        star = next((d for d in decisions if d.names), None)
        if star is not None:
            statements.append(f"from ampcompat import {', '.join(star.names)}")
        elif moved:
            statements.append(f"from {catalogue.ampcompat_module(node.module or '')} import {', '.join(moved)}")
    for decision in decisions:
        if decision.action == _NATIVE:
            statement = _native_statement(decision.local, decision.native)
            plan.uses_torch |= not statement.startswith("from ")
            if "functools.partial(" in statement:
                plan.modules.add("functools")
            statements.append(statement)
    return "; ".join(statements) if statements else "pass"


def _replace_statement(plan: RewritePlan, node: ast.stmt, replacement: str) -> None:
    """Replace an import; a multi-line one that owns its lines keeps its comments, above the new line."""
    if node.lineno != node.end_lineno and plan.text.owns_lines(node):
        plan.replace_statement(node, [replacement])
    else:
        plan.replace(node, replacement)


def _note(plan: RewritePlan, node: ast.stmt, decision: _Decision) -> None:
    spelled = ast.unparse(decision.alias)
    what = f"`import {spelled}`" if isinstance(node, ast.Import) else f"`{spelled}` from `{node.module}`"
    if decision.action == _REMOVE:
        plan.note(node, f"removed {what}: {decision.why}")
    elif decision.action == _NATIVE:
        plan.note(node, f"{what} now binds `{decision.native}` ({decision.why})")
    elif decision.action == _AMPCOMPAT:
        plan.note(node, f"{what} now comes from ampcompat: {decision.why}, and plain PyTorch has no drop-in "
                        "equivalent for every use")
    elif decision.action == _LEAVE:
        plan.note(node, f"left {what} as it was: {decision.why}")


def _remove_statements(plan: RewritePlan, statements: List[ast.stmt]) -> None:
    """Remove import statements; a block they would leave empty keeps a ``pass``.

    Runs of removed lines that sat between blank lines take one of those blank lines with them, so
    a removed import paragraph does not leave a double gap. Comments inside a removed multi-line
    import stay, each on its own line.
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
                _replace_statement(plan, statement, "pass")
            else:
                whole_lines.append(statement)
    for run in _line_runs(sorted(whole_lines, key=lambda s: s.lineno)):
        text = plan.text
        first, last = run[0], run[-1]
        start_line = first.lineno
        kept = _kept_comments(plan, run)
        if not kept and 1 < start_line and last.end_lineno < len(text.line_starts) \
                and not text.line(start_line - 1).strip() \
                and not text.line(last.end_lineno + 1).strip():  # type: ignore[operator]
            start_line -= 1
        end = text.line_end(last.end_lineno)  # type: ignore[arg-type]
        plan.edits.append(Edit(text.line_start(start_line), end, kept))


def _kept_comments(plan: RewritePlan, run: List[ast.stmt]) -> str:
    """The comments inside the multi-line statements of ``run``, as whole lines at the first one's indentation."""
    text = plan.text
    comments: List[str] = []
    for statement in run:
        if statement.lineno != statement.end_lineno:
            start, end = text.line_start(statement.lineno), text.line_end(statement.end_lineno)  # type: ignore[arg-type]
            comments += text.comments_in(start, end)
    indent, newline = text.indentation(run[0].lineno), text.newline(run[0].lineno)
    return "".join(indent + comment + newline for comment in comments)


def _line_runs(statements: List[ast.stmt]) -> List[List[ast.stmt]]:
    """Group statements on consecutive lines."""
    runs: List[List[ast.stmt]] = []
    for statement in statements:
        if runs and statement.lineno == runs[-1][-1].end_lineno + 1:  # type: ignore[operator]
            runs[-1].append(statement)
        else:
            runs.append([statement])
    return runs
