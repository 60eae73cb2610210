"""O0/O2/O3/O5: casting the model, its inputs and its outputs as Apex did, with module hooks.

Apex replaced ``model.forward`` with a closure stored on the instance, which broke ``copy.deepcopy``
(copies ran the original module), ``torch.save(model)`` and ``DataParallel`` replicas. Here the same
casts are module hooks built from module-level functions, so every copy of the model carries them and
pickles them.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import _torch_compat

_NOT_ON_DEVICE = "An input tensor was not {}."


def cast_tree(value: Any, dtype: torch.dtype, device_type: Optional[str] = None) -> Any:
    """Cast every floating tensor in a nested structure to ``dtype`` (Apex's ``applier``).

    Tensors: floating ones are cast (device unchanged), others left alone; a tensor on another device
    type than ``device_type`` warns as Apex warned for non-CUDA tensors. Strings and numpy arrays pass
    through; objects with a ``.to`` method (custom batches, ``PackedSequence``) get ``.to(dtype)``.
    Containers -- mappings (Hugging Face's ``ModelOutput`` too), dataclasses, lists, tuples,
    namedtuples, sets -- are rebuilt with their own type, never changed in place; one whose type cannot
    be rebuilt becomes what Apex returned (a plain ``dict``, ``list``, ``tuple``...). Other objects
    pass through unchanged, as in Apex.
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
    cast = functools.partial(cast_tree, dtype=dtype, device_type=device_type)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _cast_dataclass(value, cast)
    if isinstance(value, Mapping):
        return _cast_mapping(value, cast)
    if isinstance(value, _COLLECTIONS):
        return _cast_collection(value, cast)
    return value


# --- rebuilding containers: a cast input or output is a new container, the caller's is never mutated --

_COLLECTIONS = (list, tuple, set, frozenset)
_Cast = Callable[[Any], Any]


def _rebuilt(original: Any, attempts: Iterable[Callable[[], Any]], fits: Callable[[Any], bool]) -> Any:
    """The first attempt's result that has ``original``'s exact type, is a new object and ``fits``; else None.

    Any exception counts as a failed attempt: container types forbid operations in their own ways
    (``ModelOutput.update`` raises a bare ``Exception``).
    """
    for attempt in attempts:
        try:
            rebuilt = attempt()
            if type(rebuilt) is type(original) and rebuilt is not original and fits(rebuilt):
                return rebuilt
        except Exception:  # noqa: BLE001 -- see the docstring
            continue
    return None


def _holds_items(rebuilt: Mapping, items: List[Tuple[Any, Any]]) -> bool:
    """Whether ``rebuilt`` holds exactly ``items``, in order (values by identity: no stale tensor left)."""
    return len(rebuilt) == len(items) and all(
        (key is new_key or key == new_key) and rebuilt[new_key] is item for (key, item), new_key in zip(items, rebuilt))


def _holds_sequence(rebuilt: Any, items: List[Any]) -> bool:
    if isinstance(rebuilt, (set, frozenset)):
        return len(rebuilt) == len(items)
    return len(rebuilt) == len(items) and all(a is b for a, b in zip(rebuilt, items))


def _cast_dataclass(value: Any, cast: _Cast) -> Any:
    """A dataclass instance rebuilt through its constructor with every ``__init__`` field cast.

    This is how ``ModelOutput`` (a dataclass and an ``OrderedDict`` that forbids ``update``) is built:
    its ``__post_init__`` fills the mapping from the fields. A mapping must come back with the same
    keys (an item set outside the fields is not), or it is rebuilt as a mapping; any other dataclass
    that cannot be rebuilt passes through, as in Apex.
    """
    is_mapping = isinstance(value, Mapping)
    keys = list(value) if is_mapping else []
    changes = {}

    def replace() -> Any:
        changes.update((f.name, cast(getattr(value, f.name))) for f in dataclasses.fields(value) if f.init)
        return dataclasses.replace(value, **changes)

    def fits(new: Any) -> bool:
        same_fields = all(getattr(new, name) is item for name, item in changes.items())
        return same_fields and (not is_mapping or list(new) == keys)

    rebuilt = _rebuilt(value, [replace], fits)
    if rebuilt is not None:
        return rebuilt
    return _cast_mapping(value, cast) if is_mapping else value


def _cast_mapping(value: Mapping, cast: _Cast) -> Mapping:
    """A mapping rebuilt with cast keys and values: through its type's constructor, else a refilled copy
    (``defaultdict`` keeps its factory), else a plain ``dict`` as in Apex."""
    items = [(cast(key), cast(item)) for key, item in value.items()]
    if type(value) is dict:
        return dict(items)

    def refilled_copy() -> Any:
        copy = value.copy()  # type: ignore[attr-defined]
        if copy is value:
            raise TypeError("copy() returned the container itself")
        copy.clear()
        copy.update(items)
        return copy

    rebuilt = _rebuilt(value, [lambda: type(value)(items), refilled_copy], lambda new: _holds_items(new, items))
    return dict(items) if rebuilt is None else rebuilt


def _cast_collection(value: Any, cast: _Cast) -> Any:
    """A list, tuple, namedtuple or set (or subclass) rebuilt with its type, else with the built-in base."""
    items = [cast(item) for item in value]
    kind = type(value)
    if kind in _COLLECTIONS:
        return kind(items)
    rebuilt = _rebuilt(value, [lambda: kind(*items), lambda: kind(items)] if hasattr(value, "_fields")
                       else [lambda: kind(items)], lambda new: _holds_sequence(new, items))
    if rebuilt is not None:
        return rebuilt
    base = next(base for base in _COLLECTIONS if isinstance(value, base))
    return base(items)


# --- parameter casting ------------------------------------------------------------------------------

def is_kept_fp32(module: torch.nn.Module) -> bool:
    """Apex's ``keep_batchnorm_fp32`` rule: an affine batch norm (any ``_BatchNorm`` subclass) stays FP32."""
    return isinstance(module, _torch_compat.BatchNormBase) and module.affine is True


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
        if is_kept_fp32(module):
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


def was_cast_by_amp(model: torch.nn.Module) -> bool:
    """Whether an earlier ``amp.initialize`` cast ``model`` (it carries the FP32 ``state_dict`` hook)."""
    return _state_dict_to_fp32 in model._state_dict_hooks.values()
