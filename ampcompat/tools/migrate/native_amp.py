"""``--to-native`` for ``apex.amp``: training loops become ``torch.autocast`` + ``torch.amp.GradScaler``.

The amp calls of a file are converted together or not at all, because they share the scalers::

    model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
    ...
    output = model(x)                                 with torch.autocast(amp_device_type, dtype=torch.float16):
    loss = criterion(output, y)             ->            output = model(x)
    with amp.scale_loss(loss, optimizer) as s:            loss = criterion(output, y)
        s.backward()                                  scaler.scale(loss).backward()
    clip_grad_norm_(amp.master_params(optimizer), 1)  scaler.unscale_(optimizer)
    optimizer.step()                                  clip_grad_norm_((p for group in optimizer.param_groups ...), 1)
    scheduler.step()                                  scale_before = scaler.get_scale()
                                                      scaler.step(optimizer)
                                                      scaler.update()
                                                      if scaler.get_scale() >= scale_before:
                                                          scheduler.step()

``amp.initialize`` becomes the autocast device type and a GradScaler with Apex's dynamic-scaling constants
(start 2**16, growth window 2000); one GradScaler per optimizer (or per group of optimizers and losses
that share gradients), as Apex had one loss scaler per loss. The level decides the recipe
(:mod:`native_levels`); where the names are created and how other functions reach them is
:mod:`native_placement`'s; where gradients must be unscaled, :mod:`native_loop`'s; the autocast region
around the forward pass, :mod:`native_regions`'s. A scheduler stepped right after the optimizer steps
only when the optimizer did (a GradScaler skips steps with inf/NaN gradients; Apex's schedulers advanced
on skipped steps too, which each such site's note says). Checkpoints keep the GradScaler's state under
Apex's key, with a loader for Apex's format (:mod:`native_checkpoint`).

Anything that is not one of these shapes -- private attributes, the old ``amp.init()`` handle, a loss
computed in another function, a static loss scale -- leaves every amp call of the file on ampcompat,
with a ``TODO(ampcompat)`` comment saying why at each spot that blocked the rewrite.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import native_amp_object, native_checkpoint, native_inference, native_reads
from .native_forward import outer_regions
from .callargs import NOT_LITERAL, argument, has_starred, literal_value
from .native_imports import disposable_import_try
from .native_init_pair import branch_pair, differences
from .native_levels import LevelChoice, Recipe, recipe_for
from .native_loop import (ScaledClip, might_read_grads, path_to_step, plan_unscaling, scheduler_steps,
                          unscaled_backwards)
from .native_placement import Placement, place
from .native_regions import Region, forward_region, overlapping
from .plan import RewritePlan
from .scanner import Use, catches_import_error
from .syntax import block_of, enclosing, is_plain_reference, root_name, same_expression, scope_of, walk_local

_GROWTH_INTERVAL = 2000
_ORIGINAL_MAX_SCALE = 2.0**24

_SCALED_CLIP_NOTE = ("this clips after every backward pass of gradient accumulation, where Apex had unscaled the "
                     "partial sums and a GradScaler has not: it now clips the scaled gradients at the threshold times "
                     "scaler.get_scale() (the same clipping; a returned norm is divided by the scale), which reads "
                     "the scale on the host at each call")

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
_NATIVE_FP16 = {"einsum", "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "addr", "mv", "conv1d",
                "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "prelu",
                "chain_matmul", "scaled_dot_product_attention"}
"""Functions CUDA autocast already runs in FP16 (PyTorch's documented list): registering them is a no-op."""
_SCALE_LOSS_POSITIONS = {"loss_id": 2, "model": 3, "delay_unscale": 4, "delay_overflow_check": 5}
_DELAY_OVERFLOW_CHECK = ("delay_overflow_check hands the overflow check to the caller; GradScaler checks in "
                         "scaler.step(); rewrite by hand")
_INITIALIZE_DEFAULTS = {
    "loss_scale": "dynamic", "max_loss_scale": _ORIGINAL_MAX_SCALE, "min_loss_scale": None,
}
_INITIALIZE_BLOCKERS = {
    "loss_scale": "a static loss scale: torch.amp.GradScaler always scales dynamically (and skips steps with inf/NaN "
                  "gradients); rewrite by hand",
    "max_loss_scale": "torch.amp.GradScaler has no ceiling on the loss scale (max_loss_scale); rewrite by hand",
    "min_loss_scale": "torch.amp.GradScaler has no floor on the loss scale (min_loss_scale); rewrite by hand",
}
_IGNORED_OPTIONS = ("keep_batchnorm_fp32", "master_weights", "cast_model_type", "patch_torch_functions",
                    "cast_model_outputs")
_O1_OVERRIDE_BLOCKER = "overrides one of O1's properties ({name}); plain autocast has no such switch, rewrite by hand"
_IGNORED_NOTE = ("{names}: Apex's casting options have no effect on the native recipe (an FP32 model, "
                 "autocast per op; batch norm weights stay FP32)")
_RUNTIME_LOSS_SCALE_NOTE = (
    "loss_scale `{spelled}` is only known at run time: a GradScaler scales dynamically, so the converted program "
    "stops with an error if it is given a static scale (None and \"dynamic\" run as before)")
_NOT_A_WITH_BLOCK = (
    "amp.scale_loss is not used as `with amp.scale_loss(loss, optimizer) as scaled_loss:`; rewrite by hand"
)
_UNCONVERTED = (
    "the amp calls in this file stay on ampcompat until the TODO(ampcompat) notes in it are resolved"
)
_SCHEDULER_NOTE = (
    "`{spelled}` now runs only when {scaler}.step stepped the optimizer (a GradScaler skips steps with inf/NaN "
    "gradients, usually a few at the start); Apex's run advanced the schedule on skipped steps too"
)
_KEPT_WHOLE_NOTE = (
    "the result of amp.initialize is kept whole in `{name}`: it is now `({model}, {optimizer})`, or `{model}` alone "
    "where `{optimizer}` is None at run time, as Apex returned it; with no optimizer Apex still cast what the model "
    "computed from here on (evaluation), which natively runs in FP32 outside the autocast regions"
)
_FALLBACK_BINDING = (
    "`{name}` is not only amp here: another binding of the name (an assignment or another import) reaches "
    "{count} of it, so the amp calls stay on ampcompat; rewrite by hand"
)


def is_amp_use(use: Use) -> bool:
    """Whether a use belongs to the amp recipe (converted as one unit)."""
    return use.kind not in ("import", "string", "check") and (
        use.api == "apex.amp" or use.api.startswith(("apex.amp.", "optimizer.")) or use.api == "apex.amp.init()"
    )


@dataclass(frozen=True)
class AmpOutcome:
    """What :func:`convert_amp` did.

    Attributes:
        converted: the amp calls are now plain PyTorch.
        level_unknown: the conversion stopped at an ``opt_level`` only known at run time, with no
            ``--opt-level`` given (``--opt-level O1`` might convert it).
    """

    converted: bool = False
    level_unknown: bool = False


def convert_amp(plan: RewritePlan, choice: Optional[LevelChoice] = None) -> AmpOutcome:
    """Convert the file's amp calls to plain PyTorch, or leave TODOs where that is not mechanical.

    Args:
        plan: the file's rewrite plan.
        choice: what ``--opt-level`` said about levels only known at run time.
    """
    uses = [use for use in plan.result.uses if is_amp_use(use) and not plan.is_converted(use)]  # not a wrapper's
    if not uses:
        return AmpOutcome()
    conversion = _AmpConversion(plan, uses, choice)
    conversion.analyse()
    if conversion.blockers:
        for node, message in conversion.blockers:
            plan.todo(node, message)
        init = conversion.init
        if init is not None and all(node is not init.node for node, _ in conversion.blockers):
            plan.todo(init.node, _UNCONVERTED)
        return AmpOutcome(level_unknown=conversion.level_unknown)
    if conversion.init is not None:
        conversion.apply()
        plan.uses_torch = True
    else:  # no training here: registrations native autocast makes moot, `amp is not None` checks (a second run)
        conversion.apply_registrations()
        if conversion.presence:
            plan.stand_ins["apex.amp"] = "torch.amp"
    presence = {id(use) for use, _, _ in conversion.presence}
    for use in uses:
        if id(use) not in presence:
            plan.mark_converted(use)
    return AmpOutcome(converted=True)


@dataclass
class _Backward:
    """One ``with amp.scale_loss(...)`` block."""

    use: Use
    statement: ast.With
    loss: str
    arguments: str
    optimizers: List[ast.expr]
    loss_id: int
    region: Optional[Region] = None
    group: int = 0
    outer: List[Region] = field(default_factory=list)
    """Statements of enclosing blocks that compute what ``region`` reads (:mod:`native_forward`)."""


@dataclass
class _Group:
    """Losses and optimizers that share gradients, and so one GradScaler."""

    optimizers: List[ast.expr] = field(default_factory=list)
    loss_ids: Set[int] = field(default_factory=set)
    scaler: str = ""
    steps: List[ast.Expr] = field(default_factory=list)


class _AmpConversion:
    """Checks that the amp calls have a shape with a native counterpart and queues the edits that convert them."""

    def __init__(self, plan: RewritePlan, uses: List[Use], choice: Optional[LevelChoice]) -> None:
        self.plan = plan
        self.uses = uses
        self.choice = choice
        self.blockers: List[Tuple[ast.AST, str]] = []
        self.notes: List[Tuple[ast.AST, str]] = []
        self.init: Optional[Use] = None
        self.init_statement: Optional[ast.stmt] = None
        self.recipe: Optional[Recipe] = None
        self.level_unknown = False
        self.targets: Optional[ast.expr] = None
        self.models: Optional[ast.expr] = None
        self.optimizers: Optional[ast.expr] = None
        self.model_ref: Optional[ast.expr] = None
        self.optimizer_refs: List[ast.expr] = []
        self.num_losses = 1
        self.enabled: Optional[ast.expr] = None
        self.loss_scale_check: Optional[ast.expr] = None
        self.pair: List[Tuple[ast.stmt, Optional[ast.expr]]] = []
        """For two calls in the branches of one ``if`` (:mod:`native_init_pair`): each call's statement and the
        runtime loss scale it checks."""
        self.backwards: List[_Backward] = []
        self.groups: List[_Group] = []
        self.points: List[Tuple[ast.stmt, int]] = []
        """Backward passes, and the calls of functions that run one and return, each with its group."""
        self.placement: Optional[Placement] = None
        self.unscale_before: Dict[int, Tuple[ast.stmt, str]] = {}
        self.scaled_clips: List[Tuple[ScaledClip, str]] = []
        """Clipping on the scaled partial sums of gradient accumulation, with the scale's expression."""
        self.unscaled_reads: List[Tuple[native_reads.UnscaledRead, str]] = []
        """Other reads of those partial sums, run with them unscaled (:mod:`native_reads`), with the scaler."""
        self.schedulers: List[Tuple[ast.stmt, str, ast.stmt]] = []
        self.masters: List[Use] = []
        self.plain: List[Tuple[ast.Expr, ast.Call, Optional[Region]]] = []
        """Backward passes Apex left unscaled that now scale their loss (their statement, call, forward pass)."""
        self.registrations: List[Tuple[ast.stmt, Use]] = []
        self.inference = False
        """``amp.initialize`` without an optimizer: the model's calls go under autocast, no GradScaler."""
        self.level: Optional[str] = None
        self.model_casts: Optional[bool] = None
        """For O2/O3 inference: Apex's model casts instead (:mod:`native_inference`), and keep_batchnorm_fp32."""
        self.model_calls: List[ast.stmt] = []
        self.states: List[Use] = []
        self.disables: List[Use] = []
        self.presence: List[Tuple[Use, ast.expr, bool]] = []
        self.device = plan.fresh_name("amp_device_type")
        self.flag = ""
        self.dtype_name = ""

    def block(self, node: ast.AST, message: str) -> None:
        self.blockers.append((node, message))

    def segment(self, node: ast.AST) -> str:
        return self.plan.text.segment(node)

    # -- analysis --------------------------------------------------------------------------------
    def analyse(self) -> None:
        inits = [use for use in self.uses if use.api == "apex.amp.initialize"]
        self.check_bindings()
        if len(inits) == 1:
            self.init = inits[0]
            self.read_initialize(self.init)
        elif branch_pair(inits, self.plan.parents) is not None:
            self._initialize_pair(inits)
        elif len(inits) > 1:
            for use in inits:
                self.block(use.node, "amp.initialize is called more than once in this file; rewrite by hand")
        init_ok = not self.blockers and self.init is not None
        handlers: Dict[str, Callable[[Use], None]] = {
            "apex.amp.initialize": lambda use: None,
            "apex.amp.scale_loss": self._scale_loss,
            "apex.amp.master_params": self.masters.append,
            "apex.amp.state_dict": self._state_dict,
            "apex.amp.load_state_dict": self._state_dict,
            "apex.amp.disable_casts": self._disable_casts,
        }
        for use in self.uses:
            handler = handlers.get(use.api)
            if handler is not None:
                if init_ok:  # these need what amp.initialize becomes
                    handler(use)
                elif not inits:
                    self.block(use.node, "amp.initialize is not called in this file: create the torch.amp.GradScaler "
                                         "where it is called and pass it here")
            elif use.api == "apex.amp" and native_amp_object.passed_to_a_call(use.node, self.plan.parents):
                if init_ok:
                    self.states.append(use)  # the module passed to save or restore amp's state
                else:
                    self.block(use.node, _OTHER_API_BLOCKERS["apex.amp"])
            elif use.api == "apex.amp" and self._presence_answer(use) is not None:
                node, value = self._presence_answer(use)  # type: ignore[misc]
                self.presence.append((use, node, value))
            elif use.api.startswith("optimizer."):
                self.block(use.node, f"uses `{use.api.split('.', 1)[1]}`, which amp adds to optimizers; "
                                     "torch.amp.GradScaler has no counterpart, rewrite this by hand")
            elif use.api == "apex.amp.register_half_function" and self._native_half(use) is not None:
                self.registrations.append((self._native_half(use), use))  # type: ignore[arg-type]
            elif "function" in use.api:
                self.block(use.node, _REGISTRY_BLOCKER)
            else:
                self.block(use.node, _OTHER_API_BLOCKERS.get(use.api, f"`{use.api}`: {use.reason}"))
        if not init_ok:
            return
        assert self.init is not None
        if self.inference and native_inference.casts_model(self.level):
            self._model_casts()
            return
        if self.inference:
            self._inference()
            return
        if not self.backwards and not any(use.api == "apex.amp.scale_loss" for use in self.uses):
            self.block(self.init.node, "amp.scale_loss is not called in this file, so the forward pass to put under "
                                       "torch.autocast is not here either; rewrite by hand")
        if self.blockers:
            return
        self._group()
        self._find_steps()
        if self.blockers:
            return
        self._place()
        if self.blockers:
            return
        self._loop()
        self._check_masters()
        if len(self.groups) > 1 and self.states:
            self.block(self.states[0].node, "several GradScalers (one per optimizer, as Apex had one loss scaler per "
                                            "loss) share this checkpoint entry; save each scaler's state_dict() by hand")

    def _model_casts(self) -> None:
        """``model = amp.initialize(model, opt_level="O2")`` for evaluation: Apex's casts of the model itself."""
        assert self.init is not None and self.level is not None
        if self.backwards or self.masters or self.states or self.disables:
            node = (self.backwards[0].statement if self.backwards else (self.masters + self.states + self.disables)[0].node)
            self.block(node, "amp.initialize got no optimizer, yet this trains or saves amp's state; rewrite by hand")
            return
        keep, problem = native_inference.keep_batchnorm(self.init.node, self.level)  # type: ignore[arg-type]
        if problem:
            self.block(self.init.node, problem)
        elif not isinstance(self.models, (ast.Name, ast.Attribute)):
            self.block(self.init.node, "amp.initialize without an optimizer gets a list of models; rewrite by hand")
        self.model_casts = keep

    def _inference(self) -> None:
        """``model = amp.initialize(model, opt_level=...)`` for evaluation: Apex cast from there on, natively the
        statements that call the model (in the same function, after it) go under autocast. The model must not be
        handed to other code, which would run it outside any autocast region."""
        assert self.init_statement is not None and self.model_ref is not None
        if self.backwards or self.masters or self.states:
            node = (self.backwards[0].statement if self.backwards else (self.masters + self.states)[0].node)
            self.block(node, "amp.initialize got no optimizer, yet this trains or saves amp's state; rewrite by hand")
            return
        parents = self.plan.parents
        scope = scope_of(self.init_statement, parents)
        model = ast.unparse(self.model_ref)
        for node in walk_local(scope):
            if not (isinstance(node, (ast.Name, ast.Attribute)) and isinstance(getattr(node, "ctx", None), ast.Load)
                    and ast.unparse(node) == model and (node.lineno, node.col_offset) > (  # type: ignore
                        self.init_statement.end_lineno, self.init_statement.end_col_offset)):
                continue
            parent = parents.get(node)
            statement = self.plan.statement(node)
            if isinstance(parent, ast.Call) and parent.func is node:
                if not any(statement is known for known in self.model_calls):
                    if not self.plan.text.owns_lines(statement) or _has_nested_block(statement):
                        self.block(node, "the model is called in a statement this rewrite cannot put under "
                                         "torch.autocast on its own; rewrite by hand")
                    self.model_calls.append(statement)
            elif isinstance(parent, ast.Attribute) and parent.value is node:
                continue  # model.eval(), model.to(...)
            elif isinstance(parent, ast.Call) and isinstance(statement, ast.Assign) \
                    and any(ast.unparse(target) == model for target in statement.targets):
                continue  # model = torch.nn.DataParallel(model): still the model
            else:
                self.block(node, "the model is handed to other code here, which would run it outside torch.autocast; "
                                 "put its calls under torch.autocast by hand")
        nested = [node for node in ast.walk(scope) if isinstance(node, ast.Name) and node.id == model
                  and scope_of(node, parents) is not scope]
        if nested:
            self.block(nested[0], "the model is used in a nested function; put its calls under torch.autocast by hand")
        if not self.model_calls and not self.blockers:
            self.block(self.init.node, "amp.initialize has no optimizer and the model is not called after it in this "
                                       "function; put its calls under torch.autocast by hand")
        if self.blockers:
            return
        self.place_nodes(self.model_calls, [])

    def check_bindings(self) -> None:
        """A use that another binding of its name reaches is converted only when that binding is an
        ``except ImportError`` fallback of the Apex import (never taken where Apex -- or ampcompat -- is), or
        the ``import apex`` of the line ``--write`` adds (the same module, through ampcompat's alias)."""
        shared = [use for use in self.uses if not use.exclusive and not self._only_import_fallbacks(use)]
        if shared:
            count = "the use" if len(shared) == 1 else f"{len(shared)} uses"
            self.block(shared[0].node, _FALLBACK_BINDING.format(name=shared[0].local_name, count=count))

    def _only_import_fallbacks(self, use: Use) -> bool:
        result = self.plan.result
        scopes = result.scopes
        root = root_name(use.node)
        if scopes is None or not isinstance(root, ast.Name):
            return False
        ours = {id(node) for statement in result.alias_statements for node in ast.walk(statement)}
        for definition in scopes.reaching(root):
            if definition in result.apex_definitions or id(definition.node) in ours:
                continue
            handler = enclosing(definition.node, ast.ExceptHandler, self.plan.parents)
            owner = self.plan.parents.get(handler) if handler is not None else None
            binding = use.binding
            if not (isinstance(handler, ast.ExceptHandler) and catches_import_error(handler) and binding is not None
                    and binding.statement is not None and isinstance(owner, ast.Try)
                    and any(binding.statement is node for item in owner.body for node in ast.walk(item))):
                return False
        return True

    def _presence_answer(self, use: Use) -> Optional[Tuple[ast.expr, bool]]:
        """``amp is not None``, ``if amp:``, ``not amp``: a check that amp was imported (the node, and its answer
        under ampcompat). Such checks stay: ``amp`` then names ``torch.amp``, so they keep asking whether the
        import was reached, and a GradScaler created under one is enabled by it."""
        node = use.node
        parent = self.plan.parents.get(node)
        if isinstance(parent, ast.Compare) and parent.left is node and len(parent.ops) == 1 \
                and isinstance(parent.ops[0], (ast.Is, ast.IsNot)) \
                and isinstance(parent.comparators[0], ast.Constant) and parent.comparators[0].value is None:
            return parent, isinstance(parent.ops[0], ast.IsNot)
        if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not):
            return parent, False
        if isinstance(parent, (ast.If, ast.While, ast.IfExp, ast.Assert)) and parent.test is node:
            return node, True  # type: ignore[return-value]
        return None

    def _native_half(self, use: Use) -> Optional[ast.stmt]:
        """For ``amp.register_half_function(torch, "einsum")`` of a function native autocast already runs in FP16:
        the statement to drop (the ``if`` around it when that only checked for Apex by name)."""
        call = use.node
        if not (isinstance(call, ast.Call) and len(call.args) == 2 and not call.keywords):
            return None
        module, name = self.segment(call.args[0]), literal_value(call.args[1])
        if module not in ("torch", "torch.nn.functional", "F") or name not in _NATIVE_FP16:
            return None
        statement = self.plan.statement(call)
        if not (isinstance(statement, ast.Expr) and statement.value is call and self.plan.text.owns_lines(statement)):
            return None
        owner = self.plan.parents.get(statement)
        checks = {id(item.node) for item in self.plan.result.uses if item.kind in ("string", "check")}
        if isinstance(owner, ast.If) and owner.body == [statement] and not owner.orelse \
                and any(id(node) in checks for node in ast.walk(owner.test)) and self.plan.text.owns_lines(owner):
            return owner
        return statement

    def read_initialize(self, use: Use) -> None:
        """Read an ``amp.initialize`` call: its level's recipe, models, optimizers and targets, or block it."""
        call = use.node
        if not isinstance(call, ast.Call):
            self.block(call, "amp.initialize is used as a value; rewrite by hand")
            return
        statement = self.plan.statement(call)
        if has_starred(call):
            self.block(call, "the arguments of amp.initialize are unpacked with * or **; rewrite by hand")
            return
        level_node = argument(call, "opt_level", 3)
        literal = "O1" if level_node is None else literal_value(level_node)
        level = None if literal is NOT_LITERAL else literal
        recipe = recipe_for(level, self.segment(level_node) if level_node is not None else "", self.choice)
        if isinstance(recipe, str):
            self.level_unknown = level is None and self.choice is None
            self.block(call, recipe)
        else:
            self.recipe = recipe
            self.notes.extend((call, note) for note in recipe.notes)
        if len(call.args) > 2:
            self.block(call, "pass amp.initialize's options by keyword; only models and optimizers are read "
                             "positionally here")
        self._options(call, level)
        models, optimizers = argument(call, "models", 0), argument(call, "optimizers", 1)
        model_ref = models.elts[0] if isinstance(models, (ast.List, ast.Tuple)) and models.elts else models
        if not is_plain_reference(model_ref):
            self.block(call, "the model passed to amp.initialize is not a plain name; assign it to a variable first")
        refs: List[ast.expr] = []
        if optimizers is None:
            self.inference = True
        elif isinstance(optimizers, (ast.List, ast.Tuple)):
            refs = list(optimizers.elts)
        else:
            refs = [optimizers]
        if not all(is_plain_reference(ref) for ref in refs):
            self.block(call, "an optimizer passed to amp.initialize is not a plain name; assign it to a variable "
                             "first")
        parent = self.plan.parents[call]
        targets: Optional[ast.expr] = None
        if isinstance(parent, ast.Assign) and len(parent.targets) == 1:
            targets = parent.targets[0]
        elif not isinstance(parent, ast.Expr):
            self.block(call, "the result of amp.initialize is used inside an expression; rewrite by hand")
        if not self.plan.text.owns_lines(statement):
            self.block(call, "amp.initialize shares its line with other code; put it on a line of its own")
        if optimizers is None and targets is not None and not (is_plain_reference(targets) and
                                                               same_expression(targets, model_ref)):
            self.block(call, "the model amp.initialize returns gets another name; rewrite by hand")
        if optimizers is not None and targets is not None:
            if isinstance(targets, (ast.Tuple, ast.List)) and len(targets.elts) == 2:
                returned = targets.elts[1]
                refs += list(returned.elts) if isinstance(returned, (ast.List, ast.Tuple)) else [returned]
            elif isinstance(targets, ast.Name) and isinstance(models, ast.Name) and is_plain_reference(optimizers):
                self.notes.append((call, _KEPT_WHOLE_NOTE.format(name=targets.id, model=self.segment(models),
                                                                 optimizer=self.segment(optimizers))))
            else:
                self.block(call, "the (model, optimizer) pair amp.initialize returns is not unpacked; rewrite by hand")
        self.init_statement = statement
        self.level = level
        self.targets, self.models, self.optimizers, self.model_ref = targets, models, optimizers, model_ref
        self.optimizer_refs = refs

    def _initialize_pair(self, inits: List[Use]) -> None:
        """Two calls, one in each branch of an ``if``: read both, and convert as one call standing where the
        ``if`` stands, when they are the same but for their loss-scale options."""
        problem = differences(inits[0].node, inits[1].node, self.plan.parents)  # type: ignore[arg-type]
        if problem:
            for use in inits:
                self.block(use.node, problem)
            return
        for use in reversed(inits):  # the first call's reading is the one kept
            self.loss_scale_check = None
            self.read_initialize(use)
            self.pair.insert(0, (self.init_statement, self.loss_scale_check))  # type: ignore[arg-type]
        self.init, self.loss_scale_check = inits[0], None
        self.init_statement = branch_pair(inits, self.plan.parents)

    def _options(self, call: ast.Call, level: Optional[str]) -> None:
        ignored = []
        for keyword in call.keywords:
            name = keyword.arg
            value = literal_value(keyword.value)
            if name in ("models", "optimizers", "opt_level", "verbosity"):
                continue
            if name == "enabled":
                if value is not True:
                    self.enabled = keyword.value
                continue
            if name == "num_losses":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    self.block(call, "num_losses is not a literal number; rewrite by hand")
                else:
                    self.num_losses = value
                continue
            if name in _INITIALIZE_DEFAULTS:
                if value is not NOT_LITERAL and value == _INITIALIZE_DEFAULTS[name]:
                    continue
                if name == "loss_scale" and value is None:
                    continue  # None: the level's own default, dynamic
                if name == "loss_scale" and value is NOT_LITERAL:
                    self.loss_scale_check = keyword.value
                    self.notes.append((call, _RUNTIME_LOSS_SCALE_NOTE.format(spelled=self.segment(keyword.value))))
                    continue
                self.block(call, _INITIALIZE_BLOCKERS[name])
                continue
            if name in _IGNORED_OPTIONS:
                if value is None:
                    continue  # the level's own default
                if level in ("O1", "O4"):
                    if value is NOT_LITERAL:
                        ignored.append(name)  # Apex refused these with O1 unless None: at run time they are None
                        continue
                    self.block(call, _O1_OVERRIDE_BLOCKER.format(name=name))
                    continue
                ignored.append(name)
                continue
            self.block(call, _O1_OVERRIDE_BLOCKER.format(name=name))
        if ignored:
            self.notes.append((call, _IGNORED_NOTE.format(names=", ".join(ignored))))

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
        loss_id = 0
        for name, position in _SCALE_LOSS_POSITIONS.items():
            node = argument(call, name, position)
            value = literal_value(node)
            if node is None:
                continue
            if name == "loss_id":
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.num_losses:
                    self.block(call, f"loss_id is not a literal number below num_losses ({self.num_losses}); "
                                     "rewrite by hand")
                else:
                    loss_id = value
            elif name == "delay_overflow_check" and value is not False:
                self.block(call, _DELAY_OVERFLOW_CHECK)
        loss, optimizer = argument(call, "loss", 0), argument(call, "optimizers", 1)
        optimizers = list(optimizer.elts) if isinstance(optimizer, (ast.List, ast.Tuple)) else [optimizer]
        if not optimizers or not all(self._is_amp_optimizer(item) for item in optimizers):
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
        if not isinstance(loss, ast.Name):
            self.block(call, "the loss passed to amp.scale_loss is an expression; assign it to a variable where the "
                             "forward pass computes it")
            return
        amp_nodes = {id(item.node) for item in self.uses}
        region = forward_region(self.plan.text, self.plan.parents, with_statement, loss.id, amp_nodes)
        if isinstance(region, str):
            self.block(call, region)
            return
        outer = outer_regions(self.plan.text, self.plan.parents, region, amp_nodes)
        if isinstance(outer, str):
            self.block(call, outer)
            return
        known = [known for item in self.backwards for known in [item.region] + item.outer if known is not None]
        if any(overlapping(known, item) is not None for item in [region] + outer):
            self.block(call, "two amp.scale_loss calls share some statements of their forward passes; put the forward "
                             "pass under torch.autocast by hand")
            return
        self.backwards.append(_Backward(use, with_statement, loss.id, _arguments_text(self.plan, backward),
                                        optimizers, loss_id, region, outer=outer))  # type: ignore[arg-type]

    def _group(self) -> None:
        """Union the losses and optimizers that share gradients: each group gets one GradScaler."""
        keys: Dict[str, int] = {}
        parent: List[int] = []

        def find(index: int) -> int:
            while parent[index] != index:
                index = parent[index]
            return index

        def key(name: str) -> int:
            if name not in keys:
                keys[name] = len(parent)
                parent.append(len(parent))
            return keys[name]

        for backward in self.backwards:
            nodes = [key(f"loss {backward.loss_id}")] + [key("opt " + ast.unparse(o)) for o in backward.optimizers]
            for node in nodes[1:]:
                parent[find(node)] = find(nodes[0])
        roots: Dict[int, int] = {}
        for backward in self.backwards:
            root = find(keys[f"loss {backward.loss_id}"])
            if root not in roots:
                roots[root] = len(self.groups)
                self.groups.append(_Group())
            group = self.groups[roots[root]]
            backward.group = roots[root]
            group.loss_ids.add(backward.loss_id)
            for optimizer in backward.optimizers:
                if not any(same_expression(optimizer, known) for known in group.optimizers):
                    group.optimizers.append(optimizer)
        for group in self.groups:
            if len(self.groups) == 1:
                group.scaler = self.plan.fresh_name("scaler")
            else:
                group.scaler = self.plan.fresh_name("scaler_" + _last_name(group.optimizers[0]))

    def _group_of(self, optimizer: ast.AST) -> Optional[_Group]:
        return next((group for group in self.groups
                     if any(same_expression(optimizer, known) for known in group.optimizers)), None)

    def _find_steps(self) -> None:
        """``optimizer.step()`` -> ``scaler.step`` + ``scaler.update``: the steps in the functions of the backward
        passes or, where a function runs a backward pass and returns (a ``training_step``), in its callers."""
        for backward in self.backwards:
            scope = scope_of(backward.statement, self.plan.parents)
            self.points.append((backward.statement, backward.group))
            if self._steps_in(scope, backward.group):
                continue
            callers = _call_sites(scope, self.plan.result.nodes, self.plan.parents)
            stepping = [caller for caller in callers
                        if self._steps_in(scope_of(caller, self.plan.parents), backward.group)]
            if not stepping or len(stepping) != len(callers):
                anchor = scope if not isinstance(scope, ast.Module) else self.init.node  # type: ignore[union-attr]
                self.block(anchor, "no optimizer.step() for the amp optimizer next to amp.scale_loss here (or in every "
                                   "function that calls this one); rewrite by hand")
            self.points.extend((caller, backward.group) for caller in stepping)
        for group in self.groups:
            if len(group.optimizers) > 1:
                blocks = {id(self.plan.parents[step]) for step in group.steps}
                if len(blocks) > 1 or any(not self._stepped(group, optimizer) for optimizer in group.optimizers):
                    self.block(group.steps[0] if group.steps else self.init.node,  # type: ignore[union-attr]
                               "several optimizers share a backward pass, and their steps are not side by side; "
                               "call scaler.step(...) for each and scaler.update() once, by hand")

    def _steps_in(self, scope: ast.AST, index: int) -> bool:
        """Record the group's optimizer steps in ``scope``; whether there is one."""
        group = self.groups[index]
        found = False
        for node in walk_local(scope):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"):
                continue
            if self._group_of(node.func.value) is not group:
                continue
            found = True
            statement = self.plan.parents[node]
            if any(statement is known for known in group.steps):
                continue
            if not isinstance(statement, ast.Expr) or node.args or node.keywords:
                self.block(node, "optimizer.step() is called with arguments or its result is used; rewrite by hand")
            elif not self.plan.text.owns_lines(statement):
                self.block(node, "optimizer.step() shares its line with other code; put it on a line of its own")
            else:
                group.steps.append(statement)
        return found

    def _stepped(self, group: _Group, optimizer: ast.expr) -> bool:
        return any(same_expression(step.value.func.value, optimizer) for step in group.steps)  # type: ignore

    def _place(self) -> None:
        assert self.init_statement is not None and self.init is not None and self.model_ref is not None
        nodes: List[ast.AST] = []
        for backward in self.backwards:
            nodes.append(backward.statement)
            if backward.region is not None:
                nodes.append(backward.region[0])
            nodes.extend(item[0] for item in backward.outer)
        for group in self.groups:
            nodes.extend(group.steps)
        nodes.extend(use.node for use in self.masters + self.states + self.disables)
        self.place_nodes(nodes, [node for node in (self.loss_scale_check,) if node is not None])

    def place_nodes(self, nodes: List[ast.AST], extra: List[ast.AST]) -> None:
        """Where the GradScaler and the autocast flag go so that ``nodes`` (and the expressions in ``extra``) see
        them, and the names a condition or a level chosen at run time needs."""
        at_run_time = self.recipe is not None and self.recipe.at_run_time
        if at_run_time:
            extra = extra + [argument(self.init.node, "opt_level", 3)]  # type: ignore[union-attr,list-item]
        placement = place(self.init_statement, self.init.node, nodes, self.plan.parents,  # type: ignore[arg-type]
                          self.model_ref, self.enabled, lambda test: None, extra)
        self.blockers.extend(placement.blockers)
        self.placement = placement
        if placement.conditions or at_run_time:
            self.flag = self.plan.fresh_name("amp_enabled")
        if at_run_time:
            self.dtype_name = self.plan.fresh_name("amp_dtype")

    def _loop(self) -> None:
        """Other backward passes that reach the steps, where ``unscale_`` goes, and which schedulers follow a step."""
        parents = self.plan.parents
        assert self.placement is not None
        if self.recipe is not None and self.recipe.scaled is not False:
            self._plain_backwards()
        masters = {id(use.node) for use in self.masters}
        for index, group in enumerate(self.groups):
            steps = {id(step) for step in group.steps}
            backwards = [point for point, owner in self.points if owner == index]
            unscaling = plan_unscaling(backwards, lambda statement: id(statement) in steps, parents,
                                       lambda node: id(node) in masters, self.placement.conditions,
                                       lambda node: argument(node, "optimizer", 0) if id(node) in masters else None)
            self.blockers.extend(unscaling.blockers)
            for read, _ in unscaling.unscaled_reads:
                if self._group_of(read.optimizer) is not group:
                    self.block(read.statement, "this reads the gradients of an optimizer whose loss scale differs "
                                               "from the backward pass before it; rewrite by hand")
                self.unscaled_reads.append((read, self._name(group.scaler, read.statement)))
            for key, (statement, step) in unscaling.before.items():
                optimizer = self.segment(step.value.func.value)  # type: ignore[attr-defined]
                self.unscale_before[key] = (statement, f"{self._name(group.scaler, statement)}.unscale_({optimizer})")
            for clip in unscaling.scaled_clips:
                self.scaled_clips.append((clip, f"{self._name(group.scaler, clip.call)}.get_scale()"))
                self.notes.append((clip.call, _SCALED_CLIP_NOTE))
            for step in group.steps:
                for scheduler in scheduler_steps(step, parents, self.segment):
                    if self.plan.text.owns_lines(scheduler):
                        self.schedulers.append((scheduler, group.scaler, step))

    def _plain_backwards(self) -> None:
        """``loss.backward()`` that reaches a step while the GradScaler may be on: Apex added its unscaled
        gradients to the unscaled ones; with a GradScaler they must be scaled too (``scaler.scale(loss)``),
        and their forward pass goes under autocast where it can be found."""
        parents = self.plan.parents
        scopes: List[ast.AST] = []
        for statement in [step for group in self.groups for step in group.steps] + [b.statement for b in self.backwards]:
            scope = scope_of(statement, parents)
            if not any(scope is known for known in scopes):
                scopes.append(scope)
        scaled = {id(node) for item in self.backwards for node in ast.walk(item.statement)}
        assert self.placement is not None
        amp_nodes = {id(use.node) for use in self.uses}
        for call in unscaled_backwards(scopes, scaled, self.placement.conditions, parents):
            statement = parents.get(call)
            receiver = call.func.value  # type: ignore[attr-defined]
            if len(self.groups) != 1 or not isinstance(statement, ast.Expr) or not is_plain_reference(receiver) \
                    or not self.plan.text.owns_lines(statement):
                self.block(call, f"`{self.segment(call)}` also reaches optimizer.step() while the GradScaler may be "
                                 "on, with gradients it did not scale; rewrite by hand")
                continue
            region = forward_region(self.plan.text, parents, statement, receiver.id, amp_nodes) \
                if isinstance(receiver, ast.Name) else "not a name"
            known = [known for item in self.backwards for known in [item.region] + item.outer if known is not None]
            if isinstance(region, str) or overlapping(known, region) is not None:
                region = None
                self.notes.append((call, f"`{self.segment(call)}` now scales its loss with the GradScaler, as the "
                                         "gradients it adds to must be; its forward pass runs outside torch.autocast "
                                         "(in FP32)"))
            self.plain.append((statement, call, region))
            self.points.append((statement, 0))

    def _check_masters(self) -> None:
        """``amp.master_params(optimizer)`` -> the optimizer's parameters; a read of their gradients must be on a
        path where ``unscale_`` has run."""
        covered: Set[int] = set()
        for point, index in self.points:
            steps = {id(step) for step in self.groups[index].steps}
            path = path_to_step(point, lambda statement: id(statement) in steps, self.plan.parents,
                                self.placement.conditions)  # type: ignore[union-attr]
            for statement in path.repeated + path.every_time + path.before_step if path.step is not None else []:
                covered.update(id(node) for node in ast.walk(statement))
        for use in self.masters:
            call = use.node
            if not isinstance(call, ast.Call) or has_starred(call):
                self.block(use.node, "amp.master_params is used as a value; rewrite by hand")
                continue
            if not self._is_amp_optimizer(argument(call, "optimizer", 0)):
                self.block(call, "amp.master_params gets an optimizer other than the one amp.initialize returned; "
                                 "rewrite by hand")
                continue
            statement = self.plan.statement(call)
            if id(call) not in covered and might_read_grads(statement, lambda node: False):
                self.block(call, "this reads gradients outside the stretch between a backward pass and "
                                 "optimizer.step(), where Apex had unscaled them and a GradScaler may not have; "
                                 "rewrite by hand")

    def _state_dict(self, use: Use) -> None:
        call = use.node
        if not isinstance(call, ast.Call) or has_starred(call):
            self.block(use.node, f"{use.api.rsplit('.', 1)[1]} is used as a value; rewrite by hand")
            return
        loading = use.api.endswith("load_state_dict")
        if (loading and len(call.args) + len(call.keywords) != 1) or (not loading and (call.args or call.keywords)):
            self.block(call, "amp.state_dict(destination) has no GradScaler counterpart; rewrite by hand")
            return
        self.states.append(use)

    def _disable_casts(self, use: Use) -> None:
        call = use.node
        withitem = self.plan.parents.get(call)
        if not isinstance(call, ast.Call) or not isinstance(withitem, ast.withitem) or call.args or call.keywords:
            self.block(use.node, "amp.disable_casts is not used as `with amp.disable_casts():`; rewrite by hand")
            return
        self.disables.append(use)

    # -- edits ----------------------------------------------------------------------------------
    def _name(self, name: str, at: ast.AST) -> str:
        assert self.placement is not None
        return self.placement.access(name, at, self.plan.parents)

    def apply(self) -> None:
        if self.model_casts is not None:
            native_inference.apply(self.plan, self.init_statement, self.model_ref, self.model_casts,  # type: ignore
                                   self.level, self.init.node)  # type: ignore[arg-type,union-attr]
            return
        for node, note in self.notes:
            self.plan.note(node, note)
        self.apply_initialize()
        regions_done: List[Region] = []
        for statement in self.model_calls:
            self.wrap_region((statement, statement))
        for backward in self.backwards:
            self._apply_backward(backward, regions_done)
        for statement, call, region in self.plain:
            receiver = self.segment(call.func.value)  # type: ignore[attr-defined]
            arguments = _arguments_text(self.plan, call)
            self.plan.replace_statement(statement, [f"{self._name(self.groups[0].scaler, statement)}.scale({receiver})"
                                                    f".backward({arguments})"])
            if region is not None and not any(done[0] is region[0] for done in regions_done):
                regions_done.append(region)
                self.wrap_region(region)
        self.apply_registrations()
        for group in self.groups:
            self._apply_steps(group)
        for statement, line in self.unscale_before.values():
            self.plan.insert_lines_before(statement, [line])
        for clip, scale in self.scaled_clips:
            self._apply_scaled_clip(clip, scale)
        native_reads.apply(self.plan, self.unscaled_reads)
        self._apply_schedulers()
        for use in self.masters:
            optimizer = self.segment(argument(use.node, "optimizer", 0))  # type: ignore[arg-type]
            self.plan.replace(use.node, parameters_of(optimizer, use.node, self.plan))
        self._apply_states()
        for use in self.disables:
            self.plan.replace(use.node, f"torch.autocast({self._name(self.device, use.node)}, enabled=False)")
        if self.presence:
            # ``amp is not None`` keeps asking whether the import got that far: ``amp`` now names torch.amp.
            self.plan.stand_ins["apex.amp"] = "torch.amp"

    def _apply_scaled_clip(self, clip: ScaledClip, scale: str) -> None:
        """Clip the scaled gradients at the threshold times ``scale``; a kept norm is divided by it."""
        threshold = clip.threshold
        simple = isinstance(threshold, (ast.Name, ast.Attribute, ast.Constant, ast.Subscript))
        start, end = self.plan.text.span(threshold)
        if not simple:
            self.plan.insert_at(start, "(")
        self.plan.insert_at(end, ("" if simple else ")") + f" * {scale}")
        if clip.returns_norm:
            self.plan.insert_at(self.plan.text.span(clip.call)[1], f" / {scale}")

    def apply_registrations(self) -> None:
        """Remove the registrations of functions native autocast already runs in FP16."""
        for statement, use in self.registrations:
            alone = len(block_of(statement, self.plan.parents)[0]) == 1
            self.plan.supersede_statement(statement, ["pass"] if alone else [])
            self.plan.note(use.node, "native autocast already runs this function in FP16: the registration is gone")

    def _device_model(self) -> str:
        """The model whose parameters give the device: the first one where a list of models is passed by name
        (``models = [...]``, then ``amp.initialize(models, ...)``: Apex took a list as well as a module)."""
        assert self.model_ref is not None and self.init_statement is not None
        spelled = self.segment(self.model_ref)
        if not isinstance(self.model_ref, ast.Name):
            return spelled
        values = [node.value for node in walk_local(scope_of(self.init_statement, self.plan.parents))
                  if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id ==
                                                          self.model_ref.id for target in node.targets)]
        if values and all(isinstance(value, (ast.List, ast.Tuple, ast.ListComp)) for value in values):
            return f"{spelled}[0]"
        return spelled

    def _creation_lines(self, at: ast.AST) -> List[str]:
        assert self.placement is not None and self.recipe is not None and self.model_ref is not None
        name = lambda item: self._name(item, at)  # noqa: E731
        created = [self.device] + ([self.dtype_name] if self.dtype_name else []) + ([self.flag] if self.flag else [])
        created += [group.scaler for group in self.groups]
        lines = self.placement.declaration(created)
        if self.loss_scale_check is not None and not self.flag:
            lines += self._loss_scale_check_lines(self.loss_scale_check)
        lines.append(f"{name(self.device)} = next({self._device_model()}.parameters()).device.type")
        conditions = [condition.spelled() for condition in self.placement.conditions]
        if self.recipe.at_run_time:
            table = self.recipe.dtype_table()
            level = self.recipe.level_expression
            lookup = f"{table}.get({level})" if conditions else f"{table}[{level}]"
            lines.append(f"{name(self.dtype_name)} = {lookup}")
            conditions.append(f"{name(self.dtype_name)} is not None")
        if self.flag:
            lines.append(f"{name(self.flag)} = {all_of(self.placement.conditions, conditions)}")
            if self.loss_scale_check is not None:  # only where amp.initialize ran (`if args.fp16:`)
                lines += self._loss_scale_check_lines(self.loss_scale_check, guard=name(self.flag))
        for group in self.groups:
            enabled = ""
            if self.recipe.at_run_time:
                enabled = f", enabled={name(self.flag)} and {name(self.dtype_name)} == torch.float16"
            elif not self.recipe.scaled:
                enabled = ", enabled=False"
            elif self.flag:
                enabled = f", enabled={name(self.flag)}"
            lines.append(f"{name(group.scaler)} = torch.amp.GradScaler({name(self.device)}, init_scale=2.0**16, "
                         f"growth_interval={_GROWTH_INTERVAL}{enabled})")
        return lines

    def _loss_scale_check_lines(self, loss_scale: ast.expr, guard: str = "") -> List[str]:
        """Stop with ValueError where a static scale is given (``guard``: only when that flag is true)."""
        spelled = self.segment(loss_scale)
        test = f"{guard} and " if guard else ""
        if not is_plain_reference(loss_scale):  # `"dynamic" if s == 0 else s`: no quotes inside an f-string
            spelled = f"({spelled})"
            return [f'if {test}{spelled} not in (None, "dynamic"):',
                    '    raise ValueError("loss_scale=%r: torch.amp.GradScaler has no static loss scale; "',
                    f'                     "leave it unset (dynamic)" % ({spelled},))']
        return [f'if {test}{spelled} not in (None, "dynamic"):',
                f'    raise ValueError(f"loss_scale={{{spelled}!r}}: torch.amp.GradScaler has no static loss scale; "',
                '                     "leave it unset (dynamic)")']

    def apply_initialize(self) -> None:
        """Replace ``amp.initialize`` by the names it becomes (device, GradScalers, flag) where they are placed."""
        assert self.placement is not None and self.init_statement is not None
        statement, anchor = self.init_statement, self.placement.anchor
        if self.pair:  # the names are created before the `if`; each branch keeps its own check
            self.plan.insert_lines_before(anchor, self._creation_lines(anchor))
            for branch, loss_scale in self.pair:
                lines = self.returned_assignment() + (self._loss_scale_check_lines(loss_scale) if loss_scale else [])
                self.plan.replace_statement(branch, lines or ["pass"])
            return
        kept = self.returned_assignment()
        if anchor is statement:
            self.plan.replace_statement(statement, kept + self._creation_lines(statement))
            return
        if isinstance(anchor, ast.If) and self.plan.parents.get(statement) is anchor and not anchor.orelse \
                and not kept and all(self._removable(item) for item in anchor.body):
            self.plan.supersede_statement(anchor, self._creation_lines(anchor))
            return
        self.plan.insert_lines_before(anchor, self._creation_lines(anchor))
        if kept:
            self.plan.replace_statement(statement, kept)
        elif all(self._removable(item) for item in _block(statement, self.plan.parents)):
            self.plan.replace_statement(statement, ["pass"])
        else:
            self.plan.remove_statement(statement)

    def returned_assignment(self) -> List[str]:
        """``model, optimizer = net, opt`` where the names amp.initialize returned differ from its arguments."""
        targets, models, optimizers = self.targets, self.models, self.optimizers
        if targets is None or models is None or optimizers is None:
            return []
        if isinstance(targets, ast.Name):  # kept whole: what Apex returned, by whether there is an optimizer
            model, optimizer = self.segment(models), self.segment(optimizers)
            return [f"{targets.id} = ({model}, {optimizer}) if {optimizer} is not None else {model}"]
        unpacked = targets.elts if isinstance(targets, (ast.Tuple, ast.List)) else []
        if all(map(same_expression, unpacked, (models, optimizers))):
            return []
        return [f"{self.segment(targets)} = {self.segment(models)}, {self.segment(optimizers)}"]

    def _removable(self, statement: ast.stmt) -> bool:
        """Whether ``statement`` goes away with the conversion (amp.initialize, an import only amp calls read)."""
        if statement is self.init_statement or isinstance(statement, ast.Pass):
            return True
        if isinstance(statement, ast.Try):
            return disposable_import_try(statement, self._removable)
        if not isinstance(statement, (ast.Import, ast.ImportFrom)):
            return False
        scopes = self.plan.result.scopes
        assert scopes is not None
        roots = {id(root_name(use.node)) for use in self.uses}
        definitions = [d for alias in statement.names for d in scopes.definitions_at(alias)]
        return bool(definitions) and all(d in self.plan.result.apex_definitions for d in definitions) and all(
            id(read) in roots for d in definitions for read in scopes.reads_of(d))

    def _apply_backward(self, backward: _Backward, regions_done: List[Region]) -> None:
        group = self.groups[backward.group]
        statement = backward.statement
        scaler = self._name(group.scaler, statement)
        self.plan.replace_statement(statement, [f"{scaler}.scale({backward.loss}).backward({backward.arguments})"])
        for region in [backward.region] + backward.outer:
            if region is None or any(done[0] is region[0] and done[1] is region[1] for done in regions_done):
                continue
            regions_done.append(region)
            self.wrap_region(region)

    def wrap_region(self, region: Region) -> None:
        """Put the statements of ``region`` under ``torch.autocast`` with the recipe's dtype and flag."""
        assert self.recipe is not None
        dtype = self.recipe.dtype or self._name(self.dtype_name, region[0])
        enabled = f", enabled={self._name(self.flag, region[0])}" if self.flag else ""
        self.plan.wrap_in_block(region[0], region[1], f"with torch.autocast({self._name(self.device, region[0])}, "
                                                      f"dtype={dtype}{enabled}):")

    def _apply_steps(self, group: _Group) -> None:
        last = max(group.steps, key=lambda step: (step.lineno, step.col_offset))
        gated = {id(step) for _, _, step in self.schedulers}
        for step in group.steps:
            scaler = self._name(group.scaler, step)
            optimizer = self.segment(step.value.func.value)  # type: ignore[attr-defined]
            lines = [f"{self.plan.fresh_name('scale_before')} = {scaler}.get_scale()"] if id(step) in gated else []
            lines.append(f"{scaler}.step({optimizer})")
            if len(group.optimizers) == 1 or step is last:
                lines.append(f"{scaler}.update()")
            self.plan.replace_statement(step, lines)

    def _apply_schedulers(self) -> None:
        before = self.plan.fresh_name("scale_before")
        for scheduler, scaler_name, _ in self.schedulers:
            scaler = self._name(scaler_name, scheduler)
            text = self.segment(scheduler)
            self.plan.replace_statement(scheduler, [f"if {scaler}.get_scale() >= {before}:  # the optimizer stepped",
                                                    "    " + text])
            self.plan.note(scheduler, _SCHEDULER_NOTE.format(spelled=" ".join(text.split()), scaler=scaler))

    def _apply_states(self) -> None:
        loads = [use for use in self.states if use.api.endswith("load_state_dict") or use.api == "apex.amp"]
        helper = self.plan.fresh_name(native_checkpoint.HELPER) if loads else ""
        for use in self.states:
            call = use.node
            scaler = self._name(self.groups[0].scaler, call)
            if use.api == "apex.amp":
                self.plan.replace(call, native_amp_object.state_object(scaler, helper))
                self.plan.note(call, native_amp_object.NOTE.format(loader=helper))
                self.plan.modules.add("types")
            elif use.api.endswith("load_state_dict"):
                value = self.segment(call.args[0] if call.args else call.keywords[0].value)  # type: ignore[attr-defined]
                self.plan.replace(call, f"{scaler}.load_state_dict({helper}({value}))")
                self.plan.note(call, f"a checkpoint written by Apex's amp.state_dict() loads through {helper}(), added "
                                     "to this file: it converts Apex's loss-scaler entry to the GradScaler's state")
            else:
                self.plan.replace(call, f"{scaler}.state_dict()")
        if loads:
            native_checkpoint.add_helper(self.plan, helper, [use.node for use in loads])


def parameters_of(optimizer: str, at: ast.AST, plan: RewritePlan) -> str:
    """``(p for group in optimizer.param_groups for p in group["params"])``, quoted so that it also fits inside
    an f-string around ``at``."""
    quote = '"'
    current = plan.parents.get(at)
    while current is not None and not isinstance(current, ast.stmt):
        if isinstance(current, ast.JoinedStr):
            opening = plan.text.segment(current).lstrip("rRbBfFuU")[:1]
            quote = "'" if opening == '"' else '"'
        current = plan.parents.get(current)
    return f"(p for group in {optimizer}.param_groups for p in group[{quote}params{quote}])"


def all_of(conditions: Sequence, texts: List[str]) -> str:
    """The conjunction of ``texts`` as a bool (``bool(args.fp16)`` where a condition may not be one)."""
    boolean = [_is_boolean(condition.node) or not condition.holds for condition in conditions]
    boolean += [True] * (len(texts) - len(boolean))
    parts = [text if ok else f"bool({text})" for text, ok in zip(texts, boolean)]
    if len(parts) == 1:
        return parts[0]
    return " and ".join(part if _is_atom(part) else f"({part})" for part in parts)


def _is_boolean(node: ast.expr) -> bool:
    if isinstance(node, ast.Compare) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        return True
    if isinstance(node, ast.Constant):
        return isinstance(node.value, bool)
    if isinstance(node, ast.BoolOp):
        return all(_is_boolean(value) for value in node.values)
    return False


def _is_atom(text: str) -> bool:
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return False
    return not isinstance(node, (ast.BoolOp, ast.IfExp, ast.Lambda, ast.NamedExpr))


def _has_nested_block(statement: ast.stmt) -> bool:
    """A compound statement (``for``, ``with``, ``if`` ...): wrapping it whole would put more than the call under
    autocast."""
    return any(isinstance(getattr(statement, field, None), list) for field in ("body", "orelse", "finalbody"))


def _arguments_text(plan: RewritePlan, call: ast.Call) -> str:
    parts = [plan.text.segment(arg) for arg in call.args]
    parts += [(f"{k.arg}=" if k.arg else "**") + plan.text.segment(k.value) for k in call.keywords]
    return ", ".join(parts)


def _single_backward_call(with_statement: ast.With, scaled_name: str) -> Optional[ast.Call]:
    """The ``scaled.backward(...)`` call if it is the block's only statement."""
    if len(with_statement.body) != 1 or not isinstance(with_statement.body[0], ast.Expr):
        return None
    call = with_statement.body[0].value
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "backward"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == scaled_name):
        return call
    return None


def _call_sites(function: ast.AST, nodes: Sequence[ast.AST], parents) -> List[ast.stmt]:
    """The statements that call ``function`` by its name: ``name(...)`` for a module-level function,
    ``self.name(...)`` from another method of its class. Empty if it is referred to any other way."""
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    owner = parents.get(function)
    found: List[ast.stmt] = []
    for node in nodes:
        if isinstance(owner, ast.ClassDef) and isinstance(node, ast.Attribute) and node.attr == function.name:
            call = parents.get(node)
            method = enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef), parents)
            is_self = isinstance(node.value, ast.Name) and method is not None and parents.get(method) is owner \
                and (method.args.posonlyargs + method.args.args)[:1] \
                and (method.args.posonlyargs + method.args.args)[0].arg == node.value.id  # type: ignore[union-attr]
            if not (is_self and isinstance(call, ast.Call) and call.func is node):
                return []
            found.append(_statement(call, parents))
        elif isinstance(owner, ast.Module) and isinstance(node, ast.Name) and node.id == function.name \
                and isinstance(node.ctx, ast.Load):
            call = parents.get(node)
            if not (isinstance(call, ast.Call) and call.func is node):
                return []
            found.append(_statement(call, parents))
    return found


def _statement(node: ast.AST, parents) -> ast.stmt:
    while not isinstance(node, ast.stmt):
        node = parents[node]
    return node


def _last_name(node: ast.AST) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else "optimizer"


def _block(statement: ast.stmt, parents) -> List[ast.stmt]:
    return block_of(statement, parents)[0]


# What native_wrappers reuses: the analysis of amp.initialize and the placement of the names it becomes (for the file
# that builds a scaler wrapper of another file), and the reading of a `with amp.scale_loss(...)` block (for the wrapper).
AmpConversion = _AmpConversion
single_backward_call = _single_backward_call
arguments_text = _arguments_text
