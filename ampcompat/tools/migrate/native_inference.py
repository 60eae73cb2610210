"""``model = amp.initialize(model, opt_level="O2")`` with no optimizer (an inference script): Apex's model casts.

At O2 and O3 Apex did not patch torch: it changed the model object itself -- FP16 weights (affine batch
norms kept FP32 at O2, ``keep_batchnorm_fp32``), its floating inputs cast to FP16 and its floating
outputs to FP32 on every call, and ``state_dict()`` giving FP32 tensors. Everything lives in the model,
so the model can be handed to other code (an evaluator's ``predict(model)``) and still runs as it did.
There is nothing to scale without an optimizer, so this is exact in plain PyTorch: the call becomes
``model = fp16_model_casts.apply(model, keep_batchnorm_fp32=True)``, with that small class added once to
the file (the same casts as ampcompat's O2, as forward hooks, which copies and ``DataParallel`` replicas of
the model keep). O1 (autocast per op) and O4/O5 stay with :mod:`native_amp`'s inference conversion.
"""
from __future__ import annotations

import ast
from typing import List, Optional, Tuple

from . import native_checkpoint
from .callargs import NOT_LITERAL, literal_value
from .plan import RewritePlan

HELPER = "fp16_model_casts"
"""The class's name (or a fresh variant where the file already uses it)."""

_KEEP_BATCHNORM = {"O2": True, "O3": False}
"""Each level's ``keep_batchnorm_fp32`` default."""
_ALLOWED = ("models", "opt_level", "verbosity", "keep_batchnorm_fp32")
NOTE = ("amp.initialize without an optimizer at opt_level {level}: Apex cast the model itself (FP16 weights{batchnorm}, "
        "inputs to FP16, outputs to FP32, FP32 state_dict), which {helper}.apply, added to this file, does the same "
        "way in plain PyTorch -- also where the model is handed to other code")


def casts_model(level: Optional[str]) -> bool:
    """Whether an ``amp.initialize`` without optimizer at ``level`` (a literal) becomes the model casts."""
    return level in _KEEP_BATCHNORM


def keep_batchnorm(call: ast.Call, level: str) -> Tuple[Optional[bool], str]:
    """``(keep_batchnorm_fp32, "")`` for the call, or ``(None, why it cannot become the casts)``."""
    keep = _KEEP_BATCHNORM[level]
    for keyword in call.keywords:
        if keyword.arg not in _ALLOWED:
            return None, (f"amp.initialize without an optimizer sets `{keyword.arg}`, which the model casts of "
                          f"{level} do not take here; rewrite by hand")
        if keyword.arg == "keep_batchnorm_fp32":
            value = literal_value(keyword.value)
            if value is NOT_LITERAL or value not in (None, True, False):
                return None, "keep_batchnorm_fp32 is not a literal True, False or None; rewrite by hand"
            if value is not None:
                keep = bool(value)
    return keep, ""


def apply(plan: RewritePlan, statement: ast.stmt, model: ast.expr, keep: bool, level: str,
          call: ast.Call) -> None:
    """Replace the ``amp.initialize`` statement by the casts and add the class once."""
    helper = plan.fresh_name(HELPER)
    spelled = plan.text.segment(model)
    target = f"{spelled} = " if isinstance(statement, ast.Assign) else ""
    plan.replace_statement(statement, [f"{target}{helper}.apply({spelled}, keep_batchnorm_fp32={keep})"])
    plan.note(call, NOTE.format(level=level, helper=helper, batchnorm=", affine batch norms kept FP32" if keep else ""))
    plan.uses_torch = True
    plan.modules.add("collections.abc")
    native_checkpoint.add_helper(plan, helper, [statement], helper_lines(helper))


def helper_lines(name: str) -> List[str]:
    """The class's source at module level (it needs ``torch`` and ``collections.abc`` imported)."""
    return [
        f"class {name}:",
        '    """Apex amp\'s O2/O3 model casts (amp.initialize with no optimizer) in plain PyTorch: FP16 weights (affine',
        "    batch norms kept FP32 where keep_batchnorm_fp32), floating inputs cast to FP16 and floating outputs to FP32",
        '    by forward hooks, and state_dict() in FP32."""',
        "",
        "    @staticmethod",
        "    def apply(model, keep_batchnorm_fp32):",
        "        for module in model.modules():",
        "            if keep_batchnorm_fp32 and isinstance(module, torch.nn.modules.batchnorm._BatchNorm) \\",
        "                    and module.affine is True:",
        "                continue",
        "            for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):",
        "                if tensor.is_floating_point():",
        "                    tensor.data = tensor.data.to(torch.float16)",
        "            if isinstance(module, torch.nn.RNNBase):",
        "                module.flatten_parameters()",
        f"        model.register_forward_pre_hook({name}.inputs, with_kwargs=True)",
        f"        model.register_forward_hook({name}.outputs)",
        "        for module in model.modules():  # the public hook is torch 2.5's; older torch has the private one",
        '            register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook',
        f"            register({name}.fp32_state)",
        "        return model",
        "",
        "    @staticmethod",
        "    def cast(value, dtype):",
        "        if isinstance(value, torch.Tensor):",
        "            return value.to(dtype) if value.is_floating_point() else value",
        '        if isinstance(value, (str, bytes)) or type(value).__module__ == "numpy":',
        "            return value",
        '        if hasattr(value, "to"):',
        "            return value.to(dtype)",
        "        if isinstance(value, collections.abc.Mapping):",
        f"            return {{{name}.cast(k, dtype): {name}.cast(v, dtype) for k, v in value.items()}}",
        "        if isinstance(value, collections.abc.Iterable):",
        f"            return type(value)({name}.cast(v, dtype) for v in value)",
        "        return value",
        "",
        "    @staticmethod",
        "    def inputs(module, args, kwargs):",
        f"        return {name}.cast(args, torch.float16), {name}.cast(kwargs, torch.float16)",
        "",
        "    @staticmethod",
        "    def outputs(module, args, output):",
        f"        return {name}.cast(output, torch.float32)",
        "",
        "    @staticmethod",
        "    def fp32_state(module, state_dict, prefix, local_metadata):",
        "        for key, value in state_dict.items():",
        "            if isinstance(value, torch.Tensor) and value.dtype == torch.float16:",
        "                state_dict[key] = value.to(torch.float32)",
    ]
