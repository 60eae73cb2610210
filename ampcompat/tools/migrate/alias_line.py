"""The line ``migrate --write`` adds so that code looking for Apex by name still finds it.

After ``from apex import amp`` becomes ``from ampcompat import amp``, nothing imports a module named
``apex`` any more: ``"apex" in sys.modules``, ``importlib.util.find_spec("apex")``, metadata lookups
and libraries' own ``is_apex_available()`` would all say "no Apex", and the program would leave its
Apex path. The added line installs ampcompat's import alias (which answers those questions as an
installed Apex would) and imports ``apex`` through it, as the original import did::

    import ampcompat; ampcompat.install_apex_alias(); import apex  # noqa: E702 -- ampcompat migrate: ...

It goes at the top of the module (after the docstring and ``from __future__`` imports), so it runs
before any check in the file, and is recognised on later runs, which leave it alone.

Where the file ran without Apex before (its Apex imports are optional: inside ``try``/``except
ImportError``, in a function or under an ``if``), the line is guarded the same way, so that a machine
without ampcompat still takes the program's own fallback::

    try:  # ampcompat migrate: code that looks for Apex by name (sys.modules, find_spec, metadata) still finds it
        import ampcompat; ampcompat.install_apex_alias(); import apex  # noqa: E702
    except ImportError:  # no ampcompat here: the program's own fallbacks for a missing Apex apply
        pass
"""
from __future__ import annotations

import ast
from typing import List, Optional, Set, Tuple

from .edits import Edit, SourceText
from .syntax import is_docstring

ALIAS_STATEMENTS = "import ampcompat; ampcompat.install_apex_alias(); import apex"
ALIAS_LINE = (ALIAS_STATEMENTS + "  # noqa: E702 -- ampcompat migrate: code that looks for Apex by name "
              "(sys.modules, find_spec, metadata) still finds it")


GUARDED_ALIAS_LINES = (
    "try:  # ampcompat migrate: code that looks for Apex by name (sys.modules, find_spec, metadata) still finds it",
    "    " + ALIAS_STATEMENTS + "  # noqa: E702",
    "except ImportError:  # no ampcompat here: the program's own fallbacks for a missing Apex apply",
    "    pass",
)


def alias_line_statements(tree: ast.Module) -> List[ast.stmt]:
    """The module-level statements of an alias line already in ``tree``: its three statements, or the
    guarding ``try`` (empty if there is none)."""
    body = tree.body
    for index, statement in enumerate(body):
        if _is_alias_triple(body[index : index + 3]):
            return body[index : index + 3]
        if isinstance(statement, ast.Try) and _is_alias_triple(statement.body) and len(statement.body) == 3 \
                and len(statement.handlers) == 1 and not statement.orelse and not statement.finalbody \
                and _is_import_error(statement.handlers[0]):
            return [statement]
    return []


def alias_line_nodes(tree: ast.Module) -> Set[int]:
    """``id()`` of the top-level statements of an alias line already in ``tree`` (empty if there is none)."""
    return {id(statement) for statement in alias_line_statements(tree)}


def _is_alias_triple(statements: List[ast.stmt]) -> bool:
    return len(statements) >= 3 and _imports(statements[0], "ampcompat") and _calls_install(statements[1]) \
        and _imports(statements[2], "apex")


def _is_import_error(handler: ast.ExceptHandler) -> bool:
    return isinstance(handler.type, ast.Name) and handler.type.id == "ImportError" and handler.name is None \
        and len(handler.body) == 1 and isinstance(handler.body[0], ast.Pass)


def alias_line_text(newline: str, guarded: bool) -> str:
    """The alias line (or its guarded form), each line ended by ``newline``."""
    lines = GUARDED_ALIAS_LINES if guarded else (ALIAS_LINE,)
    return "".join(line + newline for line in lines)


def alias_line_removal(text: SourceText, statements: List[ast.stmt]) -> Edit:
    """The edit that deletes an alias line found by :func:`alias_line_statements` (whole lines)."""
    first, last = statements[0], statements[-1]
    return Edit(text.line_start(first.lineno), text.line_end(last.end_lineno), "")  # type: ignore[arg-type]


def _imports(node: ast.stmt, name: str) -> bool:
    return isinstance(node, ast.Import) and len(node.names) == 1 and node.names[0].name == name \
        and node.names[0].asname is None


def _calls_install(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    func = node.value.func
    return isinstance(func, ast.Attribute) and func.attr == "install_apex_alias" \
        and isinstance(func.value, ast.Name) and func.value.id == "ampcompat"


def alias_line_edit(text: SourceText, tree: ast.Module, guarded: bool = False) -> Optional[Tuple[Edit, int]]:
    """The insertion of the alias line, and the (original) line it goes above; ``None`` if no safe place.

    Args:
        text: the file's text.
        tree: its module.
        guarded: insert the ``try``/``except ImportError`` form.
    """
    place = top_of_module(text, tree)
    if place is None:
        return None
    offset, lineno = place
    newline = text.newline(lineno) if lineno <= len(text.line_starts) else text.newline(1)
    separator = newline if offset == len(text.text) and text.text and not text.text.endswith(("\n", "\r")) else ""
    return Edit(offset, offset, separator + alias_line_text(newline, guarded)), lineno


def top_of_module(text: SourceText, tree: ast.Module) -> Optional[Tuple[int, int]]:
    """Where a module-level line goes that must run before the program: (offset, line number).

    That is the start of the line of the first statement after the docstring and ``from __future__``
    imports (above its decorators, below leading comments), or the end of the file when the module
    has nothing else; ``None`` when that statement does not start its line.
    """
    body = tree.body
    index = 1 if body and is_docstring(body[0]) else 0
    while index < len(body) and isinstance(body[index], ast.ImportFrom) and body[index].module == "__future__":
        index += 1
    if index == len(body):
        if body and not text.owns_lines(body[-1]):
            return None
        return len(text.text), len(text.line_starts) + (0 if text.text.endswith(("\n", "\r")) or not text.text else 1)
    statement = body[index]
    lineno = _first_line(statement)
    if not text.line(lineno)[: _column_of(text, statement, lineno)].strip(" \t\f") == "":
        return None
    return text.line_start(lineno), lineno


def _first_line(statement: ast.stmt) -> int:
    decorators = getattr(statement, "decorator_list", [])
    return min([statement.lineno] + [decorator.lineno for decorator in decorators])


def _column_of(text: SourceText, statement: ast.stmt, lineno: int) -> int:
    """Character column where the statement (or its first decorator's ``@``) begins on ``lineno``."""
    if lineno == statement.lineno:
        return text.offset(lineno, statement.col_offset) - text.line_start(lineno)
    line = text.line(lineno)
    return line.index("@") if "@" in line else len(line)
