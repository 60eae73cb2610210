"""``--to-native`` for Apex's other surfaces: fused optimizers and norms, apex DDP/SyncBatchNorm, helpers.

Each converter rewrites one call (or class reference) to its ``torch`` counterpart with Apex's
defaults made explicit where torch's differ (``AdamW``'s weight decay, ``RMSNorm``'s eps), or returns
the reason it cannot, which becomes a ``TODO(ampcompat)`` comment; the call then stays on ampcompat.
Arguments are carried over as written; an argument with no torch counterpart is dropped only when it
cannot change the result, and the drop is noted.
"""
from __future__ import annotations

import ast
from typing import Callable, Dict, List, Optional, Sequence

from .callargs import NOT_LITERAL, argument, has_starred, literal_value
from .catalogue import ENTRIES, Verdict
from .native_amp import is_amp_use
from .native_fp16_optimizer import WRAPPERS
from .native_groups import convert_create_syncbn_process_group
from .native_inline_classes import inline_fused_adam, inline_larc
from .native_multi_tensor import convert_multi_tensor
from .native_profiling import convert_profiling
from .plan import RewritePlan
from .scanner import Use

_NORM_UNDER_AUTOCAST = (
    "under autocast, {apex} returned the autocast dtype (FP16); {torch} may run in FP32 there, so results can "
    "differ slightly: cast its output if later code relies on FP16"
)


def convert_calls(plan: RewritePlan) -> None:
    """Convert every non-amp Apex use that has a mechanical torch counterpart; TODOs for the rest.

    Only a use that sees nothing but its Apex binding is rewritten where it stands. Where another
    binding of the name can reach it too (``try: from apex... except ImportError: from torch...``), the
    use is left as written and the import decides what the name means (see :mod:`native_imports`).
    """
    known = {**convert_multi_tensor(plan), **convert_profiling(plan)}  # their own reasons for what stays
    for use in plan.result.uses:
        if is_amp_use(use) or plan.is_converted(use) or not use.exclusive or use.api in WRAPPERS:
            continue  # amp and FP16_Optimizer loops are converted (or reported) as a whole
        if use.kind in ("import", "string", "check"):
            continue  # imports follow their names (native_imports); checks by name are the guards' (to_native)
        converter = _CONVERTERS.get(use.api)
        if id(use.node) in known:
            problem: Optional[str] = known[id(use.node)]
        else:
            problem = converter(plan, use) if converter is not None else _no_rewrite(use)
        if problem is None:
            plan.mark_converted(use)
            plan.uses_torch = True
        else:
            plan.todo(use.node, problem)


def _no_rewrite(use: Use) -> str:
    entry = ENTRIES.get(use.api)
    useful = entry is not None and entry.native != "—" and not entry.native.startswith("none")
    native = f" (native equivalent: {entry.native})" if useful else ""
    if use.verdict is Verdict.UNSUPPORTED:
        return f"`{use.api}`: {use.reason}{native}"
    return f"no mechanical rewrite of `{use.api}` to plain PyTorch{native}; it stays on ampcompat"


_LEGACY_KEYWORDS = ("eps_inside_sqrt", "max_grad_norm")
"""Apex's 2019 FusedAdam keywords: a call using them gets the class of :mod:`native_inline_classes`."""


class _Call:
    """One call being rewritten: reads its arguments by Apex's signature and builds the torch call."""

    def __init__(self, plan: RewritePlan, use: Use, signature: Sequence[str]) -> None:
        self.plan = plan
        self.use = use
        self.call = use.node if isinstance(use.node, ast.Call) else None
        self.signature = list(signature)

    def arg(self, name: str) -> Optional[ast.expr]:
        assert self.call is not None
        return argument(self.call, name, self.signature.index(name))

    def value(self, name: str, default: object = None) -> object:
        node = self.arg(name)
        return default if node is None else literal_value(node)

    def is_default(self, name: str, default: object) -> bool:
        """Whether ``name`` was not passed, or passed as a literal equal to ``default``."""
        value = self.value(name, default)
        return value is not NOT_LITERAL and value == default

    def problem(self, shared_positional: int) -> Optional[str]:
        """Why the call cannot be rewritten at all, or ``None``."""
        if self.call is None:
            return f"`{self.use.api}` is used as a value here; rewrite by hand"
        if has_starred(self.call):
            return "its arguments are unpacked with * or **; rewrite by hand"
        if len(self.call.args) > shared_positional:
            return (f"more than {shared_positional} positional argument(s): Apex's order differs from torch's "
                    "after that; pass them by keyword first")
        unknown = [keyword.arg for keyword in self.call.keywords if keyword.arg not in self.signature]
        if unknown:
            return (f"`{unknown[0]}` is not an argument this rewrite knows for `{self.use.api}` (an older Apex "
                    f"release's, or a misspelling): torch's counterpart may not take it or may mean something else"
                    "; keep ampcompat or rewrite by hand")
        return None

    def rewrite(self, func: str, drop: Sequence[str] = (), add: Optional[Dict[str, str]] = None) -> None:
        """Replace the call with ``func(...)``: its arguments except ``drop``, then ``add`` where not given."""
        assert self.call is not None
        text = self.plan.text
        parts = [text.segment(arg) for arg in self.call.args]
        parts += [f"{k.arg}={text.segment(k.value)}" for k in self.call.keywords if k.arg not in drop]
        for name, value in (add or {}).items():
            given = name in self.signature and self.arg(name) is not None
            if not given:
                parts.append(f"{name}={value}")
        self._keep_comments()
        self.plan.replace(self.call, f"{func}({', '.join(parts)})")

    def _keep_comments(self) -> None:
        start, end = self.plan.text.span(self.call)
        comments = self.plan.text.comments_in(start, end)
        statement = self.plan.statement(self.call)
        if comments and self.plan.text.owns_lines(statement):
            self.plan.insert_lines_before(statement, comments)


def _fused_adam(plan: RewritePlan, use: Use) -> Optional[str]:
    call = _Call(plan, use, ("params", "lr", "bias_correction", "betas", "eps", "adam_w_mode", "weight_decay",
                             "amsgrad", "set_grad_none", "capturable", "master_weights") + _LEGACY_KEYWORDS)
    problem = call.problem(shared_positional=2)
    if problem:
        return problem
    adam_w = call.value("adam_w_mode", True)
    if adam_w is NOT_LITERAL:
        return "adam_w_mode is only known at run time (AdamW or Adam); rewrite by hand"
    for name, default, why in (
        ("amsgrad", False, "Apex's FusedAdam rejected amsgrad=True"),
        ("master_weights", False, "FusedAdam's master_weights has no torch counterpart"),
    ):
        if not call.is_default(name, default):
            return why + "; keep ampcompat.optimizers.FusedAdam or rewrite by hand"
    inline = inline_fused_adam(call)  # "" once rewritten to a class added to the file
    if inline is not None:
        return inline or None
    add = {"weight_decay": "0.0", "fused": "True"} if adam_w else {"fused": "True"}
    call.rewrite("torch.optim.AdamW" if adam_w else "torch.optim.Adam",
                 drop=("bias_correction", "adam_w_mode", "amsgrad", "set_grad_none", "master_weights")
                 + _LEGACY_KEYWORDS, add=add)
    return None


def _fused_sgd(plan: RewritePlan, use: Use) -> Optional[str]:
    call = _Call(plan, use, ("params", "lr", "momentum", "dampening", "weight_decay", "nesterov",
                             "wd_after_momentum", "materialize_master_grads", "set_grad_none"))
    problem = call.problem(shared_positional=6)
    if problem:
        return problem
    if not call.is_default("wd_after_momentum", False):
        return "wd_after_momentum=True has no torch counterpart; keep ampcompat.optimizers.FusedSGD or rewrite by hand"
    call.rewrite("torch.optim.SGD", drop=("wd_after_momentum", "materialize_master_grads", "set_grad_none"),
                 add={"fused": "True"})
    return None


def _fused_adagrad(plan: RewritePlan, use: Use) -> Optional[str]:
    call = _Call(plan, use, ("params", "lr", "eps", "weight_decay", "set_grad_none", "adagrad_w_mode"))
    problem = call.problem(shared_positional=2)
    if problem:
        return problem
    if not call.is_default("adagrad_w_mode", False):
        return "adagrad_w_mode=True (decoupled weight decay) has no torch counterpart; rewrite by hand"
    call.rewrite("torch.optim.Adagrad", drop=("set_grad_none", "adagrad_w_mode"))
    return None


def _value_context(node: ast.AST, parents) -> str:
    """How a class used as a value is used: ``type`` (``isinstance``/``issubclass``/``type(x) is C``/
    ``except C``), ``base`` (a class statement's base), else ``value`` (passed on, stored, called later)."""
    parent = parents.get(node)
    while isinstance(parent, ast.Tuple):
        node, parent = parent, parents.get(parent)
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) \
            and parent.func.id in ("isinstance", "issubclass") and node in parent.args[1:]:
        return "type"
    if isinstance(parent, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) for op in parent.ops):
        return "type"
    if isinstance(parent, ast.ExceptHandler):
        return "type"
    if isinstance(parent, ast.ClassDef) and node in parent.bases:
        return "base"
    return "value"


def _class_reference(plan: RewritePlan, use: Use, target: str, defaults: Dict[str, str], todo: str) -> Optional[str]:
    """A mapped class used as a value: torch's class where only its type matters, else a
    ``functools.partial`` that keeps Apex's defaults (``defaults``), with ``todo`` left where it is."""
    context = _value_context(use.node, plan.parents)
    if context == "base":
        passing = f" and pass {', '.join(f'{k}={v}' for k, v in defaults.items())} in __init__" if defaults else ""
        return (f"a subclass of Apex's `{use.api.rsplit('.', 1)[1]}`: it keeps Apex's behaviour on ampcompat; to "
                f"move to `{target}`, subclass it{passing} by hand")
    if context == "type" or not defaults:
        plan.replace(use.node, target)
    else:
        keywords = ", ".join(f"{name}={value}" for name, value in defaults.items())
        plan.replace(use.node, f"functools.partial({target}, {keywords})")
        plan.modules.add("functools")
    if todo and context != "type":
        plan.todo(use.node, todo)
    return None


def _fused_layer_norm(plan: RewritePlan, use: Use) -> Optional[str]:
    if use.kind == "reference":
        return _class_reference(plan, use, "torch.nn.LayerNorm", {},
                                _NORM_UNDER_AUTOCAST.format(apex="FusedLayerNorm", torch="torch.nn.LayerNorm"))
    call = _Call(plan, use, ("normalized_shape", "eps", "elementwise_affine", "memory_efficient"))
    problem = call.problem(shared_positional=3)
    if problem:
        return problem
    call.rewrite("torch.nn.LayerNorm", drop=("memory_efficient",))
    plan.todo(use.node, _NORM_UNDER_AUTOCAST.format(apex="FusedLayerNorm", torch="torch.nn.LayerNorm"))
    return None


def _fused_rms_norm(plan: RewritePlan, use: Use) -> Optional[str]:
    if use.kind == "reference":
        return _class_reference(plan, use, "torch.nn.RMSNorm", {"eps": "1e-5"},
                                "Apex's FusedRMSNorm(normalized_shape, eps=1e-5): keep passing eps by keyword here")
    call = _Call(plan, use, ("normalized_shape", "eps", "elementwise_affine", "memory_efficient"))
    problem = call.problem(shared_positional=3)
    if problem:
        return problem
    call.rewrite("torch.nn.RMSNorm", drop=("memory_efficient",), add={"eps": "1e-5"})
    plan.todo(use.node, _NORM_UNDER_AUTOCAST.format(apex="FusedRMSNorm", torch="torch.nn.RMSNorm"))
    return None


_DDP_SIGNATURE = ("module", "message_size", "delay_allreduce", "shared_param", "allreduce_trigger_params",
                  "retain_allreduce_buffers", "allreduce_always_fp32", "num_allreduce_streams",
                  "allreduce_communicators", "gradient_average", "gradient_predivide_factor",
                  "gradient_average_split_factor", "prof")
_DDP_PERFORMANCE_KNOBS = ("allreduce_trigger_params", "retain_allreduce_buffers", "num_allreduce_streams",
                          "allreduce_communicators", "gradient_average_split_factor", "prof")


_DDP_VALUE_TODO = (
    "Apex's DistributedDataParallel as a value: this keeps Apex's default broadcast_buffers=False; torch's second "
    "positional parameter is device_ids (Apex's was message_size), so where this is called, pass everything "
    "after the module by keyword, and message_size/delay_allreduce as torch's bucket_cap_mb or not at all"
)


def _distributed_data_parallel(plan: RewritePlan, use: Use) -> Optional[str]:
    if use.kind == "reference":
        return _class_reference(plan, use, "torch.nn.parallel.DistributedDataParallel",
                                {"broadcast_buffers": "False"}, _DDP_VALUE_TODO)
    call = _Call(plan, use, _DDP_SIGNATURE)
    problem = call.problem(shared_positional=1)
    if problem:
        return problem
    for name, default in (("gradient_average", True), ("gradient_predivide_factor", 1.0),
                          ("allreduce_always_fp32", False), ("shared_param", None)):
        if not call.is_default(name, default):
            return f"{name} needs a DDP communication hook in torch (register_comm_hook); rewrite by hand"
    notes: List[str] = []
    if not call.is_default("delay_allreduce", False):
        notes.append("delay_allreduce: torch DDP overlaps the all-reduce with backward (same averaged gradients); "
                     "add find_unused_parameters=True if some parameters get no gradient")
    dropped = [name for name in _DDP_PERFORMANCE_KNOBS if call.arg(name) is not None]
    if dropped:
        notes.append(f"dropped {', '.join(dropped)}: Apex performance settings with no torch counterpart")
    size = call.arg("message_size")
    add = {"broadcast_buffers": "False"}
    if size is not None:
        add["bucket_cap_mb"] = f"({plan.text.segment(size)}) * 4 / 2**20"
    call.rewrite("torch.nn.parallel.DistributedDataParallel",
                 drop=("message_size", "delay_allreduce", "gradient_average", "gradient_predivide_factor",
                       "allreduce_always_fp32", "shared_param") + _DDP_PERFORMANCE_KNOBS, add=add)
    for note in notes:
        plan.todo(use.node, note)
    return None


def _convert_syncbn_model(plan: RewritePlan, use: Use) -> Optional[str]:
    call = _Call(plan, use, ("module", "process_group", "channel_last"))
    problem = call.problem(shared_positional=2)
    if problem:
        return problem
    if not call.is_default("channel_last", False):
        return "channel_last=True has no torch.nn.SyncBatchNorm counterpart; rewrite by hand"
    call.rewrite("torch.nn.SyncBatchNorm.convert_sync_batchnorm", drop=("channel_last",))
    return None


def _sync_batch_norm(plan: RewritePlan, use: Use) -> Optional[str]:
    if use.kind == "reference":
        return _class_reference(plan, use, "torch.nn.SyncBatchNorm", {}, "")
    call = _Call(plan, use, ("num_features", "eps", "momentum", "affine", "track_running_stats", "process_group",
                             "channel_last", "fuse_relu"))
    problem = call.problem(shared_positional=6)
    if problem:
        return problem
    for name in ("channel_last", "fuse_relu"):
        if not call.is_default(name, False):
            return f"{name}=True has no torch.nn.SyncBatchNorm counterpart; rewrite by hand"
    call.rewrite("torch.nn.SyncBatchNorm", drop=("channel_last", "fuse_relu"))
    return None


def _to_python_float(plan: RewritePlan, use: Use) -> Optional[str]:
    call = use.node
    if not isinstance(call, ast.Call) or len(call.args) != 1 or call.keywords or has_starred(call):
        return "to_python_float is not called with one argument; rewrite by hand"
    value = call.args[0]
    text = plan.text.segment(value)
    if not isinstance(value, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)):
        text = f"({text})"
    plan.replace(call, f"{text}.item()")
    return None


def _clip_grad_norm(plan: RewritePlan, use: Use) -> Optional[str]:
    target = use.node.func if isinstance(use.node, ast.Call) else use.node
    plan.replace(target, "torch.nn.utils.clip_grad_norm_")
    return None


_CONVERTERS: Dict[str, Callable[[RewritePlan, Use], Optional[str]]] = {
    "apex.optimizers.FusedAdam": _fused_adam,
    "apex.optimizers.FusedSGD": _fused_sgd,
    "apex.optimizers.FusedAdagrad": _fused_adagrad,
    "apex.normalization.FusedLayerNorm": _fused_layer_norm,
    "apex.normalization.FusedRMSNorm": _fused_rms_norm,
    "apex.parallel.DistributedDataParallel": _distributed_data_parallel,
    "apex.parallel.convert_syncbn_model": _convert_syncbn_model,
    "apex.parallel.create_syncbn_process_group": convert_create_syncbn_process_group,
    "apex.parallel.SyncBatchNorm": _sync_batch_norm,
    "apex.fp16_utils.to_python_float": _to_python_float,
    "apex.fp16_utils.clip_grad_norm": _clip_grad_norm,
    "apex.parallel.LARC.LARC": lambda plan, use: inline_larc(_Call(plan, use, ("optimizer", "trust_coefficient",
                                                                              "clip", "eps"))),
}
