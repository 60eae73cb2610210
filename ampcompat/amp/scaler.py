"""``LossScaler``: Apex's loss-scaling rules on PyTorch's fused AMP kernels.

Apex semantics, kept exactly: the scale is a Python float; dynamic scaling starts at
``min(init_scale, max_loss_scale)``, divides by ``scale_factor`` on every overflowing backward pass
(floored at ``min_loss_scale`` when one is set), multiplies after ``scale_window`` consecutive clean
backward passes and never exceeds ``max_loss_scale``.

Two deliberate fixes, both documented in ``migration_guide.md``:

* a *static* scale other than 1.0 still checks gradients for inf/NaN and skips the step
  (Apex stepped with non-finite gradients);
* a dynamic scale that falls below 1 warns once, with advice, instead of decaying silently.

Gradients are unscaled and checked with ``torch._amp_foreach_non_finite_check_and_unscale_``, one
launch per (device, dtype) group, writing an on-device flag; :meth:`LossScaler.update_scale` reads
that flag with the one host sync of a backward pass.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict, deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import _torch_compat

_BELOW_ONE_ADVICE = (
    "ampcompat: the dynamic loss scale of loss scaler {} fell below 1 ({}). Gradients overflow even "
    "unscaled, so every step is being skipped: the model or the data produce inf/NaN. Check the inputs "
    "and the learning rate, or set min_loss_scale in amp.initialize to bound the scale."
)


def _group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]]:
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


def _dense(grads: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views the kernels can work on: sparse gradients are coalesced and their values used."""
    out = []
    for g in grads:
        if g.is_sparse:
            if not g.is_coalesced():
                raise RuntimeError(
                    "ampcompat cannot unscale an uncoalesced sparse gradient in place; "
                    "call grad.coalesce() in a hook or use a dense embedding."
                )
            out.append(g.values())
        else:
            out.append(g)
    return out


class _ScaleRecord:
    """One on-device scale update, read back to the host without stalling the GPU.

    The values (overflow flag, new scale, new unskipped count) are copied into pinned host memory
    asynchronously; reading them waits only for this copy, which by then has normally finished.
    """

    def __init__(self, values: torch.Tensor, loss_id: int) -> None:
        self.loss_id = loss_id
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values
        self._read: Optional[Tuple[bool, float, float]] = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def values(self) -> Tuple[bool, float, float]:
        if self._read is None:
            if self._event is not None and not self._event.query():
                self._event.synchronize()
            found, scale, unskipped = self._host.tolist()
            self._read = (found != 0.0, scale, unskipped)
        return self._read


#: The dynamic scale never halves below this: its inverse, the unscale factor, must stay a finite
#: float32 (Apex decayed to 1e-205 and, here, torch.full would fail near 2**-128).
_SMALLEST_SCALE = torch.finfo(torch.float32).tiny


class LossScaler:
    """Apex's ``apex.amp.scaler.LossScaler``, field for field.

    Args:
        loss_scale: ``"dynamic"`` or a static scale (a number).
        init_scale: the first dynamic scale (capped by ``max_loss_scale``).
        scale_factor: the factor the dynamic scale is divided or multiplied by.
        scale_window: clean backward passes before the dynamic scale grows.
        min_loss_scale: floor of the dynamic scale (``None``: no floor, as Apex).
        max_loss_scale: ceiling of the dynamic scale.
    """

    warned_no_fused_kernel = False
    warned_unscaling_non_fp32_grad = False
    has_fused_kernel = True

    def __init__(
        self,
        loss_scale: Union[str, float],
        init_scale: float = 2.0 ** 16,
        scale_factor: float = 2.0,
        scale_window: int = 2000,
        min_loss_scale: Optional[float] = None,
        max_loss_scale: float = 2.0 ** 24,
    ) -> None:
        self._records: Deque[_ScaleRecord] = deque()
        self._scale_t: Optional[torch.Tensor] = None
        self._tracker_t: Optional[torch.Tensor] = None
        if loss_scale == "dynamic":
            self.dynamic = True
            self._scale_host = min(max_loss_scale, init_scale)
        else:
            self.dynamic = False
            self._scale_host = loss_scale
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_seq_len = scale_window
        self._scale_factor = scale_factor
        self._unskipped_host = 0
        self._has_overflow = False
        self._overflow_buf: Optional[torch.Tensor] = None
        self._loss_id = 0
        self._warned_below_one = False
        self._inv_scale_cache: Dict[Tuple[torch.device, bool], list] = {}

    # --- Apex's fields: exact whenever read ------------------------------------------------------

    @property
    def _loss_scale(self) -> float:
        self.resolve()
        return self._scale_host

    @_loss_scale.setter
    def _loss_scale(self, value: float) -> None:
        self.resolve()
        self._scale_host = value
        if self._scale_t is not None:
            self._scale_t.fill_(value)

    @property
    def _unskipped(self) -> int:
        self.resolve()
        return self._unskipped_host

    @_unskipped.setter
    def _unskipped(self, value: int) -> None:
        self.resolve()
        self._unskipped_host = value
        if self._tracker_t is not None:
            self._tracker_t.fill_(value)

    # --- Apex's public surface -------------------------------------------------------------------

    def loss_scale(self) -> float:
        """The current scale (a method, as in Apex)."""
        return self._loss_scale

    def clear_overflow_state(self) -> None:
        """Forget any overflow recorded since the last :meth:`update_scale`."""
        self._has_overflow = False
        if self._overflow_buf is not None:
            self._overflow_buf.zero_()

    def update_scale(self) -> bool:
        """Read the overflow flag (one host sync), adjust the scale, and say whether to skip the step.

        Returns:
            True if the gradients of this backward pass held inf/NaN and the step must be skipped.
        """
        if self._records:
            self.resolve()
        scale, unskipped = self._scale_host, self._unskipped_host
        checks = self.dynamic or scale != 1.0
        if not self._has_overflow and self._overflow_buf is not None and checks:
            self._has_overflow = bool(self._overflow_buf.item())
        if self._has_overflow and checks:
            should_skip = True
            unskipped = 0
            if self.dynamic:
                scale = scale / self._scale_factor
                if self._min_loss_scale:
                    scale = max(self._min_loss_scale, scale)
                scale = max(scale, _SMALLEST_SCALE)
        else:
            should_skip = False
            unskipped += 1
        if unskipped == self._scale_seq_len and self.dynamic:
            scale = min(self._max_loss_scale, scale * self._scale_factor)
            unskipped = 0
        self._scale_host, self._unskipped_host = scale, unskipped
        if self._scale_t is not None:  # a device copy exists (the deferred path was used before)
            self._scale_t.fill_(scale)
            self._tracker_t.fill_(unskipped)
        if scale < 1.0:
            self._warn_if_below_one(scale)
        return should_skip

    # --- the deferred path: no host sync per backward pass ----------------------------------------

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss.float() * scale``, using the on-device scale when there is one (same bits)."""
        if self._scale_t is not None:
            return loss.float() * self._scale_t.clone()  # a snapshot: the scale is updated in place later
        return loss.float() * self._scale_host

    def can_defer(self) -> bool:
        """Whether this scaler can update itself on the device (dynamic, with a bound device)."""
        return self.dynamic and self._overflow_buf is not None and self._overflow_buf.dtype == torch.float32

    def update_scale_on_device(self) -> "_ScaleRecord":
        """Apex's :meth:`update_scale` without the host sync: the scale and counter change on the device.

        The overflow flag of this backward pass stays in ``_overflow_buf`` for the optimizers' fused
        kernels to skip on; the host copies of the fields catch up when they are next read.

        Returns:
            The record of this update (its overflow flag and resulting scale, read back lazily).
        """
        buf = self._overflow_buf
        if self._scale_t is None:
            self._scale_t = torch.full((1,), float(self._scale_host), dtype=torch.float32, device=buf.device)
            self._tracker_t = torch.full((1,), int(self._unskipped_host), dtype=torch.int32, device=buf.device)
        _torch_compat.amp_update_scale_(self._scale_t, self._tracker_t, buf, self._scale_factor,
                                        1.0 / self._scale_factor, self._scale_seq_len)
        self._scale_t.clamp_(min=self._min_loss_scale or _SMALLEST_SCALE, max=self._max_loss_scale)
        record = _ScaleRecord(torch.cat([buf, self._scale_t, self._tracker_t.float()]), self._loss_id)
        self._records.append(record)
        return record

    def resolve(self, block: bool = True) -> None:
        """Bring the host fields up to date with the device updates made so far (reads finished ones only
        when ``block`` is False)."""
        while self._records:
            record = self._records[0]
            if not block and not record.ready():
                return
            self._records.popleft()
            found, scale, unskipped = record.values()
            self._scale_host, self._unskipped_host = scale, int(unskipped)
            if found:
                self._warn_if_below_one(scale)

    # --- ampcompat's multi-tensor work -----------------------------------------------------------

    def checks_overflow(self) -> bool:
        """Whether gradients are checked for inf/NaN: always when dynamic, and for a static scale != 1."""
        return self.dynamic or self._loss_scale != 1.0

    def bind_device(self, device: Union[str, torch.device]) -> None:
        """Allocate the on-device overflow flag (done by ``initialize`` with the model's device)."""
        device = torch.device(device)
        if self._overflow_buf is None or self._overflow_buf.device != device:
            self._overflow_buf = torch.zeros(1, dtype=torch.float32, device=device)

    def _flag_for(self, device: torch.device) -> torch.Tensor:
        if self._overflow_buf is None:
            self.bind_device(device)
        buf = self._overflow_buf
        if buf.device == device and buf.dtype == torch.float32 and buf.numel() == 1:
            return buf
        # Legacy code may swap in its own (e.g. int, all-reduced) buffer; the kernel needs float32.
        return torch.zeros(1, dtype=torch.float32, device=device)

    def _merge_flag(self, flag: torch.Tensor) -> None:
        self._overflow_buf.add_(flag.to(self._overflow_buf.device, self._overflow_buf.dtype))

    def _inv_scale(self, device: torch.device, scale: float) -> torch.Tensor:
        """``1/scale`` as a one-element device tensor, refilled in place when the scale changes.

        Refilling (a fill kernel, no host-to-device copy) instead of allocating keeps device memory flat.
        """
        key = (device, scale == 1.0)
        cached = self._inv_scale_cache.get(key)
        if cached is None:
            cached = [scale, torch.full((1,), 1.0 / scale, dtype=torch.float32, device=device)]
            self._inv_scale_cache[key] = cached
        elif cached[0] != scale:
            cached[0] = scale
            cached[1].fill_(1.0 / scale)
        return cached[1]

    def unscale_(self, grads: Sequence[torch.Tensor], scale: Optional[float] = None) -> None:
        """Divide ``grads`` in place by the scale and record inf/NaN in the overflow flag.

        Args:
            grads: gradient tensors (any floating dtype, any mix of devices, sparse ones coalesced).
            scale: the scale the gradients carry; defaults to the current scale.
        """
        if grads:
            self.unscale_groups_(list(_group_by_device_and_dtype(_dense(grads)).values()), scale)

    def unscale_groups_(self, groups: Sequence[List[torch.Tensor]], scale: Optional[float] = None) -> None:
        """:meth:`unscale_` for dense gradients already grouped by (device, dtype): one launch per group.

        The optimizers group their parameters once, at lazy init, and call this on every backward pass.
        """
        if scale is None and self._scale_t is not None:
            # In place on the fresh FP64 copy: in-place ops are on no autocast list, so under O1 this never
            # meets an autocast kernel (out-of-place reciprocal has one on CPU: a Python call per step).
            inv_on_device = self._scale_t.double().reciprocal_().float()
        else:
            inv_on_device = None
            scale = self._scale_host if scale is None else scale
            if scale == 1.0 and not self.checks_overflow():
                return
        for group in groups:
            if not group:
                continue
            device = group[0].device
            flag = self._overflow_buf  # the usual flag and 1/scale are taken without a call
            if flag is None or flag.device != device or flag.dtype != torch.float32 or flag.shape != (1,):
                flag = self._flag_for(device)
            if inv_on_device is None:
                cached = self._inv_scale_cache.get((device, scale == 1.0))
                inv = cached[1] if cached is not None and cached[0] == scale else self._inv_scale(device, scale)
            else:
                inv = inv_on_device.to(device)
            if group[0].dtype == torch.bfloat16:
                # The fused check has no bf16 kernel on CUDA: work on FP32 copies (bf16 -> FP32 is exact).
                work = [g.float() for g in group]
                _torch_compat.amp_foreach_non_finite_check_and_unscale_(work, flag, inv)
                _torch_compat.foreach_copy_(group, work)
            else:
                _torch_compat.amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
            if flag is not self._overflow_buf:
                self._merge_flag(flag)

    def unscale_add_(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
        """``dst[i] += src[i] / scale``, checking only the incoming ``src`` for inf/NaN (as Apex)."""
        if not dst:
            return
        incoming = [torch.empty_like(d) for d in dst]
        _torch_compat.foreach_copy_(incoming, list(src))
        self.unscale_(incoming)
        _torch_compat.foreach_add_(list(dst), incoming)

    def _warn_if_below_one(self, scale: float) -> None:
        if self.dynamic and scale < 1.0 and not self._warned_below_one:
            self._warned_below_one = True
            warnings.warn(_BELOW_ONE_ADVICE.format(self._loss_id, scale), RuntimeWarning, stacklevel=3)

    # --- pickling: old Apex pickles and our own --------------------------------------------------

    def __getstate__(self) -> Dict[str, Any]:
        self.resolve()
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_records", "_scale_t", "_tracker_t", "_scale_host", "_unskipped_host")}
        state["_loss_scale"] = self._scale_host  # Apex's field names, so Apex-era readers still work
        state["_unskipped"] = self._unskipped_host
        state["_inv_scale_cache"] = {}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Apex-era pickles lack ampcompat's fields; fill them with their defaults.
        state = dict(state)
        scale = state.pop("_loss_scale", 1.0)
        unskipped = state.pop("_unskipped", 0)
        self.__dict__.update(
            dict(_scale_factor=2.0, _loss_id=0, _warned_below_one=False, _overflow_buf=None,
                 _has_overflow=False, _min_loss_scale=None, _max_loss_scale=2.0 ** 24, _scale_seq_len=2000,
                 dynamic=False)
        )
        self.__dict__.update(state)
        self.__dict__.update(_records=deque(), _scale_t=None, _tracker_t=None, _inv_scale_cache={},
                             _scale_host=scale, _unskipped_host=unskipped)


# --- conversion between Apex's amp.state_dict() and torch.amp.GradScaler.state_dict() -------------

def amp_state_to_grad_scaler(amp_state: Mapping[str, Mapping[str, Any]], loss_id: int = 0,
                             scale_window: int = 2000) -> Dict[str, Any]:
    """Convert one entry of an Apex ``amp.state_dict()`` into a ``GradScaler.state_dict()``.

    Args:
        amp_state: ``{"loss_scaler0": {"loss_scale": float, "unskipped": int}, ...}``.
        loss_id: which loss scaler to convert.
        scale_window: Apex's growth window (GradScaler's ``growth_interval``).

    Returns:
        A dict that ``torch.amp.GradScaler().load_state_dict`` accepts.

    Raises:
        KeyError: if ``amp_state`` has no ``loss_scaler{loss_id}`` entry.
    """
    key = "loss_scaler%d" % loss_id
    if key not in amp_state:
        raise KeyError("amp state_dict has no entry {!r}; it holds {}".format(key, sorted(amp_state)))
    entry = amp_state[key]
    return {
        "scale": float(entry["loss_scale"]),
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": int(scale_window),
        "_growth_tracker": int(entry["unskipped"]),
    }


def grad_scaler_to_amp_state(grad_scaler_state: Mapping[str, Any], num_losses: int = 1) -> "OrderedDict[str, Dict[str, Any]]":
    """Convert a ``GradScaler.state_dict()`` into Apex's ``amp.state_dict()`` format.

    Args:
        grad_scaler_state: the GradScaler's state dict (must not be empty).
        num_losses: how many ``loss_scalerN`` entries to produce (each gets the same values).

    Raises:
        ValueError: for an empty state dict (a disabled GradScaler saves ``{}``).
    """
    if not grad_scaler_state:
        raise ValueError(
            "The GradScaler state dict is empty, so it was saved from a disabled GradScaler; "
            "there is no loss scale to convert."
        )
    entry = {"loss_scale": float(grad_scaler_state["scale"]),
             "unskipped": int(grad_scaler_state.get("_growth_tracker", 0))}
    return OrderedDict(("loss_scaler%d" % i, dict(entry)) for i in range(num_losses))
