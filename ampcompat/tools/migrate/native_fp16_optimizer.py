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

The wrapper's methods are recognised on the name it was assigned to, in the function that builds it
and in the functions that call its ``backward(loss)``. A static loss scale, ``update_master_grads``,
the wrapper's ``overflow`` flag and a wrapper used as a value stay on ampcompat, with the reason.
"""
from __future__ import annotations

import ast
from typing import Dict, List, Optional, Tuple

from .callargs import NOT_LITERAL, has_starred, literal_value
from .native_amp import parameters_of
from .native_loop import plan_unscaling, scheduler_steps, unscaled_backwards
from .native_placement import place
from .native_regions import forward_region, overlapping
from .plan import RewritePlan
from .scanner import Use
from .syntax import block_of, scope_of, walk_local

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


def convert_fp16_optimizers(plan: RewritePlan) -> None:
    """Convert the file's ``FP16_Optimizer`` loops (with their model halving), or leave TODOs."""
    wrappers = [use for use in plan.result.uses if use.api in WRAPPERS and use.kind == "call"]
    if not wrappers:
        return
    if len(wrappers) > 1:
        for use in wrappers:
            plan.todo(use.node, "FP16_Optimizer is built more than once in this file; rewrite by hand")
        return
    conversion = _Conversion(plan, wrappers[0])
    conversion.analyse()
    if conversion.blockers:
        for node, message in conversion.blockers:
            plan.todo(node, message)
        return
    conversion.apply()


class _Conversion:
    def __init__(self, plan: RewritePlan, use: Use) -> None:
        self.plan = plan
        self.use = use
        self.blockers: List[Tuple[ast.AST, str]] = []
        self.name = ""
        self.statement: Optional[ast.Assign] = None
        self.inner: Optional[ast.expr] = None
        self.scaler_options = ""
        self.backwards: List[Tuple[ast.Expr, str, str, Tuple[ast.stmt, ast.stmt]]] = []
        self.clips: List[ast.Call] = []
        self.steps: List[ast.Expr] = []
        self.scale_reads: List[ast.Attribute] = []
        self.halvings: List[Tuple[ast.AST, str, Use]] = []
        self.models: List[str] = []
        self.placement = None
        self.unscale: Dict[int, ast.stmt] = {}
        self.schedulers: List[Tuple[ast.stmt, ast.stmt]] = []
        self.loads: List[ast.Call] = []
        self.inner_reads: List[ast.Attribute] = []
        self.device = plan.fresh_name("amp_device_type")
        self.scaler = plan.fresh_name("scaler")

    def block(self, node: ast.AST, message: str) -> None:
        self.blockers.append((node, message))

    def segment(self, node: ast.AST) -> str:
        return self.plan.text.segment(node)

    def analyse(self) -> None:
        call = self.use.node
        statement = self.plan.parents.get(call)
        if not (isinstance(call, ast.Call) and isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], (ast.Name, ast.Attribute))
                and self.plan.text.owns_lines(statement)) or has_starred(call) or not call.args:
            self.block(call, "FP16_Optimizer(...) is not assigned to a name on a line of its own; rewrite by hand")
            return
        self.statement, self.inner = statement, call.args[0]
        self.name = self.segment(statement.targets[0])
        self._options(call)
        self._methods()
        self._halving()
        if self.blockers:
            return
        if not self.backwards:
            self.block(call, "the FP16_Optimizer's backward(loss) is not called in this file; rewrite by hand")
            return
        self._place()
        if self.blockers:
            return
        self._loop()

    def _options(self, call: ast.Call) -> None:
        values = {keyword.arg: literal_value(keyword.value) for keyword in call.keywords}
        for position, name in enumerate(("static_loss_scale", "dynamic_loss_scale", "dynamic_loss_args"), start=1):
            if position < len(call.args):
                values[name] = literal_value(call.args[position])
        if any(value is NOT_LITERAL for key, value in values.items() if key != "verbose"):
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
            self.scaler_options = options
        elif values.get("static_loss_scale", 1.0) == 1.0:
            self.scaler_options = ", enabled=False"  # FP16_Optimizer's default: no loss scaling at all
        else:
            self.block(call, "a static loss scale: torch.amp.GradScaler always scales dynamically (and skips steps "
                             "with inf/NaN gradients); rewrite by hand")

    def _methods(self) -> None:
        """Every use of the wrapper's name where it is the wrapper."""
        assert self.statement is not None
        scopes = [scope_of(self.statement, self.plan.parents)]
        for node in self.plan.result.nodes:
            if self._is_call_of(node, "backward"):
                scope = scope_of(node, self.plan.parents)
                if not any(scope is known for known in scopes):
                    scopes.append(scope)
        for scope in scopes:
            for node in walk_local(scope):
                if isinstance(node, (ast.Name, ast.Attribute)) and self._is_wrapper(node) \
                        and node.lineno > self.statement.end_lineno:  # type: ignore[operator]
                    self._method(node)

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
        if self.statement is not None and any(node is target for target in self.statement.targets):
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
        models = {self.segment(node.func.value) for node in self.plan.result.nodes
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("parameters", "named_parameters")}
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
        assert self.statement is not None
        nodes: List[ast.AST] = [item[0] for item in self.backwards] + [item[3][0] for item in self.backwards]
        nodes += self.steps + [self.plan.statement(call) for call in self.clips]
        placement = place(self.statement, self.use.node, nodes, self.plan.parents,  # type: ignore[arg-type]
                          self.statement.targets[0], None, lambda test: None)
        self.blockers.extend(placement.blockers)
        if placement.conditions:
            self.block(self.use.node, "FP16_Optimizer is built under a condition and the loop also runs without it; "
                                      "rewrite by hand")
        self.placement = placement

    def _loop(self) -> None:
        parents = self.plan.parents
        steps = {id(step) for step in self.steps}
        clips = {id(call) for call in self.clips}
        unscaling = plan_unscaling([item[0] for item in self.backwards], lambda statement: id(statement) in steps,
                                   parents, lambda node: id(node) in clips)
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
        if ", enabled=False" not in self.scaler_options:
            for call in unscaled_backwards(scopes, scaled, [], parents):
                self.block(call, f"`{self.segment(call)}` also reaches the FP16_Optimizer's step with gradients it did "
                                 "not scale; rewrite by hand")

    # -- edits ------------------------------------------------------------------------------------
    def _access(self, name: str, node: ast.AST) -> str:
        assert self.placement is not None
        return self.placement.access(name, node, self.plan.parents)

    def apply(self) -> None:
        plan = self.plan
        assert self.statement is not None and self.inner is not None and self.placement is not None
        at = self.statement
        lines = self.placement.declaration([self.device, self.scaler])
        if self.segment(self.inner) != self.name:
            lines.append(f"{self.name} = {self.segment(self.inner)}")
        lines.append(f'{self._access(self.device, at)} = {self.name}.param_groups[0]["params"][0].device.type')
        lines.append(f"{self._access(self.scaler, at)} = torch.amp.GradScaler({self._access(self.device, at)}"
                     f"{self.scaler_options})")
        plan.replace_statement(at, lines)
        plan.note(self.use.node, _SUBSTITUTED)
        for statement, loss, kept, region in self.backwards:
            plan.replace_statement(statement, [f"{self._access(self.scaler, statement)}.scale({loss}).backward({kept})"])
            device = self._access(self.device, region[0])
            plan.wrap_in_block(region[0], region[1], f"with torch.autocast({device}, dtype=torch.float16):")
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
        for step in self.steps:
            scaler = self._access(self.scaler, step)
            lines = [f"{before} = {scaler}.get_scale()"] if id(step) in gated else []
            plan.replace_statement(step, lines + [f"{scaler}.step({self.name})", f"{scaler}.update()"])
        for scheduler, step in self.schedulers:
            scaler = self._access(self.scaler, scheduler)
            plan.replace_statement(scheduler, [f"if {scaler}.get_scale() >= {before}:  # the optimizer stepped",
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
        plan.mark_converted(self.use)
        plan.uses_torch = True
