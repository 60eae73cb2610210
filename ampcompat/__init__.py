"""ampcompat: NVIDIA Apex's mixed-precision API (``apex.amp`` and its neighbours) on native PyTorch AMP.

    from ampcompat import amp
    model, optimizer = amp.initialize(model, optimizer, opt_level="O2")
    with amp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    optimizer.step()

Everything but ``__version__`` loads on first use (``ampcompat.amp``, ``from ampcompat import amp``),
so ``import ampcompat`` and ``python -m ampcompat --help`` do not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any, List

from ._version import __version__  # noqa: F401

__all__ = ["amp", "install_apex_alias", "reset", "amp_state_to_grad_scaler", "grad_scaler_to_amp_state",
           "__version__"]

# Submodules importable as attributes: the amp core and Apex's neighbours.
_SUBMODULES = ("amp", "fp16_utils", "parallel", "optimizers", "normalization", "multi_tensor_apply", "amp_C",
               "apex_C", "contrib", "mlp", "fused_dense", "reparameterization")
# Public functions defined further down the package: name -> the module that defines it.
_FUNCTIONS = {"amp_state_to_grad_scaler": ".amp.scaler", "grad_scaler_to_amp_state": ".amp.scaler"}
def reset() -> None:
    """Forget every ``amp.initialize``: undo O1's autocast and patched functions, drop scalers and options.

    Models and optimizers already patched keep their casts and master weights; this resets the global
    state so a new ``initialize`` (or a test) starts clean. (See ``ampcompat.amp.process_state.reset``.)
    """
    from .amp import process_state

    process_state.reset()


def install_apex_alias() -> None:
    """Make ``import apex`` / ``from apex import amp`` / ``import amp_C`` resolve to ampcompat (opt-in)."""
    from .tools.alias import install_apex_alias as _install

    _install()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name], __name__), name)
    raise AttributeError("module 'ampcompat' has no attribute {!r}".format(name))


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FUNCTIONS))
