"""Which binding of a name each use of it sees, by Python's scoping rules and the flow between branches.

``from apex.parallel import DistributedDataParallel`` makes ``DistributedDataParallel`` Apex's class
only where that import reaches: not in a function with a parameter or a local of the same name, not
in the ``else`` branch that imports torch's class instead, not after a later rebinding. This module
answers, for every read of a name, the set of definitions (imports, assignments, parameters, ``def``
and ``class`` statements, ...) it may see at run time.

The rules are Python's: a name bound anywhere in a function is local to all of it (unless declared
``global`` or ``nonlocal``); class bodies do not enclose the functions defined in them; comprehensions
and lambdas are scopes of their own; a free name is looked up in the nearest enclosing function that
binds it, else among the module's globals, else the builtins. Within a scope, definitions flow along
the statements: ``if``/``else`` branches join, loops run their body zero or more times, an ``except``
handler can be entered from any point of its ``try`` block, ``return``/``raise``/``break``/``continue``
end a path. A function or lambda runs after it is defined, so a free name there sees every
definition that can happen from its ``def`` on; a class body and a list/set/dict comprehension run at
once and see the definitions at that point.

The analysis is static and safe in one direction: a use may be given a definition that cannot reach
it at run time (a closure called before a later rebinding, a branch Python would never take), never
denied one that can. Star imports bind only the names ``star_names`` says the module exports.
"""
from __future__ import annotations

import ast
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

from .edits import SourceText

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_SCOPE_NODES = (ast.Module, ast.ClassDef) + _FUNCTIONS + _COMPREHENSIONS
_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_TRY = (ast.Try,) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())  # type: ignore[attr-defined]


@dataclass(frozen=True, eq=False)
class Definition:
    """One place that binds a name.

    Attributes:
        name: the name bound.
        node: what binds it: an ``ast.alias`` (an import; ``*`` for a name a star import brings), an
            ``ast.Name`` in store context (assignment, ``for``/``with`` target, walrus), an ``ast.arg``
            (a parameter), a ``FunctionDef``/``AsyncFunctionDef``/``ClassDef``, an ``ExceptHandler``
            (``except E as name``) or a match pattern (``MatchAs``, ``MatchStar``, ``MatchMapping``).
        scope: the scope the name is bound in.
        statement: the statement that binds it (for a parameter, the function).
    """

    name: str
    node: ast.AST
    scope: "Scope"
    statement: ast.AST

    @property
    def is_import(self) -> bool:
        return isinstance(self.node, ast.alias)


@dataclass(eq=False)
class Scope:
    """A module, class, function, lambda or comprehension and the names bound in it.

    Attributes:
        node: the syntax node that opens the scope.
        parent: the enclosing scope (``None`` for the module).
        locals: names bound here (not declared ``global``/``nonlocal``).
        declared_global, declared_nonlocal: names declared so in this scope.
        statement: the statement of the parent scope that holds this scope's node.
    """

    node: ast.AST
    parent: Optional["Scope"]
    statement: Optional[ast.AST] = None
    locals: Set[str] = field(default_factory=set)
    declared_global: Set[str] = field(default_factory=set)
    declared_nonlocal: Set[str] = field(default_factory=set)
    mentions: Set[str] = field(default_factory=set)
    """Names read, bound or deleted in this scope's own code (not in nested scopes)."""

    @property
    def is_function(self) -> bool:
        return isinstance(self.node, _FUNCTIONS + _COMPREHENSIONS)

    @property
    def is_class(self) -> bool:
        return isinstance(self.node, ast.ClassDef)

    @property
    def runs_at_once(self) -> bool:
        """A class body or a list/set/dict comprehension runs where it is written; functions run later."""
        return isinstance(self.node, (ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp))


_Defs = FrozenSet[Definition]
_Env = Dict[str, _Defs]
_UNBOUND_MARK = ast.Pass()
"""Stands for "no binding yet" in the sets the flow analysis carries (never returned to callers)."""


class ScopeMap:
    """The definitions each read of a name may see, in one parsed module.

    Args:
        tree: the module.
        names: the names to follow (``None``: every name). Reads of other names are not resolved;
            following only the names of interest keeps large files cheap.
        star_names: for ``from MODULE import *``, the names ``MODULE`` exports, or ``None`` when
            unknown (then the star import is taken to bind nothing).
        text: the module's source; with ``names``, a function or class whose source spells none of
            them is not analysed at all (large files with a few uses of a few names stay cheap).
    """

    def __init__(self, tree: ast.Module, names: Optional[Collection[str]] = None,
                 star_names: Callable[[str], Optional[Collection[str]]] = lambda module: None,
                 text: Optional[SourceText] = None) -> None:
        self.tree = tree
        self._names = None if names is None else frozenset(names)
        self._text = text
        self._star_names = star_names
        self._parents: Dict[ast.AST, ast.AST] = {}
        self._scopes: Dict[ast.AST, Scope] = {}
        self._scope_of: Dict[ast.AST, Scope] = {}
        self._definitions: Dict[ast.AST, List[Definition]] = {}
        self._by_name: Dict[str, List[Definition]] = {}
        self._reads: Dict[ast.Name, Tuple[Scope, Optional[_Defs]]] = {}
        self._before: Dict[ast.AST, Optional[_Env]] = {}
        self._end: Dict[Scope, Optional[_Env]] = {}
        self._outside: Dict[Tuple[str, Scope], List[Definition]] = {}  # global/nonlocal writes from inner scopes
        self._resolved: Dict[ast.Name, _Defs] = {}
        self._views: Dict[Tuple[Scope, ast.AST, str, bool], _Defs] = {}
        self._reached_by: Optional[Dict[Definition, List[ast.Name]]] = None
        self.module = self._collect(tree, None, None)
        for scope in list(self._scopes.values()):
            if self._names is None or scope.mentions & self._names:  # nothing followed here: nothing to carry
                _Flow(self, scope).run()

    # -- queries -------------------------------------------------------------------------------
    def reaching(self, name: ast.Name) -> FrozenSet[Definition]:
        """The definitions a read (or ``del``) of ``name`` may see; empty for a builtin, an unbound name,
        or a name not followed."""
        found = self._resolved.get(name)
        if found is None:
            found = self._resolve(name)
            self._resolved[name] = found
        return found

    def definitions(self, name: str) -> List[Definition]:
        """Every definition of ``name`` in the module, in source order."""
        return list(self._by_name.get(name, ()))

    def definitions_at(self, node: ast.AST) -> List[Definition]:
        """The definitions ``node`` creates (an import alias, a stored ``Name``, a parameter, ...)."""
        return list(self._definitions.get(node, ()))

    def reads_of(self, definition: Definition) -> List[ast.Name]:
        """The reads (and ``del`` statements) of its name that ``definition`` may reach, in source order."""
        if self._reached_by is None:
            reached: Dict[Definition, List[ast.Name]] = {}
            for read in self._reads:
                for found in self.reaching(read):
                    reached.setdefault(found, []).append(read)
            for reads in reached.values():
                reads.sort(key=lambda node: (node.lineno, node.col_offset))
            self._reached_by = reached
        return list(self._reached_by.get(definition, ()))

    def scope_of(self, node: ast.AST) -> Scope:
        """The scope whose names ``node`` sees first."""
        current: Optional[ast.AST] = node
        while current is not None:
            scope = self._scope_of.get(current)
            if scope is not None:
                return scope
            current = self._parents.get(current)
        return self.module

    def parent(self, node: ast.AST) -> Optional[ast.AST]:
        return self._parents.get(node)

    def follows(self, name: str) -> bool:
        return self._names is None or name in self._names

    # -- pass 1: scopes and the names bound in each ------------------------------------------------
    def _collect(self, node: ast.AST, parent: Optional[Scope], statement: Optional[ast.AST]) -> Scope:
        scope = Scope(node, parent, statement)
        self._scopes[node] = scope
        body = _scope_body(node)
        if isinstance(node, _FUNCTIONS):
            for arg in _arguments(node.args):
                scope.locals.add(arg.arg)
                scope.mentions.add(arg.arg)
        if isinstance(node, _COMPREHENSIONS):
            for generator in node.generators:  # the targets are local; only the first iterable is outside
                for target in _stored_names(generator.target):
                    scope.locals.add(target.id)
        for child in body:
            self._scan(child, scope, child if isinstance(child, ast.stmt) else statement)
        scope.locals -= scope.declared_global | scope.declared_nonlocal
        return scope

    def _scan(self, node: ast.AST, scope: Scope, statement: Optional[ast.AST]) -> None:
        """Record bindings and declarations in ``node`` for ``scope``; open nested scopes."""
        stack: List[Tuple[ast.AST, Optional[ast.AST]]] = [(node, statement)]
        while stack:
            current, owner = stack.pop()
            if isinstance(current, ast.stmt):
                owner = current
            self._scope_of.setdefault(current, scope)
            if isinstance(current, ast.Global):
                scope.declared_global.update(current.names)
            elif isinstance(current, ast.Nonlocal):
                scope.declared_nonlocal.update(current.names)
            elif isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scope.locals.add(current.name)
                scope.mentions.add(current.name)
                outer = list(current.decorator_list)
                if isinstance(current, ast.ClassDef):
                    outer += current.bases + [k.value for k in current.keywords]
                else:
                    outer += _defaults_and_annotations(current)
                for child in outer:
                    self._parents[child] = current
                    stack.append((child, owner))
                if self._spells_a_followed_name(current):
                    self._enter(current, scope, owner)
                else:
                    self._scope_of[current] = scope
                continue
            elif isinstance(current, ast.Lambda):
                for child in current.args.defaults + [d for d in current.args.kw_defaults if d is not None]:
                    self._parents[child] = current
                    stack.append((child, owner))
                self._enter(current, scope, owner)
                continue
            elif isinstance(current, _COMPREHENSIONS):
                first = current.generators[0].iter
                self._parents[first] = current.generators[0]
                stack.append((first, owner))
                self._enter(current, scope, owner)
                continue
            elif isinstance(current, ast.Name):
                scope.mentions.add(current.id)
                if isinstance(current.ctx, (ast.Store, ast.Del)):
                    scope.locals.add(current.id)
            elif isinstance(current, ast.NamedExpr):
                self._walrus_scope(scope).locals.add(current.target.id)  # type: ignore[union-attr]
                self._walrus_scope(scope).mentions.add(current.target.id)  # type: ignore[union-attr]
            elif isinstance(current, (ast.Import, ast.ImportFrom)):
                for alias in current.names:
                    names = self._imported_names(current, alias)
                    scope.locals.update(names)
                    scope.mentions.update(names)
            elif isinstance(current, ast.ExceptHandler) and current.name:
                scope.locals.add(current.name)
                scope.mentions.add(current.name)
            elif isinstance(current, (ast.MatchAs, ast.MatchStar)) and current.name:
                scope.locals.add(current.name)
                scope.mentions.add(current.name)
            elif isinstance(current, ast.MatchMapping) and current.rest:
                scope.locals.add(current.rest)
                scope.mentions.add(current.rest)
            for child in ast.iter_child_nodes(current):
                self._parents[child] = current
                stack.append((child, owner))

    def _enter(self, node: ast.AST, scope: Scope, statement: Optional[ast.AST]) -> None:
        self._collect(node, scope, statement)
        self._scope_of[node] = scope  # the def/lambda/comprehension node itself belongs to the outer scope
        for child in _scope_body(node):
            self._parents[child] = node
        if isinstance(node, _COMPREHENSIONS):
            for index, generator in enumerate(node.generators):
                self._parents[generator] = node
                for child in ast.iter_child_nodes(generator):
                    if not (index == 0 and child is generator.iter):
                        self._parents[child] = generator

    def _spells_a_followed_name(self, node: ast.AST) -> bool:
        if self._text is None or self._names is None:
            return True
        start = self._text.line_start(node.lineno)  # type: ignore[attr-defined]
        end = self._text.line_end(node.end_lineno)  # type: ignore[attr-defined]
        segment = self._text.text[start:end]
        if not segment.isascii():  # Python reads identifiers NFKC-normalised (``ａｍｐ`` is ``amp``)
            segment = unicodedata.normalize("NFKC", segment)
        return any(name in segment for name in self._names)

    def _walrus_scope(self, scope: Scope) -> Scope:
        """``:=`` inside a comprehension binds in the nearest enclosing non-comprehension scope."""
        while isinstance(scope.node, _COMPREHENSIONS) and scope.parent is not None:
            scope = scope.parent
        return scope

    def _imported_names(self, statement: ast.stmt, alias: ast.alias) -> List[str]:
        if alias.name != "*":
            return [alias.asname or alias.name.split(".")[0]] if isinstance(statement, ast.Import) \
                else [alias.asname or alias.name]
        module = statement.module if isinstance(statement, ast.ImportFrom) and not statement.level else None
        exported = self._star_names(module) if module else None
        return sorted(exported or ())

    # -- definitions ---------------------------------------------------------------------------
    def define(self, name: str, node: ast.AST, scope: Scope, statement: ast.AST) -> Definition:
        """The definition of ``name`` by ``node`` (one object per pair, however often the flow passes it)."""
        for known in self._definitions.get(node, ()):
            if known.name == name:
                return known
        definition = Definition(name, node, scope, statement)
        self._definitions.setdefault(node, []).append(definition)
        self._by_name.setdefault(name, []).append(definition)
        return definition

    def record_read(self, name: ast.Name, scope: Scope, local: Optional[_Defs]) -> None:
        self._reads[name] = (scope, local)

    def record_outside(self, target: Scope, definition: Definition) -> None:
        self._outside.setdefault((definition.name, target), []).append(definition)

    def record_before(self, statement: ast.AST, env: Optional[_Env]) -> None:
        self._before[statement] = None if env is None else dict(env)

    def record_end(self, scope: Scope, env: Optional[_Env]) -> None:
        self._end[scope] = env

    # -- pass 3: resolving a read --------------------------------------------------------------
    def _resolve(self, name: ast.Name) -> _Defs:
        if name not in self._reads:
            return frozenset()
        scope, local = self._reads[name]
        identifier = name.id
        if identifier in scope.declared_global:
            return self._global_view(identifier, scope)
        if identifier in scope.declared_nonlocal:
            return self._free_view(identifier, scope, skip_self=True)
        if local is not None:
            found = set(local) | set(self._outside.get((identifier, scope), ()))
            unbound = _UNBOUND_MARK in {d.node for d in local}
            found = {d for d in found if d.node is not _UNBOUND_MARK}
            if unbound and scope.is_class:  # a class body falls back to the globals (LOAD_NAME)
                found |= self._global_view(identifier, scope)
            return frozenset(found)
        if scope is self.module:  # bound only by `global` statements in functions
            return frozenset(self._outside.get((identifier, scope), ()))
        return self._free_view(identifier, scope, skip_self=True)

    def _free_view(self, identifier: str, scope: Scope, skip_self: bool) -> _Defs:
        """A free name: the nearest enclosing function that binds it, else the globals."""
        inner, current = scope, scope.parent if skip_self else scope
        at_once = True
        while current is not None:
            at_once = at_once and inner.runs_at_once
            if current.node is self.tree:
                return self._view(current, inner, identifier, at_once)
            if not current.is_class and identifier in current.locals:
                return self._view(current, inner, identifier, at_once)
            if not current.is_class and identifier in current.declared_global:
                return self._global_view(identifier, current)
            inner, current = current, current.parent
        return frozenset()

    def _global_view(self, identifier: str, scope: Scope) -> _Defs:
        inner = scope
        at_once = True
        while inner.parent is not None and inner.parent.node is not self.tree:
            at_once = at_once and inner.runs_at_once
            inner = inner.parent
        at_once = at_once and inner.runs_at_once
        if inner.node is self.tree:
            return frozenset(d for d in self._end_defs(self.module, identifier) if d.node is not _UNBOUND_MARK)
        return self._view(self.module, inner, identifier, at_once)

    def _view(self, outer: Scope, inner: Scope, identifier: str, at_once: bool) -> _Defs:
        """What ``identifier`` of ``outer`` may be while code of its child scope ``inner`` runs."""
        point = inner.statement
        if point is None:
            return frozenset()
        key = (outer, point, identifier, at_once)
        cached = self._views.get(key)
        if cached is not None:
            return cached
        found: Set[Definition] = set()
        if isinstance(outer.node, (ast.Lambda,) + _COMPREHENSIONS):  # one expression: its names are set at once
            envs = [self._end.get(outer)]
        elif at_once:
            envs = [self._before.get(point)]
        else:
            envs = [self._before.get(s) for s in self._reachable_from(point, outer)] + [self._end.get(outer)]
        for env in envs:
            if env is not None:
                found.update(env.get(identifier, ()))
        found.update(self._outside.get((identifier, outer), ()))
        if _UNBOUND_MARK in {d.node for d in found} and outer.is_class:
            found |= self._global_view(identifier, outer)
        result = frozenset(d for d in found if d.node is not _UNBOUND_MARK)
        self._views[key] = result
        return result

    def _end_defs(self, scope: Scope, identifier: str) -> Set[Definition]:
        env = self._end.get(scope)
        found = set(env.get(identifier, ())) if env else set()
        return found | set(self._outside.get((identifier, scope), ()))

    def _reachable_from(self, statement: ast.AST, scope: Scope) -> Iterator[ast.AST]:
        """The statements of ``scope`` that may run after ``statement`` (itself included)."""
        yield from _nested_statements([statement])
        node = statement
        while node is not scope.node:
            parent = self._parents.get(node)
            if parent is None:
                return
            for field_name, block in _blocks(parent):
                if not any(item is node for item in block):
                    continue
                index = next(i for i, item in enumerate(block) if item is node)
                yield from _nested_statements(block[index + 1:])
                if isinstance(parent, _LOOPS) and field_name == "body":
                    yield from _nested_statements(parent.body + parent.orelse)
                if isinstance(parent, _TRY) and field_name == "body":
                    yield from _nested_statements([s for h in parent.handlers for s in h.body])
                    yield from _nested_statements(parent.orelse + parent.finalbody)
                elif isinstance(parent, _TRY) and field_name == "orelse":
                    yield from _nested_statements(parent.finalbody)
                elif isinstance(parent, ast.ExceptHandler):
                    owner = self._parents.get(parent)
                    if isinstance(owner, _TRY):
                        yield from _nested_statements(owner.finalbody)
            node = parent


class _Flow:
    """Carries the definitions of one scope's names along its statements (the reaching definitions)."""

    def __init__(self, owner: ScopeMap, scope: Scope) -> None:
        self.owner = owner
        self.scope = scope
        self.tracked = {name for name in scope.locals if owner.follows(name)}
        self.breaks: List[List[Optional[_Env]]] = []
        self.continues: List[List[Optional[_Env]]] = []
        self.handlers: List[List[Optional[_Env]]] = []  # open try blocks: every state seen inside them
        self._unbound = Definition("", _UNBOUND_MARK, scope, scope.node)

    def run(self) -> None:
        node = self.scope.node
        env: Optional[_Env] = {name: frozenset([self._unbound]) for name in self.tracked}
        if isinstance(node, _FUNCTIONS):
            for arg in _arguments(node.args):
                self._bind(env, arg.arg, arg, node)
        if isinstance(node, _COMPREHENSIONS):
            env = self._comprehension(node, env)
            self.owner.record_end(self.scope, env)
            return
        if isinstance(node, ast.Lambda):
            self._expression(node.body, env)
            self.owner.record_end(self.scope, env)
            return
        env = self._block(_scope_body(node), env)
        self.owner.record_end(self.scope, env)

    # -- environments --------------------------------------------------------------------------
    def _bind(self, env: Optional[_Env], name: str, node: ast.AST, statement: ast.AST) -> None:
        target = self.scope
        if name in self.scope.declared_global or name in self.scope.declared_nonlocal:
            target = self._declared_target(name)
        if target is None or not self.owner.follows(name):
            return
        definition = self.owner.define(name, node, target, statement)
        if target is not self.scope:
            self.owner.record_outside(target, definition)
        elif env is not None and name in self.tracked:
            env[name] = frozenset([definition])

    def _declared_target(self, name: str) -> Optional[Scope]:
        if name in self.scope.declared_global:
            return self.owner.module
        current = self.scope.parent
        while current is not None:
            if not current.is_class and name in current.locals:
                return current
            current = current.parent
        return None

    def _kill(self, env: Optional[_Env], name: str) -> None:
        if env is not None and name in self.tracked:
            env[name] = frozenset([self._unbound])

    @staticmethod
    def _join(*envs: Optional[_Env]) -> Optional[_Env]:
        live = [env for env in envs if env is not None]
        if not live:
            return None
        joined: Dict[str, Set[Definition]] = {}
        for env in live:
            for name, defs in env.items():
                joined.setdefault(name, set()).update(defs)
        return {name: frozenset(defs) for name, defs in joined.items()}

    def _seen(self, env: Optional[_Env]) -> None:
        for states in self.handlers:
            states.append(None if env is None else dict(env))

    # -- statements ----------------------------------------------------------------------------
    def _block(self, statements: Iterable[ast.stmt], env: Optional[_Env]) -> Optional[_Env]:
        for statement in statements:
            self.owner.record_before(statement, env)
            self._seen(env)
            env = self._statement(statement, None if env is None else dict(env))
            self._seen(env)
        return env

    def _statement(self, node: ast.stmt, env: Optional[_Env]) -> Optional[_Env]:
        if env is None:  # unreachable code: still resolve what it reads, against nothing
            self._expressions_in(node, None)
            return None
        handler = getattr(self, "_" + type(node).__name__, None)
        if handler is not None:
            return handler(node, env)
        self._expressions_in(node, env)
        return env

    def _expressions_in(self, node: ast.stmt, env: Optional[_Env]) -> None:
        """Resolve the reads of a simple statement, bind its targets."""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._expression(child, env, node)

    def _Assign(self, node: ast.Assign, env: _Env) -> _Env:
        self._expression(node.value, env, node)
        for target in node.targets:
            self._expression(target, env, node)
        return env

    def _AugAssign(self, node: ast.AugAssign, env: _Env) -> _Env:
        self._expression(node.value, env, node)
        if isinstance(node.target, ast.Name):
            self._read(node.target, env)
        self._expression(node.target, env, node)
        return env

    def _AnnAssign(self, node: ast.AnnAssign, env: _Env) -> _Env:
        if node.value is not None:
            self._expression(node.value, env, node)
        if not self.scope.is_function:
            self._expression(node.annotation, env, node)
        if node.value is not None or not isinstance(node.target, ast.Name):
            self._expression(node.target, env, node)
        return env

    def _Delete(self, node: ast.Delete, env: _Env) -> _Env:
        for target in node.targets:
            self._expression(target, env, node)
            if isinstance(target, ast.Name):
                self._kill(env, target.id)
        return env

    def _Import(self, node: ast.Import, env: _Env) -> _Env:
        for alias in node.names:
            for name in self.owner._imported_names(node, alias):
                self._bind(env, name, alias, node)
        return env

    _ImportFrom = _Import

    def _FunctionDef(self, node: ast.AST, env: _Env) -> _Env:
        for child in node.decorator_list + _defaults_and_annotations(node):  # type: ignore[attr-defined]
            self._expression(child, env, node)
        self._bind(env, node.name, node, node)  # type: ignore[attr-defined]
        return env

    _AsyncFunctionDef = _FunctionDef

    def _ClassDef(self, node: ast.ClassDef, env: _Env) -> _Env:
        for child in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self._expression(child, env, node)
        self._bind(env, node.name, node, node)
        return env

    def _Return(self, node: ast.Return, env: _Env) -> None:
        if node.value is not None:
            self._expression(node.value, env, node)
        return None

    def _Raise(self, node: ast.Raise, env: _Env) -> None:
        self._expressions_in(node, env)
        return None

    def _Break(self, node: ast.Break, env: _Env) -> None:
        if self.breaks:
            self.breaks[-1].append(env)
        return None

    def _Continue(self, node: ast.Continue, env: _Env) -> None:
        if self.continues:
            self.continues[-1].append(env)
        return None

    def _If(self, node: ast.If, env: _Env) -> Optional[_Env]:
        self._expression(node.test, env, node)
        return self._join(self._block(node.body, dict(env)), self._block(node.orelse, dict(env)))

    def _While(self, node: ast.While, env: _Env) -> Optional[_Env]:
        return self._loop(node, env, lambda state: self._expression(node.test, state, node) if state else None)

    def _For(self, node: ast.For, env: _Env) -> Optional[_Env]:
        self._expression(node.iter, env, node)
        return self._loop(node, env, lambda state: self._expression(node.target, state, node) if state else None)

    _AsyncFor = _For

    def _loop(self, node: ast.AST, env: _Env, on_entry: Callable[[Optional[_Env]], None]) -> Optional[_Env]:
        head: Optional[_Env] = dict(env)
        for _ in range(50):  # definitions only grow: a fixpoint within a few rounds
            self.breaks.append([])
            self.continues.append([])
            entry = dict(head) if head is not None else None
            on_entry(entry)
            end = self._block(node.body, entry)  # type: ignore[attr-defined]
            breaks, continues = self.breaks.pop(), self.continues.pop()
            new_head = self._join(head, end, *continues)
            if new_head == head:
                break
            head = new_head
        exit_env = dict(head) if head is not None else None
        if isinstance(node, ast.While):
            self._expression(node.test, exit_env, node)
        after_else = self._block(node.orelse, exit_env)  # type: ignore[attr-defined]
        return self._join(after_else, *breaks)

    def _With(self, node: ast.AST, env: _Env) -> Optional[_Env]:
        for item in node.items:  # type: ignore[attr-defined]
            self._expression(item.context_expr, env, node)
            if item.optional_vars is not None:
                self._expression(item.optional_vars, env, node)
        return self._block(node.body, env)  # type: ignore[attr-defined]

    _AsyncWith = _With

    def _Try(self, node: ast.AST, env: _Env) -> Optional[_Env]:
        states: List[Optional[_Env]] = [dict(env)]
        self.handlers.append(states)
        after_body = self._block(node.body, dict(env))  # type: ignore[attr-defined]
        self.handlers.pop()
        entry = self._join(*states)
        outcomes = [self._block(node.orelse, after_body)]  # type: ignore[attr-defined]
        handled: List[Optional[_Env]] = []
        for handler in node.handlers:  # type: ignore[attr-defined]
            state = dict(entry) if entry is not None else None
            if handler.type is not None:
                self._expression(handler.type, state, handler)
            if handler.name and state is not None:
                self._bind(state, handler.name, handler, handler)
            self.handlers.append(handled)
            out = self._block(handler.body, state)
            self.handlers.pop()
            if handler.name:
                self._kill(out, handler.name)
            outcomes.append(out)
        normal = self._join(*outcomes)
        if not node.finalbody:  # type: ignore[attr-defined]
            return normal
        final_entry = self._join(normal, entry, *handled)
        final_out = self._block(node.finalbody, final_entry)  # type: ignore[attr-defined]
        return final_out if normal is not None else None

    _TryStar = _Try

    def _Match(self, node: ast.Match, env: _Env) -> Optional[_Env]:
        self._expression(node.subject, env, node)
        outcomes: List[Optional[_Env]] = [dict(env)]
        for case in node.cases:
            state = dict(env)
            self._pattern(case.pattern, state, node)
            if case.guard is not None:
                self._expression(case.guard, state, node)
            outcomes.append(self._block(case.body, state))
        return self._join(*outcomes)

    def _pattern(self, pattern: ast.AST, env: _Env, statement: ast.AST) -> None:
        for node in ast.walk(pattern):
            if isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
                self._bind(env, node.name, node, statement)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                self._bind(env, node.rest, node, statement)
            elif isinstance(node, ast.expr):
                self._expression(node, env, statement)

    # -- expressions ---------------------------------------------------------------------------
    def _read(self, name: ast.Name, env: Optional[_Env]) -> None:
        if not self.owner.follows(name.id):
            return
        local: Optional[_Defs] = None
        if name.id in self.tracked:
            local = env.get(name.id, frozenset()) if env is not None else frozenset()
        self.owner.record_read(name, self.scope, local)

    def _expression(self, node: ast.AST, env: Optional[_Env], statement: Optional[ast.AST] = None) -> None:
        """Resolve the reads in ``node`` left to right, binding stores and ``:=`` targets."""
        statement = statement if statement is not None else self.scope.node
        stack = [node]
        order: List[ast.AST] = []
        while stack:  # pre-order, children left to right
            current = stack.pop()
            order.append(current)
            if isinstance(current, (ast.Lambda,) + _COMPREHENSIONS):
                if isinstance(current, _COMPREHENSIONS):
                    stack.append(current.generators[0].iter)
                else:
                    stack.extend(reversed(current.args.defaults + [d for d in current.args.kw_defaults if d]))
                continue
            if isinstance(current, ast.NamedExpr):
                stack.append(current.target)  # bound after its value: pushed first, popped last
                stack.append(current.value)
                continue
            stack.extend(reversed(list(ast.iter_child_nodes(current))))
        for current in order:
            if isinstance(current, ast.Name):
                if isinstance(current.ctx, ast.Load):
                    self._read(current, env)
                elif isinstance(current.ctx, ast.Del):
                    self._read(current, env)
                else:
                    self._bind_store(current, env, statement)

    def _bind_store(self, name: ast.Name, env: Optional[_Env], statement: ast.AST) -> None:
        parent = self.owner.parent(name)
        if isinstance(parent, ast.NamedExpr) and isinstance(self.scope.node, _COMPREHENSIONS):
            target = self.owner._walrus_scope(self.scope)
            if self.owner.follows(name.id):
                definition = self.owner.define(name.id, name, target, statement)
                self.owner.record_outside(target, definition)
            return
        self._bind(env, name.id, name, statement)

    def _comprehension(self, node: ast.AST, env: Optional[_Env]) -> Optional[_Env]:
        for index, generator in enumerate(node.generators):  # type: ignore[attr-defined]
            if index:
                self._expression(generator.iter, env, node)
            self._expression(generator.target, env, node)
            for condition in generator.ifs:
                self._expression(condition, env, node)
        for part in ("elt", "key", "value"):
            child = getattr(node, part, None)
            if child is not None:
                self._expression(child, env, node)
        return env


# --- syntax helpers -------------------------------------------------------------------------------
def _scope_body(node: ast.AST) -> List[ast.AST]:
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return list(node.body)
    if isinstance(node, ast.Lambda):
        return [node.body]
    if isinstance(node, _COMPREHENSIONS):
        parts: List[ast.AST] = []
        for index, generator in enumerate(node.generators):
            if index:
                parts.append(generator.iter)
            parts.append(generator.target)
            parts.extend(generator.ifs)
        parts.extend(getattr(node, part) for part in ("elt", "key", "value") if getattr(node, part, None) is not None)
        return parts
    return []


def _arguments(args: ast.arguments) -> List[ast.arg]:
    found = list(args.posonlyargs) + list(args.args) + list(args.kwonlyargs)
    found += [arg for arg in (args.vararg, args.kwarg) if arg is not None]
    return found


def _defaults_and_annotations(node: ast.AST) -> List[ast.expr]:
    args: ast.arguments = node.args  # type: ignore[attr-defined]
    found: List[ast.expr] = list(args.defaults) + [d for d in args.kw_defaults if d is not None]
    found += [arg.annotation for arg in _arguments(args) if arg.annotation is not None]
    returns = getattr(node, "returns", None)
    if returns is not None:
        found.append(returns)
    return found


def _stored_names(target: ast.AST) -> Iterator[ast.Name]:
    for node in ast.walk(target):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node


def _blocks(node: ast.AST) -> Iterator[Tuple[str, List[ast.stmt]]]:
    for field_name in ("body", "orelse", "finalbody"):
        block = getattr(node, field_name, None)
        if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
            yield field_name, block
    for case in getattr(node, "cases", ()):
        yield "case", case.body
    for handler in getattr(node, "handlers", ()):
        yield "handler", handler.body


def _nested_statements(statements: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """The statements and every statement nested in them, not entering functions or classes."""
    stack = list(statements)[::-1]
    while stack:
        statement = stack.pop()
        yield statement
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        children: List[ast.AST] = []
        for _, block in _blocks(statement):
            children.extend(block)
        stack.extend(reversed(children))
