"""The line ``migrate --write`` adds so that code looking for Apex by name still finds it.

After ``from apex import amp`` becomes ``from ampcompat import amp``, nothing imports a module named
``apex`` any more: ``"apex" in sys.modules``, ``importlib.util.find_spec("apex")``, metadata lookups
and libraries' own ``is_apex_available()`` would all say "no Apex", and the program would leave its
Apex path. The added line installs ampcompat's import alias (which answers those questions as an
installed Apex would) and imports ``apex`` through it, as the original import did::

    import ampcompat; ampcompat.install_apex_alias(); import apex  # noqa: E702 -- ampcompat migrate: ...

It goes at the top of the module (after the docstring and ``from __future__`` imports), so it runs
before any check in the file, and is recognised on later runs, which leave it alone.
"""
from __future__ import annotations

import ast
from typing import List, Optional, Set, Tuple

from .edits import Edit, SourceText

ALIAS_STATEMENTS = "import ampcompat; ampcompat.install_apex_alias(); import apex"
ALIAS_LINE = (ALIAS_STATEMENTS + "  # noqa: E702 -- ampcompat migrate: code that looks for Apex by name "
              "(sys.modules, find_spec, metadata) still finds it")


def alias_line_nodes(tree: ast.Module) -> Set[int]:
    """``id()`` of the three statements of an alias line already in ``tree`` (empty if there is none)."""
    body = tree.body
    for index in range(len(body) - 2):
        first, second, third = body[index : index + 3]
        if _imports(first, "ampcompat") and _calls_install(second) and _imports(third, "apex"):
            return {id(first), id(second), id(third)}
    return set()


def _imports(node: ast.stmt, name: str) -> bool:
    return isinstance(node, ast.Import) and len(node.names) == 1 and node.names[0].name == name \
        and node.names[0].asname is None


def _calls_install(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    func = node.value.func
    return isinstance(func, ast.Attribute) and func.attr == "install_apex_alias" \
        and isinstance(func.value, ast.Name) and func.value.id == "ampcompat"


def alias_line_edit(text: SourceText, tree: ast.Module) -> Optional[Tuple[Edit, int]]:
    """The insertion of the alias line, and the (original) line it goes above; ``None`` if no safe place.

    The place is the start of the first statement after the docstring and ``from __future__`` imports
    (above its decorators), provided that statement starts its line; or the end of the file when the
    module has nothing else.
    """
    body = tree.body
    index = 0
    if body and _is_docstring(body[0]):
        index = 1
    while index < len(body) and isinstance(body[index], ast.ImportFrom) and body[index].module == "__future__":
        index += 1
    if index == len(body):
        return _at_end(text, body)
    statement = body[index]
    lineno = _first_line(statement)
    if not text.line(lineno)[: _column_of(text, statement, lineno)].strip(" \t\f") == "":
        return None
    start = text.line_start(lineno)
    return Edit(start, start, ALIAS_LINE + text.newline(lineno)), lineno


def _at_end(text: SourceText, body: List[ast.stmt]) -> Optional[Tuple[Edit, int]]:
    if body and not text.owns_lines(body[-1]):
        return None
    end = len(text.text)
    newline = text.newline(1)
    separator = newline if text.text and not text.text.endswith(("\n", "\r")) else ""
    return Edit(end, end, separator + ALIAS_LINE + newline), len(text.line_starts) + (1 if separator else 0)


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _first_line(statement: ast.stmt) -> int:
    decorators = getattr(statement, "decorator_list", [])
    return min([statement.lineno] + [decorator.lineno for decorator in decorators])


def _column_of(text: SourceText, statement: ast.stmt, lineno: int) -> int:
    """Character column where the statement (or its first decorator's ``@``) begins on ``lineno``."""
    if lineno == statement.lineno:
        return text.offset(lineno, statement.col_offset) - text.line_start(lineno)
    line = text.line(lineno)
    return line.index("@") if "@" in line else len(line)
