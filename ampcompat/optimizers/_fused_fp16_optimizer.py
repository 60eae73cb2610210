"""What the two fused-optimizer ``FP16_Optimizer`` wrappers of Apex share: loss scaling and the step protocol.

``apex.optimizers.FP16_Optimizer`` (until September 2019; flat FP32 masters per param group) and
``apex.contrib.optimizers.FP16_Optimizer`` (its successor; one FP32 master per parameter) wrap a
fused optimizer whose ``step`` takes ``grads``, ``output_params``, ``scale`` and ``grad_norms``: the
wrapper checks the scaled FP16 gradients for inf/NaN (skipping the step and updating its own loss
scale), and the optimizer unscales, clips, updates the FP32 masters and writes the FP16 weights.

Their loss scaler is their own, not amp's: dynamic scaling starts at 2**16, halves on overflow (floor
1) and doubles after every 1000 iterations since the last overflow. ``state_dict`` has their keys.

Differences from Apex, each more permissive: any device; a wrapped optimizer whose ``step`` lacks those
arguments (``torch.optim.AdamW``, ``FusedLAMB``) is driven with unscaled FP32 master gradients instead of
failing; ``step(closure)`` raises instead of silently ignoring the closure.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .. import _torch_compat

__all__ = ["FusedFP16OptimizerBase"]

_LEGACY_STEP_ARGS = ("grads", "output_params", "scale", "grad_norms")


def _takes_legacy_step_args(optimizer: Any) -> bool:
    try:
        parameters = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in _LEGACY_STEP_ARGS)


class FusedFP16OptimizerBase:
    """Loss scaling, ``backward``, ``step``, ``zero_grad`` and checkpoints of Apex's fused ``FP16_Optimizer``.

    Subclasses build the masters (:meth:`_make_masters`), say which tensors carry the FP16 gradients and
    receive the updated weights (:meth:`_step_lists`), and name the masters' ``state_dict`` key.
    """

    _banner: Sequence[str] = ()
    _masters_key = ""

    def __init__(self, init_optimizer: torch.optim.Optimizer, static_loss_scale: float = 1.0,
                 dynamic_loss_scale: bool = False, dynamic_loss_args: Optional[Mapping[str, Any]] = None,
                 verbose: bool = True) -> None:
        if dynamic_loss_scale and dynamic_loss_args is not None:
            raise SystemError("Do not support dynamic loss scale args for now.")  # Apex's exception and text
        if not isinstance(init_optimizer, torch.optim.Optimizer):
            raise TypeError(f"FP16_Optimizer wraps a torch.optim.Optimizer; got {type(init_optimizer).__name__}")
        for line in self._banner:
            print(line)
        self.optimizer = init_optimizer
        self.fp16_groups: List[List[torch.Tensor]] = []
        self._make_masters()
        self._fused_step = _takes_legacy_step_args(init_optimizer)
        self.dynamic_loss_scale = bool(dynamic_loss_scale)
        self.cur_iter = 0
        if self.dynamic_loss_scale:
            self.cur_scale = 2.0 ** 16
            self.last_overflow_iter = -1
            self.scale_factor = 2
            self.scale_window = 1000
        else:
            self.cur_scale = static_loss_scale
        self.verbose = verbose

    # --- subclass hooks ----------------------------------------------------------------------------

    def _make_masters(self) -> None:
        """Fill ``self.fp16_groups`` and put FP32 masters into ``self.optimizer.param_groups``."""
        raise NotImplementedError

    def _step_lists(self, fp16_grads: List[List[Optional[torch.Tensor]]]):
        """``(grads, output_params)`` per group as the fused optimizer takes them."""
        raise NotImplementedError

    def _masters(self) -> List[List[torch.Tensor]]:
        """The FP32 masters per group, in the order of ``param_groups``."""
        return [list(group["params"]) for group in self.optimizer.param_groups]

    def _after_step(self) -> None:
        """Anything to redo once the optimizer wrote the FP16 weights."""

    # --- training ------------------------------------------------------------------------------------

    def zero_grad(self, set_grads_to_None: bool = True) -> None:
        """Drop (default) or zero the model's FP16 gradients; the masters never hold gradients here.

        Args:
            set_grads_to_None: set ``.grad`` to None instead of zeroing it in place.
        """
        for group in self.fp16_groups:
            for p in group:
                if set_grads_to_None:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_()
                    p.grad.zero_()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss.float() * cur_scale`` into the model's FP16 gradients."""
        (loss.float() * self.cur_scale).backward()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        """Update the masters and the FP16 weights, or skip the step if a gradient is inf/NaN.

        Raises:
            NotImplementedError: if a closure is given (Apex ignored it silently).
        """
        if closure is not None:
            raise NotImplementedError("This FP16_Optimizer does not support step(closure) (Apex ignored the "
                                      "closure); call optimizer.backward(loss) and then step()")
        fp16_grads = [[p.grad for p in group] for group in self.fp16_groups]
        norms = self._scaled_grad_norms(fp16_grads)
        if not all(norm == norm and abs(norm) != float("inf") for norm in norms):
            self._update_scale(True)
            return
        if self._fused_step:
            grads, output_params = self._step_lists(fp16_grads)
            self.optimizer.step(grads=grads, output_params=output_params, scale=self.cur_scale, grad_norms=norms)
        else:
            self._plain_step(fp16_grads)
        self._after_step()
        self._update_scale(False)

    @staticmethod
    def _scaled_grad_norms(fp16_grads: List[List[Optional[torch.Tensor]]]) -> List[float]:
        """Per group, the L2 norm (FP32 accumulation) of the still-scaled gradients; one host sync in all."""
        per_group = []
        for grads in fp16_grads:
            present = [g for g in grads if g is not None]
            if present:
                norms = _torch_compat.foreach_norm(present, 2, dtype=torch.float32)
                device = present[0].device
                per_group.append(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2))
            else:
                per_group.append(None)
        device_values = [n for n in per_group if n is not None]
        if not device_values:
            return [0.0] * len(per_group)
        values = iter(torch.stack([n.to(device_values[0].device) for n in device_values]).tolist())
        return [next(values) if n is not None else 0.0 for n in per_group]

    def _plain_step(self, fp16_grads: List[List[Optional[torch.Tensor]]]) -> None:
        """For an optimizer without the fused protocol: unscaled FP32 master grads, step, copy the weights out."""
        grads, outputs = self._step_lists(fp16_grads)
        for masters, group_grads in zip(self._masters(), grads):
            for master, grad in zip(masters, group_grads):
                master.grad = None if grad is None else grad.detach().float().div_(self.cur_scale)
        self.optimizer.step()
        for masters, group_outputs in zip(self._masters(), outputs):
            pairs = [(out, m) for out, m in zip(group_outputs, masters) if out is not None]
            if pairs:
                with torch.no_grad():
                    _torch_compat.foreach_copy_([o for o, _ in pairs], [m for _, m in pairs])
            for master in masters:
                master.grad = None

    def _update_scale(self, skip: bool) -> None:
        if self.dynamic_loss_scale:
            if skip:
                if self.verbose:
                    print("\nGrad overflow on iteration", self.cur_iter)
                    print("Using dynamic loss scale of", self.cur_scale)
                self.cur_scale = max(self.cur_scale / self.scale_factor, 1)
                self.last_overflow_iter = self.cur_iter
            elif (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                self.cur_scale *= self.scale_factor
        elif skip:
            print("\nGrad overflow on iteration", self.cur_iter)
            print("Using static loss scale of", self.cur_scale)
        self.cur_iter += 1

    # --- proxies and checkpoints ---------------------------------------------------------------------

    @property
    def state(self) -> Dict[Any, Any]:
        """The wrapped optimizer's state (keyed by the masters)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Dict[Any, Any]) -> None:
        self.optimizer.state = value

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The wrapped optimizer's param groups (holding the masters), e.g. to change the learning rate."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    def state_dict(self) -> Dict[str, Any]:
        """Apex's keys: the scaler's fields, ``optimizer_state_dict`` and the FP32 masters."""
        state = {"dynamic_loss_scale": self.dynamic_loss_scale, "cur_scale": self.cur_scale,
                 "cur_iter": self.cur_iter}
        if self.dynamic_loss_scale:
            state.update(last_overflow_iter=self.last_overflow_iter, scale_factor=self.scale_factor,
                         scale_window=self.scale_window)
        state["optimizer_state_dict"] = self.optimizer.state_dict()
        state[self._masters_key] = self._saved_masters()
        return state

    def _saved_masters(self) -> Any:
        return self._masters()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (or an Apex checkpoint of the same class).

        Raises:
            KeyError: if an entry is missing.
            ValueError: if the saved masters do not match this optimizer's; nothing changes then.
        """
        missing = [k for k in ("dynamic_loss_scale", "cur_scale", "cur_iter", "optimizer_state_dict",
                               self._masters_key) if k not in state_dict]
        if state_dict.get("dynamic_loss_scale"):
            missing += [k for k in ("last_overflow_iter", "scale_factor", "scale_window") if k not in state_dict]
        if missing:
            raise KeyError(f"FP16_Optimizer state dict is missing {missing}")
        current = [t for group in self._masters() for t in group]
        saved = self._flat_saved_masters(state_dict[self._masters_key])
        if [tuple(t.shape) for t in saved] != [tuple(t.shape) for t in current]:
            raise ValueError("The saved FP32 master weights do not match this FP16_Optimizer's parameters; "
                             "build it around the same model and optimizer as the one that saved them")
        self.optimizer.load_state_dict(state_dict["optimizer_state_dict"])
        self.dynamic_loss_scale = state_dict["dynamic_loss_scale"]
        self.cur_scale = state_dict["cur_scale"]
        self.cur_iter = state_dict["cur_iter"]
        if self.dynamic_loss_scale:
            self.last_overflow_iter = state_dict["last_overflow_iter"]
            self.scale_factor = state_dict["scale_factor"]
            self.scale_window = state_dict["scale_window"]
        if current:
            with torch.no_grad():
                _torch_compat.foreach_copy_(current, [t.detach() for t in saved])

    def _flat_saved_masters(self, saved: Any) -> List[torch.Tensor]:
        return [t for group in saved for t in group]
