"""``--to-native`` across files: Apex scaler wrapper classes, and the files that build them.

Some projects keep the amp calls in a small class of their own (timm's ``ApexScaler``, GNMT's
``AMPOptimizer``) and call ``amp.initialize`` in another file, which builds the class and hands it the
loss. Neither file converts on its own: the wrapper has no ``amp.initialize``, the caller no
``amp.scale_loss``. When both are in the scanned tree, they convert together::

    class Scaler:                                       class Scaler:
        state_dict_key = "amp"                              state_dict_key = "amp"
                                                            def __init__(self):
                                                                self.grad_scaler = torch.amp.GradScaler(...)
        def __call__(self, loss, optimizer, clip=None):     def __call__(self, loss, optimizer, clip=None):
            with amp.scale_loss(loss, optimizer) as s:          self.grad_scaler.scale(loss).backward()
                s.backward()                                    self.grad_scaler.unscale_(optimizer)
            if clip is not None:                                if clip is not None:
                clip_grad_norm_(amp.master_params(opt), clip)       clip_grad_norm_((p for group in ...), clip)
            optimizer.step()                                    self.grad_scaler.step(optimizer)
                                                                self.grad_scaler.update()
        def state_dict(self):                               def state_dict(self):
            return amp.state_dict()                             return self.grad_scaler.state_dict()

The wrapper owns its GradScaler (Apex's start scale and growth window, or the values a constructor poked
into Apex's private loss scaler: ``_loss_scale``, ``_scale_seq_len``); gradients are unscaled once per
step, before the first statement on the way to the step that may read them (:mod:`native_loop`), so a
call that does not step (gradient accumulation) does not unscale; a checkpoint written by Apex's
``amp.state_dict()`` still loads (:mod:`native_checkpoint`). The caller drops ``amp.initialize`` and puts
the forward pass under ``torch.autocast``: either the forward pass that computes the loss handed to the
wrapper (found as for ``amp.scale_loss``), or -- timm's shape -- the autocast slot its training loop
already enters (``amp_autocast = suppress`` ... ``with amp_autocast():``), which the Apex path now sets to
a ``torch.autocast`` partial.

A wrapper converts only when a caller in the scanned tree builds it and converts with it (a wrapper
converted alone would scale losses that ``amp.initialize`` on ampcompat also manages); otherwise both keep
their TODOs. :func:`tree_wrappers` decides this for the whole tree before any file is rewritten.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from . import native_checkpoint
from .callargs import has_starred
from .exports import imports_by_module, module_name_of
from .native_amp import AmpConversion, arguments_text, is_amp_use, parameters_of, single_backward_call
from .native_levels import LevelChoice
from .native_loop import path_to_step, plan_unscaling
from .native_regions import forward_region
from .plan import RewritePlan
from .scanner import ScanResult, Use
from .syntax import block_of, enclosing, is_docstring, is_plain_reference, same_expression, walk_local

_DEVICE = '"cuda" if torch.cuda.is_available() else "cpu"'
_APEX_START_SCALE = "2.0**16"
_APEX_GROWTH_INTERVAL = "2000"
_POKES = {"_loss_scale": "init_scale", "_scale_seq_len": "growth_interval"}
"""Private attributes of Apex's LossScaler a constructor may set, and the GradScaler argument each becomes."""
_NULL_CONTEXTS = {"suppress", "contextlib.suppress", "nullcontext", "contextlib.nullcontext"}
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)

_WRAPPER_NOTE = ("{name} now owns a torch.amp.GradScaler (start scale {start}, growth window {window}) in place of "
                 "Apex's loss scaler, on CUDA where there is a GPU (Apex's scaling was CUDA-only), else on the CPU; "
                 "its callers in the scanned tree put the forward pass under torch.autocast")
_BLOCKED_WRAPPER = ("{name} scales the loss for code that calls amp.initialize elsewhere, but cannot own a "
                    "torch.amp.GradScaler in Apex's place: {reason}; rewrite it by hand (see migration_guide.md, What "
                    "`--to-native` converts)")
_NOT_A_WITH = ("amp.scale_loss is not `with amp.scale_loss(loss, optimizer) as scaled_loss:` with two positional "
               "arguments")
_NO_SINGLE_STEP = ("the method does not end the backward pass with exactly one `optimizer.step()` of the same "
                   "optimizer (and no other backward pass)")
_UNSCALED_READ = ("gradients are read after a backward pass that does not always reach the step (a GradScaler unscales "
                  "only once per step), or amp.master_params gets another optimizer")
_AMP_AS_VALUE = ("the amp module is used as a value, other than `if 'state_dict' in amp.__dict__:` around one "
                 "statement")
_PRIVATE_STATE = ("amp's private state is touched other than `s = apex.amp._amp_state.loss_scalers[0]` followed by "
                  "`s._loss_scale = ...` / `s._scale_seq_len = ...` in __init__")
_CALLER_NOTE = ("amp.initialize is gone: {scaling} now scales the loss with its own torch GradScaler, and the forward "
                "pass runs under torch.autocast here")
_SLOT_NOTE = ("amp.initialize is gone: `{slot}` now enters torch.autocast (FP16) on this path, around the forward "
              "passes the training loop runs under `with {slot}():`; {scaling} scales the loss")
_LIBRARY_NOTE = "amp.initialize is gone: {scaling} runs the forward pass under autocast and scales the loss"


@dataclass(frozen=True)
class WrapperContext:
    """What the tree pass decided for one file.

    Attributes:
        own: the wrapper classes defined in this file that convert (a caller in the tree converts with them).
        partners: wrapper classes of other scanned files this file imports, which convert with it: name -> the
            names of the methods that take the loss, each with the loss's position among their arguments.
        files: name -> the file (base name) each partner is defined in, for the notes.
    """

    own: FrozenSet[str] = frozenset()
    partners: Mapping[str, Tuple[Tuple[str, int], ...]] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)


NO_WRAPPERS = WrapperContext()


# --- the wrapper class ---------------------------------------------------------------------------------
@dataclass
class _Wrapper:
    """One class that qualifies, and the edits that convert it."""

    node: ast.ClassDef
    loss_methods: List[Tuple[str, int]] = field(default_factory=list)
    uses: List[Use] = field(default_factory=list)
    blockers: List[Tuple[ast.AST, str]] = field(default_factory=list)
    edits: List = field(default_factory=list)
    """Callables ``(plan, scaler) -> None`` applied in order once the class is known to convert."""
    start: str = _APEX_START_SCALE
    window: str = _APEX_GROWTH_INTERVAL


def wrapper_classes(plan: RewritePlan) -> Dict[str, _Wrapper]:
    """The classes of the file that convert as scaler wrappers on their own (see the module docstring).

    Empty unless the file has no ``amp.initialize`` and every amp use in it lies in such a class.
    """
    found, blocked = _classify(plan)
    return {} if blocked else found


def wrapper_problems(plan: RewritePlan) -> List[Tuple[ast.ClassDef, ast.AST, str]]:
    """For each class that scales a loss with amp (in a file without ``amp.initialize``) but cannot become a
    GradScaler wrapper: the class, the first node in the way, and why."""
    _, blocked = _classify(plan)
    return [(wrapper.node, *wrapper.blockers[0]) for wrapper in blocked if wrapper.blockers]


def _classify(plan: RewritePlan) -> Tuple[Dict[str, _Wrapper], List[_Wrapper]]:
    """The file's amp-using classes: those that qualify as scaler wrappers (by name), and those that do not."""
    uses = [use for use in plan.result.uses if is_amp_use(use)]
    if not uses or any(use.api == "apex.amp.initialize" for use in uses):
        return {}, []
    parents = plan.parents
    by_class: Dict[int, _Wrapper] = {}
    for use in uses:
        owner = enclosing(use.node, (ast.ClassDef,), parents)
        if not isinstance(owner, ast.ClassDef):
            return {}, []
        by_class.setdefault(id(owner), _Wrapper(owner)).uses.append(use)
    if _shared_bindings(plan, uses):
        return {}, []
    found, blocked = {}, []
    for wrapper in by_class.values():
        _analyse(plan, wrapper)
        if wrapper.blockers or not wrapper.loss_methods:
            blocked.append(wrapper)
        else:
            found[wrapper.node.name] = wrapper
    return found, blocked


def _shared_bindings(plan: RewritePlan, uses: List[Use]) -> bool:
    """Whether another binding of ``amp`` (not an ``except ImportError`` fallback) may reach a use."""
    conversion = AmpConversion(plan, uses, None)
    conversion.check_bindings()
    return bool(conversion.blockers)


def _analyse(plan: RewritePlan, wrapper: _Wrapper) -> None:
    parents = plan.parents
    handled: set = set()
    pokes: Dict[str, ast.expr] = {}
    for use in wrapper.uses:
        if use.api == "apex.amp":
            handled |= _presence_guard(plan, wrapper, use)
    for use in wrapper.uses:
        if id(use.node) in handled or use.api == "apex.amp":
            continue
        method = enclosing(use.node, _FUNCTIONS, parents)
        if method is None or parents.get(method) is not wrapper.node or not _self_name(method):
            wrapper.blockers.append((use.node, "an amp call outside the methods of the class"))
            continue
        if use.api == "apex.amp.scale_loss":
            handled |= _scale_loss(plan, wrapper, method, use)
        elif use.api in ("apex.amp.state_dict", "apex.amp.load_state_dict"):
            _state(plan, wrapper, method, use)
        elif use.api == "apex.amp._amp_state":
            _loss_scaler_pokes(plan, wrapper, method, use, pokes)
        elif use.api != "apex.amp.master_params":  # master_params: handled with its scale_loss
            wrapper.blockers.append((use.node, f"`{use.api}` has no GradScaler counterpart"))
    masters = [use for use in wrapper.uses if use.api == "apex.amp.master_params"]
    if any(id(use.node) not in handled for use in masters):
        wrapper.blockers.append((masters[0].node, "amp.master_params is read outside the method that scales the loss"))
    if pokes:
        wrapper.start = plan.text.segment(pokes["_loss_scale"]) if "_loss_scale" in pokes else _APEX_START_SCALE
        wrapper.window = plan.text.segment(pokes["_scale_seq_len"]) if "_scale_seq_len" in pokes \
            else _APEX_GROWTH_INTERVAL
    elif not wrapper.blockers:
        wrapper.edits.insert(0, _creation_edit(plan, wrapper))


def _scale_loss(plan: RewritePlan, wrapper: _Wrapper, method: ast.FunctionDef, use: Use) -> set:
    """``with amp.scale_loss(loss, optimizer) as s: s.backward(...)`` followed in the same method by
    ``optimizer.step()``; returns the ids of the ``amp.master_params`` calls this covers."""
    call, parents = use.node, plan.parents
    withitem = parents.get(call)
    statement = parents.get(withitem) if isinstance(withitem, ast.withitem) else None
    if not (isinstance(call, ast.Call) and isinstance(statement, ast.With) and len(statement.items) == 1
            and isinstance(withitem.optional_vars, ast.Name) and not has_starred(call) and len(call.args) == 2
            and not call.keywords and plan.text.owns_lines(statement)):
        wrapper.blockers.append((call, _NOT_A_WITH))
        return set()
    loss, optimizer = call.args
    backward = single_backward_call(statement, withitem.optional_vars.id)
    arguments = [a.arg for a in method.args.posonlyargs + method.args.args][1:]
    if backward is None or not isinstance(loss, ast.Name) or loss.id not in arguments \
            or not is_plain_reference(optimizer) or any(l for l in wrapper.loss_methods if l[0] == method.name):
        wrapper.blockers.append((call, "the scaled loss is not a parameter of the method, the block does more than "
                                       "scaled_loss.backward(), or a second method scales a loss the same way"))
        return set()

    def is_step(node: ast.stmt) -> bool:
        value = getattr(node, "value", None)
        return isinstance(node, ast.Expr) and isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) \
            and value.func.attr == "step" and not value.args and not value.keywords \
            and same_expression(value.func.value, optimizer)

    steps = [node for node in walk_local(method) if isinstance(node, ast.stmt) and is_step(node)]
    masters = [u for u in wrapper.uses if u.api == "apex.amp.master_params"
               and enclosing(u.node, _FUNCTIONS, parents) is method]
    master_ids = {id(u.node) for u in masters}
    path = path_to_step(statement, is_step, parents)
    others = [node for node in walk_local(method) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "backward" and node is not backward]
    if len(steps) != 1 or path.step is not steps[0] or others or not plan.text.owns_lines(steps[0]):
        wrapper.blockers.append((call, _NO_SINGLE_STEP))
        return set()
    unscaling = plan_unscaling([statement], is_step, parents, lambda node: id(node) in master_ids)
    reach = {id(n) for item in path.every_time + path.before_step for n in ast.walk(item)}
    if unscaling.blockers or unscaling.scaled_clips or any(
            id(u.node) not in reach or not isinstance(u.node, ast.Call) or len(u.node.args) != 1
            or not same_expression(u.node.args[0], optimizer) for u in masters):
        wrapper.blockers.append((call, _UNSCALED_READ))
        return set()
    wrapper.loss_methods.append((method.name, arguments.index(loss.id)))
    self_name, step = _self_name(method), steps[0]
    loss_text, optimizer_text = loss.id, plan.text.segment(optimizer)
    args_text = arguments_text(plan, backward)

    def edit(plan: RewritePlan, scaler: str) -> None:
        access = f"{self_name}.{scaler}"
        plan.replace_statement(statement, [f"{access}.scale({loss_text}).backward({args_text})"])
        for reader, _ in unscaling.before.values():
            plan.insert_lines_before(reader, [f"{access}.unscale_({optimizer_text})"])
        for master in masters:
            plan.replace(master.node, parameters_of(optimizer_text, master.node, plan))
        plan.replace_statement(step, [f"{access}.step({optimizer_text})", f"{access}.update()"])

    wrapper.edits.append(edit)
    return master_ids


def _state(plan: RewritePlan, wrapper: _Wrapper, method: ast.FunctionDef, use: Use) -> None:
    call = use.node
    loading = use.api.endswith("load_state_dict")
    if not isinstance(call, ast.Call) or has_starred(call) or call.keywords \
            or len(call.args) != (1 if loading else 0):
        wrapper.blockers.append((call, "amp.state_dict()/amp.load_state_dict(state) is called with other arguments"))
        return
    self_name = _self_name(method)

    def edit(plan: RewritePlan, scaler: str) -> None:
        if loading:
            helper = plan.fresh_name(native_checkpoint.HELPER)
            value = plan.text.segment(call.args[0])
            plan.replace(call, f"{self_name}.{scaler}.load_state_dict({helper}({value}))")
            native_checkpoint.add_helper(plan, helper, [call])
            plan.note(call, f"a checkpoint written by Apex's amp.state_dict() loads through {helper}(), added to "
                            "this file: it converts Apex's loss-scaler entry to the GradScaler's state")
        else:
            plan.replace(call, f"{self_name}.{scaler}.state_dict()")

    wrapper.edits.append(edit)


def _presence_guard(plan: RewritePlan, wrapper: _Wrapper, use: Use) -> set:
    """``if 'state_dict' in amp.__dict__:`` around one statement (an old-Apex guard): the statement alone."""
    parents = plan.parents
    attribute = parents.get(use.node)
    compare = parents.get(attribute)
    guard = parents.get(compare)
    if not (isinstance(attribute, ast.Attribute) and attribute.attr == "__dict__" and isinstance(compare, ast.Compare)
            and len(compare.ops) == 1 and isinstance(compare.ops[0], ast.In) and compare.comparators[0] is attribute
            and isinstance(compare.left, ast.Constant) and compare.left.value in ("state_dict", "load_state_dict")
            and isinstance(guard, ast.If) and guard.test is compare and not guard.orelse and len(guard.body) == 1
            and plan.text.owns_lines(guard) and guard.body[0].lineno == guard.body[0].end_lineno
            and guard.body[0].lineno > guard.lineno):
        wrapper.blockers.append((use.node, _AMP_AS_VALUE))
        return set()
    body = guard.body[0]
    inner = [u for u in wrapper.uses if u.kind == "call" and _within(u.node, body, parents)]
    if len(inner) != 1 or inner[0].api != f"apex.amp.{compare.left.value}":
        wrapper.blockers.append((use.node, _AMP_AS_VALUE))
        return set()
    call = inner[0].node
    method = enclosing(call, _FUNCTIONS, parents)
    self_name = _self_name(method)  # type: ignore[arg-type]

    def edit(plan: RewritePlan, scaler: str) -> None:
        # The guard and its statement become the statement, with the amp call rewritten in place.
        text = plan.text.segment(body)
        start = plan.text.span(body)[0]
        call_start, call_end = plan.text.span(call)
        if compare.left.value == "load_state_dict":
            helper = plan.fresh_name(native_checkpoint.HELPER)
            value = plan.text.segment(call.args[0])  # type: ignore[attr-defined]
            new_call = f"{self_name}.{scaler}.load_state_dict({helper}({value}))"
            native_checkpoint.add_helper(plan, helper, [call])
        else:
            new_call = f"{self_name}.{scaler}.state_dict()"
        line = text[: call_start - start] + new_call + text[call_end - start:]
        plan.replace_statement(guard, [line])
        plan.note(guard, f"`{plan.text.segment(compare)}` asked whether this Apex had the call; the GradScaler has it")

    wrapper.edits.append(edit)
    return {id(call)}


def _loss_scaler_pokes(plan: RewritePlan, wrapper: _Wrapper, method: ast.FunctionDef, use: Use,
                       pokes: Dict[str, ast.expr]) -> None:
    """``s = apex.amp._amp_state.loss_scalers[0]`` then ``s._loss_scale = x`` / ``s._scale_seq_len = y`` in
    ``__init__``: the GradScaler is created there, with ``init_scale=x, growth_interval=y``."""
    statement = plan.statement(use.node)
    target = statement.targets[0] if isinstance(statement, ast.Assign) and len(statement.targets) == 1 else None
    subscript = plan.parents.get(use.node)
    block, index = block_of(statement, plan.parents)
    if not (method.name == "__init__" and isinstance(target, ast.Name) and isinstance(subscript, ast.Subscript)
            and statement.value is subscript and ast.unparse(subscript.slice) == "0"
            and plan.text.owns_lines(statement)):
        wrapper.blockers.append((use.node, _PRIVATE_STATE))
        return
    following: List[ast.stmt] = []
    for item in block[index + 1:]:
        if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Attribute) \
                and isinstance(item.targets[0].value, ast.Name) and item.targets[0].value.id == target.id \
                and item.targets[0].attr in _POKES and plan.text.owns_lines(item) \
                and target.id not in {n.id for n in ast.walk(item.value) if isinstance(n, ast.Name)}:
            following.append(item)
            pokes[item.targets[0].attr] = item.value
        else:
            break
    later = [n for n in walk_local(method) if isinstance(n, ast.Name) and n.id == target.id
             and not any(_within(n, item, plan.parents) for item in [statement] + following)]
    if not following or later:
        wrapper.blockers.append((use.node, _PRIVATE_STATE))
        return
    self_name = _self_name(method)

    def edit(plan: RewritePlan, scaler: str) -> None:
        plan.replace_statement(statement, [_creation_line(self_name, scaler, wrapper.start, wrapper.window)])
        for item in following:
            plan.remove_statement(item)
        plan.note(statement, "Apex's private loss-scaler settings become the GradScaler's init_scale and "
                             "growth_interval (a GradScaler has no ceiling at 2**24 on the scale, as Apex had)")

    wrapper.edits.insert(0, edit)


def _creation_line(self_name: str, scaler: str, start: str, window: str) -> str:
    return (f"{self_name}.{scaler} = torch.amp.GradScaler({_DEVICE}, init_scale={start}, "
            f"growth_interval={window})")


def _creation_edit(plan: RewritePlan, wrapper: _Wrapper):
    """The GradScaler is created in ``__init__`` (added before the first method where there is none)."""
    methods = [item for item in wrapper.node.body if isinstance(item, _FUNCTIONS)]
    init = next((item for item in methods if item.name == "__init__"), None)

    def edit(plan: RewritePlan, scaler: str) -> None:
        if init is not None:
            body = init.body
            first = body[1] if len(body) > 1 and is_docstring(body[0]) else body[0]
            if is_docstring(first):
                plan.insert_at(plan.text.line_end(first.end_lineno),  # type: ignore[arg-type]
                               plan.text.indentation(first.lineno) +
                               _creation_line(_self_name(init), scaler, wrapper.start, wrapper.window) +
                               plan.text.newline(first.lineno))
            else:
                plan.insert_lines_before(first, [_creation_line(_self_name(init), scaler, wrapper.start,
                                                                wrapper.window)])
            return
        anchor = methods[0]
        line = min([anchor.lineno] + [d.lineno for d in anchor.decorator_list])
        indent = plan.text.indentation(anchor.lineno)
        newline = plan.text.newline(line)
        lines = [f"def __init__(self):", f"    {_creation_line('self', scaler, wrapper.start, wrapper.window)}", ""]
        plan.insert_at(plan.text.line_start(line), "".join((indent + item if item else "") + newline
                                                           for item in lines))

    return edit


def convert_wrappers(plan: RewritePlan, context: WrapperContext) -> None:
    """Convert the file's wrapper classes that the tree pass found partners for (``context.own``)."""
    if not context.own:
        if any(use.api == "apex.amp.scale_loss" for use in plan.result.uses):
            for owner, node, reason in wrapper_problems(plan):
                if any(use.api == "apex.amp.scale_loss" and _within(use.node, owner, plan.parents)
                       for use in plan.result.uses):
                    plan.todo(node, _BLOCKED_WRAPPER.format(name=owner.name, reason=reason))
        return
    wrappers = wrapper_classes(plan)
    if not wrappers or set(wrappers) - set(context.own):
        return
    scaler = plan.fresh_name("grad_scaler")
    for name, wrapper in wrappers.items():
        for edit in wrapper.edits:
            edit(plan, scaler)
        plan.note(wrapper.node, _WRAPPER_NOTE.format(name=name, start=wrapper.start, window=wrapper.window))
        for use in wrapper.uses:
            plan.mark_converted(use)
    plan.uses_torch = True


# --- the caller --------------------------------------------------------------------------------------------
def convert_callers(plan: RewritePlan, context: WrapperContext, choice: Optional[LevelChoice]) -> bool:
    """Convert ``amp.initialize`` where it builds a converted wrapper (``context.partners``) or a library's
    (:data:`LIBRARY_WRAPPERS`); whether it did."""
    library = {name: adapter for name, adapter in _library_imports(plan).items() if name not in context.partners}
    partners: Dict[str, Tuple[Tuple[str, int], ...]] = dict(context.partners)
    partners.update((name, adapter.loss_methods) for name, adapter in library.items())
    if not partners:
        return False
    uses = [use for use in plan.result.uses if is_amp_use(use) and not plan.is_converted(use)]
    inits = [use for use in uses if use.api == "apex.amp.initialize"]
    if len(inits) != 1 or len(uses) != 1:
        return False
    init = inits[0]
    conversion = AmpConversion(plan, uses, choice)
    conversion.init = init
    conversion.check_bindings()
    conversion.read_initialize(init)
    if conversion.blockers or conversion.inference or conversion.recipe is None \
            or conversion.recipe.at_run_time or conversion.recipe.dtype != "torch.float16" \
            or conversion.enabled is not None:
        return False
    statement = conversion.init_statement
    built = _built_wrappers(plan, statement, partners)
    if not built:
        return False
    adapters = []
    for target, name in built:
        if name in library:
            adapter = library[name].adapt(plan, target, conversion)
            if adapter is None:
                return False
            adapters.append(adapter)
    scaling = ", ".join(sorted({f"{name} (converted in {context.files[name]})" if name not in library
                                else library[name].spelled for _, name in built}))
    model = plan.text.segment(conversion.model_ref)
    kept = conversion.returned_assignment()
    device = plan.fresh_name("amp_device_type")
    slot = _autocast_slot(plan, statement)
    if not any(partners[name] for _, name in built):  # the library runs the forward pass itself
        plan.replace_statement(statement, kept + [f"{device} = next({model}.parameters()).device.type"])
        plan.note(init.node, _LIBRARY_NOTE.format(scaling=scaling))
    elif slot is not None:
        plan.replace_statement(statement, kept + [
            f"{slot} = functools.partial(torch.autocast, next({model}.parameters()).device.type, dtype=torch.float16)"])
        plan.modules.add("functools")
        plan.note(init.node, _SLOT_NOTE.format(slot=slot, scaling=scaling))
    else:
        regions = []
        for target, name in built:
            for site in _loss_sites(plan, target, partners[name]):
                region = forward_region(plan.text, plan.parents, site[0], site[1], {id(init.node)})
                if isinstance(region, str):
                    return False
                if not any(region[0] is known[0] for known in regions):
                    regions.append(region)
        if not regions:
            return False
        conversion.place_nodes([region[0] for region in regions], [])
        if conversion.blockers:
            return False
        conversion.apply_initialize()
        for region in regions:
            conversion.wrap_region(region)
        plan.note(init.node, _CALLER_NOTE.format(scaling=scaling))
    for apply in adapters:
        apply(device)
    for node, note in conversion.notes:
        plan.note(node, note)
    plan.mark_converted(init)
    plan.uses_torch = True
    return True


# --- known library wrappers ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LibraryWrapper:
    """A wrapper class an installed library provides, and its native counterpart in the same library.

    Attributes:
        name: the class (imported by this name).
        modules: the modules it is imported from.
        loss_methods: the methods the caller hands the loss to (empty: the library runs the training step itself).
        spelled: how the notes name what scales the loss now.
        adapt: checks one ``target = name(...)`` and returns the edit that converts it (given the name of the autocast
            device type, where one is created), or ``None`` when the native counterpart cannot stand in.
    """

    name: str
    modules: Tuple[str, ...]
    loss_methods: Tuple[Tuple[str, int], ...]
    spelled: str
    adapter: object

    def adapt(self, plan: RewritePlan, target: ast.expr, conversion):
        return self.adapter(plan, target, conversion)  # type: ignore[operator]


_NATIVE_SCALER_NOTE = (
    "timm's ApexScaler becomes timm's NativeScaler (a torch GradScaler, Apex's start scale and growth window): its "
    "state_dict_key is \"amp_scaler\", not \"amp\", so resuming from a checkpoint written before the migration "
    "leaves the loss scale to start over at 2**16 (the old \"amp\" entry is not read); it clips the parameters= "
    "passed (ApexScaler clipped the optimizer's)")
_LR_FINDER_NOTE = (
    "amp_backend='apex' becomes torch-lr-finder's 'torch' backend (as this file's own torch run uses it): autocast "
    "FP16 from amp_config and a torch.amp.GradScaler with Apex's start scale and growth window")


def _timm_native_scaler(plan: RewritePlan, target: ast.expr, conversion):
    """``scaler = ApexScaler()`` -> ``NativeScaler()``; every call of the scaler that clips passes ``parameters=``
    (NativeScaler asserts it)."""
    build = plan.statement(target)
    call = build.value  # type: ignore[attr-defined]
    if call.args or call.keywords:
        return None
    spelled = ast.unparse(target)
    for node in plan.result.nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) \
                and ast.unparse(node.func) == spelled:
            names = {keyword.arg for keyword in node.keywords}
            if len(node.args) > 2 or None in names or ("clip_grad" in names and "parameters" not in names):
                return None
    bound = any(isinstance(node, ast.ImportFrom) and node.module in ("timm.utils", "timm.utils.cuda")
                and any(alias.name == "NativeScaler" and alias.asname is None for alias in node.names)
                for node in plan.result.nodes)

    def apply(device: str) -> None:
        if not bound:
            plan.modules.add("timm.utils")
        plan.replace(call.func, "NativeScaler" if bound else "timm.utils.NativeScaler")
        plan.note(call, _NATIVE_SCALER_NOTE)

    return apply


def _lr_finder_torch_backend(plan: RewritePlan, target: ast.expr, conversion):
    """``LRFinder(..., amp_backend="apex")`` -> ``amp_backend="torch", amp_config=..., grad_scaler=...``, where the
    file already builds an LRFinder with ``amp_backend="torch"`` (so the installed version has that backend)."""
    call = plan.statement(target).value  # type: ignore[attr-defined]
    backend = next((keyword for keyword in call.keywords if keyword.arg == "amp_backend"), None)
    names = {keyword.arg for keyword in call.keywords}
    if backend is None or not isinstance(backend.value, ast.Constant) or backend.value.value != "apex" \
            or names & {"amp_config", "grad_scaler", None}:
        return None
    torch_runs = [node for node in plan.result.nodes if isinstance(node, ast.keyword) and node.arg == "amp_backend"
                  and isinstance(node.value, ast.Constant) and node.value.value == "torch"]
    if not torch_runs:
        return None

    def apply(device: str) -> None:
        plan.replace(backend, f'amp_backend="torch", amp_config={{"device_type": {device}, "dtype": torch.float16}}, '
                              f"grad_scaler=torch.amp.GradScaler({device}, init_scale=2.0**16, growth_interval=2000)")
        plan.note(call, _LR_FINDER_NOTE)

    return apply


LIBRARY_WRAPPERS = {
    "ApexScaler": LibraryWrapper("ApexScaler", ("timm.utils", "timm.utils.cuda"), (("__call__", 0),),
                                 "timm's NativeScaler (in place of ApexScaler)", _timm_native_scaler),
    "LRFinder": LibraryWrapper("LRFinder", ("torch_lr_finder", "torch_lr_finder.lr_finder"), (),
                               "torch-lr-finder's torch backend", _lr_finder_torch_backend),
}
"""Wrappers of installed libraries whose native counterpart's API is known (see each adapter's conditions)."""


def _library_imports(plan: RewritePlan) -> Dict[str, LibraryWrapper]:
    found = {}
    for node in plan.result.nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                adapter = LIBRARY_WRAPPERS.get(alias.name)
                if adapter is not None and alias.asname is None and node.module in adapter.modules:
                    found[alias.name] = adapter
    return found


def _built_wrappers(plan: RewritePlan, statement: ast.stmt,
                    partners: Mapping[str, object]) -> List[Tuple[ast.expr, str]]:
    """``(target, class name)`` for each ``target = Wrapper(...)`` after ``statement`` in its block."""
    block, index = block_of(statement, plan.parents)
    found = []
    for item in block[index + 1:]:
        if isinstance(item, ast.Assign) and len(item.targets) == 1 and is_plain_reference(item.targets[0]) \
                and isinstance(item.value, ast.Call) and isinstance(item.value.func, (ast.Name, ast.Attribute)):
            name = item.value.func.id if isinstance(item.value.func, ast.Name) else item.value.func.attr
            if name in partners:
                found.append((item.targets[0], name))
    return found


def _loss_sites(plan: RewritePlan, target: ast.expr, methods: Sequence[Tuple[str, int]]) -> List[Tuple[ast.stmt, str]]:
    """The statements that hand a loss (a plain name) to the wrapper held in ``target``: ``target.step(loss, ...)``
    or ``target(loss, ...)``, each with the loss's name."""
    spelled = ast.unparse(target)
    sites = []
    for node in plan.result.nodes:
        if not isinstance(node, ast.Call):
            continue
        for name, position in methods:
            receiver = node.func if name == "__call__" else (
                node.func.value if isinstance(node.func, ast.Attribute) and node.func.attr == name else None)
            if receiver is None or ast.unparse(receiver) != spelled:
                continue
            loss = node.args[position] if len(node.args) > position else None
            statement = plan.statement(node)
            if isinstance(loss, ast.Name) and isinstance(statement, ast.Expr) and statement.value is node:
                sites.append((statement, loss.id))
    return sites


def _autocast_slot(plan: RewritePlan, statement: ast.stmt) -> Optional[str]:
    """timm's slot: ``slot = suppress`` earlier in the function, around the ``if`` that holds ``statement``,
    entered as ``with slot():`` somewhere in the file (or passed on by keyword)."""
    parents = plan.parents
    current: ast.AST = statement
    while True:
        parent = parents.get(current)
        if parent is None or isinstance(parent, (ast.Module, ast.ClassDef)) or isinstance(parent, _FUNCTIONS):
            return None
        if isinstance(parent, ast.If) and isinstance(current, ast.stmt):
            block, index = block_of(parent, parents)
            for item in reversed(block[:index]):
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name) \
                        and ast.unparse(item.value) in _NULL_CONTEXTS:
                    slot = item.targets[0].id
                    if slot in _stored_in_branch(statement, parents):
                        return None
                    return slot if _entered(plan, slot) else None
        current = parent


def _stored_in_branch(statement: ast.stmt, parents) -> set:
    """The names assigned in the block of ``statement`` (the branch that calls ``amp.initialize``)."""
    block, _ = block_of(statement, parents)
    return {target.id for item in block for node in ast.walk(item) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def _entered(plan: RewritePlan, slot: str) -> bool:
    for node in plan.result.nodes:
        if isinstance(node, ast.withitem) and isinstance(node.context_expr, ast.Call) \
                and isinstance(node.context_expr.func, ast.Name) and node.context_expr.func.id == slot:
            return True
        if isinstance(node, ast.keyword) and isinstance(node.value, ast.Name) and node.value.id == slot:
            return True
    return False


# --- the tree pass ---------------------------------------------------------------------------------------------
def tree_wrappers(results: Sequence[ScanResult], choice: Optional[LevelChoice]) -> Dict[str, WrapperContext]:
    """For each scanned file: which of its wrapper classes convert, and which partners it converts with.

    A wrapper class converts when at least one other scanned file imports it (by name, from its module or
    from the package folder holding it) and every such file converts its ``amp.initialize`` with it. A bug
    here must not end the run: then nothing converts across files.
    """
    try:
        return _tree_wrappers(results, choice)
    except Exception:  # the files still convert one by one, keeping their TODOs
        return {}


def _tree_wrappers(results: Sequence[ScanResult], choice: Optional[LevelChoice]) -> Dict[str, WrapperContext]:
    candidates: Dict[str, Dict[str, _Wrapper]] = {}
    for result in results:
        if not any(use.api == "apex.amp.scale_loss" for use in result.uses):
            continue
        found = wrapper_classes(RewritePlan(result))
        if found:
            candidates[result.source.path] = found
    if not candidates:
        return {}
    importers: Dict[str, Dict[str, str]] = {}  # caller path -> class name -> wrapper path
    for result in results:
        if not any(use.api == "apex.amp.initialize" for use in result.uses):
            continue
        imports = imports_by_module(result.source.tree)
        for path, classes in candidates.items():
            modules = {module_name_of(path), os.path.basename(os.path.dirname(os.path.normpath(path)))}
            for module in modules & imports.keys():
                for name in imports[module] & classes.keys():
                    importers.setdefault(result.source.path, {})[name] = path
    by_path = {result.source.path: result for result in results}
    alive = {path: set(classes) for path, classes in candidates.items()}
    while True:
        contexts = {caller: _caller_context(names, alive, candidates) for caller, names in importers.items()}
        converts = {caller: bool(context.partners) and _converts(by_path[caller], context, choice)
                    for caller, context in contexts.items()}
        changed = False
        for path, names in alive.items():
            for name in list(names):
                callers = [caller for caller, imported in importers.items() if imported.get(name) == path]
                if not callers or not all(converts[caller] for caller in callers):
                    names.discard(name)
                    changed = True
        if not changed:
            break
    result_contexts: Dict[str, WrapperContext] = {}
    for path, names in alive.items():
        if names and names == set(candidates[path]):
            result_contexts[path] = WrapperContext(own=frozenset(names))
    for caller, context in contexts.items():
        if converts[caller]:
            result_contexts[caller] = context
    return result_contexts


def _converts(result: ScanResult, context: WrapperContext, choice: Optional[LevelChoice]) -> bool:
    """Whether the caller converts with its partners (a bug in one caller keeps only its partners back)."""
    try:
        return convert_callers(RewritePlan(result), context, choice)
    except Exception:
        return False


def _caller_context(names: Dict[str, str], alive: Dict[str, set],
                    candidates: Dict[str, Dict[str, _Wrapper]]) -> WrapperContext:
    partners = {name: tuple(candidates[path][name].loss_methods) for name, path in names.items()
                if name in alive.get(path, set())}
    files = {name: os.path.basename(path) for name, path in names.items()}
    return WrapperContext(partners=partners, files=files)


# --- small syntax helpers ----------------------------------------------------------------------------------------
def _within(node: ast.AST, outer: ast.AST, parents) -> bool:
    current: Optional[ast.AST] = node
    while current is not None:
        if current is outer:
            return True
        current = parents.get(current)
    return False


def _self_name(method) -> str:
    arguments = method.args.posonlyargs + method.args.args
    if not arguments or any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod")
                            for d in method.decorator_list):
        return ""
    return arguments[0].arg
