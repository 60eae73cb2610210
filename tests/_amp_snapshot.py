"""Snapshots of everything a refused amp call could leave half-changed, for the misuse tests.

``snapshot(models, optimizers)`` copies the models' parameters, buffers and hooks, the optimizers'
parameters, gradients, state, hyper-parameters and amp patches, and ``amp._amp_state`` (options,
verbosity, loss-scale bounds, each loss scaler, the O1 handle); ``differences(before, after)`` names
what changed. Nothing here uses ``assert``: the misuse catalogue also runs under ``python -O``, where
only the test modules' own asserts survive (pytest rewrites those).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ampcompat import amp


def _clone(t):
    return None if t is None else t.detach().clone()


def _tensor_record(t: torch.Tensor) -> tuple:
    return (id(t), t.dtype, t.device, _clone(t), _clone(t.grad))


def _hook_counts(model: torch.nn.Module) -> List[tuple]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), len(m._state_dict_hooks),
             "forward" in m.__dict__) for m in model.modules()]


def _optimizer_records(opt: Any) -> Dict[str, Any]:
    params = [p for g in opt.param_groups for p in g["params"]]
    stash = opt.__dict__.get("_amp_stash")
    return {
        "stepped": [_tensor_record(p) for p in params],
        "hyper": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        # o.state read directly: state_dict() would run amp's lazy init (O2) and change param_groups.
        "state": [{k: _clone(v) if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params],
        "attributes": sorted(opt.__dict__),
        "stash": None if stash is None else (stash.already_patched, stash.params_have_scaled_gradients,
                                             stash.lazy_init_called),
    }


def _amp_records() -> Dict[str, Any]:
    state = amp._amp_state
    props = state.__dict__.get("opt_properties")
    return {
        "attributes": sorted(state.__dict__),
        "options": None if props is None else dict(props.options),
        "verbosity": state.verbosity,
        "min_max": (state.__dict__.get("min_loss_scale"), state.__dict__.get("max_loss_scale")),
        "scalers": [(id(s), s.loss_scale(), s._unskipped, s.dynamic) for s in state.__dict__.get("loss_scalers", ())],
        "handle": id(state.__dict__.get("handle")),
        "autocast": torch.is_autocast_enabled("cpu"),
    }


def snapshot(models: Sequence[torch.nn.Module], optimizers: Sequence[Any]) -> Dict[str, Any]:
    """Everything a bad call could change, of ``models``, ``optimizers`` and amp's global state."""
    return {
        "params": [[_tensor_record(p) for p in m.parameters()] for m in models],
        "buffers": [[_tensor_record(b) for b in m.buffers()] for m in models],
        "hooks": [_hook_counts(m) for m in models],
        "optimizers": [_optimizer_records(o) for o in optimizers],
        "amp": _amp_records(),
    }


def same(a: Any, b: Any) -> bool:
    """Equality that compares tensors by dtype and every bit (NaN included), recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                                       b.view(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def differences(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    """The paths (``amp.scalers``, ``optimizers[0].state``, ...) whose values differ."""
    changed: List[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            for key in a:
                walk(a[key], b[key], "{}.{}".format(path, key) if path else str(key))
        elif (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
              and any(isinstance(x, dict) for x in a)):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, "{}[{}]".format(path, i))
        elif not same(a, b):
            changed.append(path)

    walk(before, after, "")
    return changed
