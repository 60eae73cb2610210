"""The ``amp`` module passed as a value for checkpoint restore (SwAV: ``restart_from_checkpoint(..., amp=apex.amp)``).

Code that receives the module to save or restore amp's state with the model and the optimizer (``for key,
value in kwargs.items(): value.load_state_dict(checkpoint[key])``) needs only ``state_dict()`` and
``load_state_dict(state)``. Natively that is the GradScaler's state, so the module passed becomes an object
with those two methods: ``state_dict`` is the GradScaler's, and ``load_state_dict`` goes through the loader of
:mod:`native_checkpoint`, so a checkpoint Apex wrote (``{"loss_scaler0": ...}``) still restores the scale. Any
other attribute the receiver reads fails loudly (``AttributeError``), never silently. Only the module passed
as an argument of a call qualifies; other uses of it as a value stay on ampcompat.
"""
from __future__ import annotations

import ast

from .syntax import Parents

NOTE = ("the amp module passed here (to save or restore amp's state) is now an object with the GradScaler's "
        "state_dict() and a load_state_dict() that also reads Apex's checkpoints, through {loader}(); other "
        "attributes of amp are not on it")


def passed_to_a_call(node: ast.AST, parents: Parents) -> bool:
    """Whether ``node`` (the amp module) is an argument of a call, positional or by keyword, not unpacked."""
    parent = parents.get(node)
    if isinstance(parent, ast.keyword) and parent.arg is not None:
        parent = parents.get(parent)
        return isinstance(parent, ast.Call)
    return isinstance(parent, ast.Call) and any(arg is node for arg in parent.args)


def state_object(scaler: str, loader: str) -> str:
    """The expression that stands for the amp module: the GradScaler's state methods."""
    return (f"types.SimpleNamespace(state_dict={scaler}.state_dict, "
            f"load_state_dict=lambda state: {scaler}.load_state_dict({loader}(state)))")
