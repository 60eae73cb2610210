"""Reading a call's arguments from its syntax tree, by keyword or by Apex's positional order."""
from __future__ import annotations

import ast
from typing import Any, Optional

NOT_LITERAL = object()
"""Returned by :func:`literal_value` for an expression whose value is only known at run time."""


def argument(call: ast.Call, keyword: str, position: Optional[int] = None) -> Optional[ast.expr]:
    """The expression passed for ``keyword`` (or at ``position``), or ``None`` if it was not passed.

    Args:
        call: the call node.
        keyword: the parameter's name.
        position: its index in the callee's positional order, if it can be passed positionally.
    """
    for item in call.keywords:
        if item.arg == keyword:
            return item.value
    if position is not None and position < len(call.args):
        candidate = call.args[position]
        if not any(isinstance(arg, ast.Starred) for arg in call.args[: position + 1]):
            return candidate
    return None


def literal_value(node: Optional[ast.expr]) -> Any:
    """The Python value of a literal expression, ``None`` for no node, else :data:`NOT_LITERAL`."""
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _power_of_two(node)


def _power_of_two(node: ast.expr) -> Any:
    # ``2**16`` and ``2.**24`` are how loss scales are usually written; literal_eval refuses them.
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = literal_value(node.left), literal_value(node.right)
        if isinstance(base, (int, float)) and isinstance(exponent, int) and 0 <= exponent <= 64:
            return base**exponent
    return NOT_LITERAL


def has_starred(call: ast.Call) -> bool:
    """Whether the call unpacks ``*args`` or ``**kwargs`` (its arguments cannot be read statically)."""
    return any(isinstance(arg, ast.Starred) for arg in call.args) or any(k.arg is None for k in call.keywords)
