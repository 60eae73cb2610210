"""``apex.reparameterization``: Apex's weight normalization (``apply_weight_norm`` / ``remove_weight_norm``).

    apply_weight_norm(model.rnn, hook_child=False)   # every weight of model.rnn: weight -> weight_g, weight_v
    ...train...
    remove_weight_norm(model.rnn)                    # plain weights again, holding the trained values

Unlike ``torch.nn.utils.parametrizations.weight_norm`` this keeps Apex's ``state_dict`` keys
(``<name>_g``/``<name>_v`` next to where ``<name>`` was), applies to every weight of a module tree at
once, and can compute the weights of a whole subtree in a hook on its root (``hook_child=False``), once
per call of that root.
"""
from __future__ import annotations

from typing import Iterator, Optional, Set

import torch

from .reparameterization import Reparameterization
from .weight_norm import WeightNorm

__all__ = ["apply_weight_norm", "remove_weight_norm", "apply_reparameterization", "remove_reparameterization",
           "WeightNorm", "Reparameterization"]


def apply_weight_norm(module: torch.nn.Module, name: str = "", dim: Optional[int] = 0,
                      hook_child: bool = True) -> torch.nn.Module:
    """Weight-normalize the parameter ``name`` of ``module``, or every weight in it.

    ``w = g * v / ||v||``: the parameter ``weight`` is replaced by ``weight_g`` (magnitude) and
    ``weight_v`` (direction), and a forward pre-hook recomputes ``weight`` from them. Parameters with
    at most one dimension (biases, scalars) and those of ``Embedding``/``EmbeddingBag`` are left alone.

    Args:
        module: the module (or model) to change in place.
        name: a parameter's dotted name under ``module`` (``"weight"``, ``"rnn.weight_hh_l0"``); the
            name of a submodule (``"rnn"``) applies to each parameter of that submodule; ``""`` (the
            default) to each parameter of ``module``. Parameters that already belong to a
            reparameterization are skipped, so applying twice changes nothing.
        dim: the dimension kept apart by the norm (``0``: per output row/channel; ``None``: the whole
            tensor).
        hook_child: put the hook on the module that owns each parameter; if False, on ``module``, which
            then computes all of its children's weights once per call of ``module``.

    Returns:
        ``module``.

    Raises:
        AttributeError: if ``name`` does not exist under ``module``.
        ValueError: if ``name`` is not a parameter (e.g. a buffer). Nothing is changed then.
    """
    return apply_reparameterization(module, reparameterization=WeightNorm, name=name, dim=dim, hook_child=hook_child)


def remove_weight_norm(module: torch.nn.Module, name: str = "", remove_all: bool = False) -> torch.nn.Module:
    """Undo :func:`apply_weight_norm`: each weight becomes a plain parameter holding its current value.

    Args:
        module: the module passed to :func:`apply_weight_norm` (where its hooks are).
        name: the name the hook was registered under (the parameter's name relative to the hooked
            module); ``""`` removes every weight normalization in ``module`` and its submodules.
        remove_all: remove every weight normalization hooked on ``module`` itself.

    Returns:
        ``module``.

    Raises:
        ValueError: with Apex's message if ``name`` is given and no weight normalization of that name
            is hooked on ``module``.
    """
    return remove_reparameterization(module, reparameterization=WeightNorm, name=name, remove_all=remove_all)


def apply_reparameterization(module: torch.nn.Module, reparameterization: Optional[type] = None, name: str = "",
                             dim: Optional[int] = 0, hook_child: bool = True) -> torch.nn.Module:
    """Apply the :class:`Reparameterization` subclass ``reparameterization`` as :func:`apply_weight_norm` does.

    Raises:
        AssertionError: if ``reparameterization`` is not given (as in Apex).
        AttributeError, ValueError: as :func:`apply_weight_norm`.
    """
    if reparameterization is None:
        raise AssertionError("apply_reparameterization needs a Reparameterization subclass, e.g. WeightNorm")
    for param_name in list(_parameter_names(module, name)):
        Reparameterization.apply(module, param_name, dim, reparameterization, hook_child)
    return module


def remove_reparameterization(module: torch.nn.Module, reparameterization: type = Reparameterization,
                              name: str = "", remove_all: bool = False) -> torch.nn.Module:
    """Remove reparameterizations of type ``reparameterization`` as :func:`remove_weight_norm` does.

    Raises:
        ValueError: with Apex's message if ``name`` is given and no such hook of that name is on ``module``.
    """
    if name == "" and not remove_all:
        for submodule in list(module.modules()):
            remove_reparameterization(submodule, reparameterization=reparameterization, remove_all=True)
        return module
    matching = [key for key, hook in module._forward_pre_hooks.items()
                if isinstance(hook, reparameterization) and (remove_all or hook.name == name)]
    if not matching and not remove_all:
        raise ValueError("reparameterization of '{}' not found in {}".format(name, module))
    for key in matching:
        module._forward_pre_hooks[key].remove(module)
        del module._forward_pre_hooks[key]
    return module


def _parameter_names(module: torch.nn.Module, name: str) -> Iterator[str]:
    """The dotted parameter names ``name`` stands for under ``module`` (see :func:`apply_weight_norm`)."""
    target, prefix = (module, "") if name == "" else (_submodule(module, name), name + ".")
    if target is None:
        yield name
        return
    taken = _reparameterization_params(module)
    for param_name, param in target.named_parameters(remove_duplicate=False):
        if id(param) not in taken:
            yield prefix + param_name


def _submodule(module: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    """The submodule at the dotted path ``name``, or None if ``name`` is not one."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _reparameterization_params(module: torch.nn.Module) -> Set[int]:
    """ids of the parameters that reparameterizations hooked anywhere in ``module`` compute weights from."""
    taken: Set[int] = set()
    for hooked in module.modules():
        for hook in hooked._forward_pre_hooks.values():
            if isinstance(hook, Reparameterization):
                owner, _ = Reparameterization.get_module_and_name(hooked, hook.name)
                taken.update(id(p) for p in hook.get_params(owner))
    return taken
