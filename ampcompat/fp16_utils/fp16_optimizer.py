"""``FP16_Optimizer``: FP32 master weights and loss scaling around any torch optimizer.

The wrapped optimizer's half-precision parameters are replaced, inside its own ``param_groups``,
by FP32 master copies; FP32 parameters are kept as they are. Each backward pass scales the loss,
then one multi-tensor copy moves the half gradients into the master gradients and one fused
kernel per (device, dtype) unscales them (and the FP32 gradients, in place) while checking for
inf/NaN, with a single host sync. After each step one multi-tensor copy writes the masters back
into the model.

Behaviour, printed lines and ``state_dict`` keys are Apex's (``apex/fp16_utils/fp16_optimizer.py``),
with these differences, each strictly more permissive:

* parameters may live on any device, and bfloat16 parameters are treated like float16 ones
  (FP32 masters are made for them); Apex accepted only ``torch.cuda.HalfTensor``/``FloatTensor``;
* the ``loss_scaler`` entry of ``state_dict()`` is a dict of plain Python numbers, so checkpoints
  load with ``torch.load(weights_only=True)``; Apex-era checkpoints, whose entry is a pickled
  ``LossScaler`` object, load too;
* ``zero_grad`` also accepts torch's ``set_to_none`` keyword;
* bad input (a parameter of another dtype, a mismatching state dict) raises before anything changes.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .. import _torch_compat

from .fp16util import clip_grad_norm

__all__ = ["FP16_Optimizer"]

_DEPRECATION_LINE = (
    "Warning:  FP16_Optimizer is deprecated and dangerous, and will be deleted soon.  "
    "If it still works, you're probably getting lucky.  "
    "For mixed precision, use the documented API https://nvidia.github.io/apex/amp.html, with opt_level=O1."
)
# Apex's line stays (logs and scripts look for it); this one says where to go instead.
_MAINTAINED_PATH_LINE = (
    "ampcompat: FP16_Optimizer keeps working; amp.initialize(model, optimizer, opt_level='O2') gives the same "
    "FP32 master weights and is the maintained path."
)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_STATE_KEYS = (
    "loss_scaler",
    "dynamic_loss_scale",
    "overflow",
    "first_closure_call_this_step",
    "optimizer_state_dict",
    "fp32_from_fp16",
)
# Serialized name -> attribute of ampcompat.amp.scaler.LossScaler (Apex's attribute names).
_SCALER_FIELDS = {
    "loss_scale": "_loss_scale",
    "unskipped": "_unskipped",
    "dynamic": "dynamic",
    "min_loss_scale": "_min_loss_scale",
    "max_loss_scale": "_max_loss_scale",
    "scale_window": "_scale_seq_len",
    "scale_factor": "_scale_factor",
}


def _amp_maybe_print(msg: str) -> None:
    """Print through amp's verbosity switch, as Apex's step() did."""
    from ampcompat.amp.process_state import maybe_print

    maybe_print(msg)


def _make_loss_scaler(
    dynamic_loss_scale: bool, static_loss_scale: float, dynamic_loss_args: Optional[Mapping[str, Any]]
):
    from ampcompat.amp.scaler import LossScaler

    if dynamic_loss_scale:
        return LossScaler("dynamic", **(dynamic_loss_args or {}))
    return LossScaler(static_loss_scale)


def _scaler_fields(saved: Any, current: Any) -> Dict[str, Any]:
    """Read a saved ``loss_scaler`` entry into ``{attribute: value}`` for the current scaler.

    Accepts ampcompat's plain dict, an (unpickled) amp ``LossScaler`` object as Apex saved it, and
    the pre-amp ``fp16_utils`` ``LossScaler``/``DynamicLossScaler`` objects of 2018 checkpoints (their
    scale and static/dynamic kind are taken; the current scaler's window and bounds are kept).
    Fields absent from the saved entry keep the current scaler's values.
    """
    if isinstance(saved, Mapping):
        if "loss_scale" not in saved:
            raise KeyError(
                "The 'loss_scaler' entry of the FP16_Optimizer state dict has no 'loss_scale'; "
                "expected the dict written by FP16_Optimizer.state_dict()."
            )
        unknown = sorted(set(saved) - set(_SCALER_FIELDS))
        if unknown:
            raise KeyError(
                "The 'loss_scaler' entry of the FP16_Optimizer state dict has unexpected key(s) {}; "
                "known keys are {}.".format(unknown, sorted(_SCALER_FIELDS))
            )
        return {_SCALER_FIELDS[key]: value for key, value in saved.items()}
    if hasattr(saved, "_loss_scale"):
        return {attr: getattr(saved, attr) for attr in _SCALER_FIELDS.values() if hasattr(saved, attr)}
    if hasattr(saved, "cur_scale"):
        return {"_loss_scale": saved.cur_scale, "_unskipped": 0, "dynamic": hasattr(saved, "cur_iter")}
    raise TypeError(
        "Cannot restore the loss scaler from an object of type {}; expected the dict written by "
        "FP16_Optimizer.state_dict() or a pickled Apex LossScaler.".format(type(saved).__name__)
    )


class FP16_Optimizer:
    """Wrap ``init_optimizer`` with FP32 master weights for its half-precision parameters and loss scaling.

    Replace ``loss.backward()`` by ``optimizer.backward(loss)``; ``step()`` then updates the FP32
    masters and copies them into the model. Not a ``torch.optim.Optimizer`` subclass (as in Apex).

    Args:
        init_optimizer: a torch optimizer over the model's FP16/BF16 and FP32 parameters; it is
            modified in place (its half parameters become FP32 masters, their state moves along).
        static_loss_scale: the fixed loss scale when ``dynamic_loss_scale`` is False.
        dynamic_loss_scale: use a dynamic scale (amp's rules).
        dynamic_loss_args: keyword arguments for the dynamic scaler: ``init_scale``,
            ``scale_factor``, ``scale_window``, ``min_loss_scale``, ``max_loss_scale``.
        verbose: print one line per param group and per parameter while wrapping.

    Raises:
        TypeError: if a trainable parameter is neither FP32 nor FP16/BF16 (Apex's message), or
            ``dynamic_loss_args`` holds an unknown key; the optimizer is left untouched.
    """

    def __init__(
        self,
        init_optimizer: torch.optim.Optimizer,
        static_loss_scale: float = 1.0,
        dynamic_loss_scale: bool = False,
        dynamic_loss_args: Optional[Mapping[str, Any]] = None,
        verbose: bool = True,
    ) -> None:
        print(_DEPRECATION_LINE)
        print(_MAINTAINED_PATH_LINE)
        self.verbose = verbose
        self.optimizer = init_optimizer

        half_slots, fp32_groups = self._classify_params(init_optimizer.param_groups)
        loss_scaler = _make_loss_scaler(dynamic_loss_scale, static_loss_scale, dynamic_loss_args)

        self.fp16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_fp16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_fp32_groups: List[List[torch.Tensor]] = fp32_groups
        for group, slots in zip(init_optimizer.param_groups, half_slots):
            model_params = [group["params"][i] for i in slots]
            masters = self._make_masters(model_params)
            for i, model_param, master in zip(slots, model_params, masters):
                group["params"][i] = master
                if model_param in init_optimizer.state:
                    init_optimizer.state[master] = init_optimizer.state.pop(model_param)
            self.fp16_groups.append(model_params)
            self.fp32_from_fp16_groups.append(masters)

        self.all_fp16_params = [p for group in self.fp16_groups for p in group]
        self.all_fp32_from_fp16_params = [p for group in self.fp32_from_fp16_groups for p in group]
        self.all_fp32_from_fp32_params = [p for group in self.fp32_from_fp32_groups for p in group]

        # A state_dict round trip re-casts per-parameter state (e.g. momentum) to the masters' FP32.
        self.optimizer.load_state_dict(self.optimizer.state_dict())

        self.dynamic_loss_scale = bool(dynamic_loss_scale)
        self.loss_scaler = loss_scaler
        self.overflow = False
        self.first_closure_call_this_step = True
        self.clip_grad_norm = clip_grad_norm

    def _classify_params(self, param_groups: Sequence[Dict[str, Any]]):
        """Print the per-parameter lines and sort trainable parameters; raise before changing anything.

        Returns:
            ``(half_slots, fp32_groups)``: per group, the indices of its half parameters in
            ``group["params"]``, and the list of its FP32 parameters.
        """
        half_slots, fp32_groups = [], []
        for group_index, group in enumerate(param_groups):
            self.maybe_print("FP16_Optimizer processing param group {}:".format(group_index))
            slots, fp32_params = [], []
            for i, param in enumerate(group["params"]):
                if not param.requires_grad:
                    continue
                if param.dtype in _HALF_DTYPES:
                    slots.append(i)
                elif param.dtype == torch.float32:
                    fp32_params.append(param)
                else:
                    raise TypeError(
                        "Wrapped parameters must be either torch.cuda.FloatTensor or torch.cuda.HalfTensor. "
                        "Received {}".format(param.type())
                    )
                self.maybe_print("FP16_Optimizer received {} with {}".format(param.type(), param.size()))
            half_slots.append(slots)
            fp32_groups.append(fp32_params)
        return half_slots, fp32_groups

    @staticmethod
    def _make_masters(model_params: List[torch.Tensor]) -> List[torch.Tensor]:
        masters = [torch.empty_like(p, dtype=torch.float32) for p in model_params]
        if masters:
            _torch_compat.foreach_copy_(masters, [p.detach() for p in model_params])
        for master in masters:
            master.requires_grad_(True)
        return masters

    def maybe_print(self, msg: str) -> None:
        """Print ``msg`` if this optimizer was built with ``verbose=True``."""
        if self.verbose:
            print(msg)

    def __getstate__(self):
        raise RuntimeError("FP16_Optimizer should be serialized using state_dict().")

    def __setstate__(self, state):
        raise RuntimeError("FP16_Optimizer should be deserialized using load_state_dict().")

    # --- gradients -------------------------------------------------------------------------------

    def zero_grad(self, set_grads_to_None: bool = False, *, set_to_none: Optional[bool] = None) -> None:
        """Zero (or drop) the gradients of the masters, the FP32 parameters and the model's half parameters.

        Args:
            set_grads_to_None: set every ``.grad`` to None instead of zeroing it.
            set_to_none: torch's name for the same switch; overrides ``set_grads_to_None`` if given.
        """
        to_none = set_grads_to_None if set_to_none is None else set_to_none
        params = [p for group in self.optimizer.param_groups for p in group["params"]] + self.all_fp16_params
        if to_none:
            for p in params:
                p.grad = None
            return
        grads = []
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            if grad.grad_fn is not None:
                grad.detach_()
            else:
                grad.requires_grad_(False)
            grads.append(grad)
        if grads:
            _torch_compat.foreach_zero_(grads)

    def backward(self, loss: torch.Tensor, update_master_grads: bool = True, retain_graph: bool = False) -> None:
        """Backpropagate ``loss.float() * loss_scale``, then (by default) :meth:`update_master_grads`.

        Args:
            loss: the loss (FP16 or FP32).
            update_master_grads: pass False for all but the last of several losses of one step and
                call :meth:`update_master_grads` once afterwards.
            retain_graph: forwarded to ``backward``.
        """
        scaled_loss = loss.float() * self.loss_scaler.loss_scale()
        scaled_loss.backward(retain_graph=retain_graph)
        if update_master_grads:
            self.update_master_grads()

    def update_master_grads(self) -> None:
        """Unscale this step's gradients into the masters and record whether they overflowed.

        Half gradients are copied into the FP32 master gradients (allocated on first use), FP32
        parameters' gradients are unscaled in place, all by ``1/loss_scale`` with an inf/NaN check;
        ``self.overflow`` then says whether :meth:`step` will skip, and the scale is updated.
        """
        self.loss_scaler.clear_overflow_state()
        master_grads, model_grads = [], []
        for model_param, master in zip(self.all_fp16_params, self.all_fp32_from_fp16_params):
            if model_param.grad is None:
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            master_grads.append(master.grad)
            model_grads.append(model_param.grad)
        if master_grads:
            _torch_compat.foreach_copy_(master_grads, model_grads)
        fp32_grads = [p.grad for p in self.all_fp32_from_fp32_params if p.grad is not None]
        self.loss_scaler.unscale_(master_grads + fp32_grads)
        self.overflow = self.loss_scaler.update_scale()

    def clip_master_grads(self, max_norm: float, norm_type: float = 2):
        """Clip the FP32 master gradients with ``torch.nn.utils.clip_grad_norm_``.

        Returns:
            The total norm of the master gradients before clipping, or -1 if the last gradients
            overflowed (nothing is clipped then).
        """
        if self.overflow:
            return -1
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return self.clip_grad_norm(params, max_norm, norm_type)

    def inspect_master_grad_data(self) -> Optional[List[List[Optional[torch.Tensor]]]]:
        """The master gradients per param group (None for parameters without one), or None after an overflow."""
        if self.overflow:
            print(
                "Warning:  calling FP16_Optimizer.inspect_master_grad_data while in an overflow state.  "
                "Gradients are currently invalid (may be inf, nan, or stale).  Returning None."
            )
            return None
        return [
            [p.grad.data if p.grad is not None else None for p in group["params"]]
            for group in self.optimizer.param_groups
        ]

    # --- stepping --------------------------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Update the masters with the wrapped optimizer and copy them into the model.

        Skipped (returning None, printing Apex's line) if the last gradients overflowed. With a
        closure, the closure must call ``self.backward(loss)``; it is re-run while it overflows.

        Returns:
            Whatever the wrapped optimizer's ``step`` returned.
        """
        if self.overflow:
            _amp_maybe_print(
                "Gradient overflow.  Skipping step, reducing loss scale to {}".format(self.loss_scaler.loss_scale())
            )
            return None
        if closure is not None:
            retval = self._step_with_closure(closure)
        else:
            retval = self.optimizer.step()
        self._master_params_to_model_params()
        return retval

    def _step_with_closure(self, closure: Callable[[], Any]):
        def wrapped_closure():
            if self.first_closure_call_this_step:
                # The model is fresh on entry to step(); only later calls follow a master update.
                self.first_closure_call_this_step = False
            else:
                self._master_params_to_model_params()
            loss = closure()
            while self.overflow:
                print(
                    "OVERFLOW within closure! Skipping step, reducing loss scale to {}".format(
                        self.loss_scaler.loss_scale()
                    )
                )
                loss = closure()
            return loss

        try:
            return self.optimizer.step(wrapped_closure)
        finally:
            self.first_closure_call_this_step = True

    def _master_params_to_model_params(self) -> None:
        if self.all_fp16_params:
            with torch.no_grad():
                _torch_compat.foreach_copy_(self.all_fp16_params, self.all_fp32_from_fp16_params)

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """This optimizer's state: Apex's keys, with the loss scaler as plain Python values.

        Returns:
            ``{"loss_scaler": {...}, "dynamic_loss_scale", "overflow", "first_closure_call_this_step",
            "optimizer_state_dict", "fp32_from_fp16"}``; ``fp32_from_fp16`` holds the master
            tensors per group (references, as torch's own ``state_dict`` does).
        """
        scaler = self.loss_scaler
        return {
            "loss_scaler": {key: getattr(scaler, attr) for key, attr in _SCALER_FIELDS.items()},
            "dynamic_loss_scale": self.dynamic_loss_scale,
            "overflow": self.overflow,
            "first_closure_call_this_step": self.first_closure_call_this_step,
            "optimizer_state_dict": self.optimizer.state_dict(),
            "fp32_from_fp16": self.fp32_from_fp16_groups,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (or from an Apex checkpoint).

        Load the model's weights first: the saved FP32 masters are copied into the current ones,
        but the model itself is not touched.

        Raises:
            KeyError: if an entry is missing.
            ValueError: if the saved masters or optimizer state do not match this optimizer;
                nothing is changed then.
        """
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise KeyError(
                "FP16_Optimizer state dict is missing {}; expected the dict returned by "
                "FP16_Optimizer.state_dict().".format(missing)
            )
        scaler_fields = _scaler_fields(state_dict["loss_scaler"], self.loss_scaler)
        saved_masters = self._matching_saved_masters(state_dict["fp32_from_fp16"])
        self.optimizer.load_state_dict(state_dict["optimizer_state_dict"])

        for attr, value in scaler_fields.items():
            setattr(self.loss_scaler, attr, value)
        self.loss_scaler.clear_overflow_state()
        self.dynamic_loss_scale = state_dict["dynamic_loss_scale"]
        self.overflow = state_dict["overflow"]
        self.first_closure_call_this_step = state_dict["first_closure_call_this_step"]
        if saved_masters:
            with torch.no_grad():
                _torch_compat.foreach_copy_(self.all_fp32_from_fp16_params, saved_masters)

    def _matching_saved_masters(self, saved_groups: Sequence[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        if len(saved_groups) != len(self.fp32_from_fp16_groups):
            raise ValueError(
                "The state dict holds master weights for {} param groups, this FP16_Optimizer has {}; "
                "build it the same way as the one that saved the state.".format(
                    len(saved_groups), len(self.fp32_from_fp16_groups)
                )
            )
        flat = []
        for index, (saved, current) in enumerate(zip(saved_groups, self.fp32_from_fp16_groups)):
            shapes_saved = [tuple(t.shape) for t in saved]
            shapes_current = [tuple(t.shape) for t in current]
            if shapes_saved != shapes_current:
                raise ValueError(
                    "Master weights of param group {} do not match: saved shapes {}, current shapes {}.".format(
                        index, shapes_saved, shapes_current
                    )
                )
            flat.extend(t.detach() for t in saved)
        return flat

    # --- proxies to the wrapped optimizer ---------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        """The current loss scale; assignable (sets the scaler's ``_loss_scale``)."""
        return self.loss_scaler.loss_scale()

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        self.loss_scaler._loss_scale = value

    @property
    def state(self):
        """The wrapped optimizer's per-parameter state (keyed by the masters)."""
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def param_groups(self):
        """The wrapped optimizer's param groups (holding the masters), e.g. to change the learning rate."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value
