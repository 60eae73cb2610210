"""``amp.initialize``, ``amp.state_dict`` and ``amp.load_state_dict`` with Apex's
signatures, defaults, validation messages and state format.

``initialize`` validates everything (options, models, optimizers, devices) before it touches any
object, so bad input never leaves a model or optimizer half-patched; then it casts models, patches
optimizers, builds the loss scalers and, for O1/O4, turns autocast on.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import master_weights, model_casting
from .legacy_handle import AmpHandle
from .opt_levels import OVERRIDE_ORDER, Properties, format_options, get_opt_level
from .scaler import LossScaler
from .process_state import _amp_state, maybe_print, warn_or_err

_PARALLEL_WRAPPERS = (
    (torch.nn.parallel.DistributedDataParallel, "torch.nn.parallel.DistributedDataParallel"),
    (torch.nn.DataParallel, "torch.nn.parallel.DataParallel"),
)


def _normalize_optimizers(optimizers: Any) -> Tuple[List[Any], bool]:
    if optimizers is None:
        return [], False
    if isinstance(optimizers, torch.optim.Optimizer) or _is_larc(optimizers):
        _reject_fp16_optimizer(optimizers)
        return [optimizers], False
    if isinstance(optimizers, list):
        for optimizer in optimizers:
            _reject_fp16_optimizer(optimizer)
        return optimizers, True
    _reject_fp16_optimizer(optimizers)
    raise TypeError("optimizers must be either a single optimizer or a list of optimizers.")


def _is_larc(optimizer: Any) -> bool:
    return type(optimizer).__name__ == "LARC" and hasattr(optimizer, "optim")


def _reject_fp16_optimizer(optimizer: Any) -> None:
    if type(optimizer).__name__ == "FP16_Optimizer":
        raise RuntimeError(
            "An incoming optimizer is an instance of apex.fp16_utils.FP16_Optimizer. The optimizer(s) passed "
            "to amp.initialize() must be bare \ninstances of either ordinary Pytorch optimizers, or Apex fused "
            "\noptimizers.\n"
        )


def _normalize_models(models: Any) -> Tuple[List[torch.nn.Module], bool]:
    if isinstance(models, torch.nn.Module):
        return [models], False
    if isinstance(models, list):
        return models, True
    raise TypeError("models must be either a single model or a list of models.")


def _check_models(models: List[torch.nn.Module]) -> None:
    for model in models:
        for wrapper, name in _PARALLEL_WRAPPERS:
            if isinstance(model, wrapper):
                raise RuntimeError(
                    "Incoming model is an instance of {}. Parallel wrappers should only be applied to the "
                    "model(s) AFTER \nthe model(s) have been returned from amp.initialize.".format(name)
                )


def _model_device_type(models: List[torch.nn.Module]) -> str:
    """The one device type every floating param/buffer lives on (default: cuda if present, else cpu)."""
    types = set()
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                types.add(tensor.device.type)
    if len(types) > 1:
        raise RuntimeError(
            "amp.initialize found model parameters on several device types ({}); ampcompat needs every "
            "model on one device type. Move the model(s) with model.to(device) first.".format(
                ", ".join(sorted(types)))
        )
    if types:
        return types.pop()
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_params_fp32(models: List[torch.nn.Module], device_type: str) -> None:
    if _amp_state.allow_incoming_model_not_fp32:
        return
    expected = "torch.cuda.FloatTensor" if device_type == "cuda" else "torch.FloatTensor"
    for model in models:
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, tensor in named:
                if tensor.is_floating_point() and tensor.dtype == torch.float16:
                    warn_or_err(
                        "Found {} {} with type {}, expected {}.\nWhen using amp.initialize, you do not need to "
                        "call .half() on your model\nbefore passing it, no matter what optimization level you "
                        "choose.".format(kind, name, tensor.type(), expected)
                    )


def _print_block(props: Properties, level: Any) -> None:
    for line in format_options(props, level).split("\n"):
        maybe_print(line, True)


def initialize(models: Any, optimizers: Any = None, enabled: bool = True, opt_level: str = "O1",
               cast_model_type: Optional[torch.dtype] = None, patch_torch_functions: Optional[bool] = None,
               keep_batchnorm_fp32: Any = None, master_weights: Optional[bool] = None, loss_scale: Any = None,
               cast_model_outputs: Optional[torch.dtype] = None, num_losses: int = 1, verbosity: int = 1,
               min_loss_scale: Optional[float] = None, max_loss_scale: float = 2.0 ** 24,
               patch_torch_functions_type: Optional[torch.dtype] = None, allow_banned: bool = False) -> Any:
    """Set up models and optimizers for mixed precision, in place (Apex's ``amp.initialize``).

    Args:
        models: a ``torch.nn.Module`` or a list of them (FP32, on one device type; CPU works).
        optimizers: an optimizer, a list of optimizers, or None (inference).
        enabled: False makes every amp call a no-op and returns the inputs untouched.
        opt_level: "O0" (FP32), "O1" (autocast fp16), "O2" (fp16 model + FP32 masters), "O3" (pure fp16),
            "O4" (autocast bf16), "O5" (bf16 model + FP32 masters).
        cast_model_type, patch_torch_functions, keep_batchnorm_fp32, master_weights, loss_scale:
            overrides of the level's defaults, validated with Apex's rules and messages.
        cast_model_outputs: dtype the model's floating outputs are cast to (default FP32 when the model
            is cast).
        num_losses: how many independent loss scalers to create (``scale_loss(..., loss_id=i)``).
        verbosity: 0 silences everything amp prints.
        min_loss_scale, max_loss_scale: floor and ceiling of the dynamic loss scale.
        patch_torch_functions_type: ROCm Apex's override of the O1/O4 autocast dtype.
        allow_banned: O1/O4 run Apex's banned functions (``F.binary_cross_entropy``, ``nn.BCELoss``) in
            FP32 instead of raising ``NotImplementedError`` on fp16 inputs (Apex: ``amp.init`` only).

    Returns:
        ``models`` or ``(models, optimizers)`` shaped like the inputs: the same objects, patched.

    Raises:
        RuntimeError, TypeError, ValueError, AssertionError: Apex's errors for bad options or inputs.
    """
    saved = {key: _amp_state.__dict__[key] for key in _SET_BY_INITIALIZE if key in _amp_state.__dict__}
    try:
        return _initialize_options(models, optimizers, enabled, opt_level, cast_model_type,
                                   patch_torch_functions, keep_batchnorm_fp32, master_weights, loss_scale,
                                   cast_model_outputs, num_losses, verbosity, min_loss_scale, max_loss_scale,
                                   patch_torch_functions_type, allow_banned)
    except BaseException:
        # A refused call leaves the state of the previous initialize (or of none) as it was.
        for key in _SET_BY_INITIALIZE:
            _amp_state.__dict__.pop(key, None)
        _amp_state.__dict__.update(saved)
        raise


_SET_BY_INITIALIZE = ("opt_properties", "verbosity", "min_loss_scale", "max_loss_scale")


def _initialize_options(models, optimizers, enabled, opt_level, cast_model_type, patch_torch_functions,
                        keep_batchnorm_fp32, master_weights, loss_scale, cast_model_outputs, num_losses,
                        verbosity, min_loss_scale, max_loss_scale, patch_torch_functions_type, allow_banned):
    _amp_state.opt_properties = Properties()
    _amp_state.verbosity = verbosity
    if not enabled:
        return models if optimizers is None else (models, optimizers)

    level = get_opt_level(opt_level)
    props = _amp_state.opt_properties
    props.apply_level(level)
    maybe_print("Selected optimization level {}".format(level.brief), True)
    maybe_print("Defaults for this optimization level are:", True)
    _print_block(props, level)
    _amp_state.min_loss_scale = min_loss_scale
    _amp_state.max_loss_scale = max_loss_scale

    maybe_print("Processing user overrides (additional kwargs that are not None)...", True)
    overrides = dict(enabled=enabled, opt_level=opt_level, cast_model_type=cast_model_type,
                     patch_torch_functions=patch_torch_functions,
                     patch_torch_functions_type=patch_torch_functions_type,
                     keep_batchnorm_fp32=keep_batchnorm_fp32, master_weights=master_weights,
                     loss_scale=loss_scale)
    for key in OVERRIDE_ORDER:
        if overrides[key] is not None:
            setattr(props, key, overrides[key])
    maybe_print("After processing overrides, optimization options are:", True)
    _print_block(props, level)

    return _initialize(models, optimizers, props, num_losses, cast_model_outputs, allow_banned)


def _initialize(models: Any, optimizers: Any, props: Properties, num_losses: int,
                cast_model_outputs: Optional[torch.dtype], allow_banned: bool) -> Any:
    optimizer_list, optimizers_were_list = _normalize_optimizers(optimizers)
    model_list, models_were_list = _normalize_models(models)
    _check_models(model_list)
    device_type = _model_device_type(model_list)
    _check_params_fp32(model_list, device_type)
    if device_type == "cuda" and not torch.backends.cudnn.enabled:
        raise RuntimeError("Amp requires torch.backends.cudnn.enabled = True")
    for optimizer in optimizer_list:
        master_weights.check_optimizer(optimizer)
    if len(set(map(id, optimizer_list))) != len(optimizer_list):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")

    # Everything is validated: from here on, objects are modified.
    previous = getattr(_amp_state, "handle", None)
    if previous is not None:
        previous._deactivate()
        del _amp_state.handle

    if props.cast_model_type:
        for model in model_list:
            model_casting.cast_model(model, props.cast_model_type, props.keep_batchnorm_fp32)
            model_casting.add_cast_hooks(model, props.cast_model_type, cast_model_outputs or torch.float32,
                                   device_type)
            model_casting.add_fp32_state_dict_hooks(model)
        for optimizer in optimizer_list:
            # Only O3-like levels step the half params themselves; with masters the state moves onto
            # the FP32 masters at lazy init, and a round trip through FP16/BF16 here would lose precision.
            if optimizer.state and not props.master_weights:
                optimizer.load_state_dict(optimizer.state_dict())
    elif cast_model_outputs is not None:
        for model in model_list:
            model_casting.add_cast_hooks(model, None, cast_model_outputs, device_type)

    for optimizer in optimizer_list:
        master_weights.patch_optimizer(optimizer, bool(props.master_weights))

    _amp_state.loss_scalers = []
    for loss_id in range(num_losses):
        scaler = LossScaler(props.loss_scale, min_loss_scale=_amp_state.min_loss_scale,
                            max_loss_scale=_amp_state.max_loss_scale)
        scaler._loss_id = loss_id
        scaler.bind_device(_scaler_device(model_list, device_type))
        _amp_state.loss_scalers.append(scaler)

    if props.patch_torch_functions:
        handle = AmpHandle(device_type, props.autocast_dtype(), verbose=_amp_state.verbosity == 2,
                           allow_banned=allow_banned)
        _amp_state.handle = handle
        handle.patch_registered_functions()
        for model in model_list:
            handle.attach_model(model)

    if optimizers is None:
        return models
    return models, optimizers


def _scaler_device(models: List[torch.nn.Module], device_type: str) -> torch.device:
    for model in models:
        for p in model.parameters():
            if p.device.type == device_type:
                return p.device
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def state_dict(destination: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Apex's amp state: ``{"loss_scaler0": {"loss_scale": float, "unskipped": int}, ...}``.

    Plain Python numbers only, so it loads with ``torch.load(weights_only=True)``.
    """
    if destination is None:
        destination = OrderedDict()
    for idx, loss_scaler in enumerate(_amp_state.loss_scalers):
        destination["loss_scaler%d" % idx] = {
            "loss_scale": float(loss_scaler.loss_scale()),
            "unskipped": int(loss_scaler._unskipped),
        }
    return destination


def load_state_dict(state_dict: Dict[str, Any]) -> None:
    """Restore loss scales saved by :func:`state_dict` (Apex's positional rules and messages)."""
    scalers = _amp_state.loss_scalers
    if len(state_dict) != len(scalers):
        print("Warning: state_dict contains {} entries, while {} loss_scalers are used".format(
            len(state_dict), len(scalers)))
    state_dict = state_dict.copy()
    unexpected_keys = []
    idx = 0
    for key in state_dict:
        if "loss_scaler" not in key:
            unexpected_keys.append(key)
            continue
        if idx > len(scalers) - 1:
            print("Skipping loss_scaler[{}], since num_losses was set to {}".format(idx, len(scalers)))
            break
        scalers[idx]._loss_scale = state_dict[key]["loss_scale"]
        scalers[idx]._unskipped = state_dict[key]["unskipped"]
        idx += 1
    if unexpected_keys:
        raise RuntimeError("Error(s) in loading state_dict. Unexpected key(s) in state_dict: {}. ".format(
            ", ".join('"{}"'.format(k) for k in unexpected_keys)))
