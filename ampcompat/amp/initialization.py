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

from . import model_casting, patched_optimizer, process_state
from .legacy_handle import AmpHandle
from .option_validation import check_initialize_arguments, check_verbosity
from .opt_levels import OVERRIDE_ORDER, Properties, format_options, get_opt_level
from .scaler import LossScaler
from .process_state import _amp_state, maybe_print, warn_or_err
from .state_validation import loaded_counter, not_initialized_error, plan_load
from .verbosity import effective_verbosity

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
        _check_not_cast_before(model)
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, tensor in named:
                if tensor.is_floating_point() and tensor.dtype == torch.float16:
                    warn_or_err(
                        "Found {} {} with type {}, expected {}.\nWhen using amp.initialize, you do not need to "
                        "call .half() on your model\nbefore passing it, no matter what optimization level you "
                        "choose.".format(kind, name, tensor.type(), expected)
                    )


def _check_not_cast_before(model: torch.nn.Module) -> None:
    """Refuse a model an earlier ``initialize`` cast to FP16/BF16 (Apex's error blamed a ``.half()`` call)."""
    if not model_casting.was_cast_by_amp(model):
        return
    for name, param in model.named_parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            warn_or_err(
                "This {} was already passed through amp.initialize, which cast its parameters (param {} is "
                "{}). Pass each model through amp.initialize once: keep using the model and optimizer the "
                "first call returned, or build a fresh FP32 model to start again.".format(
                    type(model).__name__, name, param.dtype))
            return


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
        verbosity: 0 silences everything amp prints; the environment variable ``AMPCOMPAT_VERBOSITY``
            overrides it.
        min_loss_scale, max_loss_scale: floor and ceiling of the dynamic loss scale.
        patch_torch_functions_type: ROCm Apex's override of the O1/O4 autocast dtype.
        allow_banned: O1/O4 run Apex's banned functions (``F.binary_cross_entropy``, ``nn.BCELoss``) in
            FP32 instead of raising ``NotImplementedError`` on fp16 inputs (Apex: ``amp.init`` only).

    Returns:
        ``models`` or ``(models, optimizers)`` shaped like the inputs: the same objects, patched.

    Raises:
        RuntimeError, TypeError, ValueError, AssertionError: Apex's errors for bad options or inputs, and
            clear ones where Apex accepted an impossible value (a loss scale of 0, inf or NaN,
            ``num_losses=0``, ``min_loss_scale > max_loss_scale``, a non-dtype ``cast_model_type``, ...).
            Raised before anything is changed: models, optimizers and amp's state stay as they were.
    """
    saved = process_state.snapshot()
    try:
        return _initialize_options(models, optimizers, enabled, opt_level, cast_model_type,
                                   patch_torch_functions, keep_batchnorm_fp32, master_weights, loss_scale,
                                   cast_model_outputs, num_losses, verbosity, min_loss_scale, max_loss_scale,
                                   patch_torch_functions_type, allow_banned)
    except BaseException:
        # A refused call leaves the state of the previous initialize (or of none) as it was.
        process_state.restore(saved, _SET_BY_INITIALIZE)
        raise


_SET_BY_INITIALIZE = ("opt_properties", "verbosity", "min_loss_scale", "max_loss_scale")


def _initialize_options(models, optimizers, enabled, opt_level, cast_model_type, patch_torch_functions,
                        keep_batchnorm_fp32, master_weights, loss_scale, cast_model_outputs, num_losses,
                        verbosity, min_loss_scale, max_loss_scale, patch_torch_functions_type, allow_banned):
    verbosity = effective_verbosity(check_verbosity(verbosity))
    if enabled:
        check_initialize_arguments(num_losses, min_loss_scale, max_loss_scale, cast_model_outputs)
    process_state.begin_initialize(Properties(), verbosity)
    if not enabled:
        return models if optimizers is None else (models, optimizers)

    level = get_opt_level(opt_level)
    props = _amp_state.opt_properties
    props.apply_level(level)
    maybe_print("Selected optimization level {}".format(level.brief), True)
    maybe_print("Defaults for this optimization level are:", True)
    _print_block(props, level)
    process_state.set_loss_scale_bounds(min_loss_scale, max_loss_scale)

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
        patched_optimizer.check_optimizer(optimizer)
    if len(set(map(id, optimizer_list))) != len(optimizer_list):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")

    # Everything is validated: from here on, objects are modified.
    process_state.remove_handle()

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
        patched_optimizer.patch_optimizer(optimizer, bool(props.master_weights))

    loss_scalers = []
    for loss_id in range(num_losses):
        scaler = LossScaler(props.loss_scale, min_loss_scale=_amp_state.min_loss_scale,
                            max_loss_scale=_amp_state.max_loss_scale)
        scaler._loss_id = loss_id
        scaler.bind_device(_scaler_device(model_list, device_type))
        loss_scalers.append(scaler)
    process_state.install_loss_scalers(loss_scalers)

    if props.patch_torch_functions:
        handle = AmpHandle(device_type, props.autocast_dtype(), verbose=_amp_state.verbosity == 2,
                           allow_banned=allow_banned)
        process_state.install_handle(handle)
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


def _loss_scalers(call: str, then: str) -> Optional[List[LossScaler]]:
    """The live loss scalers; None while amp is disabled (``enabled=False``: nothing to save or restore).

    Raises:
        AmpNotInitializedError: before ``amp.initialize`` (a RuntimeError and an AttributeError).
    """
    props = getattr(_amp_state, "opt_properties", None)
    if props is not None and not props.enabled:
        return None
    scalers = getattr(_amp_state, "loss_scalers", None)
    if props is None or scalers is None:
        raise not_initialized_error(call, then)
    return scalers


def state_dict(destination: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Apex's amp state: ``{"loss_scaler0": {"loss_scale": float, "unskipped": int}, ...}``.

    Plain Python numbers only, so it loads with ``torch.load(weights_only=True)``. Empty while amp is
    disabled (``initialize(..., enabled=False)``).

    Raises:
        AmpNotInitializedError: before ``amp.initialize`` (a RuntimeError and an AttributeError).
    """
    if destination is None:
        destination = OrderedDict()
    scalers = _loss_scalers("amp.state_dict()", "amp.state_dict()")
    for idx, loss_scaler in enumerate(scalers or ()):
        destination["loss_scaler%d" % idx] = {
            "loss_scale": float(loss_scaler.loss_scale()),
            "unskipped": int(loss_scaler._unskipped),
        }
    return destination


def load_state_dict(state_dict: Dict[str, Any]) -> None:
    """Restore loss scales saved by :func:`state_dict`, with Apex's positional rules and messages.

    The whole dict is checked first, so a refused one changes nothing. While amp is disabled, a valid
    dict is accepted and ignored.

    Raises:
        AmpNotInitializedError: before ``amp.initialize`` (a RuntimeError and an AttributeError).
        TypeError, ValueError: a value of the wrong type, or a loss scale that is not finite and above 0;
            the message names the entry and the value.
        RuntimeError: Apex's error for keys that name no loss scaler.
    """
    scalers = _loss_scalers("amp.load_state_dict()", "amp.load_state_dict(checkpoint['amp'])")
    plan = plan_load(state_dict, None if scalers is None else len(scalers))
    if scalers is None:
        return
    for line in plan.messages:
        maybe_print(line)
    for entry in plan.entries:
        scaler = scalers[entry.scaler_index]
        scaler._loss_scale = entry.loss_scale
        scaler._unskipped = loaded_counter(entry.unskipped, scaler.dynamic, scaler._scale_seq_len)
