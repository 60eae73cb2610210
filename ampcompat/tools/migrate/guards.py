"""Checks for Apex by name: which expressions are ones, and what they answer once Apex is gone.

A program can ask whether Apex is there without importing it, and no import rewrite reaches such a
question. Only these count as checks (anything else that mentions ``"apex"`` -- ``"apex" in sys.argv``,
``args.amp == "apex"`` -- is ordinary data):

* ``sys.modules`` lookups: ``"apex" in sys.modules``, ``sys.modules["apex"]``, ``sys.modules.get("apex")``;
* ``find_spec("apex")`` / ``find_loader("apex")`` (``importlib.util``, ``pkgutil``);
* metadata lookups: ``importlib.metadata`` (or ``importlib_metadata``) ``version``, ``distribution``,
  ``metadata``, ``requires``, ``files``; ``pkg_resources`` ``get_distribution``, ``require``; and
  ``"apex" in`` an expression built from ``pkg_resources``/``importlib.metadata`` (``working_set``,
  ``packages_distributions()``);
* helpers that check a named package (``RequirementCache("apex")``, ``package_available("apex")``,
  ``is_package_available("apex")``, ``module_available("apex")``) or Apex itself by their name
  (``is_apex_available()``, ``apex_is_installed()``, ``HAS_APEX()``-style functions);

plus imports by name (``importlib.import_module("apex")``, ``__import__("apex")``), which need the
module to be importable the same way.

Under ampcompat's import alias every check finds Apex (``apex`` 0.1 is installed). When ``--to-native``
leaves a file with no Apex or ampcompat left, a check whose truth value is all that is used is
replaced by the answer it gave (:func:`answer_under_ampcompat`), so the branch it guarded -- now plain
PyTorch -- still runs; any other check is reported as now answering "no Apex".
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

from .syntax import dotted_name

_SPEC_FINDERS = {"find_spec", "find_loader"}
_IMPORTERS = {"import_module", "__import__"}
_METADATA_MODULES = ("importlib.metadata.", "importlib_metadata.")
_METADATA_FUNCTIONS = {"version", "distribution", "metadata", "requires", "files"}
_PKG_RESOURCES_FUNCTIONS = {"get_distribution", "require"}
_PACKAGE_HELPERS = {"RequirementCache", "package_available", "is_package_available", "_is_package_available",
                    "module_available", "is_module_available"}
_BOOLEAN_HELPERS = {"package_available", "is_package_available", "_is_package_available", "module_available",
                    "is_module_available"}
_METADATA_WORDS = {"working_set", "packages_distributions", "distributions", "pkg_resources", "importlib_metadata"}
APEX_HELPER = re.compile(r"(is|has|have|use|can)_?apex|apex_?(is_)?(available|installed|enabled|present)", re.I)
"""Names of functions that check whether Apex is there (``is_apex_available``, ``apex_is_installed``)."""


@dataclass(frozen=True)
class Check:
    """One check for a module by name.

    Attributes:
        node: the whole check expression (the comparison, call or subscript).
        literal: the string naming the module (``None`` for a helper such as ``is_apex_available()``).
        kind: ``sys.modules``, ``find_spec``, ``metadata``, ``helper`` or ``import`` (an import by name).
    """

    node: ast.expr
    literal: Optional[ast.Constant]
    kind: str


def import_origins(nodes: List[ast.AST]) -> Dict[str, str]:
    """Local name -> the dotted name an import binds it to (``metadata`` -> ``importlib.metadata``), file-wide."""
    origins: Dict[str, str] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    origins[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    origins[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    origins[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return origins


def origin_of(node: ast.AST, origins: Dict[str, str]) -> str:
    """The dotted name an expression such as ``metadata.version`` stands for (``""`` if not a dotted name)."""
    chain = dotted_name(node)
    if chain is None:
        return ""
    return ".".join([origins.get(chain[0], chain[0])] + chain[1:])


def find_check(node: ast.AST, origins: Dict[str, str], names_apex: Callable[[str], bool]) -> Optional[Check]:
    """The check ``node`` is, if it looks up a module for which ``names_apex`` is true (or is an Apex helper).

    Args:
        node: any expression node.
        origins: from :func:`import_origins`.
        names_apex: whether a module name (``"apex"``, ``"amp_C"``) is one of Apex's.
    """
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
        literal = _string(node.left)
        if literal is not None and names_apex(literal.value):
            container = node.comparators[0]
            if _is_sys_modules(container, origins):
                return Check(node, literal, "sys.modules")
            if _mentions_metadata(container, origins):
                return Check(node, literal, "metadata")
        return None
    if isinstance(node, ast.Subscript) and _is_sys_modules(node.value, origins):
        literal = _string(node.slice)
        if literal is not None and names_apex(literal.value):
            return Check(node, literal, "sys.modules")
        return None
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    literal = _string(node.args[0]) if node.args else None
    if literal is not None and names_apex(literal.value):
        origin = origin_of(func, origins)
        if name == "get" and isinstance(func, ast.Attribute) and _is_sys_modules(func.value, origins):
            return Check(node, literal, "sys.modules")
        if name in _SPEC_FINDERS:
            return Check(node, literal, "find_spec")
        if name in _IMPORTERS:
            return Check(node, literal, "import")
        if name in _METADATA_FUNCTIONS and origin.startswith(_METADATA_MODULES):
            return Check(node, literal, "metadata")
        if name in _PKG_RESOURCES_FUNCTIONS and origin.startswith("pkg_resources."):
            return Check(node, literal, "metadata")
        if name in _PACKAGE_HELPERS:
            return Check(node, literal, "helper")
    if APEX_HELPER.search(name):
        return Check(node, None, "helper")
    return None


def _string(node: ast.AST) -> Optional[ast.Constant]:
    return node if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_sys_modules(node: ast.AST, origins: Dict[str, str]) -> bool:
    """``sys.modules`` or ``sys.modules.keys()``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "keys":
        node = node.func.value
    return origin_of(node, origins) == "sys.modules"


def _mentions_metadata(node: ast.AST, origins: Dict[str, str]) -> bool:
    """Whether an expression reads installed-package metadata (``pkg_resources.working_set``, ...)."""
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and child.attr in _METADATA_WORDS:
            return True
        if isinstance(child, ast.Name):
            origin = origins.get(child.id, child.id)
            if origin.split(".")[0] in ("pkg_resources", "importlib_metadata") or origin.startswith(
                    "importlib.metadata") or child.id in _METADATA_WORDS:
                return True
    return False


# --- what a check answers once nothing installs ampcompat's alias ------------------------------------
@dataclass(frozen=True)
class Answer:
    """Replace ``node`` by ``value`` (``True``/``False``): what the check said under ampcompat."""

    node: ast.expr
    value: bool


def answer_under_ampcompat(check: Check, parents: Dict[ast.AST, ast.AST]) -> Optional[Answer]:
    """The literal that keeps ``check``'s answer, where only its truth value is used; else ``None``.

    Under ampcompat's alias every check finds Apex: ``"apex" in sys.modules`` is true, ``find_spec``
    returns a spec, ``version("apex")`` a version string, ``is_apex_available()`` true. ``x is None``
    and ``x is not None`` around a lookup, ``not x``, and a lookup used as a condition (``if``,
    ``while``, ``and``/``or``, ``assert``, ``bool(...)``) keep that answer as ``True``/``False``.
    Imports by name and ``sys.modules["apex"]`` (a value) are never replaced.
    """
    node = check.node
    if check.kind == "import" or isinstance(node, ast.Subscript):
        return None
    if isinstance(node, ast.Compare):
        return Answer(node, isinstance(node.ops[0], ast.In))
    parent = parents.get(node)
    if isinstance(parent, ast.Compare) and len(parent.ops) == 1 and parent.left is node \
            and isinstance(parent.ops[0], (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) \
            and _is_none(parent.comparators[0]):
        return Answer(parent, isinstance(parent.ops[0], (ast.IsNot, ast.NotEq)))
    if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not):
        return Answer(parent, False)
    if _is_condition(node, parents):
        return Answer(node, True)
    func = node.func if isinstance(node, ast.Call) else None
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if check.kind == "helper" and (check.literal is None or name in _BOOLEAN_HELPERS):
        return Answer(node, True)  # these return a plain bool wherever they are used
    return None


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _is_condition(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether only the truth value of ``node`` is used (``a or b`` passes an operand's value on, so an
    operand counts only where the whole ``and``/``or`` is itself a condition)."""
    parent = parents.get(node)
    if isinstance(parent, (ast.If, ast.While, ast.IfExp, ast.Assert)) and parent.test is node:
        return True
    if isinstance(parent, ast.comprehension) and any(test is node for test in parent.ifs):
        return True
    if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not):
        return True
    if isinstance(parent, ast.BoolOp):
        return _is_condition(parent, parents)
    return isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id == "bool" \
        and len(parent.args) == 1 and parent.args[0] is node


def iter_checks(nodes: List[ast.AST], origins: Dict[str, str], names_apex: Callable[[str], bool]) -> Iterator[Check]:
    """Every check in ``nodes`` (see :func:`find_check`)."""
    for node in nodes:
        if isinstance(node, (ast.Call, ast.Compare, ast.Subscript)):
            check = find_check(node, origins, names_apex)
            if check is not None:
                yield check
