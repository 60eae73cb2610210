"""The table of Apex names: what each does under ampcompat, and its native PyTorch equivalent.

This is the single source for the verdicts ``ampcompat migrate`` reports and for the status tables
in ``migration_guide.md`` (``tests/test_migration_guide.py`` checks the guide against it, and
``markdown_tables()`` renders them).

Three verdicts, from the point of view of code that keeps calling the Apex name through ampcompat:

* runs unchanged -- same behaviour as Apex (a note may still point at something worth knowing);
* runs with a noted difference -- works, but something observable differs from Apex; the note
  says what and why;
* not supported -- ampcompat does not provide it; the note says what to use instead.

Whether a name is supported at all is never taken from this table: :func:`resolve` asks ampcompat
itself (:mod:`provided`: the module imports, the name exists and is not a placeholder, the call's
keyword arguments are in its signature). The table adds what cannot be derived -- the native
equivalent, the note, and which working names differ observably from Apex -- and its ``verdict``
column is a claim that ``tests/test_migrate_catalogue.py`` checks against what running the code does.
To describe a new name, append an :class:`Entry`; to give ``--to-native`` a drop-in native object
for it, add it to :data:`NATIVE_BINDINGS`.
"""
from __future__ import annotations

import ast
import enum
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ampcompat._not_provided import NOT_PROVIDED

from . import provided
from .callargs import NOT_LITERAL, argument, has_starred, literal_value


class Verdict(enum.Enum):
    """How an Apex name fares under ampcompat (ordered from best to worst)."""

    SUPPORTED = "runs unchanged"
    DIFFERENCE = "runs with a noted difference"
    UNSUPPORTED = "not supported"

    @property
    def key(self) -> str:
        """The machine-readable name used in JSON output (``supported``, ...)."""
        return self.name.lower()

    @property
    def rank(self) -> int:
        return list(Verdict).index(self)


@dataclass(frozen=True)
class Entry:
    """One Apex name.

    Attributes:
        name: the dotted name as Apex spelled it (``apex.amp.initialize``; ``amp_C.multi_tensor_scale``;
            ``optimizer._amp_stash`` for attributes amp adds to the user's objects).
        kind: ``module``, ``function``, ``class``, ``object`` or ``attribute``.
        verdict: the verdict claimed for an ordinary use. Only ``DIFFERENCE`` is used as given (for
            a name ampcompat provides); whether a name is supported at all comes from ampcompat
            itself, and the catalogue test fails when this claim disagrees.
        native: the plain-PyTorch equivalent (Markdown; backticks around code).
        note: why the verdict is what it is / what differs / what to do.
    """

    name: str
    kind: str
    verdict: Verdict
    native: str
    note: str = ""


_S, _D, _U = Verdict.SUPPORTED, Verdict.DIFFERENCE, Verdict.UNSUPPORTED

_O1_NOTE = (
    "O1 casts through PyTorch's autocast instead of patching torch functions, with Apex's FP32 list added "
    "where a device's autocast lacks it: einsum, scaled_dot_product_attention and gelu run in FP16 as in "
    "native autocast, `.cpu()` keeps FP16, in-place FP32-list ops on FP16 tensors do not raise, and "
    "binary_cross_entropy on FP16 raises Apex's NotImplementedError (allow_banned=True runs it in FP32); "
    "autocast is per thread (Apex patched the whole process)"
)
_STATIC_SCALE_NOTE = (
    "a static loss_scale above 1 now detects inf/NaN gradients and skips the step "
    "(Apex applied such steps)"
)
_REGISTRY_NOTE = (
    "the wrapped function gets inputs cast as before and its body runs with autocast off "
    "(under Apex, ops inside the body were still cast)"
)
_NO_CUSTOM_FWD = (
    "cast the inputs yourself and run the body under `torch.autocast(device_type, enabled=False)`; "
    "for an `autograd.Function` use `torch.amp.custom_fwd(device_type=..., cast_inputs=...)`"
)
_MASTER_COPY_NATIVE = "FP32 model + `torch.autocast`; or keep FP32 copies by hand (`torch._foreach_copy_`)"

_ENTRIES: Tuple[Entry, ...] = (
    # --- apex / amp -------------------------------------------------------------------------------
    Entry("apex", "module", _S, "—",
          "`import apex` becomes `import ampcompat as apex`; the removed submodules are attributes of ampcompat"),
    Entry("apex.amp", "module", _S, "`torch.amp`",
          "a real module, so `'state_dict' in amp.__dict__` checks (timm) still pass"),
    Entry("apex.amp.initialize", "function", _D,
          "O1: `torch.autocast(device_type, dtype=torch.float16)` around forward and loss, plus "
          "`torch.amp.GradScaler(device_type)`; O0: nothing; O2/O3: no native equivalent (FP16 weights)",
          "O0, O2 and O3 behave as in Apex; O1 casts with Apex's op lists on autocast, on every device, per thread (see "
          "Behaviour that differs); CPU models are accepted; O4/O5 are ROCm Apex's bf16 levels"),
    Entry("apex.amp.scale_loss", "function", _S,
          "`scaler.scale(loss).backward()`, then `scaler.step(optimizer)` and `scaler.update()`",
          "grads are unscaled when the `with` block exits; the scale is updated once per backward pass"),
    Entry("apex.amp.master_params", "function", _S,
          "`scaler.unscale_(optimizer)`, then the tensors in `optimizer.param_groups`"),
    Entry("apex.amp.state_dict", "function", _S,
          "`scaler.state_dict()` (different keys: see Checkpoints)",
          "plain Python numbers in Apex's format; loads with `torch.load(weights_only=True)`"),
    Entry("apex.amp.load_state_dict", "function", _S,
          "`scaler.load_state_dict(...)` after converting Apex's format (see Checkpoints)"),
    Entry("apex.amp.disable_casts", "function", _S, "`torch.autocast(device_type, enabled=False)`"),
    Entry("apex.amp.half_function", "function", _D, _NO_CUSTOM_FWD, _REGISTRY_NOTE),
    Entry("apex.amp.float_function", "function", _D, _NO_CUSTOM_FWD, _REGISTRY_NOTE),
    Entry("apex.amp.promote_function", "function", _D,
          "cast the inputs to their widest floating type, then call the function", _REGISTRY_NOTE),
    Entry("apex.amp.register_half_function", "function", _D, _NO_CUSTOM_FWD,
          _REGISTRY_NOTE + "; still call it before `amp.initialize`"),
    Entry("apex.amp.register_float_function", "function", _D, _NO_CUSTOM_FWD,
          _REGISTRY_NOTE + "; still call it before `amp.initialize`"),
    Entry("apex.amp.register_promote_function", "function", _D,
          "cast the inputs to their widest floating type, then call the function",
          _REGISTRY_NOTE + "; still call it before `amp.initialize`"),
    Entry("apex.amp.init", "function", _D, "as for O1: `torch.autocast` + `torch.amp.GradScaler`",
          "the pre-2019 handle API: the handle is kept, and casting is O1's (Apex's op lists on autocast)"),
    Entry("apex.amp.init().scale_loss", "function", _U, "`amp.scale_loss(loss, optimizer)`",
          "the old handle's scale_loss: Apex itself raised RuntimeError (\"The old Amp API is no longer supported\")"),
    Entry("apex.amp._amp_state", "object", _S,
          "the GradScaler's public API: `scaler.get_scale()`, `scaler.update(new_scale=...)`",
          "private state kept under Apex's names (`loss_scalers[i]._loss_scale`, `opt_properties`, ...)"),
    Entry("apex.amp.scaler", "module", _S, "`torch.amp.grad_scaler`"),
    Entry("apex.amp.amp", "module", _S, "—", "Apex's module of `init` and the registration functions"),
    Entry("apex.amp.frontend", "module", _S, "—", "`initialize`, `state_dict`, `Properties` and the opt-level table"),
    Entry("apex.amp.handle", "module", _S, "—", "`scale_loss`, `disable_casts` and the old handle classes"),
    Entry("apex.amp.opt", "module", _S, "—", "the old API's `OptimWrapper`"),
    Entry("apex.amp._process_optimizer", "module", _S, "—"),
    Entry("apex.amp._initialize", "module", _U, "—",
          "Apex's internal casting helpers; ampcompat implements `initialize` differently and has no such module"),
    Entry("apex.amp.utils", "module", _U, "—", "Apex's internal cast-cache helpers; not part of ampcompat"),
    Entry("apex.amp.wrap", "module", _U, "—", "Apex's function-patching wrappers; O1 uses native autocast instead"),
    Entry("apex.amp.compat", "module", _U, "—", "Apex's PyTorch-version shims; not needed on PyTorch 2"),
    Entry("apex.amp.rnn_compat", "module", _U, "—", "Apex's RNN patching helpers; O1 uses native autocast instead"),
    Entry("apex.amp.lists", "module", _U, "`torch.autocast`'s op lists",
          "Apex's O1 op lists; native autocast has its own (see Behaviour that differs)"),
    Entry("apex.amp.scaler.LossScaler", "class", _S, "`torch.amp.GradScaler`",
          "old pickles naming `apex.amp.scaler.LossScaler` load through the import alias"),
    Entry("optimizer._amp_stash", "attribute", _S, "none (GradScaler keeps no per-optimizer stash)",
          "kept under Apex's name with Apex's fields"),
    Entry("optimizer._lazy_init_maybe_master_weights", "attribute", _S, "none",
          "kept: creates O2's FP32 master weights early"),
    Entry("optimizer._master_params_to_model_params", "attribute", _S, "none", "kept"),
    Entry("optimizer._amp_lazy_init", "attribute", _S, "none", "kept"),
    Entry("optimizer._prepare_amp_backward", "attribute", _S, "none", "kept"),
    Entry("optimizer._post_amp_backward", "attribute", _S, "none", "kept"),
    # --- apex.fp16_utils ------------------------------------------------------------------------
    Entry("apex.fp16_utils", "module", _S, "—"),
    Entry("apex.fp16_utils.FP16_Optimizer", "class", _S,
          "FP32 model + `torch.autocast` + `torch.amp.GradScaler` (torch has no FP16-weights wrapper)",
          "`state_dict()` holds only tensors and numbers, so it loads with `torch.load(weights_only=True)`"),
    Entry("apex.fp16_utils.FP16Model", "class", _S, "`model.half()` with affine BatchNorm kept FP32; or autocast",
          "state_dict keys keep Apex's `network.` prefix"),
    Entry("apex.fp16_utils.network_to_half", "function", _S, "`model.half()` with affine BatchNorm kept FP32",
          "state_dict keys keep Apex's `1.` prefix"),
    Entry("apex.fp16_utils.BN_convert_float", "function", _S, "`m.float()` for every affine `_BatchNorm`"),
    Entry("apex.fp16_utils.convert_module", "function", _S, "`module.to(dtype)`"),
    Entry("apex.fp16_utils.convert_network", "function", _S, "`module.to(dtype)` (affine BatchNorm skipped)"),
    Entry("apex.fp16_utils.prep_param_lists", "function", _S, _MASTER_COPY_NATIVE),
    Entry("apex.fp16_utils.model_grads_to_master_grads", "function", _S, _MASTER_COPY_NATIVE),
    Entry("apex.fp16_utils.master_params_to_model_params", "function", _S, _MASTER_COPY_NATIVE),
    Entry("apex.fp16_utils.to_python_float", "function", _S, "`t.item()`"),
    Entry("apex.fp16_utils.tofp16", "class", _S, "`x.half()`"),
    Entry("apex.fp16_utils.clip_grad_norm", "function", _S, "`torch.nn.utils.clip_grad_norm_`"),
    Entry("apex.fp16_utils.LossScaler", "class", _S, "`torch.amp.GradScaler`",
          "the legacy static scaler: `loss_scale` is a property here, a method on `apex.amp.scaler.LossScaler`"),
    Entry("apex.fp16_utils.DynamicLossScaler", "class", _S,
          "`torch.amp.GradScaler(init_scale=2**32, growth_interval=1000)`"),
    Entry("apex.fp16_utils.fp16_optimizer", "module", _S, "—"),
    Entry("apex.fp16_utils.fp16util", "module", _S, "—"),
    Entry("apex.fp16_utils.loss_scaler", "module", _S, "—"),
    # --- apex.parallel --------------------------------------------------------------------------
    Entry("apex.parallel", "module", _S, "`torch.nn.parallel`, `torch.distributed`"),
    Entry("apex.parallel.DistributedDataParallel", "class", _D,
          "`torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)`",
          "built on torch's DDP: buffers are not broadcast (as in Apex), `message_size` sets the bucket size, "
          "`delay_allreduce`, `gradient_predivide_factor` and `allreduce_always_fp32` go through comm hooks; "
          "the object is a torch DDP, so `isinstance` checks against torch's class now pass"),
    Entry("apex.parallel.Reducer", "class", _S,
          "`torch.distributed.all_reduce` over the grads, divided by the world size"),
    Entry("apex.parallel.SyncBatchNorm", "class", _S, "`torch.nn.SyncBatchNorm`"),
    Entry("apex.parallel.convert_syncbn_model", "function", _S,
          "`torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`"),
    Entry("apex.parallel.create_syncbn_process_group", "function", _S, "`torch.distributed.new_subgroups(group_size)`"),
    Entry("apex.parallel.ReduceOp", "class", _S, "`torch.distributed.ReduceOp`"),
    Entry("apex.parallel.LARC", "module", _S, "—"),
    Entry("apex.parallel.LARC.LARC", "class", _S, "none in torch (ampcompat keeps the wrapper)"),
    Entry("apex.parallel.distributed", "module", _S, "—"),
    Entry("apex.parallel.distributed.flat_dist_call", "function", _S,
          "`torch.distributed.all_reduce` on `torch._utils._flatten_dense_tensors(tensors)`"),
    Entry("apex.parallel.sync_batchnorm", "module", _S, "—"),
    Entry("apex.parallel.optimized_sync_batchnorm", "module", _S, "`torch.nn.SyncBatchNorm`"),
    Entry("apex.parallel.sync_batchnorm_kernel", "module", _U, "`torch.nn.SyncBatchNorm`",
          "Apex's autograd function behind the Python SyncBatchNorm; use the module instead"),
    Entry("apex.parallel.optimized_sync_batchnorm_kernel", "module", _U, "`torch.nn.SyncBatchNorm`",
          "Apex's CUDA-kernel autograd function; use the module instead"),
    Entry("apex.parallel.multiproc", "module", _S, "`torchrun --nproc_per_node=N script.py`",
          "Apex's one-process-per-GPU launcher, run as `python -m ampcompat.parallel.multiproc`"),
    # --- apex.optimizers ------------------------------------------------------------------------
    Entry("apex.optimizers", "module", _S, "`torch.optim`"),
    Entry("apex.optimizers.FusedAdam", "class", _S,
          "`torch.optim.AdamW(params, weight_decay=0.0, fused=True)` (`adam_w_mode=False`: `torch.optim.Adam`); "
          "pass `weight_decay` explicitly: AdamW's default is 0.01, FusedAdam's 0.0",
          "runs torch's fused Adam/AdamW kernels; `optimizer.state_dict()` has torch's layout (a `step` per "
          "parameter) and Apex-era checkpoints are converted when loaded"),
    Entry("apex.optimizers.FusedLAMB", "class", _S, "none in torch"),
    Entry("apex.optimizers.FusedSGD", "class", _S, "`torch.optim.SGD(params, lr, fused=True)`",
          "runs torch's fused SGD kernel; momentum buffers are created on the first step and only when momentum != 0"),
    Entry("apex.optimizers.FusedNovoGrad", "class", _S, "none in torch"),
    Entry("apex.optimizers.FusedAdagrad", "class", _S, "`torch.optim.Adagrad`"),
    Entry("apex.optimizers.FusedMixedPrecisionLamb", "class", _S, "none in torch",
          "FP32 masters (kept in `optimizer.state_dict()` as `master_param`) and FP32 moments for "
          "`reduced_precision_dtype` parameters; `GradScaler.step(optimizer)` unscales inside and skips inf/NaN "
          "steps; one host read per step decides the skip (Apex decided on the device)"),
    Entry("apex.optimizers.FP16_Optimizer", "class", _S,
          "FP32 model + `torch.autocast` + `torch.amp.GradScaler` (or `amp.initialize(opt_level='O2')`)",
          "the wrapper Apex had until September 2019: flat FP32 master per param group, its own loss scaler"),
    Entry("apex.optimizers.fused_adam", "module", _S, "—"),
    Entry("apex.optimizers.fused_lamb", "module", _S, "—"),
    Entry("apex.optimizers.fused_sgd", "module", _S, "—"),
    Entry("apex.optimizers.fused_novograd", "module", _S, "—"),
    Entry("apex.optimizers.fused_adagrad", "module", _S, "—"),
    Entry("apex.optimizers.fused_mixed_precision_lamb", "module", _S, "—"),
    # --- apex.normalization ---------------------------------------------------------------------
    Entry("apex.normalization", "module", _S, "`torch.nn`"),
    Entry("apex.normalization.fused_layer_norm", "module", _S, "`torch.nn` / `torch.nn.functional`",
          "where 2019-era BERT code imported `FusedLayerNorm` from; also the functional forms"),
    Entry("apex.normalization.FusedLayerNorm", "class", _S,
          "`torch.nn.LayerNorm` (same parameters and state_dict; under autocast its output is FP32, "
          "not the autocast dtype)",
          "as in Apex, under autocast the output has the autocast dtype"),
    Entry("apex.normalization.FusedRMSNorm", "class", _S, "`torch.nn.RMSNorm(shape, eps=1e-5)`",
          "pass `eps=1e-5` explicitly when moving to torch: `torch.nn.RMSNorm`'s default eps is the dtype's epsilon"),
    Entry("apex.normalization.MixedFusedLayerNorm", "class", _S,
          "`torch.nn.LayerNorm`, output cast to the parameter dtype"),
    Entry("apex.normalization.MixedFusedRMSNorm", "class", _S,
          "`torch.nn.RMSNorm`, output cast to the parameter dtype"),
    # --- apex.multi_tensor_apply / amp_C ---------------------------------------------------------
    Entry("apex.multi_tensor_apply", "module", _S, "`torch._foreach_*`"),
    Entry("apex.multi_tensor_apply.multi_tensor_apply", "module", _S, "`torch._foreach_*`",
          "the submodule Apex defined `MultiTensorApply` in"),
    Entry("apex.multi_tensor_apply.multi_tensor_applier", "object", _S, "call the `torch._foreach_*` op directly",
          "always available: every op runs on `torch._foreach_*` kernels on any device"),
    Entry("apex.multi_tensor_apply.MultiTensorApply", "class", _S, "call the `torch._foreach_*` op directly"),
    Entry("amp_C", "module", _S, "`torch._foreach_*` and the fused AMP kernels",
          "a Python module of the same name: `import amp_C` becomes `import ampcompat.amp_C as amp_C`"),
    Entry("amp_C.multi_tensor_scale", "function", _S,
          "`torch._foreach_mul(src, scale)` + copy; inf/NaN check: `torch._amp_foreach_non_finite_check_and_unscale_`"),
    Entry("amp_C.multi_tensor_axpby", "function", _S, "`torch._foreach_add(torch._foreach_mul(x, a), y, alpha=b)`"),
    Entry("amp_C.multi_tensor_l2norm", "function", _S,
          "`torch._foreach_norm(tensors)` (+ `torch.linalg.vector_norm` of those)"),
    Entry("amp_C.multi_tensor_unscale_l2norm", "function", _S,
          "`torch._foreach_norm(torch._foreach_mul(tensors, inv_scale))`"),
    Entry("amp_C.multi_tensor_l2norm_mp", "function", _S, "`torch._foreach_norm` on FP32 copies"),
    Entry("amp_C.multi_tensor_l2norm_scale", "function", _S,
          "`torch._foreach_norm(src)` + `torch._foreach_mul(src, scale)`", "the norms are of the sources, before scaling"),
    Entry("amp_C.update_scale_hysteresis", "function", _S, "`torch._amp_update_scale_` (no hysteresis)"),
    Entry("amp_C.multi_tensor_adam", "function", _S, "`torch.optim.Adam(W)(fused=True)`"),
    Entry("amp_C.multi_tensor_sgd", "function", _S, "`torch.optim.SGD(fused=True)`"),
    Entry("amp_C.multi_tensor_adagrad", "function", _S, "`torch.optim.Adagrad`"),
    Entry("amp_C.multi_tensor_lamb", "function", _S, "none in torch (`ampcompat.optimizers.FusedLAMB`)"),
    Entry("amp_C.multi_tensor_lamb_mp", "function", _S,
          "none in torch (`ampcompat.optimizers.FusedMixedPrecisionLamb`)",
          "`FusedMixedPrecisionLamb`'s kernel: tensor `lr`/`step`/`max_grad_norm`, `inv_scale`, an optional fifth "
          "list of model params fed from FP32 masters"),
    Entry("amp_C.multi_tensor_lamb_stage1_cuda", "function", _S, "none in torch (`ampcompat.optimizers.FusedLAMB`)",
          "the 2019 two-kernel LAMB (NVIDIA's BERT `optimization.py`): moments and update with per-tensor decay; "
          "math in FP32 for FP16 lists (Apex: in the parameters' dtype)"),
    Entry("amp_C.multi_tensor_lamb_stage2_cuda", "function", _S, "none in torch (`ampcompat.optimizers.FusedLAMB`)",
          "the 2019 two-kernel LAMB: `p -= lr * ratio * u`, the trust ratio from the given per-tensor norms"),
    Entry("amp_C.multi_tensor_novograd", "function", _S, "none in torch (`ampcompat.optimizers.FusedNovoGrad`)"),
    Entry("amp_C.multi_tensor_adam_capturable", "function", _U, "`torch.optim.Adam(capturable=True)`",
          "not provided (raises NotImplementedError): Apex's `FusedAdam(capturable=True)` was its only caller in "
          "NVIDIA's recipes; use `FusedAdam(capturable=True)`"),
    Entry("amp_C.multi_tensor_adam_capturable_master", "function", _U, "`torch.optim.Adam(capturable=True)`",
          "not provided (raises NotImplementedError): Apex's `FusedAdam(capturable=True, master_weights=True)` was "
          "its only caller in NVIDIA's recipes; use that"),
    Entry("amp_C.multi_tensor_lars", "function", _U, "`torch.optim.SGD` with a LARS trust ratio",
          "not provided (raises NotImplementedError): gone from Apex's extension and called by no NVIDIA recipe "
          "surveyed; use SGD inside `apex.parallel.LARC.LARC`"),
    # --- apex_C, apex.mlp, apex.fused_dense -------------------------------------------------------
    Entry("apex_C", "module", _S, "`torch._utils._flatten_dense_tensors` / `_unflatten_dense_tensors`",
          "a Python module of the same name: `import apex_C` becomes `import ampcompat.apex_C as apex_C`"),
    Entry("apex_C.flatten", "function", _S, "`torch._utils._flatten_dense_tensors(tensors)`",
          "an empty list or mixed dtypes/devices raise a clear error"),
    Entry("apex_C.unflatten", "function", _S, "`torch._utils._unflatten_dense_tensors(flat, tensors)`"),
    Entry("apex.mlp", "module", _S, "a stack of `torch.nn.Linear` + activation"),
    Entry("apex.mlp.MLP", "class", _S, "`torch.nn.Sequential(Linear, ReLU, ...)`",
          "parameters `weight_i`/`bias_i` as in Apex; the activation follows every layer, the last too"),
    Entry("apex.fused_dense", "module", _S, "`torch.nn.Linear`"),
    Entry("apex.fused_dense.FusedDense", "class", _S, "`torch.nn.Linear`", "parameters uninitialised, as in Apex"),
    Entry("apex.fused_dense.FusedDenseGeluDense", "class", _S,
          "`Linear` -> `F.gelu(approximate='tanh')` -> `Linear`", "parameters uninitialised, as in Apex"),
    Entry("apex.reparameterization", "module", _S,
          "`torch.nn.utils.parametrizations.weight_norm` (its state_dict keys are "
          "`parametrizations.<name>.original0/1`, not `<name>_g/_v`)",
          "Apex's weight normalization: `<name>_g`/`<name>_v` parameters and a forward pre-hook"),
    Entry("apex.reparameterization.apply_weight_norm", "function", _S,
          "`torch.nn.utils.parametrizations.weight_norm(module, name, dim)` for each weight",
          "`name=''`: every parameter of 2+ dimensions outside embeddings; `hook_child=False` computes the "
          "subtree's weights in one hook on `module`, once per call; a submodule's name applies to its "
          "parameters (sentiment-discovery's `apply_weight_norm(model, 'rnn')`; Apex raised)"),
    Entry("apex.reparameterization.remove_weight_norm", "function", _S,
          "`torch.nn.utils.parametrize.remove_parametrizations(module, name)`",
          "a plain `Parameter` holding the current weight replaces `<name>_g`/`<name>_v`"),
    Entry("apex.reparameterization.apply_reparameterization", "function", _S,
          "`torch.nn.utils.parametrize.register_parametrization`"),
    Entry("apex.reparameterization.remove_reparameterization", "function", _S,
          "`torch.nn.utils.parametrize.remove_parametrizations`"),
    Entry("apex.reparameterization.WeightNorm", "class", _S, "`torch.nn.utils.parametrizations.weight_norm`",
          "the hook object in `module._forward_pre_hooks`; a computed weight is reused while its `g`/`v` are "
          "unchanged and until a backward pass consumed it (Apex: until the next backward)"),
    Entry("apex.reparameterization.Reparameterization", "class", _S,
          "`torch.nn.utils.parametrize.register_parametrization`",
          "base class: subclasses define `reparameterize` and `compute_weight`, as in Apex"),
    # --- apex.contrib -----------------------------------------------------------------------------
    Entry("apex.contrib", "module", _D, "—",
          "ampcompat provides the contrib modules real code uses (rows below); the rest raise "
          "ModuleNotFoundError at import, naming their native replacement"),
    Entry("apex.contrib.xentropy", "module", _S, "`torch.nn.functional.cross_entropy`"),
    Entry("apex.contrib.xentropy.SoftmaxCrossEntropyLoss", "class", _S,
          "`F.cross_entropy(logits.float(), labels, reduction='none', label_smoothing=s, ignore_index=padding_idx)`",
          "`SoftmaxCrossEntropyLoss.apply(logits, labels, smoothing, padding_idx, half_to_float)`: FP32 losses, "
          "0 on padding rows, the logits' gradient in their dtype"),
    Entry("apex.contrib.optimizers", "module", _S, "`torch.optim`"),
    Entry("apex.contrib.optimizers.FP16_Optimizer", "class", _S,
          "FP32 model + `torch.autocast` + `torch.amp.GradScaler`",
          "FP32 master per parameter and its own loss scaler (2**16, x2 every 1000 clean iterations); "
          "drives contrib FusedAdam/FusedSGD through `step(grads, output_params, scale, grad_norms)`"),
    Entry("apex.contrib.optimizers.FusedAdam", "class", _D, "`torch.optim.Adam` (+ `clip_grad_norm_`)",
          "the 2019 FusedAdam: `eps` not bias-corrected, decay added to the update and scaled by the step size, "
          "`max_grad_norm` clipping per param group; `use_mt`/`amp_scale_adjustment` have no effect"),
    Entry("apex.contrib.optimizers.FusedSGD", "class", _S, "`torch.optim.SGD`",
          "also steps without FP16_Optimizer (Apex raised)"),
    Entry("apex.contrib.optimizers.FusedLAMB", "class", _S, "none in torch (`ampcompat.optimizers.FusedLAMB`)",
          "does not write the update into `.grad` as Apex's kernel did"),
    Entry("apex.contrib.clip_grad.clip_grad_norm_", "function", _S, "`torch.nn.utils.clip_grad_norm_`"),
    Entry("apex.contrib.group_norm.GroupNorm", "class", _S, "`torch.nn.GroupNorm` (+ `F.silu` for `act='silu'`)",
          "FP32 math, output in the input's dtype, any layout and group count; an unknown `act` raises"),
    Entry("apex.contrib.layer_norm.FastLayerNorm", "class", _S,
          "`torch.nn.LayerNorm(hidden_size)`, output cast to the weight's dtype"),
    Entry("apex.contrib.focal_loss", "module", _S, "`torchvision.ops.sigmoid_focal_loss`",
          "`focal_loss.focal_loss(...)` / `focal_loss.FocalLoss.apply(...)`; labels -2 ignored, -1 background"),
    # --- the Apex modules ampcompat refuses at import: its error's own text (what it was, the replacement)
    *(Entry(name, "module", _U, instead, what) for name, (what, instead) in NOT_PROVIDED.items()),
)

ENTRIES: Dict[str, Entry] = {entry.name: entry for entry in _ENTRIES}
"""Every catalogued name, keyed by its dotted Apex name."""

NATIVE_BINDINGS: Dict[str, str] = {
    "apex.normalization.FusedLayerNorm": "torch.nn.LayerNorm",
    "apex.parallel.SyncBatchNorm": "torch.nn.SyncBatchNorm",
    "apex.parallel.convert_syncbn_model": "torch.nn.SyncBatchNorm.convert_sync_batchnorm",
    "apex.parallel.ReduceOp": "torch.distributed.ReduceOp",
    "apex.fp16_utils.clip_grad_norm": "torch.nn.utils.clip_grad_norm_",
    "apex.contrib.clip_grad.clip_grad_norm_": "torch.nn.utils.clip_grad_norm_",
    "apex_C.flatten": "torch._utils._flatten_dense_tensors",
    "apex_C.unflatten": "torch._utils._unflatten_dense_tensors",
}
"""Torch objects that can stand in for an Apex name wherever the name is used (same call signature for
the arguments Apex code passes, same results): ``--to-native`` binds a name it must keep to these.
Names without a faithful stand-in (``FusedAdam``: AdamW's weight_decay default differs) stay on ampcompat."""

NATIVE_PARTIALS: Dict[str, Tuple[str, Tuple[Tuple[str, str], ...], int]] = {
    "apex.parallel.DistributedDataParallel": ("torch.nn.parallel.DistributedDataParallel",
                                              (("broadcast_buffers", "False"),), 1),
    "apex.normalization.FusedRMSNorm": ("torch.nn.RMSNorm", (("eps", "1e-5"),), 1),
}
"""Apex names a torch callable stands in for once Apex's defaults are fixed where torch's differ:
name -> (torch callable, (keyword, Apex's default) pairs, how many leading positional arguments mean
the same to both). ``--to-native`` binds a name used as a value to ``functools.partial(callable, **defaults)``
when every call it reaches passes no more positional arguments than that."""

EXTENSION_MODULES: Dict[str, str] = {
    "fused_layer_norm_cuda": "apex.normalization.FusedLayerNorm",
    "fused_adam_cuda": "apex.optimizers.FusedAdam",
    "fused_lamb_cuda": "apex.optimizers.FusedLAMB",
    "syncbn": "apex.parallel.SyncBatchNorm",
    "mlp_cuda": "apex.mlp.MLP",
    "fused_dense_cuda": "apex.fused_dense.FusedDense",
    "xentropy_cuda": "apex.contrib.xentropy.SoftmaxCrossEntropyLoss",
    "fast_layer_norm": "apex.contrib.layer_norm.FastLayerNorm",
    "group_norm_cuda": "apex.contrib.group_norm.GroupNorm",
    "group_norm_v2_cuda": "apex.contrib.group_norm.GroupNorm",
    "focal_loss_cuda": "apex.contrib.focal_loss",
    "distributed_adam_cuda": "apex.contrib.optimizers.distributed_fused_adam",
    "distributed_lamb_cuda": "apex.contrib.optimizers.distributed_fused_lamb",
    "fmhalib": "apex.contrib.fmha",
    "fast_multihead_attn": "apex.contrib.multihead_attn",
    "bnp": "apex.contrib.groupbn",
    "cudnn_gbn_lib": "apex.contrib.cudnn_gbn",
    "fast_bottleneck": "apex.contrib.bottleneck",
    "nccl_p2p_cuda": "apex.contrib.bottleneck",
    "peer_memory_cuda": "apex.contrib.peer_memory",
    "fused_conv_bias_relu": "apex.contrib.conv_bias_relu",
    "transducer_joint_cuda": "apex.contrib.transducer",
    "transducer_loss_cuda": "apex.contrib.transducer",
    "fused_weight_gradient_mlp_cuda": "apex.transformer",
}
"""Apex's compiled CUDA extensions that code imports directly (``import fused_layer_norm_cuda``), each with
the Apex Python name built on it. ampcompat has no compiled extensions; what to use instead is derived
from what ampcompat provides for that Python name (:func:`extension_advice`). ``amp_C`` and ``apex_C``
are provided (as Python modules) and are not listed. Kernels that other projects also build under the
same names (Megatron's ``scaled_masked_softmax_cuda``) are left out."""


def extension_advice(module: str) -> Tuple[str, str]:
    """What to tell a user who imports Apex's compiled extension ``module``: (reason, native equivalent)."""
    wrapper = EXTENSION_MODULES[module]
    found = provided.lookup(wrapper)
    entry = ENTRIES.get(wrapper)
    native = entry.native if entry is not None else "—"
    what = f"`{module}` is Apex's compiled CUDA extension behind `{wrapper}`; ampcompat builds no extensions"
    if found.usable:
        return f"{what}: use `{wrapper}`, which ampcompat provides (native: {native})", native
    return f"{what}, and does not provide `{wrapper}` either: {found.problem}", native


def star_exports(module: str) -> Optional[List[str]]:
    """The names ``from MODULE import *`` binds in Apex, for an Apex module path or its ampcompat stand-in;
    ``None`` for a module that is neither."""
    mapped = apex_module(module)
    if mapped is None:
        return None
    apex_path, via = mapped
    if apex_path == "apex":
        return ["amp"] if via == "ampcompat" else list(provided.APEX_STAR_EXPORTS)
    prefix = apex_path + "."
    return sorted({name[len(prefix):] for name in ENTRIES
                   if name.startswith(prefix) and "." not in name[len(prefix):] and not name[len(prefix):].startswith("_")})


MAPPED_PACKAGES = provided.mapped_subpackages()
"""``apex.<name>`` subpackages that ampcompat provides as ``ampcompat.<name>`` (those the import alias maps)."""

PRIVATE_ATTRIBUTES = tuple(name.split(".", 1)[1] for name in ENTRIES if name.startswith("optimizer."))
"""Attribute names amp adds to the user's optimizers; distinctive enough to find by name alone."""

_TOP_LEVEL_MODULES = ("amp_C", "apex_C")
"""Apex's top-level extension modules."""

GROUPS: Tuple[Tuple[str, str], ...] = (
    ("apex.amp", "`apex.amp`"),
    ("apex.fp16_utils", "`apex.fp16_utils`"),
    ("apex.parallel", "`apex.parallel`"),
    ("apex.optimizers", "`apex.optimizers`"),
    ("apex.normalization", "`apex.normalization`"),
    ("apex.multi_tensor_apply", "`apex.multi_tensor_apply` and `amp_C`"),
    ("apex.contrib", "`apex.contrib`"),
    ("other", "Other Apex modules"),
)
"""Sections of the guide's status tables: (group key, heading)."""


def group_of(name: str) -> str:
    """The :data:`GROUPS` key a catalogued name is listed under."""
    if name.startswith("optimizer.") or name == "apex.amp" or name.startswith("apex.amp."):
        return "apex.amp"
    if name == "amp_C" or name.startswith("amp_C."):
        return "apex.multi_tensor_apply"
    for key, _ in GROUPS:
        if name == key or name.startswith(key + "."):
            return key
    return "other"


def ampcompat_module(apex_module: str) -> Optional[str]:
    """The ampcompat module that stands in for an Apex module path, or ``None`` if there is none.

    ``apex`` -> ``ampcompat``; ``apex.parallel.LARC`` -> ``ampcompat.parallel.LARC``;
    ``amp_C`` -> ``ampcompat.amp_C``; ``apex.foo`` -> ``None`` (the import alias maps no ``foo``).
    The module may still be one that refuses to import (see :func:`provided.lookup`).
    """
    return provided.ampcompat_module_name(apex_module)


def apex_module(module: str) -> Optional[Tuple[str, str]]:
    """Inverse of :func:`ampcompat_module` that also accepts Apex's own paths.

    Returns:
        ``(apex_path, via)`` where ``via`` is ``"apex"`` or ``"ampcompat"``, or ``None`` for a module
        that is neither Apex nor an ampcompat stand-in for it.
    """
    parts = module.split(".")
    if parts[0] == "apex" or parts[0] in _TOP_LEVEL_MODULES:
        return module, "apex"
    if parts[0] != "ampcompat":
        return None
    if len(parts) == 1:
        return "apex", "ampcompat"
    if parts[1] in MAPPED_PACKAGES:
        return "apex." + ".".join(parts[1:]), "ampcompat"
    if parts[1] in _TOP_LEVEL_MODULES:
        return ".".join(parts[1:]), "ampcompat"
    return None


def provided_module(apex_path: str) -> Tuple[Optional[str], str]:
    """The ampcompat module an import of ``apex_path`` can be pointed at, or ``None`` and why not.

    ``None`` when the alias maps no ampcompat module there, or the module is missing or refuses to
    import (how ampcompat marks the Apex modules it does not provide).
    """
    target = ampcompat_module(apex_path)
    found = provided.lookup(apex_path, apex_path)
    if target is None or not found.found:
        return None, found.problem or f"ampcompat does not provide `{apex_path}`"
    return target, ""


def refused_import(module: str, name: Optional[str] = None) -> str:
    """The error ampcompat raises for ``import module`` (or ``from module import name``) when that
    imports an Apex module ampcompat refuses (``apex.transformer``, ``apex.contrib.sparsity``), else ``""``.

    The rewrites leave such imports as they were: pointed at ampcompat they would fail the same way.
    """
    if name is None or name == "*":
        found = provided.lookup(module, module)
    else:
        found = provided.lookup(f"{module}.{name}", module)
    return found.problem if found.refused else ""


@dataclass(frozen=True)
class Resolution:
    """What a dotted Apex name resolves to: the catalogued ``api`` and the verdict for this use."""

    api: str
    entry: Optional[Entry]
    verdict: Verdict
    note: str
    native: str


def _is_derivable(name: str) -> bool:
    """Whether ampcompat can be asked about ``name`` (not an attribute amp adds at run time)."""
    return not name.startswith("optimizer.") and "()" not in name


def _canonical_name(qualname: str, lookup: provided.Lookup) -> str:
    """The catalogued name of the same object (``apex.normalization.fused_layer_norm.FusedLayerNorm`` ->
    ``apex.normalization.FusedLayerNorm``), else the resolved part of ``qualname``."""
    if lookup.name in ENTRIES:
        return lookup.name
    if lookup.found:
        same = _objects_by_id().get(id(lookup.value))
        if same is not None:
            return same
    return lookup.name


def _objects_by_id() -> Dict[int, str]:
    global _OBJECT_NAMES
    if _OBJECT_NAMES is None:
        _OBJECT_NAMES = provided.same_object_names([name for name in ENTRIES if _is_derivable(name)])
    return _OBJECT_NAMES


_OBJECT_NAMES: Optional[Dict[int, str]] = None


def _catalogued_prefix(qualname: str) -> Optional[Entry]:
    parts = qualname.split(".")
    for length in range(len(parts), 0, -1):
        entry = ENTRIES.get(".".join(parts[:length]))
        if entry is not None:
            return entry
    return None


def resolve(qualname: str, call: Optional[ast.Call] = None, module: Optional[str] = None) -> Resolution:
    """The verdict for one use of a dotted Apex name, as ampcompat stands.

    The name is looked up in ampcompat (:func:`provided.lookup`) as deep as modules go; attributes of
    a class or object (``apex.amp._amp_state.loss_scalers``) belong to it. Not provided, or a
    placeholder that only raises: not supported, with the reason. A call whose arguments ampcompat's
    signature rejects (``FusedAdam(..., max_grad_norm=1.0)`` where it has no such parameter): not
    supported. Otherwise the catalogue's note applies, and its ``DIFFERENCE`` claim if it makes one.

    Args:
        qualname: e.g. ``apex.amp.initialize``.
        call: the call made with exactly this name, if any (``amp.initialize(...)``).
        module: the prefix of ``qualname`` an import statement imports as a module path, if any (see
            :func:`provided.lookup`).
    """
    if not _is_derivable(qualname):
        entry = _catalogued_prefix(qualname)
        if entry is None:
            return Resolution(qualname, None, _U, "not an Apex name ampcompat knows", "—")
        return Resolution(entry.name, entry, entry.verdict, entry.note, entry.native)
    found = provided.lookup(qualname, module)
    if not found.found:
        entry = _catalogued_prefix(qualname)
        advice = ""
        if entry is not None and entry.note and entry.verdict is _U and entry.note not in found.problem:
            advice = f"; {entry.note}"
        return Resolution(qualname, entry, _U, found.problem + advice, entry.native if entry else "—")
    api = _canonical_name(qualname, found)
    entry = ENTRIES.get(api)
    native = entry.native if entry is not None else "—"
    if not found.usable:
        return Resolution(api, entry, _U, found.problem, native)
    verdict = _D if entry is not None and entry.verdict is _D else _S
    note = entry.note if entry is not None else ""
    if call is not None and found.name == qualname:
        problem = provided.call_problem(found.value, sum(not isinstance(a, ast.Starred) for a in call.args),
                                        [k.arg for k in call.keywords if k.arg is not None], has_starred(call))
        if problem is not None:
            return Resolution(api, entry, _U, problem, native)
        refine = _REFINERS.get(api)
        if refine is not None:
            verdict, note = refine(call)
    return Resolution(api, entry, verdict, note, native)


def verdict_of(entry: Entry) -> Verdict:
    """The verdict of an ordinary use of a catalogued name, as ampcompat stands (the guide's status column)."""
    return resolve(entry.name, module=entry.name if entry.kind == "module" else None).verdict


# --- verdicts that depend on the arguments -----------------------------------------------------------
def _refine_initialize(call: ast.Call) -> Tuple[Verdict, str]:
    if literal_value(argument(call, "enabled", 2)) is False:
        return _S, "enabled=False: the arguments are returned untouched, as in Apex"
    level_node = argument(call, "opt_level", 3)
    level = "O1" if level_node is None else literal_value(level_node)
    if level == "O1":
        verdict, notes = _D, [_O1_NOTE]
    elif level in ("O0", "O2", "O3"):
        verdict, notes = _S, []
    elif level in ("O4", "O5"):
        verdict, notes = _D, [f"{level} is ROCm Apex's bf16 level; NVIDIA Apex raised RuntimeError for it"]
    elif level is NOT_LITERAL:
        verdict, notes = _D, ["opt_level is chosen at run time; if it is O1: " + _O1_NOTE]
    else:
        return _U, f"opt_level {level!r} is not an optimization level: Apex and ampcompat raise RuntimeError"
    scale = literal_value(argument(call, "loss_scale", 8))
    if _is_static_scale_above_one(scale):
        verdict, notes = _D, notes + [_STATIC_SCALE_NOTE]
    return verdict, "; ".join(notes)


def _is_static_scale_above_one(value: object) -> bool:
    if value is None or value is NOT_LITERAL or value == "dynamic" or isinstance(value, bool):
        return False
    try:
        return float(value) > 1.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


_FUSED_ADAM_2019_NOTE = (
    "the 2019 keywords (`eps_inside_sqrt`, `max_grad_norm`) select that era's arithmetic, as Apex had it until "
    "September 2019: `eps` added to the un-bias-corrected `sqrt(v)`, weight decay scaled by the step size, "
    "`max_grad_norm` clipping per param group (native: `torch.optim.Adam` + `clip_grad_norm_` per group)"
)


def _refine_fused_adam(call: ast.Call) -> Tuple[Verdict, str]:
    # Keywords only: the 2019 positional order (eps_inside_sqrt 6th) is not today's.
    legacy = [literal_value(argument(call, name)) for name in ("eps_inside_sqrt", "max_grad_norm")]
    if not any(value is NOT_LITERAL or (value is not None and value) for value in legacy):
        return _S, ENTRIES["apex.optimizers.FusedAdam"].note
    todays = {"adam_w_mode": False, "capturable": True, "master_weights": True}
    clashing = [name for name, value in todays.items() if literal_value(argument(call, name)) is value]
    if clashing:
        return _U, (f"`eps_inside_sqrt`/`max_grad_norm` (the 2019 API) with `{clashing[0]}={todays[clashing[0]]}` "
                    "(today's API): ampcompat raises ValueError; drop one of them")
    return _S, _FUSED_ADAM_2019_NOTE


_REFINERS: Dict[str, Callable[[ast.Call], Tuple[Verdict, str]]] = {
    "apex.amp.initialize": _refine_initialize,
    "apex.optimizers.FusedAdam": _refine_fused_adam,
}


# --- the guide's tables ------------------------------------------------------------------------------
def entries_in(group: str) -> List[Entry]:
    """The catalogued names of one :data:`GROUPS` section, in catalogue order."""
    return [entry for entry in _ENTRIES if group_of(entry.name) == group]


def markdown_row(entry: Entry) -> str:
    """The guide's table row for ``entry``: name | status | native equivalent | notes."""
    suffix = " (attribute amp adds)" if entry.name.startswith("optimizer.") else ""
    cells = [f"`{entry.name}`{suffix}", verdict_of(entry).value, entry.native, entry.note]
    return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"


def markdown_tables() -> str:
    """All status tables, one per :data:`GROUPS` section, as they appear in ``migration_guide.md``."""
    blocks = []
    for group, heading in GROUPS:
        rows = [markdown_row(entry) for entry in entries_in(group)]
        blocks.append(
            "\n".join([f"### {heading}", "", "| Apex name | ampcompat | native PyTorch | notes |",
                       "| --- | --- | --- | --- |"] + rows)
        )
    return "\n\n".join(blocks) + "\n"


_TABLES_START = "<!-- status tables: generated from ampcompat/tools/migrate/catalogue.py"
_TABLES_END = "<!-- end of status tables -->"


def with_current_tables(guide: str) -> str:
    """``guide`` (the text of ``migration_guide.md``) with its status tables regenerated from ampcompat.

    Run ``python -m ampcompat.tools.migrate.catalogue migration_guide.md`` after ampcompat gains or loses a
    name, or after editing the table above; ``tests/test_migration_guide.py`` fails until then.

    Raises:
        ValueError: the guide lacks the markers around the tables.
    """
    try:
        start = guide.index("\n\n", guide.index(_TABLES_START)) + 2
        end = guide.index(_TABLES_END, start)
    except ValueError:
        raise ValueError(f"the guide has no `{_TABLES_START}` ... `{_TABLES_END}` block to regenerate") from None
    return guide[:start] + markdown_tables() + "\n" + guide[end:]


if __name__ == "__main__":
    import sys

    for _path in sys.argv[1:]:
        with open(_path, encoding="utf-8") as _handle:
            _text = _handle.read()
        with open(_path, "w", encoding="utf-8") as _handle:
            _handle.write(with_current_tables(_text))
