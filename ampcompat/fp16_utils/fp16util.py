"""``apex.fp16_utils.fp16util``: casting a network to half precision and keeping FP32 master copies.

Two families of helpers, with Apex's names, signatures and results:

* network casting — ``tofp16``, ``BN_convert_float``, ``network_to_half``, ``convert_module``,
  ``convert_network``, ``FP16Model``. ``convert_network`` is also the casting that amp O2/O3 use
  with ``keep_batchnorm_fp32``: affine batch norms stay FP32, every other module's floating-point
  parameters, gradients and buffers are cast through ``.data`` so each ``Parameter`` keeps its
  identity (optimizers holding it stay valid);
* manual master weights — ``prep_param_lists``, ``model_grads_to_master_grads``,
  ``master_params_to_model_params``, with ``flat_master=True`` packing all masters into one FP32
  ``Parameter``. The list copies are single ``torch._foreach_copy_`` launches, not per-tensor loops.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .. import _torch_compat

from ..amp.model_casting import convert_module, convert_network, is_kept_fp32

__all__ = [
    "tofp16",
    "BN_convert_float",
    "network_to_half",
    "convert_module",
    "convert_network",
    "FP16Model",
    "prep_param_lists",
    "model_grads_to_master_grads",
    "master_params_to_model_params",
    "to_python_float",
    "clip_grad_norm",
]

_MIXED_TYPES_MESSAGE = (
    "Error in prep_param_lists:  model may contain a mixture of parameters of different types.  "
    "Use flat_master=False, or use F16_Optimizer."
)

clip_grad_norm = torch.nn.utils.clip_grad_norm_


class tofp16(nn.Module):
    """A module whose forward returns ``input.half()``; the first stage of :func:`network_to_half`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.half()


def BN_convert_float(module: nn.Module) -> nn.Module:
    """Cast every affine batch norm inside ``module`` (itself included) back to FP32, in place.

    Args:
        module: any module, typically one just cast with ``.half()``.

    Returns:
        ``module`` itself.
    """
    for m in module.modules():
        if is_kept_fp32(m):
            m.float()
    return module


def network_to_half(network: nn.Module) -> nn.Sequential:
    """Cast ``network`` to FP16 except its affine batch norms, behind a stage that halves the input.

    The result is ``nn.Sequential(tofp16(), network)``, so the network's ``state_dict`` keys gain
    the prefix ``"1."`` (Apex's behaviour; ``FP16Model`` is the newer alternative).

    Args:
        network: the model; it is modified in place.

    Returns:
        The wrapping ``nn.Sequential``.
    """
    return nn.Sequential(tofp16(), BN_convert_float(network.half()))


# convert_module / convert_network are amp O2/O3's own casting (ampcompat.amp.model_casting), re-exported here.
class FP16Model(nn.Module):
    """Wrap a network cast with :func:`convert_network` to FP16; positional inputs are halved.

    The wrapped network lives at ``self.network``, so ``state_dict`` keys gain the prefix
    ``"network."``. Keyword arguments are passed through untouched, as in Apex; positional
    arguments without a ``.half()`` method (``None``, numbers) are passed through as well, where
    Apex raised ``AttributeError``.

    Args:
        network: the model; it is modified in place.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = convert_network(network, dtype=torch.half)

    def forward(self, *inputs, **kwargs):
        inputs = tuple(t.half() if hasattr(t, "half") else t for t in inputs)
        return self.network(*inputs, **kwargs)


def _as_list(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return tensors if isinstance(tensors, list) else list(tensors)


def _views_into(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views of the 1-D tensor ``flat`` shaped like ``like``, laid out back to back."""
    chunks = flat.split([t.numel() for t in like])
    return [chunk.view(t.shape) for chunk, t in zip(chunks, like)]


def _check_flat_master(
    model_params: Sequence[torch.Tensor], master_params: Sequence[torch.Tensor], caller: str
) -> torch.Tensor:
    if len(master_params) != 1:
        raise ValueError(
            "{}(flat_master=True) expects the one-element master list made by "
            "prep_param_lists(model, flat_master=True); got {} master tensors.".format(caller, len(master_params))
        )
    flat = master_params[0]
    expected = sum(p.numel() for p in model_params)
    if flat.numel() != expected:
        raise ValueError(
            "{}: the flat master holds {} elements but the model parameters hold {}; build both lists "
            "with prep_param_lists on the same model.".format(caller, flat.numel(), expected)
        )
    return flat


def _check_pairing(model_params: Sequence[torch.Tensor], master_params: Sequence[torch.Tensor], caller: str) -> None:
    if len(model_params) != len(master_params):
        raise ValueError(
            "{}: got {} model parameters but {} master parameters; pass the two lists returned by "
            "prep_param_lists.".format(caller, len(model_params), len(master_params))
        )


def prep_param_lists(model: nn.Module, flat_master: bool = False) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Make FP32 master copies of ``model``'s trainable parameters.

    Args:
        model: the (typically FP16) model.
        flat_master: pack all masters into one flat FP32 ``nn.Parameter`` whose ``.grad`` is
            already allocated (uninitialised), instead of one master per parameter.

    Returns:
        ``(model_params, master_params)``: the parameters with ``requires_grad``, and their
        detached FP32 copies with ``requires_grad=True`` (a one-element list when ``flat_master``).

    Raises:
        Whatever flattening raised (e.g. parameters on different devices, or no trainable
        parameters), after printing Apex's "Error in prep_param_lists" line.
    """
    model_params = [p for p in model.parameters() if p.requires_grad]
    if flat_master:
        try:
            # copy=True: flattening a single FP32 parameter returns a view of it, which must not alias.
            flat = _torch_compat.flatten_dense_tensors([p.detach() for p in model_params]).to(torch.float32, copy=True)
        except BaseException:
            print(_MIXED_TYPES_MESSAGE)
            raise
        master = nn.Parameter(flat)
        master.grad = torch.empty_like(master)
        return model_params, [master]
    masters = [torch.empty_like(p, dtype=torch.float32) for p in model_params]
    if masters:
        _torch_compat.foreach_copy_(masters, [p.detach() for p in model_params])
    for master in masters:
        master.requires_grad_(True)
    return model_params, masters


def model_grads_to_master_grads(
    model_params: Iterable[torch.Tensor], master_params: Iterable[torch.Tensor], flat_master: bool = False
) -> None:
    """Copy the model's gradients into the masters' ``.grad`` (dtype-converting).

    Without ``flat_master``, a master whose model parameter has no gradient gets ``.grad = None``,
    and missing master gradients are allocated. With ``flat_master`` every model parameter must
    have a gradient, since each owns a slice of the one flat master gradient.

    Args:
        model_params: the first list returned by :func:`prep_param_lists`.
        master_params: the second list returned by :func:`prep_param_lists`.
        flat_master: must match the ``flat_master`` given to :func:`prep_param_lists`.

    Raises:
        ValueError: if the lists do not belong together, or (flat) a model gradient is missing.
    """
    model_params, master_params = _as_list(model_params), _as_list(master_params)
    if flat_master:
        flat = _check_flat_master(model_params, master_params, "model_grads_to_master_grads")
        missing = [i for i, p in enumerate(model_params) if p.grad is None]
        if missing:
            raise ValueError(
                "model_grads_to_master_grads(flat_master=True) needs a gradient for every model parameter, but "
                "parameters {} have none; run backward through all of them or use flat_master=False.".format(missing)
            )
        if flat.grad is None:
            flat.grad = torch.empty_like(flat)
        if model_params:
            _torch_compat.foreach_copy_(_views_into(flat.grad, model_params), [p.grad for p in model_params])
        return
    _check_pairing(model_params, master_params, "model_grads_to_master_grads")
    dst, src = [], []
    for model, master in zip(model_params, master_params):
        if model.grad is None:
            master.grad = None
            continue
        if master.grad is None:
            master.grad = torch.empty_like(master)
        dst.append(master.grad)
        src.append(model.grad)
    if dst:
        _torch_compat.foreach_copy_(dst, src)


def master_params_to_model_params(
    model_params: Iterable[torch.Tensor], master_params: Iterable[torch.Tensor], flat_master: bool = False
) -> None:
    """Copy the masters' values into the model parameters (dtype-converting, in place).

    Args:
        model_params: the first list returned by :func:`prep_param_lists`.
        master_params: the second list returned by :func:`prep_param_lists`.
        flat_master: must match the ``flat_master`` given to :func:`prep_param_lists`.

    Raises:
        ValueError: if the lists do not belong together.
    """
    model_params, master_params = _as_list(model_params), _as_list(master_params)
    if flat_master:
        flat = _check_flat_master(model_params, master_params, "master_params_to_model_params")
        sources = _views_into(flat.detach(), model_params)
    else:
        _check_pairing(model_params, master_params, "master_params_to_model_params")
        sources = [m.detach() for m in master_params]
    if model_params:
        with torch.no_grad():
            _torch_compat.foreach_copy_(model_params, sources)


def to_python_float(t) -> float:
    """``t.item()``, or ``t[0]`` for objects without ``item`` (Apex's pre-0.4 compatibility shim)."""
    if hasattr(t, "item"):
        return t.item()
    return t[0]
