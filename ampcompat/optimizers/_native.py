"""Calls into torch's own optimizer implementations (``torch.optim.{adam,sgd,adagrad}`` functional API).

The functional API's keyword set grew across torch releases (``has_complex``, ``decoupled_weight_decay``,
``fused`` on CPU ...); these wrappers pass only the keywords the installed torch accepts, so the
``Fused*`` optimizers use torch's fused or foreach kernels on every supported torch version.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict

import torch.optim.adagrad as _adagrad
import torch.optim.adam as _adam
import torch.optim.sgd as _sgd


@functools.lru_cache(maxsize=None)
def _accepted(fn: Callable[..., Any]) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    accepted = _accepted(fn)
    fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def adam(*args: Any, decoupled_weight_decay: bool, **kwargs: Any) -> None:
    """``torch.optim.adam.adam`` (AdamW when ``decoupled_weight_decay``) with this torch's keywords."""
    if "decoupled_weight_decay" in _accepted(_adam.adam):
        _call(_adam.adam, *args, decoupled_weight_decay=decoupled_weight_decay, **kwargs)
    elif decoupled_weight_decay:
        import torch.optim.adamw as _adamw
        _call(_adamw.adamw, *args, **kwargs)
    else:
        _call(_adam.adam, *args, **kwargs)


def sgd(*args: Any, **kwargs: Any) -> None:
    """``torch.optim.sgd.sgd`` with this torch's keywords."""
    _call(_sgd.sgd, *args, **kwargs)


def adagrad(*args: Any, **kwargs: Any) -> None:
    """``torch.optim.adagrad.adagrad`` with this torch's keywords."""
    _call(_adagrad.adagrad, *args, **kwargs)


def implementation(fused: bool) -> Dict[str, bool]:
    """The ``fused``/``foreach`` keyword pair selecting torch's fused kernel, else its foreach one."""
    return {"fused": fused, "foreach": not fused}
