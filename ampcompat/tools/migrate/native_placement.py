"""Where the names ``amp.initialize`` becomes are created, and how each use reaches them.

``amp.initialize`` becomes a few assignments (the autocast device type, the GradScaler, ...) that the
training loop reads. Apex kept its state process-wide, so its calls could sit anywhere; native names
have to be visible where they are read:

* **in the same function**, the assignments go where ``amp.initialize`` was -- or, when it ran under
  ``if args.fp16:`` (or ``enabled=...``) and the loop also runs without it, before the outermost such
  ``if``, with ``enabled=`` the same condition, so the GradScaler exists on both paths and is a no-op
  where Apex was off;
* **in other methods of the same class**, they become attributes of the instance (``self.scaler``);
* **in other functions of the module**, they are module globals (a ``global`` statement where they are
  created), as Apex's own state was.

A condition is evaluated once more, earlier: it must be a plain expression (names, attributes,
constants, comparisons, ``not``/``and``/``or``) whose names nothing between the two places rebinds.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Set, Tuple

from .syntax import Parents, block_of, comes_before, loaded_names, stored_names, walk_local

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_TRANSPARENT = (ast.If, ast.Try, ast.With, ast.AsyncWith)
"""Statements ``amp.initialize`` may sit in when the names it becomes are created before them."""
_PLAIN = (ast.Name, ast.Attribute, ast.Constant, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Subscript, ast.Load,
          ast.BinOp, ast.JoinedStr, ast.FormattedValue, ast.Tuple, ast.List, ast.boolop, ast.cmpop, ast.operator,
          ast.unaryop, ast.expr_context, ast.IfExp)


@dataclass(frozen=True)
class Condition:
    """One condition the GradScaler is enabled under: ``test`` (its source), true or false (``holds``)."""

    node: ast.expr
    text: str
    holds: bool

    def spelled(self) -> str:
        return self.text if self.holds else f"not ({self.text})"

    def matches(self, test: ast.expr, holds: bool) -> bool:
        """Whether ``if test`` (entered when it is ``holds``) is this condition."""
        return ast.unparse(test) == ast.unparse(self.node) and holds == self.holds


@dataclass
class Placement:
    """Where the created names live.

    Attributes:
        anchor: the statement the creation lines go before (``amp.initialize``'s own statement, or the
            outermost ``if`` that guarded it).
        conditions: the conditions ``amp.initialize`` ran under (the GradScaler's ``enabled=``).
        mode: ``local`` (plain names in the function, its closures and, at module level, everywhere),
            ``self`` (attributes of the instance) or ``global`` (module globals).
        owner: for ``self``: the class whose methods read the names.
        blockers: why the names cannot be placed (empty when they can).
    """

    anchor: ast.stmt
    conditions: List[Condition] = field(default_factory=list)
    mode: str = "local"
    owner: Optional[ast.ClassDef] = None
    blockers: List[Tuple[ast.AST, str]] = field(default_factory=list)
    guards: List[ast.If] = field(default_factory=list)
    """The ``if`` statements between the anchor (inclusive) and ``amp.initialize``."""

    def access(self, name: str, node: ast.AST, parents: Parents) -> str:
        """How code at ``node`` spells the created name ``name``."""
        if self.mode != "self":
            return name
        function = _enclosing_method(node, parents)
        assert function is not None and function.args.args
        return f"{(function.args.posonlyargs + function.args.args)[0].arg}.{name}"

    def declaration(self, names: Sequence[str]) -> List[str]:
        """The ``global`` line the creation needs (empty unless ``global``)."""
        return [f"global {', '.join(names)}"] if self.mode == "global" else []


def place(statement: ast.stmt, init_call: ast.Call, uses: Sequence[ast.AST], parents: Parents,
          model_ref: ast.expr, enabled: Optional[ast.expr], is_presence_check: Callable[[ast.expr], Optional[bool]],
          evaluated: Sequence[ast.expr] = ()) -> Placement:
    """Decide where the names ``amp.initialize`` (``statement``) becomes go.

    Args:
        statement: the statement holding the ``amp.initialize`` call.
        init_call: the call.
        uses: the nodes that read the created names (amp calls, optimizer steps, forward passes).
        parents: the file's parent links.
        model_ref: the model passed to ``amp.initialize`` (its device is read where the names are created).
        enabled: the ``enabled=`` argument, when it is not a literal.
        is_presence_check: for an ``if`` test, the answer it gives under ampcompat when it only asks
            whether amp is there (``amp is not None``), else ``None``.
        evaluated: other arguments of ``amp.initialize`` the creation reads (a runtime ``opt_level``).

    Returns:
        The placement; ``blockers`` says why there is none.
    """
    function = _scope(statement, parents)
    placement = Placement(statement)
    if isinstance(function, (ast.ClassDef, ast.Lambda)):
        placement.blockers.append((init_call, "amp.initialize runs in a class body; rewrite by hand"))
        return placement
    local = [use for use in uses if _within(use, function, parents) and not (
        isinstance(function, ast.Module) and _in_function_or_class(use, parents))]
    chain = _guard_chain(statement, function, parents)
    anchor_index = 0 if len(local) == len(uses) else len(chain) - 1  # other functions run whatever the guards said
    while not all(_dominates(chain[anchor_index][0], use, parents) for use in local):
        anchor_index += 1
        if anchor_index == len(chain):
            first = next(use for use in local if not _dominates(chain[-1][0], use, parents))
            placement.blockers.append((first, "amp.initialize runs in a branch or block that does not lead here, so "
                                              "the GradScaler it becomes would not exist here: rewrite by hand"))
            return placement
    anchor = chain[anchor_index][0]
    placement.anchor = anchor
    conditions: List[Condition] = []
    for guard, holds in chain[1 : anchor_index + 1]:
        answer = is_presence_check(guard.test)  # type: ignore[attr-defined]
        if answer is not None:
            if answer != holds:
                placement.blockers.append((guard, "amp.initialize runs only where amp is missing; rewrite by hand"))
            continue
        conditions.append(Condition(guard.test, ast.unparse(guard.test), holds))  # type: ignore[attr-defined]
        placement.guards.append(guard)  # type: ignore[arg-type]
    if enabled is not None:
        conditions.append(Condition(enabled, ast.unparse(enabled), True))
    placement.conditions = conditions
    _check_conditions(placement, statement, init_call, model_ref, parents, evaluated)
    _choose_mode(placement, function, [use for use in uses if use not in local], init_call, parents)
    return placement


def _guard_chain(statement: ast.stmt, function: ast.AST, parents: Parents) -> List[Tuple[ast.stmt, bool]]:
    """``statement`` and the statements around it it could be created before: ``(statement, holds)`` where
    ``holds`` says which branch of an ``if`` the chain goes through."""
    chain: List[Tuple[ast.stmt, bool]] = [(statement, True)]
    current: ast.stmt = statement
    while True:
        parent = parents.get(current)
        if parent is None or parent is function or not isinstance(parent, _TRANSPARENT):
            return chain
        if isinstance(parent, ast.Try) and not any(current is item for item in parent.body):
            return chain
        holds = not (isinstance(parent, ast.If) and any(current is item for item in parent.orelse))
        chain.append((parent, holds))
        current = parent


def _dominates(anchor: ast.stmt, node: ast.AST, parents: Parents) -> bool:
    """Whether code created just before ``anchor`` has run whenever ``node`` runs."""
    current: Optional[ast.AST] = node
    while current is not None:
        if current is anchor:
            return True
        current = parents.get(current)
    return comes_before(anchor, node, parents)


def _check_conditions(placement: Placement, statement: ast.stmt, init_call: ast.Call, model_ref: ast.expr,
                      parents: Parents, evaluated: Sequence[ast.expr]) -> None:
    """The conditions, the model and the other arguments read must mean at the anchor what they meant at
    ``amp.initialize``."""
    between = _statements_between(placement.anchor, statement, parents)
    changed: Set[str] = set()
    for item in between:
        changed |= stored_names(item) | _stored_roots(item)
    expressions = [condition.node for condition in placement.conditions] + list(evaluated)
    for expression in expressions:
        spelled = ast.unparse(expression)
        if not all(isinstance(node, _PLAIN) for node in ast.walk(expression)):
            placement.blockers.append((init_call, f"`{spelled}` would be evaluated once more, where the GradScaler is "
                                                  "created, and it is not a plain expression (it calls something); "
                                                  "assign it to a variable first"))
        elif placement.anchor is not statement and loaded_names(expression) & changed:
            placement.blockers.append((init_call, f"`{spelled}` may change between where the GradScaler is created "
                                                  "and where amp.initialize ran; rewrite by hand"))
    root = _root(model_ref)
    for item in between:
        moves = [node for node in walk_local(item) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr in ("to", "cuda", "cpu") and _root(node.func.value) == root]
        if root in stored_names(item) | _stored_roots(item) or moves:
            placement.blockers.append((init_call, f"`{ast.unparse(model_ref)}` is built or moved inside the `if` that "
                                                  "guards amp.initialize, so its device is not known before it; "
                                                  "rewrite by hand"))
            return


def _statements_between(anchor: ast.stmt, statement: ast.stmt, parents: Parents) -> List[ast.stmt]:
    """The statements that run inside ``anchor`` before ``statement`` (the earlier siblings on the way down)."""
    found: List[ast.stmt] = []
    current: ast.stmt = statement
    while current is not anchor:
        block, index = block_of(current, parents)
        found.extend(block[:index])
        current = parents[current]  # type: ignore[assignment]
    return found


def _choose_mode(placement: Placement, function: ast.AST, elsewhere: List[ast.AST], init_call: ast.Call,
                 parents: Parents) -> None:
    if not elsewhere or isinstance(function, ast.Module):
        return
    owner = parents.get(function)
    if isinstance(owner, ast.ClassDef) and _has_self(function):
        methods = [_enclosing_method(use, parents) for use in elsewhere]
        if all(method is not None and parents.get(method) is owner and _has_self(method) for method in methods):
            placement.mode, placement.owner = "self", owner
            return
    placement.mode = "global"


def _has_self(function: ast.AST) -> bool:
    if not isinstance(function, _FUNCTIONS):
        return False
    decorators = {ast.unparse(d) for d in function.decorator_list}
    return bool(function.args.posonlyargs + function.args.args) and not decorators & {"staticmethod", "classmethod"}


def _enclosing_method(node: ast.AST, parents: Parents) -> Optional[ast.FunctionDef]:
    """The outermost function around ``node`` that is defined in a class body."""
    current: Optional[ast.AST] = node
    found = None
    while current is not None:
        parent = parents.get(current)
        if isinstance(current, _FUNCTIONS) and isinstance(parent, ast.ClassDef):
            found = current
        current = parent
    return found  # type: ignore[return-value]


def _scope(node: ast.AST, parents: Parents) -> ast.AST:
    current = parents.get(node)
    while current is not None and not isinstance(current, (ast.Module, ast.ClassDef, ast.Lambda) + _FUNCTIONS):
        current = parents.get(current)
    assert current is not None
    return current


def _within(node: ast.AST, function: ast.AST, parents: Parents) -> bool:
    """Whether ``node`` lies in ``function`` (in its body or in a function nested in it)."""
    if isinstance(function, ast.Module):
        return _scope(node, parents) is function or not _in_function_or_class(node, parents)
    current: Optional[ast.AST] = parents.get(node)
    while current is not None:
        if current is function:
            return True
        current = parents.get(current)
    return False


def _in_function_or_class(node: ast.AST, parents: Parents) -> bool:
    current = parents.get(node)
    while current is not None:
        if isinstance(current, _FUNCTIONS + (ast.ClassDef, ast.Lambda)):
            return True
        current = parents.get(current)
    return False


def _root(node: ast.AST) -> str:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def _stored_roots(statement: ast.AST) -> Set[str]:
    """Root names of attribute and item assignments (``args.fp16 = ...`` -> ``args``)."""
    roots: Set[str] = set()
    for node in walk_local(statement):
        if isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Store):
            roots.add(_root(node))
    return roots
