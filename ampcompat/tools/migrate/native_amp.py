"""``--to-native`` for ``apex.amp``: the O1 recipe becomes ``torch.autocast`` + ``torch.amp.GradScaler``.

The amp calls of a file are converted together or not at all, because they share one scaler::

    model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
    ...
    output = model(x)                                 with torch.autocast(amp_device_type, dtype=torch.float16):
    loss = criterion(output, y)             ->            output = model(x)
    with amp.scale_loss(loss, optimizer) as s:            loss = criterion(output, y)
        s.backward()                                  scaler.scale(loss).backward()
    clip_grad_norm_(amp.master_params(optimizer), 1)  scaler.unscale_(optimizer)
    optimizer.step()                                  clip_grad_norm_((p for group in optimizer.param_groups ...), 1)
                                                      scaler.step(optimizer)
                                                      scaler.update()

``initialize`` itself becomes ``amp_device_type = next(model.parameters()).device.type`` and a
``GradScaler`` with Apex's dynamic-scaling constants (start 2**16, growth window 2000). Apex's O1
autocast everything from ``initialize`` on; here the autocast region is the forward pass that
computes the loss handed to ``scale_loss`` (found by following the names the loss is computed from,
within its block). Anything that is not that shape -- O0/O2/O3, several losses or optimizers, private
attributes, a loss computed in another function -- leaves every amp call of the file on ampcompat,
with a ``TODO(ampcompat)`` comment saying why at each spot that blocked the rewrite.
"""
from __future__ import annotations

import ast
from typing import Callable, List, Optional, Set, Tuple

from .callargs import NOT_LITERAL, argument, has_starred, literal_value
from .plan import RewritePlan
from .scanner import Use
from .syntax import (block_of, comes_before, is_plain_reference, loaded_names, same_expression, scope_of,
                     stored_names, walk_local)

_GROWTH_INTERVAL = 2000
_ORIGINAL_MAX_SCALE = 2.0**24

_LEVEL_BLOCKERS = {
    "O0": "opt_level O0 is plain FP32 training: delete amp.initialize, call loss.backward() instead of "
          "amp.scale_loss, and step the optimizer as usual",
    "O2": "opt_level O2 keeps FP16 model weights with FP32 master weights inside the optimizer, which plain "
          "PyTorch has no counterpart for; keep ampcompat, or train the FP32 model under torch.autocast + "
          "torch.amp.GradScaler (O1's recipe) and expect different numerics",
    "O3": "opt_level O3 trains a pure FP16 model: the native counterpart is model.half() with no loss "
          "scaling; rewrite by hand or keep ampcompat",
    "O4": "opt_level O4 is bf16 O1: use torch.autocast(device_type, dtype=torch.bfloat16) around the forward "
          "pass and loss, and call loss.backward() without a GradScaler",
    "O5": "opt_level O5 keeps bf16 model weights with FP32 master weights, which plain PyTorch has no "
          "counterpart for; keep ampcompat or move to bf16 autocast by hand",
}
_OTHER_API_BLOCKERS = {
    "apex.amp": "uses the amp module itself as a value; plain PyTorch has no counterpart, rewrite this by hand",
    "apex.amp._amp_state": "touches amp's private state; with a GradScaler use scaler.get_scale(), "
                           "scaler.update(new_scale=...) or GradScaler(init_scale=...) instead",
    "apex.amp.init": "uses the pre-2019 amp.init() handle API; rewrite it as torch.autocast + "
                     "torch.amp.GradScaler by hand",
    "apex.amp.init()": "uses the handle returned by amp.init(); rewrite it as torch.autocast + "
                       "torch.amp.GradScaler by hand",
    "apex.amp.scaler": "uses Apex's LossScaler; torch.amp.GradScaler has a different API, rewrite this by hand",
    "apex.amp.scaler.LossScaler": "uses Apex's LossScaler; torch.amp.GradScaler has a different API, rewrite this "
                                  "by hand",
}
_REGISTRY_BLOCKER = (
    "registers a function for O1's casts; natively, cast its inputs and run it under "
    "torch.autocast(device_type, enabled=False) (torch.amp.custom_fwd for an autograd.Function)"
)
_SCALE_LOSS_DEFAULTS = {"loss_id": 0, "delay_unscale": False, "delay_overflow_check": False, "model": None}
_SCALE_LOSS_BLOCKERS = {
    "loss_id": "several losses with their own loss scalers (loss_id): one GradScaler can scale them all, "
               "but its scale then moves differently from Apex's per-loss scalers; rewrite by hand",
    "delay_unscale": "delay_unscale keeps gradients scaled across several backward passes; with a GradScaler "
                     "call scaler.scale(loss).backward() for each and scaler.step/update once; rewrite by hand",
    "delay_overflow_check": "delay_overflow_check hands the overflow check to the caller; GradScaler checks "
                            "in scaler.step(); rewrite by hand",
    "model": "the model argument of scale_loss is not used by Apex; remove it first",
}
_INITIALIZE_DEFAULTS = {
    "enabled": True, "loss_scale": "dynamic", "num_losses": 1, "max_loss_scale": _ORIGINAL_MAX_SCALE,
    "min_loss_scale": None, "cast_model_type": None, "patch_torch_functions": None, "keep_batchnorm_fp32": None,
    "master_weights": None, "cast_model_outputs": None,
}
_INITIALIZE_BLOCKERS = {
    "enabled": "amp is switched on or off at run time (enabled=...); pass the same flag to torch.autocast(enabled=...) "
               "and torch.amp.GradScaler(enabled=...) by hand",
    "loss_scale": "a static loss scale: torch.amp.GradScaler always scales dynamically (and skips steps with inf/NaN "
                  "gradients); rewrite by hand",
    "num_losses": "several losses with their own loss scalers (num_losses): rewrite by hand",
    "max_loss_scale": "torch.amp.GradScaler has no ceiling on the loss scale (max_loss_scale); rewrite by hand",
    "min_loss_scale": "torch.amp.GradScaler has no floor on the loss scale (min_loss_scale); rewrite by hand",
}
_NOT_A_WITH_BLOCK = (
    "amp.scale_loss is not used as `with amp.scale_loss(loss, optimizer) as scaled_loss:`; rewrite by hand"
)
_OVERRIDE_BLOCKER = "overrides one of O1's properties ({name}); plain autocast has no such switch, rewrite by hand"
_UNCONVERTED = (
    "the amp calls in this file stay on ampcompat until the TODO(ampcompat) notes in it are resolved"
)


def is_amp_use(use: Use) -> bool:
    """Whether a use belongs to the amp recipe (converted as one unit)."""
    return use.kind not in ("import", "string", "check") and (
        use.api == "apex.amp" or use.api.startswith(("apex.amp.", "optimizer.")) or use.api == "apex.amp.init()"
    )


def convert_amp(plan: RewritePlan) -> None:
    """Convert the file's amp calls to plain PyTorch, or leave TODOs where that is not mechanical."""
    uses = [use for use in plan.result.uses if is_amp_use(use)]
    if not uses:
        return
    conversion = _AmpConversion(plan, uses)
    conversion.analyse()
    if conversion.blockers:
        for node, message in conversion.blockers:
            plan.todo(node, message)
        init = conversion.init
        if init is not None and all(node is not init.node for node, _ in conversion.blockers):
            plan.todo(init.node, _UNCONVERTED)
        return
    for action in conversion.actions:
        action()
    for use in uses:
        plan.mark_converted(use)
    plan.uses_torch = True


class _AmpConversion:
    """Checks that the amp calls have the mechanical O1 shape and queues the edits that convert them."""

    def __init__(self, plan: RewritePlan, uses: List[Use]) -> None:
        self.plan = plan
        self.uses = uses
        self.blockers: List[Tuple[ast.AST, str]] = []
        self.actions: List[Callable[[], None]] = []
        self.init: Optional[Use] = None
        self.init_statement: Optional[ast.stmt] = None
        self.optimizer_refs: List[ast.expr] = []
        self.scale_scopes: List[ast.AST] = []
        self.clip_statements: Set[int] = set()
        self.regions: List[Tuple[int, int]] = []
        self.scaler = plan.fresh_name("scaler")
        self.device = plan.fresh_name("amp_device_type")

    def block(self, node: ast.AST, message: str) -> None:
        self.blockers.append((node, message))

    def segment(self, node: ast.AST) -> str:
        return self.plan.text.segment(node)

    # -- analysis --------------------------------------------------------------------------------
    def analyse(self) -> None:
        inits = [use for use in self.uses if use.api == "apex.amp.initialize"]
        if len(inits) == 1:
            self.init = inits[0]
            self._initialize(self.init)
        elif len(inits) > 1:
            for use in inits:
                self.block(use.node, "amp.initialize is called more than once in this file; rewrite by hand")
        init_ok = not self.blockers and self.init is not None
        handlers = {
            "apex.amp.initialize": lambda use: None,
            "apex.amp.scale_loss": self._scale_loss,
            "apex.amp.master_params": self._master_params,
            "apex.amp.state_dict": self._state_dict,
            "apex.amp.load_state_dict": self._state_dict,
            "apex.amp.disable_casts": self._disable_casts,
        }
        shared = [use for use in self.uses if not use.exclusive]
        if shared:
            self.block(shared[0].node, f"`{shared[0].local_name}` is not only amp here: another binding of the name "
                                       "(an `except ImportError` fallback, an assignment, another import) reaches "
                                       f"{_plural_uses(len(shared))} of it, so the amp calls stay on ampcompat; "
                                       "rewrite by hand")
        for use in self.uses:
            handler = handlers.get(use.api)
            if handler is not None:
                if init_ok:  # these need what amp.initialize becomes
                    handler(use)
                elif not inits:
                    self.block(use.node, "amp.initialize is not called in this file: create the torch.amp.GradScaler "
                                         "where it is called and pass it here")
            elif use.api.startswith("optimizer."):
                self.block(use.node, f"uses `{use.api.split('.', 1)[1]}`, which amp adds to optimizers; "
                                     "torch.amp.GradScaler has no counterpart, rewrite this by hand")
            elif "function" in use.api:
                self.block(use.node, _REGISTRY_BLOCKER)
            else:
                self.block(use.node, _OTHER_API_BLOCKERS.get(use.api, f"`{use.api}`: {use.reason}"))
        if init_ok and not any(use.api == "apex.amp.scale_loss" for use in self.uses):
            assert self.init is not None
            self.block(self.init.node, "amp.scale_loss is not called in this file, so the forward pass to put under "
                                       "torch.autocast is not here either; rewrite by hand")
        if init_ok:
            for scope in self.scale_scopes:
                self._steps(scope)

    def _initialize(self, use: Use) -> None:
        call = use.node
        if not isinstance(call, ast.Call):
            self.block(call, "amp.initialize is used as a value; rewrite by hand")
            return
        statement = self.plan.statement(call)
        if has_starred(call):
            self.block(call, "the arguments of amp.initialize are unpacked with * or **; rewrite by hand")
            return
        level_node = argument(call, "opt_level", 3)
        level = "O1" if level_node is None else literal_value(level_node)
        if level is NOT_LITERAL:
            self.block(call, "opt_level is only known at run time (it is not a literal); the native rewrite is O1's, "
                             "so write it by hand once the level is fixed")
        elif level != "O1":
            self.block(call, _LEVEL_BLOCKERS.get(level, f"unknown opt_level {level!r}"))
        if len(call.args) > 2:
            self.block(call, "pass amp.initialize's options by keyword; only models and optimizers are read "
                             "positionally here")
        for keyword in call.keywords:
            name = keyword.arg
            if name in ("models", "optimizers", "opt_level", "verbosity"):
                continue
            value = literal_value(keyword.value)
            if name in _INITIALIZE_DEFAULTS and value is not NOT_LITERAL and value == _INITIALIZE_DEFAULTS[name]:
                continue
            self.block(call, _INITIALIZE_BLOCKERS.get(name, _OVERRIDE_BLOCKER.format(name=name)))
        models, optimizers = argument(call, "models", 0), argument(call, "optimizers", 1)
        model_ref = models.elts[0] if isinstance(models, (ast.List, ast.Tuple)) and models.elts else models
        if not is_plain_reference(model_ref):
            self.block(call, "the model passed to amp.initialize is not a plain name; assign it to a variable first")
        if optimizers is None:
            self.block(call, "amp.initialize without an optimizer (inference): put the model calls under "
                             "torch.autocast(device_type, dtype=torch.float16) by hand")
        elif isinstance(optimizers, (ast.List, ast.Tuple)):
            self.block(call, "several optimizers: natively, call scaler.step(...) for each and scaler.update() "
                             "once per iteration; rewrite by hand")
        elif not is_plain_reference(optimizers):
            self.block(call, "the optimizer passed to amp.initialize is not a plain name; assign it to a variable "
                             "first")
        parent = self.plan.parents[call]
        targets: Optional[ast.expr] = None
        if isinstance(parent, ast.Assign) and len(parent.targets) == 1:
            targets = parent.targets[0]
        elif not isinstance(parent, ast.Expr):
            self.block(call, "the result of amp.initialize is used inside an expression; rewrite by hand")
        if not self.plan.text.owns_lines(statement):
            self.block(call, "amp.initialize shares its line with other code; put it on a line of its own")
        if optimizers is not None and targets is not None:
            if isinstance(targets, (ast.Tuple, ast.List)) and len(targets.elts) == 2:
                self.optimizer_refs.append(targets.elts[1])
            else:
                self.block(call, "the (model, optimizer) pair amp.initialize returns is not unpacked; rewrite by hand")
        if self.blockers:
            return
        self.optimizer_refs.append(optimizers)  # type: ignore[arg-type]
        self.init_statement = statement
        self.actions.append(lambda: self._replace_initialize(statement, targets, models, optimizers, model_ref))

    def _replace_initialize(self, statement: ast.stmt, targets: Optional[ast.expr], models: ast.expr,
                            optimizers: ast.expr, model_ref: ast.expr) -> None:
        lines = []
        unpacked = targets.elts if isinstance(targets, (ast.Tuple, ast.List)) else []
        if targets is not None and not all(map(same_expression, unpacked, (models, optimizers))):
            lines.append(f"{self.segment(targets)} = {self.segment(models)}, {self.segment(optimizers)}")
        lines.append(f"{self.device} = next({self.segment(model_ref)}.parameters()).device.type")
        lines.append(f"{self.scaler} = torch.amp.GradScaler({self.device}, init_scale=2.0**16, "
                     f"growth_interval={_GROWTH_INTERVAL})")
        self.plan.replace_statement(statement, lines)

    def _reachable(self, use: Use) -> bool:
        """Whether names defined where amp.initialize stood are visible at ``use``."""
        assert self.init_statement is not None
        if comes_before(self.init_statement, use.node, self.plan.parents):
            return True
        self.block(use.node, "amp.initialize runs elsewhere (another function, or a branch that does not lead here), "
                             "so the GradScaler it becomes is not visible here: create the GradScaler next to "
                             "amp.initialize and pass it to this code")
        return False

    def _is_amp_optimizer(self, node: Optional[ast.AST]) -> bool:
        return any(same_expression(node, ref) for ref in self.optimizer_refs)

    def _scale_loss(self, use: Use) -> None:
        call = use.node
        withitem = self.plan.parents.get(call)
        if not (isinstance(call, ast.Call) and isinstance(withitem, ast.withitem) and withitem.context_expr is call):
            self.block(use.node, _NOT_A_WITH_BLOCK)
            return
        with_statement = self.plan.parents[withitem]
        scaled = withitem.optional_vars
        if len(with_statement.items) != 1 or not isinstance(scaled, ast.Name) or has_starred(call):
            self.block(call, _NOT_A_WITH_BLOCK)
            return
        for name, default in _SCALE_LOSS_DEFAULTS.items():
            position = {"loss_id": 2, "model": 3, "delay_unscale": 4, "delay_overflow_check": 5}[name]
            value = literal_value(argument(call, name, position))
            if argument(call, name, position) is not None and (value is NOT_LITERAL or value != default):
                self.block(call, _SCALE_LOSS_BLOCKERS[name])
        loss, optimizer = argument(call, "loss", 0), argument(call, "optimizers", 1)
        if isinstance(optimizer, (ast.List, ast.Tuple)):
            self.block(call, "several optimizers: natively, call scaler.step(...) for each and scaler.update() once; "
                             "rewrite by hand")
            return
        if not self._is_amp_optimizer(optimizer):
            self.block(call, "the optimizer passed here is not the one amp.initialize returned (by name); "
                             "rewrite by hand")
            return
        backward = _single_backward_call(with_statement, scaled.id)
        if backward is None:
            self.block(call, "the `with amp.scale_loss(...)` block does more than `scaled_loss.backward()`; "
                             "rewrite by hand")
            return
        if not self.plan.text.owns_lines(with_statement):
            self.block(call, "the `with amp.scale_loss(...)` block shares a line with other code; rewrite by hand")
            return
        if not self._reachable(use):
            return
        if not isinstance(loss, ast.Name):
            self.block(call, "the loss passed to amp.scale_loss is an expression; assign it to a variable where the "
                             "forward pass computes it")
            return
        region = self._forward_region(with_statement, loss.id, call)
        if region is None:
            return
        scope = scope_of(with_statement, self.plan.parents)
        if not any(scope is known for known in self.scale_scopes):
            self.scale_scopes.append(scope)
        arguments = self._arguments_text(backward)
        first, last = region

        def convert() -> None:
            self.plan.replace_statement(with_statement, [f"{self.scaler}.scale({loss.id}).backward({arguments})"])
            self._wrap_in_autocast(first, last)

        self.actions.append(convert)

    def _arguments_text(self, call: ast.Call) -> str:
        parts = [self.segment(arg) for arg in call.args]
        parts += [(f"{k.arg}=" if k.arg else "**") + self.segment(k.value) for k in call.keywords]
        return ", ".join(parts)

    def _forward_region(self, with_statement: ast.stmt, loss_name: str,
                        call: ast.Call) -> Optional[Tuple[ast.stmt, ast.stmt]]:
        """The statements before ``with_statement`` in its block that compute the loss (first, last)."""
        block, index = block_of(with_statement, self.plan.parents)
        loss_index = next((j for j in range(index - 1, -1, -1) if loss_name in stored_names(block[j])), None)
        if loss_index is None:
            self.block(call, f"`{loss_name}` is not computed in the block that calls amp.scale_loss (it may come from "
                             "another function), so the forward pass to put under torch.autocast is not known; "
                             "rewrite by hand")
            return None
        needed = loaded_names(block[loss_index])
        first_index = loss_index
        for j in range(loss_index - 1, -1, -1):
            if stored_names(block[j]) & needed:
                first_index = j
                needed |= loaded_names(block[j])
        region = block[first_index : loss_index + 1]
        while len(region) > 1 and _creates_data(region[0]):
            region = region[1:]  # inputs made before the forward pass need no autocast
        amp_nodes = {id(use.node) for use in self.uses}
        problem = None
        if not all(self.plan.text.owns_lines(statement) for statement in region):
            problem = "a statement of the forward pass shares a line with other code"
        elif any(id(node) in amp_nodes for statement in region for node in ast.walk(statement)):
            problem = "the forward pass that computes the loss also contains amp calls"
        elif any(_is_multiline_string(node) for statement in region for node in ast.walk(statement)):
            problem = "the forward pass contains a multi-line string, which re-indenting would change"
        lines = (region[0].lineno, region[-1].end_lineno)
        if problem is None and any(lines[0] <= end and start <= lines[1] for start, end in self.regions):
            problem = "two amp.scale_loss calls share the statements of their forward passes"
        if problem is not None:
            self.block(call, problem + "; put the forward pass under torch.autocast by hand")
            return None
        self.regions.append(lines)  # type: ignore[arg-type]
        return region[0], region[-1]

    def _wrap_in_autocast(self, first: ast.stmt, last: ast.stmt) -> None:
        self.plan.wrap_in_block(first, last, f"with torch.autocast({self.device}, dtype=torch.float16):")

    def _steps(self, scope: ast.AST) -> None:
        """``optimizer.step()`` -> ``scaler.step(optimizer)`` + ``scaler.update()`` in ``scope``."""
        steps = [
            node for node in walk_local(scope)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
            and self._is_amp_optimizer(node.func.value)
        ]
        if not steps:
            self.block(scope if not isinstance(scope, ast.Module) else self.init.node,  # type: ignore[union-attr]
                       "no optimizer.step() for the amp optimizer next to amp.scale_loss here; rewrite by hand")
            return
        for call in steps:
            statement = self.plan.parents[call]
            if not isinstance(statement, ast.Expr) or call.args or call.keywords:
                self.block(call, "optimizer.step() is called with arguments or its result is used; rewrite by hand")
            elif not self.plan.text.owns_lines(statement):
                self.block(call, "optimizer.step() shares its line with other code; put it on a line of its own")
            else:
                optimizer = self.segment(call.func.value)  # type: ignore[attr-defined]
                self.actions.append(lambda s=statement, o=optimizer: self.plan.replace_statement(
                    s, [f"{self.scaler}.step({o})", f"{self.scaler}.update()"]))

    def _master_params(self, use: Use) -> None:
        call = use.node
        if not isinstance(call, ast.Call) or has_starred(call):
            self.block(use.node, "amp.master_params is used as a value; rewrite by hand")
            return
        optimizer = argument(call, "optimizer", 0)
        if not self._is_amp_optimizer(optimizer):
            self.block(call, "amp.master_params gets an optimizer other than the one amp.initialize returned; "
                             "rewrite by hand")
            return
        if not self._reachable(use):
            return
        name = self.segment(optimizer)  # type: ignore[arg-type]
        replacement = f'(p for group in {name}.param_groups for p in group["params"])'
        statement = self.plan.statement(call)
        if _is_clipping_argument(call, self.plan.parents):
            if not self.plan.text.owns_lines(statement):
                self.block(call, "the gradient clipping shares its line with other code; put it on a line of its own")
                return
            first_here = id(statement) not in self.clip_statements
            self.clip_statements.add(id(statement))

            def convert_clip() -> None:
                if first_here:
                    self.plan.insert_lines_before(statement, [f"{self.scaler}.unscale_({name})"])
                self.plan.replace(call, replacement)

            self.actions.append(convert_clip)
            return

        def convert() -> None:
            self.plan.replace(call, replacement)
            self.plan.todo(call, f"Apex had unscaled these gradients when `with amp.scale_loss` ended; a GradScaler "
                                 f"keeps them scaled until {self.scaler}.unscale_({name}) (or {self.scaler}.step): "
                                 "call it first if this code reads .grad")

        self.actions.append(convert)

    def _state_dict(self, use: Use) -> None:
        call = use.node
        if not isinstance(call, ast.Call) or has_starred(call):
            self.block(use.node, f"{use.api.rsplit('.', 1)[1]} is used as a value; rewrite by hand")
            return
        loading = use.api.endswith("load_state_dict")
        if (loading and len(call.args) + len(call.keywords) != 1) or (not loading and (call.args or call.keywords)):
            self.block(call, "amp.state_dict(destination) has no GradScaler counterpart; rewrite by hand")
            return
        if not self._reachable(use):
            return
        method = "load_state_dict" if loading else "state_dict"

        def convert() -> None:
            self.plan.replace(call.func, f"{self.scaler}.{method}")
            if loading:
                self.plan.todo(call, "a checkpoint written by Apex's amp.state_dict() holds {'loss_scaler0': {...}}: "
                                     "convert it with ampcompat.amp_state_to_grad_scaler(...) before loading it here "
                                     "(see migration_guide.md, Checkpoints)")

        self.actions.append(convert)

    def _disable_casts(self, use: Use) -> None:
        call = use.node
        withitem = self.plan.parents.get(call)
        if not isinstance(call, ast.Call) or not isinstance(withitem, ast.withitem) or call.args or call.keywords:
            self.block(use.node, "amp.disable_casts is not used as `with amp.disable_casts():`; rewrite by hand")
            return
        if self._reachable(use):
            self.actions.append(lambda: self.plan.replace(call, f"torch.autocast({self.device}, enabled=False)"))


def _plural_uses(count: int) -> str:
    return "the use" if count == 1 else f"{count} uses"


_FACTORIES = {"randn", "rand", "randint", "randperm", "zeros", "ones", "full", "empty", "tensor", "arange",
              "linspace", "eye", "as_tensor", "from_numpy", "randn_like", "rand_like", "zeros_like", "ones_like",
              "full_like", "empty_like", "manual_seed"}
_MOVES = {"to", "cuda", "cpu", "float", "double", "long", "int", "half", "bfloat16", "contiguous", "view",
          "reshape", "detach", "clone", "unsqueeze", "squeeze", "pin_memory"}


def _creates_data(statement: ast.stmt) -> bool:
    """An assignment that only creates or moves tensors (``x = torch.randn(4, 8).to(device)``)."""
    if not isinstance(statement, (ast.Assign, ast.AnnAssign)) or statement.value is None:
        return False
    calls = [node for node in ast.walk(statement.value) if isinstance(node, ast.Call)]
    if not calls:
        return False
    for call in calls:
        func = call.func
        if not isinstance(func, ast.Attribute):
            return False
        is_factory = func.attr in _FACTORIES and isinstance(func.value, ast.Name) and func.value.id == "torch"
        if not is_factory and func.attr not in _MOVES:
            return False
    return True


def _single_backward_call(with_statement: ast.With, scaled_name: str) -> Optional[ast.Call]:
    """The ``scaled.backward(...)`` call if it is the block's only statement."""
    if len(with_statement.body) != 1 or not isinstance(with_statement.body[0], ast.Expr):
        return None
    call = with_statement.body[0].value
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "backward"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == scaled_name):
        return call
    return None


def _is_clipping_argument(call: ast.Call, parents) -> bool:
    """Whether ``call`` is passed straight to a function whose name says it clips (``clip_grad_norm_``)."""
    parent = parents.get(call)
    if not isinstance(parent, ast.Call) or call is parent.func:
        return False
    func = parent.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return "clip" in name


def _is_multiline_string(node: ast.AST) -> bool:
    is_string = isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))
    return is_string and node.lineno != node.end_lineno  # type: ignore[attr-defined]
