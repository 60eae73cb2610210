"""``--to-native`` for Apex's multi-tensor kernels: ``multi_tensor_applier(amp_C.<op>, flag, lists, *args)``.

Each call of an op real code calls becomes the ``torch._foreach_*`` statements computing the same values,
with the semantics of ``ampcompat.amp_C`` (Apex's kernels on foreach ops)::

    total, per = multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [grads], False)
        ->  norms = torch.stack(torch._foreach_norm(grads, dtype=torch.float32))
            total, per = torch.linalg.vector_norm(norms).reshape(1), norms.new_empty(0)
    multi_tensor_applier(amp_C.multi_tensor_scale, flag, [grads, grads], coef)
        ->  torch._foreach_mul_(grads, coef)
    multi_tensor_applier(amp_C.multi_tensor_scale, flag, [src, dst], coef)
        ->  torch._foreach_copy_(dst, torch._foreach_mul([t.float() for t in src], coef))
    multi_tensor_applier(amp_C.multi_tensor_axpby, flag, [x, y, out], a, b, -1)
        ->  torch._foreach_copy_(out, torch._foreach_add(torch._foreach_mul([t.float() for t in x], a),
                                                         [t.float() for t in y], alpha=b))

The math is FP32 for FP16/BF16 tensors, as in Apex's kernels (``.float()`` of an FP32 tensor is the tensor
itself, no copy). Apex's ``flag`` (an int tensor its kernels set to 1 on inf/NaN, never clearing it) is set
the same way on the device wherever something else can read it; where it is only created and passed to
converted calls it is dropped. The op may be named directly (``amp_C.multi_tensor_scale``) or through an
attribute the file assigns once (``self.multi_tensor_scale = amp_C.multi_tensor_scale`` in ``__init__``,
NVIDIA's BERT ``GradientClipper``); those assignments go with the last call that read them.
``amp_C.<op>(chunk_size, flag, lists, *args)`` called directly is converted the same way, and
``multi_tensor_applier.available`` (always true under ampcompat) becomes ``True``.

Other ops and other shapes keep ``TODO(ampcompat)`` comments, saying why, and stay on ampcompat.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .callargs import NOT_LITERAL, has_starred, literal_value
from .plan import RewritePlan
from .scanner import Use
from .syntax import is_plain_reference, same_expression, scope_of, walk_local

APPLIER = "apex.multi_tensor_apply.multi_tensor_applier"
"""The catalogued name of Apex's launcher."""

_CONVERTED_OPS = ("amp_C.multi_tensor_l2norm", "amp_C.multi_tensor_l2norm_mp", "amp_C.multi_tensor_scale",
                  "amp_C.multi_tensor_axpby")

_AVAILABLE_NOTE = ("`multi_tensor_applier.available` is now `True`: it was under ampcompat, whose multi-tensor ops "
                   "always run (now as torch._foreach_* code)")
_LISTS_NOT_WRITTEN = ("the tensor lists are not written out here (`[grads]`, `[src, dst]`): this rewrite cannot see "
                      "which list is which; pass them as a list display, or rewrite with torch._foreach_* by hand")
_IN_EXPRESSION = "the result of {op} is used inside an expression; assign it to a name first"


@dataclass
class _Site:
    """One call of a multi-tensor op: through the launcher or directly."""

    use: Use
    call: ast.Call
    op: str
    op_node: ast.expr
    flag: ast.expr
    lists: List[ast.expr]
    args: List[ast.expr]
    statement: ast.stmt
    lines_before: List[str] = field(default_factory=list)
    problem: str = ""


def convert_multi_tensor(plan: RewritePlan) -> Dict[int, str]:
    """Convert the file's multi-tensor calls that have a ``torch._foreach_*`` counterpart.

    Returns:
        The use nodes (by id) that stay on ampcompat for a reason this module knows better than the generic
        "no mechanical rewrite": the reason, for their TODO comment.
    """
    return _MultiTensor(plan).run()


class _MultiTensor:
    def __init__(self, plan: RewritePlan) -> None:
        self.plan = plan
        self.uses = [use for use in plan.result.uses if use.exclusive and not plan.is_converted(use)
                     and use.kind not in ("import", "string", "check")]
        self.reasons: Dict[int, str] = {}

    def segment(self, node: ast.AST) -> str:
        return self.plan.text.segment(node)

    def run(self) -> Dict[int, str]:
        aliases = self._aliases()
        sites: List[_Site] = []
        for use in self.uses:
            if use.api == APPLIER and use.kind == "call" and isinstance(use.node, ast.Call):
                site = self._site(use, use.node, 1, aliases)
            elif use.api in _CONVERTED_OPS and use.kind == "call" and isinstance(use.node, ast.Call):
                site = self._site(use, use.node, 0, aliases, op=use.api)
            else:
                continue
            if site is None:
                continue
            site.problem = site.problem or _CONVERTERS[site.op][0](self, site)
            if site.problem:
                self.reasons[id(use.node)] = site.problem
            else:
                sites.append(site)
        for site in sites:
            _CONVERTERS[site.op][1](self, site, self._flag_read(site, sites))
            self.plan.mark_converted(site.use)
            self.plan.uses_torch = True
            self._mark_op(site)
        self._drop_aliases(aliases, sites)
        self._available()
        return self.reasons

    # -- finding the calls -----------------------------------------------------------------------
    def _aliases(self) -> Dict[str, Tuple[str, ast.stmt, Use]]:
        """``self.X = amp_C.<op>`` assigned once in the file: ``X`` -> (op, assignment, use of the op)."""
        stores: Dict[str, int] = {}
        for node in self.plan.result.nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
                stores[node.attr] = stores.get(node.attr, 0) + 1
        found: Dict[str, Tuple[str, ast.stmt, Use]] = {}
        for use in self.uses:
            if use.api not in _CONVERTED_OPS or use.kind != "reference":
                continue
            statement = self.plan.parents.get(use.node)
            if isinstance(statement, ast.Assign) and statement.value is use.node and len(statement.targets) == 1:
                target = statement.targets[0]
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and stores.get(target.attr) == 1 and self.plan.text.owns_lines(statement):
                    found[target.attr] = (use.api, statement, use)
        return found

    def _site(self, use: Use, call: ast.Call, offset: int, aliases: Dict[str, Tuple[str, ast.stmt, Use]],
              op: str = "") -> Optional[_Site]:
        """The call's parts (``offset``: 1 through the launcher, whose first argument is the op, 0 for
        ``amp_C.<op>(chunk_size, ...)``), or ``None`` when its op is not one this module converts."""
        op_node: ast.expr = call.func
        if offset:
            if not call.args:
                return None
            op_node = call.args[0]
            op = self._op_of(op_node, aliases)
        if op not in _CONVERTERS:
            return None
        statement = self.plan.statement(call)
        # Apex's (op or chunk_size, flag, lists, *args): the same places either way
        site = _Site(use, call, op, op_node, call.args[1] if len(call.args) > 1 else call, [], call.args[3:], statement)
        if has_starred(call) or call.keywords or len(call.args) < 3:
            site.problem = (f"{_short(op)} is not called with its arguments in Apex's order (op, flag, lists, ...) "
                            "and without * or keywords; rewrite with torch._foreach_* by hand")
            return site
        lists = call.args[2]
        if not isinstance(lists, (ast.List, ast.Tuple)) or any(isinstance(e, ast.Starred) for e in lists.elts):
            site.problem = _LISTS_NOT_WRITTEN
            return site
        site.lists = list(lists.elts)
        if not self.plan.text.owns_lines(statement):
            site.problem = f"the call of {_short(op)} shares its line with other code; put it on a line of its own"
        return site

    def _op_of(self, node: ast.expr, aliases: Dict[str, Tuple[str, ast.stmt, Use]]) -> str:
        for use in self.uses:
            if use.node is node and use.kind == "reference":
                return use.api
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr in aliases:
            return aliases[node.attr][0]
        return ""

    def _mark_op(self, site: _Site) -> None:
        for use in self.uses:
            if use.node is site.op_node:
                self.plan.mark_converted(use)

    def _drop_aliases(self, aliases: Dict[str, Tuple[str, ast.stmt, Use]], sites: List[_Site]) -> None:
        """Remove ``self.X = amp_C.<op>`` once every read of ``.X`` was the op of a converted call."""
        converted_ops = {id(site.op_node) for site in sites}
        for attr, (_, statement, use) in aliases.items():
            reads = [node for node in self.plan.result.nodes if isinstance(node, ast.Attribute) and node.attr == attr
                     and isinstance(node.ctx, ast.Load) and node is not use.node]  # not `amp_C.<op>` itself
            if reads and all(id(read) in converted_ops for read in reads):
                self.plan.remove_statement(statement)
                self.plan.mark_converted(use)

    def _available(self) -> None:
        for use in self.uses:
            if use.api != APPLIER or use.kind != "reference":
                continue
            parent = use.node  # the scanner's node is the attribute read, or the name under it
            if not (isinstance(parent, ast.Attribute) and parent.attr == "available"):
                parent = self.plan.parents.get(use.node)
                if not (isinstance(parent, ast.Attribute) and parent.value is use.node):
                    continue
            if parent.attr == "available" and isinstance(parent.ctx, ast.Load):
                self.plan.replace(parent, "True")
                self.plan.note(parent, _AVAILABLE_NOTE)
                self.plan.mark_converted(use)

    # -- the flag ----------------------------------------------------------------------------------
    def _flag_read(self, site: _Site, sites: List[_Site]) -> bool:
        """Whether anything but the converted calls can read the flag buffer (then it must still be set)."""
        flag = site.flag
        flags = {id(other.flag) for other in sites}
        if isinstance(flag, ast.Attribute) and isinstance(flag.value, ast.Name):
            reads = [node for node in self.plan.result.nodes if isinstance(node, ast.Attribute)
                     and node.attr == flag.attr and isinstance(node.ctx, ast.Load)]
            return not all(id(read) in flags for read in reads)
        if isinstance(flag, ast.Name):
            scope = scope_of(flag, self.plan.parents)
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                arguments = scope.args
                parameters = arguments.posonlyargs + arguments.args + arguments.kwonlyargs + [
                    a for a in (arguments.vararg, arguments.kwarg) if a is not None]
                if any(parameter.arg == flag.id for parameter in parameters):
                    return True  # the caller's buffer: it may read it
                if any(isinstance(node, (ast.Global, ast.Nonlocal)) and flag.id in node.names
                       for node in walk_local(scope)):
                    return True
                area = list(ast.walk(scope))
            elif isinstance(scope, ast.Module):
                area = self.plan.result.nodes
            else:
                return True
            reads = [node for node in area if isinstance(node, ast.Name) and node.id == flag.id
                     and isinstance(node.ctx, ast.Load)]
            return not all(id(read) in flags for read in reads)
        return not isinstance(flag, (ast.Call, ast.Constant))  # a buffer made on the spot: nobody else sees it

    # -- shared pieces -------------------------------------------------------------------------------
    def once(self, site: _Site, node: ast.expr, wanted: str) -> str:
        """The text to read ``node`` by, more than once: itself if it is a plain reference, else a fresh name
        assigned before the call's statement."""
        if is_plain_reference(node):
            return self.segment(node)
        name = self.plan.fresh_name(wanted)
        site.lines_before.append(f"{name} = {self.segment(node)}")
        return name

    def finish(self, site: _Site, lines: Optional[List[str]]) -> None:
        """Replace the call's statement (an expression statement) with ``lines`` after the hoisted ones
        (``None``: with nothing, not even those)."""
        self.plan.replace_statement(site.statement, [] if lines is None else site.lines_before + lines)

    def expression_statement(self, site: _Site) -> str:
        if not (isinstance(site.statement, ast.Expr) and site.statement.value is site.call):
            return (f"the result of {_short(site.op)} (None) is used here; call it as a statement of its own, or "
                    "rewrite by hand")
        return ""


def _short(op: str) -> str:
    return op.split(".")[-1]


def _float(text: str) -> str:
    """An FP32 view of a tensor list (half tensors copied up; FP32 ones as they are)."""
    return f"[t.float() for t in {text}]"


def _non_finite(text: str) -> str:
    """A 0-dim bool tensor: does any tensor of the list hold inf or NaN? (One foreach max-abs, no host read.)"""
    return f"~torch.isfinite(torch.stack(torch._foreach_norm({text}, float(\"inf\")))).all()"


# -- multi_tensor_l2norm ------------------------------------------------------------------------------
def _l2norm_problem(self: _MultiTensor, site: _Site) -> str:
    if len(site.lists) != 1:
        return f"{_short(site.op)} takes one tensor list; this call passes {len(site.lists)}: rewrite by hand"
    if len(site.args) > 1:
        return f"{_short(site.op)} takes (lists, per_tensor); this call passes more: rewrite by hand"
    per_tensor = literal_value(site.args[0]) if site.args else None
    if per_tensor is NOT_LITERAL or not isinstance(per_tensor, (bool, type(None))):
        return ("per_tensor is only known at run time: the rewrite must know whether to return the per-tensor "
                "norms; pass True or False, or rewrite by hand")
    call, parents = site.call, self.plan.parents
    holder = parents.get(call)
    if isinstance(holder, ast.Subscript) and holder.value is call:
        holder = parents.get(holder)
    if isinstance(site.statement, (ast.Assign, ast.AnnAssign, ast.Return, ast.Expr)) and holder is site.statement:
        return ""
    return _IN_EXPRESSION.format(op=_short(site.op))


def _l2norm_apply(self: _MultiTensor, site: _Site, flag_read: bool) -> None:
    per_tensor = literal_value(site.args[0]) if site.args else None
    norms = self.plan.fresh_name("norms")
    site.lines_before.append(f"{norms} = torch.stack(torch._foreach_norm({self.segment(site.lists[0])}, "
                             "dtype=torch.float32))")
    if flag_read:
        site.lines_before.append(f"{self.segment(site.flag)}.masked_fill_("
                                 f"~torch.isfinite(torch.linalg.vector_norm({norms})), 1)")
    result = f"(torch.linalg.vector_norm({norms}).reshape(1), {norms if per_tensor else norms + '.new_empty(0)'})"
    if isinstance(site.statement, ast.Expr):  # only the flag is left to compute
        self.finish(site, [] if flag_read else None)
        return
    self.plan.insert_lines_before(site.statement, site.lines_before)
    holder = self.plan.parents.get(site.call)
    if isinstance(site.statement, ast.Assign) and holder is site.statement \
            and isinstance(site.statement.targets[-1], (ast.Tuple, ast.List)):
        result = result[1:-1]  # `a, b = x, y` reads as well as the tuple
    self.plan.replace(site.call, result)


# -- multi_tensor_scale -------------------------------------------------------------------------------
def _scale_problem(self: _MultiTensor, site: _Site) -> str:
    if len(site.lists) != 2 or len(site.args) != 1:
        return "multi_tensor_scale takes ([src, dst], scale); this call passes something else: rewrite by hand"
    return self.expression_statement(site)


def _scale_apply(self: _MultiTensor, site: _Site, flag_read: bool) -> None:
    source, destination = site.lists
    scale = self.segment(site.args[0])
    in_place = is_plain_reference(source) and same_expression(source, destination)
    src = self.once(site, source, "sources") if flag_read or in_place else self.segment(source)
    lines = [f"{self.segment(site.flag)}.masked_fill_({_non_finite(src)}, 1)"] if flag_read else []
    if in_place:
        lines.append(f"torch._foreach_mul_({src}, {scale})")
    else:
        lines.append(f"torch._foreach_copy_({self.segment(destination)}, torch._foreach_mul({_float(src)}, {scale}))")
    self.finish(site, lines)


# -- multi_tensor_axpby -------------------------------------------------------------------------------
def _axpby_problem(self: _MultiTensor, site: _Site) -> str:
    if len(site.lists) != 3 or len(site.args) != 3:
        return ("multi_tensor_axpby takes ([x, y, out], a, b, arg_to_check); this call passes something else: "
                "rewrite by hand")
    check = literal_value(site.args[2])
    if not isinstance(check, int) or isinstance(check, bool):
        if not (isinstance(site.args[2], ast.UnaryOp) and isinstance(literal_value(site.args[2].operand), int)):
            return "arg_to_check is not a literal number (which lists to check for inf/NaN); rewrite by hand"
    return self.expression_statement(site)


def _axpby_apply(self: _MultiTensor, site: _Site, flag_read: bool) -> None:
    x_node, y_node, out = site.lists
    a, b = (self.segment(arg) for arg in site.args[:2])
    node = site.args[2]
    check = -literal_value(node.operand) if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
        else literal_value(node)
    checked = {-1: [0, 1], 0: [0], 1: [1]}.get(check, []) if flag_read else []  # type: ignore[call-overload]
    x = self.once(site, x_node, "xs") if 0 in checked else self.segment(x_node)
    y = self.once(site, y_node, "ys") if 1 in checked else self.segment(y_node)
    lines = [f"{self.segment(site.flag)}.masked_fill_({_non_finite([x, y][i])}, 1)" for i in checked]
    lines.append(f"torch._foreach_copy_({self.segment(out)}, torch._foreach_add(torch._foreach_mul({_float(x)}, {a}), "
                 f"{_float(y)}, alpha={b}))")
    self.finish(site, lines)


_CONVERTERS: Dict[str, Tuple[Callable[[_MultiTensor, _Site], str], Callable[[_MultiTensor, _Site, bool], None]]] = {
    "amp_C.multi_tensor_l2norm": (_l2norm_problem, _l2norm_apply),
    "amp_C.multi_tensor_l2norm_mp": (_l2norm_problem, _l2norm_apply),
    "amp_C.multi_tensor_scale": (_scale_problem, _scale_apply),
    "amp_C.multi_tensor_axpby": (_axpby_problem, _axpby_apply),
}
