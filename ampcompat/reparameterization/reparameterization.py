"""``Reparameterization``: replace a module's parameter by other parameters it is computed from.

A reparameterization (such as :class:`~ampcompat.reparameterization.WeightNorm`) removes a parameter
(``weight``) from the module that owns it, registers the parameters it is computed from in its place
(``weight_g``, ``weight_v``: what ``state_dict`` and optimizers see), and installs itself as a forward
pre-hook that sets the computed tensor as a plain attribute (``module.weight``) before the forward runs.

The hook sits on the module owning the parameter (``hook_child=True``) or on a module above it
(``hook_child=False``, its ``name`` then being the dotted path from that module), so the weight is
computed once per call of that module, however often the child runs inside it (an RNN cell per time
step). Apex reused a computed weight until the next backward pass through the hooked module; this one
reuses it while it is provably current: the parameters it came from are unchanged (same storage, same
version counter), a gradient-tracking forward never gets a weight computed without gradient tracking,
and once a backward pass has consumed the weight's graph the next call computes a new one. (An edit
through ``.data`` bypasses the version counter: like Apex, a forward after such an edit sees it only
once a backward pass has run in between.)
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.nn.parameter import Parameter

from .. import _torch_compat

__all__ = ["Reparameterization"]

_SPARSE_MODULES = (torch.nn.Embedding, torch.nn.EmbeddingBag)
_tokens = itertools.count()


class Reparameterization:
    """Base class of weight reparameterizations, with Apex's interface.

    Subclasses implement :meth:`reparameterize` (the new parameters for a weight) and
    :meth:`compute_weight` (the weight from them). :meth:`apply` installs one on a module.

    Args:
        name: the parameter's name, relative to ``module`` (dotted when the hook sits above its owner).
        dim: the dimension the reparameterization works along (its meaning is the subclass's).
        module: the module the hook is registered on.
        retain_forward: accepted for Apex compatibility; has no effect (as in Apex).

    Attributes:
        reparameterization_names: names of the parameters registered in place of the weight.
        evaluated: whether a weight has been computed since the last :meth:`backward_hook` call.
        backward_hook_key: always ``None`` (Apex registered a module backward hook to drop its cached
            weight; here the computed weight's own gradient hook does that).
    """

    def __init__(self, name: str, dim: Optional[int], module: torch.nn.Module, retain_forward: bool = True) -> None:
        self.name = name
        self.dim = dim
        self.evaluated = False
        self.retain_forward = retain_forward
        self.reparameterization_names: List[str] = []
        self.backward_hook_key = None
        self.module = module
        self._cache: Optional[Tuple[Any, bool, int, torch.Tensor]] = None

    def compute_weight(self, module: Optional[torch.nn.Module] = None, name: Optional[str] = None) -> torch.Tensor:
        """The reparameterized weight of ``module``'s parameter ``name`` (defaults: the hook's own).

        Raises:
            NotImplementedError: in this base class; subclasses compute it.
        """
        raise NotImplementedError("Reparameterization subclasses implement compute_weight (see WeightNorm)")

    def reparameterize(self, name: str, weight: torch.Tensor, dim: Optional[int]
                       ) -> Tuple[List[str], List[Parameter]]:
        """The parameters that replace ``weight`` (named ``name``), and their names.

        Raises:
            NotImplementedError: in this base class; subclasses create them.
        """
        raise NotImplementedError("Reparameterization subclasses implement reparameterize (see WeightNorm)")

    @staticmethod
    def apply(module: torch.nn.Module, name: str, dim: Optional[int], reparameterization: Optional[type] = None,
              hook_child: bool = True) -> Optional["Reparameterization"]:
        """Reparameterize ``module``'s parameter ``name`` (a dotted path into its children).

        Parameters of ``Embedding``/``EmbeddingBag`` modules (sparse gradients) and parameters with at
        most one dimension are left alone, as in Apex (``None`` is returned).

        Args:
            module: the module the name is relative to.
            name: the parameter's dotted name, e.g. ``weight`` or ``rnn.weight_hh_l0``.
            dim: passed to the reparameterization.
            reparameterization: the :class:`Reparameterization` subclass to apply.
            hook_child: register the hook on the module owning the parameter; if False, on ``module``.

        Returns:
            The installed hook, or ``None`` when the parameter is left alone.

        Raises:
            AttributeError: if ``name`` does not exist.
            ValueError: if ``name`` is not a parameter (a buffer, ``None``, or a weight already
                reparameterized), or the new parameters' names are taken. The module is unchanged.
        """
        if reparameterization is None:
            reparameterization = Reparameterization
        owner, local_name = Reparameterization.get_module_and_name(module, name)
        if local_name is None or isinstance(owner, _SPARSE_MODULES):
            return None
        weight = getattr(owner, local_name)
        if not isinstance(weight, Parameter) or owner._parameters.get(local_name) is not weight:
            already = isinstance(weight, torch.Tensor) or weight is None
            raise ValueError(
                f"{local_name!r} of {type(owner).__name__} is not a parameter and cannot be reparameterized"
                + (" (if it is a weight already reparameterized, remove_weight_norm it first)" if already else ""))
        if weight.dim() <= 1:
            return None
        hook = reparameterization(local_name, dim, owner) if hook_child else reparameterization(name, dim, module)
        names, params = hook.reparameterize(local_name, weight, dim)
        taken = [n for n in names if n in owner._parameters or n in owner._buffers or n in owner._modules]
        if taken:
            raise ValueError(f"cannot reparameterize {local_name!r} of {type(owner).__name__}: it already has "
                             f"{', '.join(map(repr, taken))}")
        del owner._parameters[local_name]
        for new_name, param in zip(names, params):
            owner.register_parameter(new_name, param)
        hook.reparameterization_names = list(names)
        setattr(owner, local_name, None)
        (owner if hook_child else module).register_forward_pre_hook(hook)
        return hook

    @staticmethod
    def get_module_and_name(module: torch.nn.Module, name: str) -> Tuple[Any, Optional[str]]:
        """``(owning module, parameter name)`` for the dotted ``name`` under ``module``; ``(None, None)`` for ``''``."""
        if name == "":
            return None, None
        *path, local_name = name.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        return owner, local_name

    def get_params(self, module: torch.nn.Module) -> List[torch.Tensor]:
        """The parameters the weight is computed from, read from their owner ``module``."""
        return [getattr(module, n) for n in self.reparameterization_names]

    def remove(self, module: torch.nn.Module) -> None:
        """Put a plain parameter holding the current weight back in place of the reparameterization.

        ``module`` is the module the hook is registered on; the forward pre-hook itself is left for the
        caller to delete (as in Apex: :func:`~ampcompat.reparameterization.remove_reparameterization`
        does both). The replaced parameters stop requiring gradients.
        """
        owner, local_name = Reparameterization.get_module_and_name(module, self.name)
        params = self.get_params(owner)
        trainable = any(p.requires_grad for p in params)
        with torch.no_grad():
            weight = self.compute_weight(owner, local_name)
        for p in params:
            p.requires_grad_(False)
        if local_name in owner.__dict__:
            delattr(owner, local_name)
        for n in self.reparameterization_names:
            del owner._parameters[n]
        setattr(owner, local_name, Parameter(weight.detach(), requires_grad=trainable))
        self._cache = None

    def __call__(self, module: torch.nn.Module, inputs: Any) -> None:
        """Forward pre-hook: set the current weight on its owner before ``module`` runs."""
        owner, local_name = Reparameterization.get_module_and_name(module, self.name)
        setattr(owner, local_name, self._current_weight(owner, local_name))
        self.evaluated = True

    def backward_hook(self, module: torch.nn.Module, grad_input: Any, grad_output: Any) -> None:
        """Apex's backward hook: forget the computed weight, so the next forward computes it anew."""
        self.evaluated = False
        self._cache = None

    def _current_weight(self, owner: torch.nn.Module, local_name: str) -> torch.Tensor:
        params = self.get_params(owner)
        key = _state_key(params)
        tracking = torch.is_grad_enabled()
        cache = self._cache
        if key is not None and cache is not None and cache[0] == key and (cache[1] or not tracking):
            return cache[3]
        weight = self.compute_weight(owner, local_name)
        token = next(_tokens)
        self._cache = (key, tracking, token, weight) if key is not None else None
        if weight.requires_grad:
            weight.register_hook(self._forgetter(token))
        return weight

    def _forgetter(self, token: int) -> Callable[[torch.Tensor], None]:
        """A gradient hook for the weight cached under ``token``: once a backward pass reaches it, its graph
        may be freed, so the next call computes a new weight."""
        @torch.utils.hooks.unserializable_hook
        def forget(grad: torch.Tensor) -> None:
            cache = self._cache
            if cache is not None and cache[2] == token:
                self._cache = None
        return forget

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # a computed (non-leaf) tensor can be neither deep-copied nor pickled
        return state


def _state_key(params: Sequence[torch.Tensor]) -> Optional[Tuple[Any, ...]]:
    """What identifies the values of ``params``: storage, version counter, dtype, device (None: unknown)."""
    try:
        return tuple((p.data_ptr(), _torch_compat.tensor_version(p), p.dtype, p.device, p.requires_grad) for p in params)
    except RuntimeError:  # inference tensors have no version counter: never reuse
        return None
