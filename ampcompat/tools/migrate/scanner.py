"""Find every use of an Apex name in a parsed file, with the verdict for running it on ampcompat.

Static analysis only: imports bind local names to Apex paths (``from apex import amp`` binds ``amp``
to ``apex.amp``), and every reference those bindings reach -- ``amp.initialize(...)``,
``apex.parallel.DistributedDataParallel``, ``amp._amp_state.loss_scalers`` -- is resolved against
the :mod:`catalogue`. Which binding a reference sees follows Python's scoping rules and the flow
between branches (:mod:`scopes`): a parameter, a local or another import of the same name is not
Apex's. Imports of ampcompat's stand-ins (``from ampcompat import amp``) count too, so a file already
moved to ampcompat still shows what it uses. Also found: the private attributes amp adds to
optimizers (``optimizer._amp_stash``), the old ``handle = amp.init()`` handle, imports of Apex's
compiled extensions (``import fused_layer_norm_cuda``), and checks for Apex by name
(``importlib.util.find_spec("apex")``: see :mod:`guards`), which no import rewrite can reach.

A use that ampcompat cannot run is "not supported" -- unless it cannot fail: an import inside
``try``/``except ImportError`` of something ampcompat lacks takes its fallback, as it did without Apex.
"""
from __future__ import annotations

import ast
import collections
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

from . import catalogue, guards, provided
from .alias_line import alias_line_statements
from .catalogue import Verdict
from .edits import SourceText
from .scopes import Definition, ScopeMap
from .sources import SourceFile
from .syntax import dotted_name

_HELPER_NOTE = (
    "`{name}()` looks like a check for Apex by name; under ampcompat it finds Apex only while the import alias "
    "is on (`python -m ampcompat run`, or the line `migrate --write` adds)"
)
_DYNAMIC_NOTE = (
    "the module is named in a string, which no import rewrite changes: under ampcompat this finds no "
    "Apex unless the import alias is on (`python -m ampcompat run script.py`, or "
    "`ampcompat.install_apex_alias()` first)"
)
_OPTIONAL_IMPORT_NOTE = (
    "{problem}; it is imported inside `try` with an `except ImportError` fallback, so under ampcompat the "
    "import fails and the fallback runs, as on a machine without this part of Apex"
)
_FALLBACK_NOTE = (
    "{problem}; under ampcompat its import fails, and here `{name}` is the `except ImportError` fallback instead"
)


@dataclass(frozen=True)
class Binding:
    """What an Apex import (or ``handle = amp.init()``) binds a local name to.

    Attributes:
        qualname: the Apex name (``apex.parallel.DistributedDataParallel``; ``apex.amp.init()`` for the handle).
        via: ``"apex"`` or ``"ampcompat"`` (the module the import names).
        module: the prefix of ``qualname`` the import statement imported as a module path.
        statement: the import (or assignment) statement.
        optional: the statement sits in a ``try`` whose ``except`` catches ``ImportError``.
        fails_under_ampcompat: importing it under ampcompat raises (a module or name ampcompat refuses
            or lacks), so an optional import takes its fallback.
    """

    qualname: str
    via: str
    module: Optional[str] = None
    statement: Optional[ast.stmt] = field(default=None, compare=False, repr=False)
    optional: bool = False
    fails_under_ampcompat: bool = False


@dataclass(frozen=True)
class Use:
    """One use of an Apex name.

    Attributes:
        path: the file.
        line, col: where it starts (1-based; the column counts characters).
        api: the catalogued Apex name (``apex.amp.initialize``), or the full dotted name when the
            name is not catalogued.
        verdict, reason, native: from :func:`catalogue.resolve` for this use.
        via: ``"apex"`` when reached through an Apex import, ``"ampcompat"`` through its stand-in.
        kind: ``import``, ``call``, ``reference``, ``attribute``, ``string`` (a module named in a string:
            ``find_spec("apex")``, ``"apex" in sys.modules``) or ``check`` (a helper such as
            ``is_apex_available()``); the last two are checks for Apex by name.
        local_name: the name in this file the use goes through (``amp``), empty for attributes and
            strings.
        node: the syntax node (the call for ``call`` uses, else the name/attribute/import node).
        exclusive: every binding of ``local_name`` that can reach this use is this Apex one (false
            when another import, an assignment or an ``except ImportError`` fallback may reach it too).
        binding: the Apex binding the use goes through (``None`` for imports, checks and attributes).
        cell: in a notebook, the cell the use is in (``line`` then counts within the cell).
    """

    path: str
    line: int
    col: int
    api: str
    verdict: Verdict
    reason: str
    native: str
    via: str
    kind: str
    local_name: str
    node: ast.AST = field(compare=False, repr=False)
    exclusive: bool = field(default=True, compare=False)
    binding: Optional[Binding] = field(default=None, compare=False, repr=False)
    cell: Optional[int] = None


@dataclass
class ScanResult:
    """Everything the scan of one file found (the rewriters work from this)."""

    source: SourceFile
    text: SourceText
    uses: List[Use]
    bindings: Dict[str, Binding]
    """Names the module's top level binds to Apex names (what other modules can import from it)."""
    parents: Dict[ast.AST, ast.AST]
    nodes: List[ast.AST] = field(default_factory=list)
    """Every node of the tree in ``ast.walk`` order (walked once: the rewriters reuse it)."""
    scopes: Optional[ScopeMap] = None
    """Which binding each read of an Apex-bound name sees."""
    apex_definitions: Dict[Definition, Binding] = field(default_factory=dict)
    """The definitions (imports, star-import names, ``amp.init()`` handles) that bind Apex names."""
    alias_statements: List[ast.stmt] = field(default_factory=list)
    """The line ``migrate --write`` adds (see :mod:`alias_line`), if the file has it."""

    def uses_of(self, api: str) -> List[Use]:
        """The uses whose catalogued name is ``api``."""
        return [use for use in self.uses if use.api == api]


def scan(source: SourceFile) -> ScanResult:
    """Find every Apex use in ``source``.

    Args:
        source: a parsed file.

    Returns:
        The uses, sorted by position, with the bindings and parent links the rewriters need.
    """
    tree = source.tree
    text = SourceText(source.text)
    ours = alias_line_statements(tree)  # the line `migrate --write` added: not the program's own Apex use
    skipped = {id(node) for statement in ours for node in ast.walk(statement)}
    nodes, parents = _walk(tree, skipped)
    imports = _ApexImports(nodes, parents)
    names = imports.local_names() | _handle_candidates(nodes, imports.local_names())
    scopes = ScopeMap(tree, names, star_names=catalogue.star_exports, text=text)
    definitions = imports.definitions(scopes, skipped)
    definitions.update(_handle_definitions(nodes, scopes, definitions))
    finder = _UseFinder(source.path, text, scopes, definitions, parents, guards.import_origins(nodes))
    uses = sorted(finder.find(nodes), key=lambda use: (use.line, use.col, use.api))
    uses = [use for use in uses if not _is_local_module(source.path, use)]
    top = {d.name: binding for d, binding in definitions.items() if d.scope is scopes.module}
    return ScanResult(source, text, uses, top, parents, nodes, scopes, definitions, ours)


def _walk(tree: ast.Module, skipped: Set[int]) -> Tuple[List[ast.AST], Dict[ast.AST, ast.AST]]:
    """Every node (``ast.walk`` order, less ``skipped``) and every node's parent, in one pass."""
    nodes: List[ast.AST] = []
    parents: Dict[ast.AST, ast.AST] = {}
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        if id(node) not in skipped:
            nodes.append(node)
        for child in ast.iter_child_nodes(node):
            parents[child] = node
            queue.append(child)
    return nodes, parents


def might_use_apex(text: str) -> bool:
    """Whether ``text`` can contain an Apex use at all (a substring test, far cheaper than parsing).

    Every use the scanner reports spells one of these words: an import or string names ``apex``,
    ``apex_C``, ``amp_C``, ``ampcompat`` or one of Apex's compiled extensions; the private optimizer
    attributes are found by name. Identifiers are compared after NFKC normalisation, as Python does
    (``import ａｐｅｘ`` imports ``apex``), so non-ASCII text is normalised before the search.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return any(word in text for word in _WORDS)


_WORDS = ("apex", "amp_C", "ampcompat") + catalogue.PRIVATE_ATTRIBUTES + tuple(catalogue.EXTENSION_MODULES)


# --- bindings ----------------------------------------------------------------------------------------
def _is_apex_name(qualname: str, via: str) -> bool:
    """Whether a name reached through an import is Apex's (ampcompat's own helpers are not)."""
    if via == "apex":
        return True
    parts = qualname.split(".")
    if parts[0] != "apex":
        return True  # amp_C
    return len(parts) > 1 and parts[1] in catalogue.MAPPED_PACKAGES


def in_import_fallback(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` lies in the body of a ``try`` whose ``except`` catches ``ImportError`` and goes on
    (a fallback), within its own function or class. A handler that only re-raises or exits is no fallback."""
    child: ast.AST = node
    parent = parents.get(child)
    while parent is not None:
        if isinstance(parent, _TRY) and any(child is statement for statement in parent.body):
            if any(catches_import_error(handler) and not _gives_up(handler.body) for handler in parent.handlers):
                return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return False
        child, parent = parent, parents.get(parent)
    return False


def runs_unconditionally(node: ast.stmt, tree: ast.Module, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether a statement runs whenever the module is imported and stops the import if it fails: it is
    at the module's top level, possibly inside ``try`` blocks that have no fallback for ``ImportError``."""
    child: ast.AST = node
    parent = parents.get(child)
    while parent is not None and parent is not tree:
        if not (isinstance(parent, _TRY) and any(child is statement for statement in parent.body)):
            return False
        if any(catches_import_error(handler) and not _gives_up(handler.body) for handler in parent.handlers):
            return False
        child, parent = parent, parents.get(parent)
    return parent is tree


def _gives_up(body: List[ast.stmt]) -> bool:
    """A handler body that ends by raising or exiting (``raise``, ``sys.exit(...)``, ``exit()``)."""
    last = body[-1] if body else None
    if isinstance(last, ast.Raise):
        return True
    if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call):
        chain = dotted_name(last.value.func)
        return chain is not None and chain[-1] in ("exit", "quit", "_exit", "abort")
    return False


_TRY = (ast.Try,) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())  # type: ignore[attr-defined]
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    """Whether an ``except`` clause catches ``ImportError`` (bare, ``Exception``, a tuple naming it, ...)."""
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = {t.attr if isinstance(t, ast.Attribute) else t.id if isinstance(t, ast.Name) else "" for t in types}
    return bool(names & _IMPORT_ERRORS)


class _ApexImports:
    """The file's import statements that bind Apex names (or ampcompat's stand-ins)."""

    def __init__(self, nodes: List[ast.AST], parents: Dict[ast.AST, ast.AST]) -> None:
        self.parents = parents
        self.statements: List[ast.stmt] = [node for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))
                                           and any(self._binding(node, alias) for alias in node.names)]

    def _binding(self, node: ast.stmt, alias: ast.alias, name: Optional[str] = None) -> Optional[Binding]:
        """What ``alias`` (or, for ``*``, its exported ``name``) binds, if it is an Apex name."""
        optional = in_import_fallback(node, self.parents)
        if isinstance(node, ast.Import):
            # ``import apex.parallel`` binds ``apex``; ``import apex.parallel as p`` binds ``p``. The second
            # check keeps ``import ampcompat.tools.migrate`` (not an Apex stand-in) from binding.
            target = alias.name if alias.asname else alias.name.split(".")[0]
            mapped = catalogue.apex_module(target)
            if mapped is None or catalogue.apex_module(alias.name) is None:
                return None
            fails = not provided.lookup(mapped[0], mapped[0]).found if mapped[1] == "apex" else False
            return Binding(mapped[0], mapped[1], mapped[0], node, optional, fails)
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            return None
        mapped = catalogue.apex_module(node.module)
        if mapped is None:
            return None
        module, via = mapped
        short = name if alias.name == "*" else alias.name
        if short is None:
            return Binding(module, via, module, node, optional)  # the star statement itself
        qualname = f"{module}.{short}"
        if not _is_apex_name(qualname, via):
            return None
        fails = via == "apex" and not provided.lookup(qualname, module).found
        return Binding(qualname, via, module, node, optional, fails)

    def local_names(self) -> Set[str]:
        names: Set[str] = set()
        for node in self.statements:
            for alias in node.names:
                if alias.name == "*":
                    names.update(catalogue.star_exports(node.module or "") or ())  # type: ignore[attr-defined]
                elif isinstance(node, ast.Import):
                    names.add(alias.asname or alias.name.split(".")[0])
                else:
                    names.add(alias.asname or alias.name)
        return names

    def definitions(self, scopes: ScopeMap, skipped: Set[int]) -> Dict[Definition, Binding]:
        found: Dict[Definition, Binding] = {}
        for node in self.statements:
            for alias in node.names:
                for definition in scopes.definitions_at(alias):
                    binding = self._binding(node, alias, definition.name if alias.name == "*" else None)
                    if binding is not None:
                        found[definition] = binding
        return found


def _handle_candidates(nodes: List[ast.AST], names: Set[str]) -> Set[str]:
    """Names assigned from ``<apex name>...init(...)``: maybe the old API's handle (confirmed later)."""
    found: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            chain = dotted_name(node.value.func)
            if chain is not None and chain[0] in names and chain[-1] == "init":
                found.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return found


def _handle_definitions(nodes: List[ast.AST], scopes: ScopeMap,
                        definitions: Dict[Definition, Binding]) -> Dict[Definition, Binding]:
    """``handle = amp.init(...)`` binds ``handle`` to the old API's handle object."""
    found: Dict[Definition, Binding] = {}
    for node in nodes:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        chain = dotted_name(node.value.func)
        root = _root_name(node.value.func)
        if chain is None or root is None:
            continue
        for seen in scopes.reaching(root):
            binding = definitions.get(seen)
            if binding is not None and ".".join([binding.qualname] + chain[1:]) == "apex.amp.init":
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        for definition in scopes.definitions_at(target):
                            found[definition] = Binding("apex.amp.init()", binding.via, None, node)
    return found


def _root_name(node: ast.AST) -> Optional[ast.Name]:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node if isinstance(node, ast.Name) else None


def _is_local_module(path: str, use: Use) -> bool:
    """An extension-module name that is also a module next to the file (``syncbn.py``): not Apex's."""
    if use.api not in catalogue.EXTENSION_MODULES:
        return False
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.exists(os.path.join(folder, use.api + ".py")) or os.path.isdir(os.path.join(folder, use.api))


# --- uses --------------------------------------------------------------------------------------------
class _UseFinder:
    def __init__(self, path: str, text: SourceText, scopes: ScopeMap, definitions: Dict[Definition, Binding],
                 parents: Dict[ast.AST, ast.AST], origins: Dict[str, str]) -> None:
        self.path = path
        self.text = text
        self.scopes = scopes
        self.definitions = definitions
        self.parents = parents
        self.origins = origins

    def find(self, nodes: List[ast.AST]) -> Iterator[Use]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from self._import_uses(node)
            elif isinstance(node, ast.ImportFrom):
                yield from self._import_from_uses(node)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del)):
                use = self._chain_use(node)
                if use is not None:
                    yield use
            elif isinstance(node, ast.Attribute) and node.attr in catalogue.PRIVATE_ATTRIBUTES:
                use = self._private_attribute_use(node)
                if use is not None:
                    yield use
            elif isinstance(node, (ast.Call, ast.Subscript, ast.Compare)):
                use = self._check_use(node) or self._private_attribute_string_use(node)
                if use is not None:
                    yield use

    def apex_binding(self, name: ast.Name) -> Tuple[Optional[Binding], bool]:
        """The Apex binding a read of a name sees (``None`` if none), and whether it is the only binding."""
        reaching = self.scopes.reaching(name)
        apex = sorted((d for d in reaching if d in self.definitions), key=lambda d: _position(d.node))
        if not apex:
            return None, False
        binding = self.definitions[apex[0]]
        exclusive = all(d in self.definitions and self.definitions[d].qualname == binding.qualname for d in reaching)
        return binding, exclusive

    def _make(self, node: ast.AST, qualname: str, via: str, kind: str, local_name: str,
              call: Optional[ast.Call] = None, position: Optional[ast.AST] = None,
              module: Optional[str] = None, exclusive: bool = True, binding: Optional[Binding] = None) -> Use:
        resolution = catalogue.resolve(qualname, call, module)
        anchor = position or node
        start = self.text.offset(anchor.lineno, anchor.col_offset)  # type: ignore[attr-defined]
        col = start - self.text.line_start(anchor.lineno) + 1  # type: ignore[attr-defined]
        verdict, reason = resolution.verdict, resolution.note
        if verdict is Verdict.UNSUPPORTED and binding is not None and binding.fails_under_ampcompat:
            if kind == "import" and binding.optional:
                verdict, reason = Verdict.DIFFERENCE, _OPTIONAL_IMPORT_NOTE.format(problem=reason)
            elif not exclusive and binding.optional:
                verdict, reason = Verdict.DIFFERENCE, _FALLBACK_NOTE.format(problem=reason, name=local_name)
        return Use(self.path, anchor.lineno, col, resolution.api, verdict,  # type: ignore[attr-defined]
                   reason, resolution.native, via, kind, local_name, node, exclusive, binding)

    def _import_uses(self, node: ast.Import) -> Iterator[Use]:
        for alias in node.names:
            if alias.name in catalogue.EXTENSION_MODULES:
                yield self._extension_use(node, alias, alias.name)
                continue
            mapped = catalogue.apex_module(alias.name)
            if mapped is None or (mapped[1] == "ampcompat" and mapped[0] == "apex"):
                continue
            qualname, via = mapped
            if _is_apex_name(qualname, via):
                binding = Binding(qualname, via, qualname, node, in_import_fallback(node, self.parents),
                                  via == "apex" and not provided.lookup(qualname, qualname).found)
                yield self._make(node, qualname, via, "import", alias.asname or alias.name.split(".")[0],
                                 position=_alias_position(alias, node), module=qualname, binding=binding)

    def _import_from_uses(self, node: ast.ImportFrom) -> Iterator[Use]:
        if node.level or not node.module:
            return
        if node.module.split(".")[0] in catalogue.EXTENSION_MODULES:
            yield self._extension_use(node, node.names[0], node.module.split(".")[0])
            return
        mapped = catalogue.apex_module(node.module)
        if mapped is None:
            return
        module, via = mapped
        optional = in_import_fallback(node, self.parents)
        for alias in node.names:
            qualname = module if alias.name == "*" else f"{module}.{alias.name}"
            if alias.name == "*" or _is_apex_name(qualname, via):
                fails = via == "apex" and not provided.lookup(qualname, module).found
                yield self._make(node, qualname, via, "import", alias.asname or alias.name,
                                 position=_alias_position(alias, node), module=module,
                                 binding=Binding(qualname, via, module, node, optional, fails))

    def _extension_use(self, node: ast.stmt, alias: ast.alias, module: str) -> Use:
        reason, native = catalogue.extension_advice(module)
        verdict = Verdict.UNSUPPORTED
        if in_import_fallback(node, self.parents):
            verdict, reason = Verdict.DIFFERENCE, _OPTIONAL_IMPORT_NOTE.format(problem=reason)
        anchor = _alias_position(alias, node)
        start = self.text.offset(anchor.lineno, anchor.col_offset)  # type: ignore[attr-defined]
        col = start - self.text.line_start(anchor.lineno) + 1  # type: ignore[attr-defined]
        return Use(self.path, anchor.lineno, col, module, verdict, reason, native, "apex", "import",  # type: ignore
                   alias.asname or module, node)

    def _chain_use(self, name: ast.Name) -> Optional[Use]:
        binding, exclusive = self.apex_binding(name)
        if binding is None:
            return None
        attrs: List[str] = []
        outer: ast.AST = name
        parent = self.parents.get(outer)
        while isinstance(parent, ast.Attribute) and parent.value is outer and not _is_dunder(parent.attr):
            attrs.append(parent.attr)
            outer = parent
            parent = self.parents.get(outer)
        qualname = ".".join([binding.qualname] + attrs)
        if binding.via == "ampcompat" and not _is_apex_name(qualname, "ampcompat"):
            return None
        call = parent if isinstance(parent, ast.Call) and parent.func is outer else None
        return self._make(call or outer, qualname, binding.via, "call" if call else "reference", name.id,
                          call=call, position=name, module=binding.module, exclusive=exclusive, binding=binding)

    def _is_apex_chain(self, node: ast.AST) -> bool:
        root = _root_name(node)
        return root is not None and self.apex_binding(root)[0] is not None

    def _private_attribute_use(self, node: ast.Attribute) -> Optional[Use]:
        if self._is_apex_chain(node.value):
            return None  # part of an Apex chain, reported there
        return self._make(node, "optimizer." + node.attr, "apex", "attribute", "",
                          position=_attribute_position(node))

    def _private_attribute_string_use(self, node: ast.AST) -> Optional[Use]:
        """``hasattr(optimizer, "_amp_stash")`` and friends."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2):
            return None
        name = node.args[1]
        if node.func.id in ("hasattr", "getattr", "setattr", "delattr") and isinstance(name, ast.Constant) \
                and name.value in catalogue.PRIVATE_ATTRIBUTES:
            return self._make(node, "optimizer." + name.value, "apex", "attribute", "", position=name)
        return None

    def _check_use(self, node: ast.AST) -> Optional[Use]:
        """A check for Apex by name (see :mod:`guards`)."""
        check = guards.find_check(node, self.origins, _names_apex)
        if check is None:
            return None
        if check.literal is None:  # is_apex_available(): a helper named after Apex
            func = node.func  # type: ignore[attr-defined]
            if self._is_apex_chain(func):
                return None
            name = func.attr if isinstance(func, ast.Attribute) else func.id
            use = self._make(node, "apex", "apex", "check", "", position=func, module="apex")
            return Use(use.path, use.line, use.col, use.api, Verdict.DIFFERENCE, _HELPER_NOTE.format(name=name),
                       use.native, use.via, use.kind, use.local_name, node)
        mapped = catalogue.apex_module(check.literal.value)
        assert mapped is not None
        use = self._make(node, mapped[0], "apex", "string", "", position=check.literal, module=mapped[0])
        if use.verdict is Verdict.UNSUPPORTED:
            return use
        return Use(use.path, use.line, use.col, use.api, Verdict.DIFFERENCE, _DYNAMIC_NOTE, use.native,
                   use.via, use.kind, use.local_name, node)


def _names_apex(module: str) -> bool:
    mapped = catalogue.apex_module(module)
    return mapped is not None and mapped[1] == "apex"


def _position(node: ast.AST) -> Tuple[int, int]:
    return getattr(node, "lineno", 0), getattr(node, "col_offset", 0)


def _alias_position(alias: ast.alias, statement: ast.stmt) -> ast.AST:
    """The alias itself where Python records its position (3.10+), else its import statement."""
    return alias if hasattr(alias, "lineno") else statement


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _attribute_position(node: ast.Attribute) -> ast.AST:
    """A node-like position pointing at the attribute name itself (``._amp_stash``), not the object."""
    marker = ast.Pass()
    marker.lineno = node.end_lineno  # type: ignore[assignment]
    marker.col_offset = node.end_col_offset - len(node.attr)  # type: ignore[operator]
    return marker
