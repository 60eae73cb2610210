"""``--to-native`` for two ``amp.initialize`` calls that are one: the two branches of an ``if``.

NVIDIA's BERT ``run_squad.py`` chooses the loss scale with the call itself::

    if args.loss_scale == 0:
        model, optimizer = amp.initialize(model, optimizer, opt_level="O2", loss_scale="dynamic")
    else:
        model, optimizer = amp.initialize(model, optimizer, opt_level="O2", loss_scale=args.loss_scale)

Exactly one of them runs, on the same model and optimizer, at the same level, so both become the same
native recipe: one GradScaler, created before the ``if`` (:mod:`native_placement` places it as for one call
standing where the ``if`` stands), and each branch keeps only what its own options need (the check that
stops a run given a static loss scale, which a GradScaler does not have), or ``pass``. Anything else about
the two calls -- other arguments, other targets, a level, ``enabled`` or ``num_losses`` that differ, a call
that is not the first statement of its branch, ``elif`` chains -- keeps "called more than once".
"""
from __future__ import annotations

import ast
from typing import Optional, Sequence

from .callargs import argument
from .scanner import Use
from .syntax import Parents, statement_of

_COMPARED = (("models", 0), ("optimizers", 1), ("opt_level", 3), ("num_losses", None), ("enabled", None))
"""The arguments both calls must spell the same (the loss-scale options may differ: each branch checks its own)."""


def branch_pair(inits: Sequence[Use], parents: Parents) -> Optional[ast.If]:
    """The ``if`` whose body starts with one of the two calls' statements and whose ``else`` starts with the
    other, or ``None``."""
    if len(inits) != 2 or not all(isinstance(use.node, ast.Call) for use in inits):
        return None
    first, second = (statement_of(use.node, parents) for use in inits)
    owner = parents.get(first)
    if not isinstance(owner, ast.If) or parents.get(second) is not owner or not owner.orelse:
        return None
    if {id(owner.body[0]), id(owner.orelse[0])} != {id(first), id(second)}:
        return None
    return owner


def differences(first: ast.Call, second: ast.Call, parents: Parents) -> str:
    """Why the two calls are not the same conversion (an argument or the assigned names differ), or ``""``."""
    for name, position in _COMPARED:
        a, b = argument(first, name, position), argument(second, name, position)
        if (a is None) != (b is None) or (a is not None and ast.unparse(a) != ast.unparse(b)):  # type: ignore[arg-type]
            return (f"the two amp.initialize calls of this `if`/`else` differ in `{name}`: they would become different "
                    "native recipes; rewrite by hand")
    targets = [_targets(call, parents) for call in (first, second)]
    if targets[0] != targets[1]:
        return "the two amp.initialize calls of this `if`/`else` assign their results to different names; rewrite by hand"
    return ""


def _targets(call: ast.Call, parents: Parents) -> str:
    statement = parents.get(call)
    if isinstance(statement, ast.Assign):
        return " = ".join(ast.unparse(target) for target in statement.targets)
    return ""
