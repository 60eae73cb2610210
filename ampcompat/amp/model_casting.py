"""O0/O2/O3/O5: casting the model, its inputs and its outputs (spec §4), with module hooks.

Apex replaced ``model.forward`` with a closure stored on the instance, which broke ``copy.deepcopy``
(copies ran the original module), ``torch.save(model)`` and ``DataParallel`` replicas. Here the same
casts are module hooks built from module-level functions, so every copy of the model carries them and
pickles them.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

_NOT_ON_DEVICE = "An input tensor was not {}."


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def cast_tree(value: Any, dtype: torch.dtype, device_type: Optional[str] = None) -> Any:
    """Cast every floating tensor in a nested structure to ``dtype`` (Apex's ``applier``).

    Tensors: floating ones are cast (device unchanged), others left alone; a tensor on another device
    type than ``device_type`` warns as Apex warned for non-CUDA tensors. Strings and numpy arrays pass
    through; objects with a ``.to`` method (custom batches, ``PackedSequence``) get ``.to(dtype)``;
    mappings, lists, tuples (namedtuples too) and sets are rebuilt with their own type.
    """
    if isinstance(value, torch.Tensor):
        if device_type is not None and value.device.type != device_type:
            warnings.warn(_NOT_ON_DEVICE.format(device_type))
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (str, bytes)) or type(value).__module__ == "numpy":
        return value
    if isinstance(value, torch.nn.Module):
        return value
    if hasattr(value, "to") and callable(value.to):
        return value.to(dtype)
    if isinstance(value, Mapping):
        items = [(cast_tree(k, dtype, device_type), cast_tree(v, dtype, device_type)) for k, v in value.items()]
        return _rebuild_mapping(value, items)
    if _is_namedtuple(value):
        return type(value)(*(cast_tree(v, dtype, device_type) for v in value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(cast_tree(v, dtype, device_type) for v in value)
    return value


def _rebuild_mapping(original: Mapping, items: list) -> Mapping:
    try:
        rebuilt = original.copy()  # keeps OrderedDict/defaultdict and their extra state
        rebuilt.clear()
        rebuilt.update(items)
        return rebuilt
    except (AttributeError, TypeError):
        return dict(items)


# --- parameter casting ------------------------------------------------------------------------------

def _is_kept_fp32(module: torch.nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.affine is True


def convert_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a module's own floating params (and their grads) and buffers to ``dtype`` via ``.data``.

    Assigning ``.data`` keeps every ``Parameter`` object, so optimizers holding them stay valid.
    """
    for param in module.parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(dtype)
        grad = param.grad
        if grad is not None and grad.is_floating_point():
            grad.data = grad.data.to(dtype)
    for buf in module.buffers(recurse=False):
        if buf.is_floating_point():
            buf.data = buf.data.to(dtype)


def convert_network(network: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast every module but affine batchnorms to ``dtype`` in place (Apex's ``convert_network``).

    Affine ``_BatchNorm`` modules (BatchNorm1d/2d/3d, SyncBatchNorm) keep FP32 params and running
    statistics; RNNs get ``flatten_parameters()`` so cuDNN sees contiguous weights.

    Returns:
        ``network`` itself.
    """
    for module in network.modules():
        if _is_kept_fp32(module):
            continue
        convert_module(module, dtype)
        if isinstance(module, torch.nn.RNNBase):
            module.flatten_parameters()
    return network


def cast_model(model: torch.nn.Module, dtype: torch.dtype, keep_batchnorm_fp32: Any) -> None:
    """Cast ``model`` for O0/O2/O3/O5: batchnorms kept FP32 when ``keep_batchnorm_fp32`` is truthy."""
    if keep_batchnorm_fp32:
        convert_network(model, dtype)
    else:
        model.to(dtype)


# --- forward hooks ----------------------------------------------------------------------------------

def _cast_inputs_hook(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], *,
                      dtype: torch.dtype, device_type: str) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    return cast_tree(args, dtype, device_type), cast_tree(kwargs, dtype, device_type)


def _cast_outputs_hook(module: torch.nn.Module, args: Any, output: Any, *, dtype: torch.dtype) -> Any:
    return cast_tree(output, dtype)


def add_cast_hooks(model: torch.nn.Module, input_dtype: Optional[torch.dtype], output_dtype: torch.dtype,
                   device_type: str) -> None:
    """Cast ``model``'s inputs to ``input_dtype`` (unless None) and its outputs to ``output_dtype``."""
    if input_dtype is not None:
        model.register_forward_pre_hook(
            functools.partial(_cast_inputs_hook, dtype=input_dtype, device_type=device_type), with_kwargs=True
        )
    model.register_forward_hook(functools.partial(_cast_outputs_hook, dtype=output_dtype))


def _state_dict_to_fp32(module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str,
                        local_metadata: Any) -> None:
    for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
            state_dict[key] = value.float()


def add_fp32_state_dict_hooks(model: torch.nn.Module) -> None:
    """Make ``state_dict()`` of the model and every submodule return FP32 instead of half/bf16."""
    for module in model.modules():
        module._register_state_dict_hook(_state_dict_to_fp32)
