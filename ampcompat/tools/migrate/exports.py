"""Which names a file exports to the rest of the scanned tree (so ``--to-native`` must keep them bound).

A name is exported when the file lists it in ``__all__``, or when another scanned file imports it
from this one (``from .compat import LayerNorm``, ``import pkg.compat as c; c.LayerNorm``,
``from compat import *``). Modules are matched by their last dotted component against the file's
name (``compat.py``; a package's ``__init__.py`` by its folder's name): a coincidence of names can
only keep a name that could have gone, never drop one that is needed.

Only files whose text spells one of those module names as a word, and one of the names wanted or a
star import, are parsed: on a large tree almost every file is ruled out by a text search.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from .sources import SourceFile, load_source
from .syntax import dotted_name

STAR = "*"
"""Stands for "every public name" in the sets :func:`imported_from` returns."""


def module_name_of(path: str) -> str:
    """The last dotted component other modules import this file by (``pkg/compat.py`` -> ``compat``)."""
    folder, name = os.path.split(os.path.normpath(path))
    stem = os.path.splitext(name)[0]
    return os.path.basename(folder) if stem == "__init__" else stem


def listed_in_all(tree: ast.Module) -> Set[str]:
    """The string literals assigned or added to ``__all__`` at the module's top level."""
    names: Set[str] = set()
    for node in tree.body:
        value: Optional[ast.expr] = None
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            value = node.value
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name) \
                and node.target.id == "__all__":
            value = node.value
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func  # __all__.append("x") / __all__.extend([...])
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "__all__":
                value = ast.List(elts=list(node.value.args), ctx=ast.Load())
        if value is not None:
            names.update(_strings_in(value))
    return names


def _strings_in(node: ast.AST) -> Iterable[str]:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def imported_from(tree: ast.Module, module: str) -> Set[str]:
    """Names ``tree`` takes from a module whose last component is ``module`` (``STAR`` for ``import *``)."""
    return imports_by_module(tree).get(module, set())


def imports_by_module(tree: ast.Module) -> Dict[str, Set[str]]:
    """For every module ``tree`` imports from, keyed by its last component: the names it takes.

    ``from a.compat import X`` and ``from .compat import *`` name them directly; after
    ``import a.compat as c`` or ``from a import compat``, every ``c.X`` / ``compat.X`` counts too.
    """
    found: Dict[str, Set[str]] = {}
    module_aliases: Dict[str, str] = {}  # local name -> module's last component
    dotted_imports: Dict[Tuple[str, ...], str] = {}  # ("a", "b", "compat") -> "compat"
    nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            tail = (node.module or "").split(".")[-1]
            if tail:
                found.setdefault(tail, set()).update(STAR if a.name == "*" else a.name for a in node.names)
            for alias in node.names:  # from pkg import compat [as c]
                if alias.name != "*":
                    module_aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if alias.asname:
                    module_aliases[alias.asname] = parts[-1]
                elif len(parts) == 1:
                    module_aliases[parts[0]] = parts[0]
                else:
                    dotted_imports[tuple(parts)] = parts[-1]
    for node in nodes:
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            found.setdefault(module_aliases[node.value.id], set()).add(node.attr)
        elif dotted_imports and isinstance(node.value, ast.Attribute):
            chain = dotted_name(node.value)
            if chain is not None and tuple(chain) in dotted_imports:
                found.setdefault(dotted_imports[tuple(chain)], set()).add(node.attr)
    return found



def exported_names(apex_files: Dict[str, Set[str]], sources: Dict[str, SourceFile],
                   other_paths: Iterable[str]) -> Dict[str, Set[str]]:
    """For each file in ``apex_files``, the names among those given that other files import from it.

    Args:
        apex_files: path -> the names it binds that may need keeping (bound by Apex imports).
        sources: the parsed files already at hand (path -> source).
        other_paths: the rest of the scanned tree; read and parsed only if they mention one of the names.

    Returns:
        path -> the names another file imports (``STAR`` if one star-imports the module).
    """
    wanted = {path: names for path, names in apex_files.items() if names}
    exported: Dict[str, Set[str]] = {path: set() for path in apex_files}
    if not wanted:
        return exported
    by_module: Dict[str, List[str]] = {}
    for path in wanted:
        by_module.setdefault(module_name_of(path), []).append(path)
    module_words = _words(by_module)
    name_words = re.compile(r"import\s*\*|" + _words({name for names in wanted.values() for name in names}).pattern)

    def may_import(text: str) -> bool:
        return bool(module_words.search(text) and name_words.search(text))

    for path, tree in [(p, s.tree) for p, s in sources.items() if may_import(s.text)] + [(p, None) for p in other_paths]:
        if tree is None:
            tree = _parse_if_mentions(path, may_import)
            if tree is None:
                continue
        imports = imports_by_module(tree)
        for module in by_module.keys() & imports.keys():
            names = imports[module]
            for target in by_module[module]:
                if target != path:
                    exported[target] |= names & (wanted[target] | {STAR})
    return exported


def _words(words: Iterable[str]) -> "re.Pattern[str]":
    """A pattern matching any of ``words`` as a whole identifier."""
    return re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, words))) + r")\b")


def _parse_if_mentions(path: str, worth_parsing: Callable[[str], bool]) -> Optional[ast.Module]:
    source = load_source(path, worth_parsing)
    return source.tree if isinstance(source, SourceFile) else None
