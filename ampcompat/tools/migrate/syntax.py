"""Navigating a parsed file: enclosing statements, blocks and scopes, and the names statements use."""
from __future__ import annotations

import ast
from typing import Dict, Iterator, List, Optional, Set, Tuple, Union

Parents = Dict[ast.AST, ast.AST]

_SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
BLOCK_FIELDS = ("body", "orelse", "finalbody")
"""The fields of a node that hold a block of statements."""


def statement_of(node: ast.AST, parents: Parents) -> ast.stmt:
    """The innermost statement containing ``node`` (``node`` itself if it is one)."""
    while not isinstance(node, ast.stmt):
        node = parents[node]
    return node


def scope_of(node: ast.AST, parents: Parents) -> ast.AST:
    """The innermost module, function, class or lambda whose names ``node`` sees first."""
    node = parents.get(node)  # type: ignore[assignment]
    while node is not None and not isinstance(node, _SCOPES):
        node = parents.get(node)  # type: ignore[assignment]
    assert node is not None, "every node lies inside the module"
    return node


def block_of(statement: ast.stmt, parents: Parents) -> Tuple[List[ast.stmt], int]:
    """The statement list holding ``statement`` and its index there."""
    parent = parents[statement]
    for field in BLOCK_FIELDS:
        block = getattr(parent, field, None)
        if isinstance(block, list) and any(item is statement for item in block):
            return block, next(i for i, item in enumerate(block) if item is statement)
    raise ValueError("statement is not in a block of its parent")


def comes_before(first: ast.stmt, node: ast.AST, parents: Parents) -> bool:
    """Whether ``first`` runs before ``node`` on every path into it within ``first``'s scope.

    True when ``first`` sits in a block that also (directly or through nesting) holds ``node``,
    earlier in that block. A statement in the module's top level also counts as coming before any
    node inside a function, which sees it as a global.
    """
    scope = scope_of(first, parents)
    if isinstance(scope, ast.Module) and not isinstance(scope_of(node, parents), ast.Module):
        return True
    first_block, first_index = block_of(first, parents)
    current: Optional[ast.AST] = node
    while current is not None and current is not scope:
        if isinstance(current, ast.stmt):
            block, index = block_of(current, parents)
            if block is first_block:
                return index > first_index
        current = parents.get(current)
    return False


def stored_names(statement: ast.AST) -> Set[str]:
    """Names a statement assigns anywhere inside it (not inside nested functions or classes)."""
    return {node.id for node in walk_local(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def loaded_names(statement: ast.AST) -> Set[str]:
    """Names a statement reads anywhere inside it (not inside nested functions or classes)."""
    return {node.id for node in walk_local(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def walk_local(root: ast.AST) -> Iterator[ast.AST]:
    """``ast.walk`` that does not descend into nested functions, classes or lambdas."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                stack.append(child)


def same_expression(a: Optional[ast.AST], b: Optional[ast.AST]) -> bool:
    """Whether two expressions are spelled the same (ignoring positions and formatting)."""
    if a is None or b is None:
        return False
    return ast.unparse(a) == ast.unparse(b)


def is_plain_reference(node: Optional[ast.AST]) -> bool:
    """A name or attribute chain (``model``, ``self.model``): safe to evaluate again."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def dotted_name(node: ast.AST) -> Optional[List[str]]:
    """``a.b.c`` -> ``["a", "b", "c"]``; ``None`` for anything that is not a plain dotted name."""
    parts: List[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def root_name(node: ast.AST) -> ast.AST:
    """``amp`` in ``amp.initialize(...)`` / ``apex.parallel.X``: the node a use's chain starts from."""
    if isinstance(node, ast.Call):
        node = node.func
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def is_docstring(statement: ast.stmt) -> bool:
    """Whether ``statement`` is a bare string literal (a docstring where it comes first)."""
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
        and isinstance(statement.value.value, str)


def binds_module(statement: ast.stmt, module: str) -> bool:
    """Whether ``statement`` is an ``import`` binding ``module``'s name to that module (``import torch``,
    ``import torch.nn``, ``import torch as torch``)."""
    return isinstance(statement, ast.Import) and any(
        (alias.asname is None and alias.name.split(".")[0] == module) or (alias.asname == module == alias.name)
        for alias in statement.names)


def enclosing(node: ast.AST, kinds: Union[type, Tuple[type, ...]], parents: Parents) -> Optional[ast.AST]:
    """The nearest ancestor of ``node`` that is an instance of ``kinds``, or ``None``."""
    current = parents.get(node)
    while current is not None and not isinstance(current, kinds):
        current = parents.get(current)
    return current
