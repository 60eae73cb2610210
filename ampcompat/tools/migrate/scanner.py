"""Find every use of an Apex name in a parsed file, with the verdict for running it on ampcompat.

Static analysis only: imports bind local names to Apex paths (``from apex import amp`` binds ``amp``
to ``apex.amp``), and every later reference through those names -- ``amp.initialize(...)``,
``apex.parallel.DistributedDataParallel``, ``amp._amp_state.loss_scalers`` -- is resolved against
the :mod:`catalogue`. Imports of ampcompat's stand-ins (``from ampcompat import amp``) count too, so
a file already moved to ampcompat still shows what it uses. Also found: the private attributes amp
adds to optimizers (``optimizer._amp_stash``), the old ``handle = amp.init()`` handle, and module
names in strings (``importlib.util.find_spec("apex")``), which no import rewrite can reach.
"""
from __future__ import annotations

import ast
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

from . import catalogue
from .alias_line import alias_line_nodes
from .catalogue import Verdict
from .edits import SourceText
from .sources import SourceFile
from .syntax import dotted_name

_DYNAMIC_IMPORTERS = (
    "import_module", "find_spec", "find_loader", "__import__",  # importlib
    "version", "distribution", "metadata", "requires", "files",  # importlib.metadata
    "get_distribution", "require", "RequirementCache", "package_available", "is_package_available",
    "_is_package_available",  # pkg_resources, Lightning, transformers
)
"""Functions whose first argument names a module or distribution (a check for Apex by name)."""
_CHECK_HELPER = re.compile(r"(is|has|have|use|can)_?apex|apex_?(is_)?(available|installed|enabled|present)", re.I)
"""Names of functions that check whether Apex is there (``is_apex_available``, ``apex_is_installed``)."""
_HELPER_NOTE = (
    "`{name}()` looks like a check for Apex by name; under ampcompat it finds Apex only while the import alias "
    "is on (`python -m ampcompat run`, or the line `migrate --write` adds)"
)
_DYNAMIC_NOTE = (
    "the module is named in a string, which no import rewrite changes: under ampcompat this finds no "
    "Apex unless the import alias is on (`python -m ampcompat run script.py`, or "
    "`ampcompat.install_apex_alias()` first)"
)


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


@dataclass(frozen=True)
class Binding:
    """A local name bound to an Apex path by an import (or to the old handle by ``amp.init()``)."""

    qualname: str
    via: str
    module: Optional[str] = None
    """The prefix of ``qualname`` the import statement imported as a module path."""


@dataclass
class ScanResult:
    """Everything the scan of one file found (the rewriters work from this)."""

    source: SourceFile
    text: SourceText
    uses: List[Use]
    bindings: Dict[str, Binding]
    parents: Dict[ast.AST, ast.AST]
    nodes: List[ast.AST] = field(default_factory=list)
    """Every node of the tree in ``ast.walk`` order (walked once: the rewriters reuse it)."""

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
    ours = alias_line_nodes(tree)  # the line `migrate --write` added: not the program's own Apex use
    skipped = {id(node) for statement in tree.body if id(statement) in ours for node in ast.walk(statement)}
    nodes = [node for node in ast.walk(tree) if id(node) not in skipped]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bindings, star_modules = _import_bindings(nodes)
    bindings.update(_star_bindings(nodes, star_modules, bindings))
    bindings.update(_handle_bindings(nodes, bindings, parents))
    finder = _UseFinder(source.path, text, bindings, parents)
    uses = sorted(finder.find(nodes), key=lambda use: (use.line, use.col, use.api))
    return ScanResult(source, text, uses, bindings, parents, nodes)


def might_use_apex(text: str) -> bool:
    """Whether ``text`` can contain an Apex use at all (a substring test, far cheaper than parsing).

    Every use the scanner reports spells one of these words: an import or string names ``apex``,
    ``apex_C``, ``amp_C`` or ``ampcompat``; the private optimizer attributes are found by name.
    Identifiers are compared after NFKC normalisation, as Python does (``import ａｐｅｘ`` imports
    ``apex``), so non-ASCII text is normalised before the search.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return any(word in text for word in _WORDS)


_WORDS = ("apex", "amp_C", "ampcompat") + catalogue.PRIVATE_ATTRIBUTES


# --- bindings ----------------------------------------------------------------------------------------
def _is_apex_name(qualname: str, via: str) -> bool:
    """Whether a name reached through an import is Apex's (ampcompat's own helpers are not)."""
    if via == "apex":
        return True
    parts = qualname.split(".")
    if parts[0] != "apex":
        return True  # amp_C
    return len(parts) > 1 and parts[1] in catalogue.MAPPED_PACKAGES


def _import_bindings(nodes: List[ast.AST]) -> Tuple[Dict[str, Binding], List[Tuple[str, str]]]:
    bindings: Dict[str, Binding] = {}
    star_modules: List[Tuple[str, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                # ``import apex.parallel`` binds ``apex``; ``import apex.parallel as p`` binds ``p``. The
                # second check keeps ``import ampcompat.tools.migrate`` (not an Apex stand-in) from binding.
                target = alias.name if alias.asname else alias.name.split(".")[0]
                mapped = catalogue.apex_module(target)
                if mapped is not None and catalogue.apex_module(alias.name) is not None:
                    bindings[alias.asname or target] = Binding(mapped[0], mapped[1], mapped[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mapped = catalogue.apex_module(node.module)
            if mapped is None:
                continue
            module, via = mapped
            for alias in node.names:
                if alias.name == "*":
                    star_modules.append((module, via))
                elif _is_apex_name(f"{module}.{alias.name}", via):
                    bindings[alias.asname or alias.name] = Binding(f"{module}.{alias.name}", via, module)
    return bindings, star_modules


def _locally_defined(nodes: List[ast.AST]) -> Set[str]:
    names: Set[str] = set()
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias) and node.name != "*":
            names.add(node.asname or node.name.split(".")[0])
    return names


def _star_bindings(nodes: List[ast.AST], star_modules: List[Tuple[str, str]],
                   bindings: Dict[str, Binding]) -> Dict[str, Binding]:
    """Names a ``from apex.X import *`` brings that the file uses and does not define itself."""
    if not star_modules:
        return {}
    defined = _locally_defined(nodes)
    found: Dict[str, Binding] = {}
    for module, via in star_modules:
        prefix = module + "."
        for name in catalogue.ENTRIES:
            short = name[len(prefix):]
            if name.startswith(prefix) and "." not in short and short not in defined and short not in bindings:
                found[short] = Binding(name, via, module)
    return found


def _handle_bindings(nodes: List[ast.AST], bindings: Dict[str, Binding],
                     parents: Dict[ast.AST, ast.AST]) -> Dict[str, Binding]:
    """``handle = amp.init(...)`` binds ``handle`` to the old API's handle object."""
    found: Dict[str, Binding] = {}
    if not bindings:
        return found
    for node in nodes:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            chain = dotted_name(node.value.func)
            if chain is None or chain[0] not in bindings:
                continue
            binding = bindings[chain[0]]
            if ".".join([binding.qualname] + chain[1:]) == "apex.amp.init":
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found[target.id] = Binding("apex.amp.init()", binding.via)
    return found



# --- uses --------------------------------------------------------------------------------------------
class _UseFinder:
    def __init__(self, path: str, text: SourceText, bindings: Dict[str, Binding],
                 parents: Dict[ast.AST, ast.AST]) -> None:
        self.path = path
        self.text = text
        self.bindings = bindings
        self.parents = parents

    def find(self, nodes: List[ast.AST]) -> Iterator[Use]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from self._import_uses(node)
            elif isinstance(node, ast.ImportFrom):
                yield from self._import_from_uses(node)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in self.bindings:
                use = self._chain_use(node)
                if use is not None:
                    yield use
            elif isinstance(node, ast.Attribute) and node.attr in catalogue.PRIVATE_ATTRIBUTES:
                use = self._private_attribute_use(node)
                if use is not None:
                    yield use
            elif isinstance(node, (ast.Call, ast.Subscript, ast.Compare)):
                use = self._string_use(node) or self._private_attribute_string_use(node) or self._helper_check(node)
                if use is not None:
                    yield use

    def _make(self, node: ast.AST, qualname: str, via: str, kind: str, local_name: str,
              call: Optional[ast.Call] = None, position: Optional[ast.AST] = None,
              module: Optional[str] = None) -> Use:
        resolution = catalogue.resolve(qualname, call, module)
        anchor = position or node
        start = self.text.offset(anchor.lineno, anchor.col_offset)  # type: ignore[attr-defined]
        col = start - self.text.line_start(anchor.lineno) + 1  # type: ignore[attr-defined]
        return Use(self.path, anchor.lineno, col, resolution.api, resolution.verdict,  # type: ignore[attr-defined]
                   resolution.note, resolution.native, via, kind, local_name, node)

    def _import_uses(self, node: ast.Import) -> Iterator[Use]:
        for alias in node.names:
            mapped = catalogue.apex_module(alias.name)
            if mapped is None or (mapped[1] == "ampcompat" and mapped[0] == "apex"):
                continue
            qualname, via = mapped
            if _is_apex_name(qualname, via):
                yield self._make(node, qualname, via, "import", alias.asname or alias.name.split(".")[0],
                                 position=_alias_position(alias, node), module=qualname)

    def _import_from_uses(self, node: ast.ImportFrom) -> Iterator[Use]:
        if node.level or not node.module:
            return
        mapped = catalogue.apex_module(node.module)
        if mapped is None:
            return
        module, via = mapped
        for alias in node.names:
            qualname = module if alias.name == "*" else f"{module}.{alias.name}"
            if alias.name == "*" or _is_apex_name(qualname, via):
                yield self._make(node, qualname, via, "import", alias.asname or alias.name,
                                 position=_alias_position(alias, node), module=module)

    def _chain_use(self, name: ast.Name) -> Optional[Use]:
        binding = self.bindings[name.id]
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
                          call=call, position=name, module=binding.module)

    def _private_attribute_use(self, node: ast.Attribute) -> Optional[Use]:
        chain = dotted_name(node.value)
        if chain is not None and chain[0] in self.bindings:
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

    def _helper_check(self, node: ast.AST) -> Optional[Use]:
        """``is_apex_available()``, ``utils.is_apex_available()``: a library's own check for Apex."""
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        chain = dotted_name(func)
        if not _CHECK_HELPER.search(name) or (chain is not None and chain[0] in self.bindings):
            return None
        use = self._make(node, "apex", "apex", "check", "", position=func, module="apex")
        return Use(use.path, use.line, use.col, use.api, Verdict.DIFFERENCE, _HELPER_NOTE.format(name=name),
                   use.native, use.via, use.kind, use.local_name, node)

    def _string_use(self, node: ast.AST) -> Optional[Use]:
        literal = _dynamic_import_string(node)
        if literal is None:
            return None
        mapped = catalogue.apex_module(literal.value)
        if mapped is None or mapped[1] != "apex":
            return None
        use = self._make(node, mapped[0], "apex", "string", "", position=literal, module=mapped[0])
        if use.verdict is Verdict.UNSUPPORTED:
            return use
        return Use(use.path, use.line, use.col, use.api, Verdict.DIFFERENCE, _DYNAMIC_NOTE, use.native,
                   use.via, use.kind, use.local_name, node)


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


def _dynamic_import_string(node: ast.AST) -> Optional[ast.Constant]:
    """The string naming a module in ``find_spec("apex")``, ``sys.modules["apex"]`` or ``"apex" in sys.modules``."""
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        candidate = node.args[0]
        if name in _DYNAMIC_IMPORTERS and isinstance(candidate, ast.Constant) and isinstance(candidate.value, str):
            return candidate
    if isinstance(node, ast.Subscript) and _is_sys_modules(node.value):
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            return node.slice
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
        left = node.left  # "apex" in sys.modules, "apex" in installed_packages, ...
        if isinstance(left, ast.Constant) and isinstance(left.value, str) and not isinstance(
                node.comparators[0], (ast.Constant, ast.JoinedStr)):
            return left
    return None


def _is_sys_modules(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "modules"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")
