"""Apex's import paths, written out as data for the tests that check ampcompat against them.

These are the names NVIDIA Apex (tag 25.04, the last with ``apex.amp``) made public, plus the private
or deep paths legacy scripts and libraries are known to import. They are kept here, in the repository,
so the tests check ampcompat against Apex's names rather than against ampcompat's own catalogue.
"""
from typing import List, Tuple


def _under(prefix: str, names: Tuple[str, ...]) -> List[str]:
    return [prefix] + [f"{prefix}.{name}" for name in names]


# Every public name of apex.amp and of the legacy surfaces next to it: each must have a row in
# migration_guide.md's status tables (tests/test_migration_guide.py).
APEX_PUBLIC_NAMES: Tuple[str, ...] = tuple(
    _under("apex.amp", (
        "init", "half_function", "float_function", "promote_function", "register_half_function",
        "register_float_function", "register_promote_function", "scale_loss", "disable_casts", "initialize",
        "state_dict", "load_state_dict", "master_params", "_amp_state", "scaler", "scaler.LossScaler"))
    + _under("apex.fp16_utils", (
        "BN_convert_float", "DynamicLossScaler", "FP16Model", "FP16_Optimizer", "LossScaler", "clip_grad_norm",
        "convert_module", "convert_network", "master_params_to_model_params", "model_grads_to_master_grads",
        "network_to_half", "prep_param_lists", "to_python_float", "tofp16", "fp16_optimizer", "fp16util",
        "loss_scaler"))
    + _under("apex.parallel", (
        "DistributedDataParallel", "Reducer", "SyncBatchNorm", "convert_syncbn_model", "create_syncbn_process_group",
        "ReduceOp", "LARC", "LARC.LARC", "distributed", "multiproc", "sync_batchnorm", "optimized_sync_batchnorm"))
    + _under("apex.optimizers", (
        "FusedAdam", "FusedLAMB", "FusedSGD", "FusedNovoGrad", "FusedAdagrad", "FusedMixedPrecisionLamb"))
    + _under("apex.normalization", ("FusedLayerNorm", "FusedRMSNorm", "MixedFusedLayerNorm", "MixedFusedRMSNorm"))
    + _under("apex.multi_tensor_apply", ("multi_tensor_applier", "MultiTensorApply"))
    + _under("amp_C", (
        "multi_tensor_scale", "multi_tensor_axpby", "multi_tensor_l2norm", "multi_tensor_unscale_l2norm",
        "update_scale_hysteresis"))
)

# Deeper or older paths that legacy code imports by name: a class inside apex.amp's state module,
# Apex's deprecation warning class, the FP16_Optimizer that older trees kept under apex.optimizers and
# apex.contrib.optimizers, a helper of apex.parallel.distributed, the legacy loss scaler's module path,
# and the ampcompat spellings of the same paths.
APEX_DEEP_PATHS: Tuple[str, ...] = (
    "apex.DeprecatedFeatureWarning",
    "apex.amp._amp_state.AmpState",
    "apex.contrib.optimizers",
    "apex.contrib.optimizers.FP16_Optimizer",
    "apex.optimizers.FP16_Optimizer",
    "apex.parallel.distributed.flat_dist_call",
    "apex.fp16_utils.loss_scaler.LossScaler",
    "ampcompat.amp",
    "ampcompat.amp._amp_state",
)

# Apex paths ampcompat deliberately answers with an ImportError that carries advice (Megatron's
# apex.transformer has a maintained home of its own).
ADVISED_NOT_PROVIDED: Tuple[str, ...] = ("apex.transformer",)
