"""``--to-native`` for ``FP16_Optimizer`` loops: an FP16 model with FP32 masters becomes autocast + GradScaler.

``FP16_Optimizer`` (``apex.fp16_utils``, and the FusedAdam flavour in ``apex.optimizers``) is the
pre-amp form of O2, so it gets O2's documented native recipe: the model stays FP32 (the
``network_to_half(model)`` / ``FP16Model(model)`` / ``model.half()`` that made it FP16 go), the
forward pass that computes the loss runs under ``torch.autocast``, and a GradScaler does the loss
scaling::

    model = network_to_half(model)                       (removed)
    optimizer = FP16_Optimizer(optimizer,                amp_device_type = next(model.parameters()).device.type
                               dynamic_loss_scale=True)  scaler = torch.amp.GradScaler(amp_device_type, ...)
    loss = criterion(model(x), y)                        with torch.autocast(amp_device_type, dtype=torch.float16):
                                                             loss = criterion(model(x), y)
    optimizer.backward(loss)                             scaler.scale(loss).backward()
    optimizer.clip_master_grads(1.0)                     scaler.unscale_(optimizer)
                                                         torch.nn.utils.clip_grad_norm_(<its parameters>, 1.0)
    optimizer.step()                                     scaler.step(optimizer); scaler.update()

A static loss scale becomes a GradScaler whose scale is pinned: ``init_scale=S`` and
``scaler.update(S)`` at each step, which sets the scale instead of growing or backing it off. An
expression for ``S`` is evaluated once, where ``FP16_Optimizer`` was built. Apex's static
``LossScaler`` never checked for overflow and applied steps with inf/NaN gradients; the GradScaler
skips them (noted at the call and in migration_guide.md).

The 2019 BERT scripts build the wrapper in each branch of one ``if``/``else`` (``if args.loss_scale
== 0: dynamic, else: static``): builds of the same optimizer into the same name, one in each branch of
one chain, are converted together -- each branch creates its own GradScaler with its own options and
sets ``static_loss_scale`` (``None`` where dynamic), and the step calls ``scaler.update(static_loss_scale)``.

The wrapper's methods are recognised on the name it was assigned to, in the function that builds it
and in the functions that call its ``backward(loss)``. ``update_master_grads``, the wrapper's
``overflow`` flag, a wrapper used as a value and other repeated builds stay on ampcompat, with the reason.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .callargs import NOT_LITERAL, has_starred, literal_value
from .native_amp import all_of, parameters_of
from .native_loop import plan_unscaling, scheduler_steps, unscaled_backwards
from .native_placement import place
from .native_regions import forward_region, overlapping
from .plan import RewritePlan
from .scanner import Use
from .syntax import block_of, comes_before, scope_of, walk_local

WRAPPERS = ("apex.fp16_utils.FP16_Optimizer", "apex.fp16_utils.fp16_optimizer.FP16_Optimizer",
            "apex.optimizers.FP16_Optimizer", "apex.contrib.optimizers.FP16_Optimizer")
HALVING = ("apex.fp16_utils.network_to_half", "apex.fp16_utils.FP16Model", "apex.fp16_utils.convert_network")
_SUBSTITUTED = (
    "FP16_Optimizer becomes O2's native recipe (an FP32 model under torch.autocast with a GradScaler): plain PyTorch "
    "has no FP16 weights with FP32 master weights, so the numbers differ slightly (see migration_guide.md, From O2 "
    "or O3 to native)"
)
_CHECKPOINT = (
    "a checkpoint written by FP16_Optimizer.state_dict() holds its own format (the masters under "
    "'fp32_from_fp16'): export it once with ampcompat as migration_guide.md shows (From O2 or O3 to native), then "
    "load the plain optimizer state here"
)


_STATIC = (
    "the static loss scale becomes a GradScaler pinned at it (init_scale=, and scaler.update() sets it back at every "
    "step, so it never grows or backs off)"
)
_STATIC_SKIPS = (
    "; one difference: apex.fp16_utils' static scaler never checked for overflow and applied steps with inf/NaN "
    "gradients, the GradScaler skips them (as ampcompat does; see migration_guide.md, What --to-native converts)"
)
_REBUILT = ("FP16_Optimizer is built more than once in this file, and not as one build of the same optimizer into the "
            "same name in each branch of one if/else; rewrite by hand")


def convert_fp16_optimizers(plan: RewritePlan) -> None:
    """Convert the file's ``FP16_Optimizer`` loops (with their model halving), or leave TODOs."""
    wrappers = [use for use in plan.result.uses if use.api in WRAPPERS and use.kind == "call"]
    if not wrappers:
        return
    site: Optional[ast.AST] = plan.parents.get(wrappers[0].node)
    if len(wrappers) > 1:
        site = branch_chain(plan, wrappers)
        if site is None:
            for use in wrappers:
                plan.todo(use.node, _REBUILT)
            return
    conversion = _Conversion(plan, wrappers, site)  # type: ignore[arg-type]
    conversion.analyse()
    if conversion.blockers:
        for node, message in conversion.blockers:
            plan.todo(node, message)
        return
    conversion.apply()


def branch_chain(plan: RewritePlan, uses: List[Use]) -> Optional[ast.If]:
    """The ``if`` whose branches (``elif``s and a final ``else`` included) each build the wrapper once, or ``None``.

    Each build must be an assignment of its own directly in its branch, and all of them must assign the
    same name from the same optimizer, so that after the ``if`` that name is the wrapper on every path
    and the loop can read one GradScaler whichever branch ran.
    """
    statements = [plan.parents.get(use.node) for use in uses]
    if not all(isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(use.node, ast.Call)
               and use.node.args and not has_starred(use.node) for statement, use in zip(statements, uses)):
        return None
    if len({ast.unparse(statement.targets[0]) for statement in statements}) != 1 \
            or len({ast.unparse(use.node.args[0]) for use in uses}) != 1:  # type: ignore[attr-defined]
        return None
    candidate = plan.parents.get(statements[0])
    while isinstance(candidate, ast.If):
        branches = _branches(candidate)
        if branches is not None and all(sum(any(item is statement for item in block) for statement in statements) == 1
                                        for block in branches) and len(branches) == len(statements):
            return candidate
        parent = plan.parents.get(candidate)
        if not (isinstance(parent, ast.If) and len(parent.orelse) == 1 and parent.orelse[0] is candidate):
            return None
        candidate = parent  # the `if` of this `elif`
    return None


def _branches(chain: ast.If) -> Optional[List[List[ast.stmt]]]:
    """The blocks of an ``if``/``elif``/``else`` chain, or ``None`` when it has no final ``else``."""
    blocks = []
    current = chain
    while True:
        blocks.append(current.body)
        if len(current.orelse) == 1 and isinstance(current.orelse[0], ast.If):
            current = current.orelse[0]
            continue
        if not current.orelse:
            return None
        blocks.append(current.orelse)
        return blocks


@dataclass
class _Build:
    """One ``FP16_Optimizer(...)`` build and the GradScaler it becomes.

    Attributes:
        use: the call.
        statement: the assignment holding it.
        options: the GradScaler's keyword arguments after the device (dynamic scaling, ``enabled=False``).
        static: a pinned loss scale: a float literal, or ``float(expression)`` evaluated once at the build.
    """

    use: Use
    statement: ast.Assign
    options: str = ""
    static: Optional[str] = None

    @property
    def static_is_literal(self) -> bool:
        return self.static is not None and not self.static.startswith("float(")


class _Conversion:
    def __init__(self, plan: RewritePlan, uses: List[Use], site: ast.stmt) -> None:
        self.plan = plan
        self.use = uses[0]
        self.uses = uses
        self.site = site
        """The build's statement, or the ``if`` whose branches hold the builds."""
        self.blockers: List[Tuple[ast.AST, str]] = []
        self.name = ""
        self.builds: List[_Build] = []
        self.inner: Optional[ast.expr] = None
        self.backwards: List[Tuple[ast.Expr, str, str, Tuple[ast.stmt, ast.stmt]]] = []
        self.clips: List[ast.Call] = []
        self.steps: List[ast.Expr] = []
        self.scale_reads: List[ast.Attribute] = []
        self.halvings: List[Tuple[ast.AST, str, Use]] = []
        self.models: List[str] = []
        self.parameter_reads: List[ast.Call] = []
        """The file's ``m.parameters()`` / ``m.named_parameters()`` calls: they name its models."""
        self.placement = None
        self.unscale: Dict[int, ast.stmt] = {}
        self.schedulers: List[Tuple[ast.stmt, ast.stmt]] = []
        self.loads: List[ast.Call] = []
        self.inner_reads: List[ast.Attribute] = []
        self.device = plan.fresh_name("amp_device_type")
        self.scaler = plan.fresh_name("scaler")
        self.flag = ""
        """Where the wrapper is built under ``if args.fp16:`` and the loop also runs without it: the name of that
        condition's value, which switches autocast (the GradScaler is a pass-through unless a build ran)."""
        self.model: Optional[str] = None
        """Then also the model whose device the GradScaler and autocast need before that ``if``."""

    def block(self, node: ast.AST, message: str) -> None:
        self.blockers.append((node, message))

    def segment(self, node: ast.AST) -> str:
        return self.plan.text.segment(node)

    def analyse(self) -> None:
        for use in self.uses:
            call = use.node
            statement = self.plan.parents.get(call)
            if not (isinstance(call, ast.Call) and isinstance(statement, ast.Assign) and len(statement.targets) == 1
                    and isinstance(statement.targets[0], (ast.Name, ast.Attribute))
                    and self.plan.text.owns_lines(statement)) or has_starred(call) or not call.args:
                self.block(call, "FP16_Optimizer(...) is not assigned to a name on a line of its own; rewrite by hand")
                return
            self.builds.append(_Build(use, statement))
        self.inner = self.use.node.args[0]  # type: ignore[attr-defined]
        self.name = self.segment(self.builds[0].statement.targets[0])
        for build in self.builds:
            self._options(build)
        self._methods()
        self._halving()
        if self.blockers:
            return
        if not self.backwards:
            self.block(self.use.node, "the FP16_Optimizer's backward(loss) is not called in this file; rewrite by hand")
            return
        self._place()
        if self.blockers:
            return
        self._loop()

    def _options(self, build: _Build) -> None:
        """The GradScaler options of one build: dynamic scaling as Apex's, a pinned static scale, or none."""
        call = build.use.node
        assert isinstance(call, ast.Call)
        given = {keyword.arg: keyword.value for keyword in call.keywords}
        for position, name in enumerate(("static_loss_scale", "dynamic_loss_scale", "dynamic_loss_args"), start=1):
            if position < len(call.args):
                given[name] = call.args[position]
        values = {name: literal_value(node) for name, node in given.items()}
        at_run_time = sorted(name for name, value in values.items() if value is NOT_LITERAL and name != "verbose")
        if at_run_time and (at_run_time != ["static_loss_scale"] or values.get("dynamic_loss_scale")):
            self.block(call, "FP16_Optimizer's loss-scale options are only known at run time; rewrite by hand")
            return
        if values.get("dynamic_loss_scale"):
            args = values.get("dynamic_loss_args") or {}
            if not isinstance(args, dict) or set(args) - {"init_scale", "scale_factor", "scale_window"}:
                self.block(call, "dynamic_loss_args with a floor or ceiling on the scale has no GradScaler "
                                 "counterpart; rewrite by hand")
                return
            factor = float(args.get("scale_factor", 2.0))
            options = f", init_scale={float(min(args.get('init_scale', 2.0**16), 2.0**24))!r}"
            options += f", growth_interval={int(args.get('scale_window', 2000))}"
            if factor != 2.0:
                options += f", growth_factor={factor!r}, backoff_factor={1 / factor!r}"
            build.options = options
            return
        static = values.get("static_loss_scale", 1.0)
        if static is NOT_LITERAL:
            build.static = f"float({self.segment(given['static_loss_scale'])})"
        elif isinstance(static, bool) or not isinstance(static, (int, float)):
            self.block(call, "FP16_Optimizer's static_loss_scale is not a number; rewrite by hand")
        elif static == 1.0:
            build.options = ", enabled=False"  # FP16_Optimizer's default: no loss scaling at all
        else:
            build.static = repr(float(static))

    def _methods(self) -> None:
        """Every use of the wrapper's name where it is the wrapper."""
        scopes = [scope_of(self.site, self.plan.parents)]
        for node in self.plan.result.nodes:
            if self._is_call_of(node, "backward"):
                scope = scope_of(node, self.plan.parents)
                if not any(scope is known for known in scopes):
                    scopes.append(scope)
        for scope in scopes:
            for node in walk_local(scope):
                if isinstance(node, (ast.Name, ast.Attribute)) and self._is_wrapper(node) \
                        and node.lineno > self.site.end_lineno:  # type: ignore[attr-defined,operator]
                    self._method(node)
        if len(self.builds) > 1:
            self._chain_reads()

    def _chain_reads(self) -> None:
        """Inside the ``if`` whose branches build the wrapper, the name may hold the plain optimizer or the
        wrapper: only the builds may read it."""
        inside_builds = {id(node) for build in self.builds for node in ast.walk(build.statement)}
        for node in walk_local(self.site):
            if self._is_wrapper(node) and id(node) not in inside_builds:
                self.block(node, f"`{self.name}` is read inside the if/else that builds the FP16_Optimizer; rewrite "
                                 "by hand")

    def _is_wrapper(self, node: ast.AST) -> bool:
        return isinstance(node, (ast.Name, ast.Attribute)) and self.segment(node) == self.name \
            and isinstance(getattr(node, "ctx", None), ast.Load)

    def _is_call_of(self, node: ast.AST, method: str) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method \
            and self._is_wrapper(node.func.value)

    def _method(self, node: ast.AST) -> None:
        parents = self.plan.parents
        attribute = parents.get(node)
        if isinstance(attribute, ast.Attribute) and attribute.value is node:
            call = parents.get(attribute)
            called = isinstance(call, ast.Call) and call.func is attribute
            name = attribute.attr
            if called and name == "backward":
                self._backward(call)  # type: ignore[arg-type]
                return
            if called and name == "clip_master_grads":
                self.clips.append(call)  # type: ignore[arg-type]
                return
            if called and name == "step" and not call.args and not call.keywords \
                    and isinstance(parents.get(call), ast.Expr) and self.plan.text.owns_lines(parents[call]):
                self.steps.append(parents[call])  # type: ignore[arg-type]
                return
            if called and name in ("zero_grad", "state_dict", "add_param_group"):
                return
            if called and name == "load_state_dict":
                self.loads.append(call)  # type: ignore[arg-type]
                return
            if not called and name in ("param_groups", "state"):
                return
            if not called and name == "optimizer" and isinstance(attribute.ctx, ast.Load):
                self.inner_reads.append(attribute)
                return
            if not called and name == "loss_scale" and isinstance(attribute.ctx, ast.Load):
                self.scale_reads.append(attribute)
                return
            self.block(attribute, f"uses FP16_Optimizer's `{name}`, which a plain optimizer with a GradScaler does not "
                                  "have; rewrite by hand")
            return
        if any(node is target for build in self.builds for target in build.statement.targets):
            return
        self.block(node, f"the FP16_Optimizer `{self.name}` is used as a value here; rewrite by hand")

    def _backward(self, call: ast.Call) -> None:
        statement = self.plan.parents.get(call)
        if not (isinstance(statement, ast.Expr) and self.plan.text.owns_lines(statement)) or has_starred(call) \
                or len(call.args) != 1 or not isinstance(call.args[0], ast.Name):
            self.block(call, "FP16_Optimizer.backward is not called as `optimizer.backward(loss)` on a line of its "
                             "own; rewrite by hand")
            return
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        if "update_master_grads" in keywords and literal_value(keywords["update_master_grads"]) is not True:
            self.block(call, "update_master_grads=False defers the master-gradient update; rewrite by hand")
            return
        kept = ", ".join(f"retain_graph={self.segment(value)}" for key, value in keywords.items()
                         if key == "retain_graph")
        loss = call.args[0].id  # type: ignore[attr-defined]
        amp_nodes = {id(use.node) for use in self.plan.result.uses}
        region = forward_region(self.plan.text, self.plan.parents, statement, loss, amp_nodes)
        if isinstance(region, str):
            self.block(call, region)
            return
        if overlapping([known[3] for known in self.backwards], region) is not None:
            self.block(call, "two backward passes share some statements of their forward passes; put the forward "
                             "pass under torch.autocast by hand")
            return
        self.backwards.append((statement, loss, kept, region))

    def _halving(self) -> None:
        """The model halving FP16_Optimizer came with: ``network_to_half(m)``, ``FP16Model(m)``,
        ``convert_network(m, torch.half)`` and ``m.half()`` of a model whose parameters the file reads."""
        self.parameter_reads = [node for node in self.plan.result.nodes
                                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                and node.func.attr in ("parameters", "named_parameters")]
        models = {self.segment(node.func.value) for node in self.parameter_reads}  # type: ignore[attr-defined]
        for use in self.plan.result.uses:
            if use.api not in HALVING or use.kind == "import":
                continue
            call = use.node
            if not isinstance(call, ast.Call) or not call.args or has_starred(call):
                self.block(use.node, f"`{use.api.rsplit('.', 1)[1]}` is not called on a model here; rewrite by hand")
                continue
            self.halvings.append((call, self.segment(call.args[0]), use))
        for node in self.plan.result.nodes:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "half" \
                    and not node.args and not node.keywords:
                target = self.segment(node.func.value)
                statement = self.plan.parents.get(node)
                assigned = isinstance(statement, ast.Assign) and any(self.segment(t) in models
                                                                     for t in statement.targets)
                if target in models or assigned:
                    if isinstance(statement, ast.Expr) and target in models:
                        self.halvings.append((statement, "", None))  # type: ignore[arg-type]
                    else:
                        self.halvings.append((node, target, None))  # type: ignore[arg-type]
        self.models = sorted(models)

    def _place(self) -> None:
        nodes: List[ast.AST] = [item[0] for item in self.backwards] + [item[3][0] for item in self.backwards]
        nodes += self.steps + [self.plan.statement(call) for call in self.clips]
        placement = place(self.site, self.use.node, nodes, self.plan.parents,  # type: ignore[arg-type]
                          self.builds[0].statement.targets[0], None, lambda test: None)
        if placement.conditions:
            # Created before the `if`: the optimizer may not exist there yet, so the device comes from the model.
            model = self._model_read_before(placement.anchor)
            if model is None:
                self.block(self.use.node, "FP16_Optimizer is built under a condition and the loop also runs without "
                                          "it, and no single model whose parameters are read before that `if` gives "
                                          "the device; rewrite by hand")
                return
            self.model = self.segment(model)
            placement = place(self.site, self.use.node, nodes, self.plan.parents,  # type: ignore[arg-type]
                              model, None, lambda test: None)
            self.flag = self.plan.fresh_name("amp_enabled")
        self.blockers.extend(placement.blockers)
        self.placement = placement

    def _model_read_before(self, anchor: ast.stmt) -> Optional[ast.expr]:
        """The model (``model`` of ``model.parameters()``) when the file reads one model's parameters, and reads them
        before ``anchor`` on every path to it -- so it exists there."""
        if len(self.models) != 1:
            return None
        for node in self.parameter_reads:
            model = node.func.value  # type: ignore[attr-defined]
            if self.segment(model) == self.models[0] and comes_before(self.plan.statement(node), anchor,
                                                                      self.plan.parents):
                return model
        return None

    def _loop(self) -> None:
        parents = self.plan.parents
        steps = {id(step) for step in self.steps}
        clips = {id(call) for call in self.clips}
        conditions = self.placement.conditions  # type: ignore[union-attr]
        unscaling = plan_unscaling([item[0] for item in self.backwards], lambda statement: id(statement) in steps,
                                   parents, lambda node: id(node) in clips, conditions)
        self.blockers.extend(unscaling.blockers)
        self.unscale = {key: statement for key, (statement, _) in unscaling.before.items()}
        for step in self.steps:
            self.schedulers.extend((scheduler, step) for scheduler in scheduler_steps(step, parents, self.segment)
                                   if self.plan.text.owns_lines(scheduler))
        scopes = []
        for step in self.steps:
            scope = scope_of(step, parents)
            if not any(scope is known for known in scopes):
                scopes.append(scope)
        scaled = {id(item[0].value) for item in self.backwards}
        if not all(build.options == ", enabled=False" for build in self.builds):
            for call in unscaled_backwards(scopes, scaled, conditions, parents):
                self.block(call, f"`{self.segment(call)}` also reaches the FP16_Optimizer's step with gradients it did "
                                 "not scale; rewrite by hand")

    # -- edits ------------------------------------------------------------------------------------
    def _access(self, name: str, node: ast.AST) -> str:
        assert self.placement is not None
        return self.placement.access(name, node, self.plan.parents)

    def apply(self) -> None:
        plan = self.plan
        assert self.inner is not None and self.placement is not None
        static = plan.fresh_name("static_loss_scale") if self._static_in_a_variable() else ""
        if self.flag:
            self._apply_pass_through(static)
        for index, build in enumerate(self.builds):
            self._apply_build(build, static, declare=index == 0 and not self.flag)
        for statement, loss, kept, region in self.backwards:
            plan.replace_statement(statement, [f"{self._access(self.scaler, statement)}.scale({loss}).backward({kept})"])
            device = self._access(self.device, region[0])
            enabled = f", enabled={self._access(self.flag, region[0])}" if self.flag else ""
            plan.wrap_in_block(region[0], region[1], f"with torch.autocast({device}, dtype=torch.float16{enabled}):")
        for call in self.clips:
            rest = [self.segment(arg) for arg in call.args] + [f"{k.arg}={self.segment(k.value)}" for k in call.keywords]
            params = parameters_of(self.name, call, plan)
            plan.replace(call, f"torch.nn.utils.clip_grad_norm_({', '.join([params] + rest)})")
            if not isinstance(plan.parents.get(call), ast.Expr):
                plan.note(call, "clip_master_grads returned -1 on an overflowing step; clip_grad_norm_ returns inf or "
                                "nan there")
        for statement in self.unscale.values():
            plan.insert_lines_before(statement, [f"{self._access(self.scaler, statement)}.unscale_({self.name})"])
        gated = {id(step) for _, step in self.schedulers}
        before = plan.fresh_name("scale_before")
        pinned = any(build.static is not None for build in self.builds)
        for step in self.steps:
            scaler = self._access(self.scaler, step)
            lines = [f"{before} = {scaler}.get_scale()"] if id(step) in gated else []
            new_scale = self._access(static, step) if static else next(
                (build.static for build in self.builds if build.static is not None), "")
            plan.replace_statement(step, lines + [f"{scaler}.step({self.name})", f"{scaler}.update({new_scale})"])
        # A pinned scale never drops, so there the test holds on every step, as Apex's static scaler stepped on all.
        stepped = "the optimizer stepped, or the scale is static" if pinned else "the optimizer stepped"
        for scheduler, step in self.schedulers:
            scaler = self._access(self.scaler, scheduler)
            plan.replace_statement(scheduler, [f"if {scaler}.get_scale() >= {before}:  # {stepped}",
                                               "    " + self.segment(scheduler)])
        for attribute in self.scale_reads:
            plan.replace(attribute, f"{self._access(self.scaler, attribute)}.get_scale()")
        for call in self.loads:
            plan.todo(call, _CHECKPOINT)
        for attribute in self.inner_reads:
            plan.replace(attribute, self.name)
        for node, argument_text, use in self.halvings:
            if isinstance(node, ast.Expr):
                alone = len(block_of(node, plan.parents)[0]) == 1
                plan.replace_statement(node, ["pass"]) if alone else plan.remove_statement(node)
            else:
                plan.replace(node, argument_text)
            if use is not None:
                plan.mark_converted(use)
            plan.note(node, "the model stays FP32 under the native recipe: this FP16 conversion is gone"
                            + (" (network_to_half's state_dict keys had a `1.` prefix; the model's keys no longer do)"
                               if use is not None and use.api.endswith("network_to_half") else ""))
        for use in self.uses:
            plan.mark_converted(use)
        plan.uses_torch = True

    def _static_in_a_variable(self) -> bool:
        """Whether the step reads the pinned scale from a variable: an expression (evaluated once, at the build),
        or builds in several branches of which some pin a scale (``None`` in the others)."""
        statics = [build.static for build in self.builds if build.static is not None]
        return any(not build.static_is_literal for build in self.builds if build.static is not None) \
            or (len(self.builds) > 1 and bool(statics))

    def _apply_pass_through(self, static: str) -> None:
        """Before the ``if`` the wrapper is built under: the condition's value, the device, and a disabled GradScaler
        (its ``step`` is the optimizer's) for the runs that skip the builds; a build replaces it."""
        assert self.placement is not None
        at = self.placement.anchor
        names = [self.flag, self.device, self.scaler] + ([static] if static else [])
        lines = self.placement.declaration(names)
        spelled = [condition.spelled() for condition in self.placement.conditions]
        lines.append(f"{self._access(self.flag, at)} = {all_of(self.placement.conditions, spelled)}")
        lines.append(f"{self._access(self.device, at)} = next({self.model}.parameters()).device.type")
        if static:
            lines.append(f"{self._access(static, at)} = None")
        lines.append(f"{self._access(self.scaler, at)} = torch.amp.GradScaler({self._access(self.device, at)}, "
                     "enabled=False)  # replaced where FP16_Optimizer was built")
        self.plan.insert_lines_before(at, lines)

    def _apply_build(self, build: _Build, static: str, declare: bool) -> None:
        """The build becomes the plain optimizer, the device type and a GradScaler with the build's options;
        ``static`` names the variable holding the pinned scale (empty when the step needs none)."""
        at = build.statement
        names = [self.device, self.scaler] + ([static] if static else [])
        lines = self.placement.declaration(names) if declare else []  # type: ignore[union-attr]
        if self.segment(self.inner) != self.name:  # type: ignore[arg-type]
            lines.append(f"{self.name} = {self.segment(self.inner)}")  # type: ignore[arg-type]
        if static:
            lines.append(f"{self._access(static, at)} = {build.static or 'None'}")
        options = build.options
        if build.static is not None:
            options = f", init_scale={self._access(static, at) if static else build.static}"
        if not self.flag:  # else known before the `if`
            lines.append(f'{self._access(self.device, at)} = {self.name}.param_groups[0]["params"][0].device.type')
        lines.append(f"{self._access(self.scaler, at)} = torch.amp.GradScaler({self._access(self.device, at)}"
                     f"{options})")
        self.plan.replace_statement(at, lines)
        self.plan.note(build.use.node, _SUBSTITUTED)
        if build.static is not None:
            skipped_already = not build.use.api.startswith("apex.fp16_utils")  # the fused flavour skipped them too
            self.plan.note(build.use.node, _STATIC + ("" if skipped_already else _STATIC_SKIPS))
