"""``LossScaler``: Apex's loss-scaling rules on PyTorch's fused AMP kernels, with one authority for the scale.

The scale lives in one place, a float32 tensor on the device the gradients are on (as in
``torch.amp.GradScaler``), beside the overflow flag and the growth counter; every change to it goes
through :meth:`LossScaler._update_scale_policy`, the one statement of Apex's rules: dynamic scaling
starts at ``min(init_scale, max_loss_scale)``, divides by ``scale_factor`` on every overflowing backward
pass (floored at ``min_loss_scale`` when one is set), multiplies after ``scale_window`` consecutive clean
backward passes and never exceeds ``max_loss_scale``. Apex's host-side fields (``_loss_scale``,
``_unskipped``) are derived from the device values when read, and writing them writes the device.

Two ways to use the policy, one rule: :meth:`LossScaler.update_scale` (Apex's method) applies it and
reads the verdict back with one host sync; :meth:`LossScaler.update_scale_on_device` applies it and
leaves the verdict on the device for an optimizer that skips inside its kernel, reading it back
later without stalling (:class:`_ScaleRecord`).

Two deliberate fixes, both documented in ``migration_guide.md``:

* a *static* scale other than 1.0 still checks gradients for inf/NaN and skips the step
  (Apex stepped with non-finite gradients);
* a dynamic scale that falls below 1 warns once, with advice, instead of decaying silently.

As in GradScaler the scale is a float32: a static scale or bound float32 cannot hold exactly (0.1)
reads back as its float32 value.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import _torch_compat
from .._multi_tensor.tensor_lists import group_indices, pick

_BELOW_ONE_ADVICE = (
    "ampcompat: the dynamic loss scale of loss scaler {} fell below 1 ({}). Gradients overflow even "
    "unscaled, so every step is being skipped: the model or the data produce inf/NaN. Check the inputs "
    "and the learning rate, or set min_loss_scale in amp.initialize to bound the scale."
)

#: The dynamic scale never halves below this: its inverse, the unscale factor, must stay a finite
#: float32 (Apex decayed to 1e-205 in float64).
_SMALLEST_SCALE = torch.finfo(torch.float32).tiny
#: A static scale's growth window: never reached, so its clean-pass count grows for ever (as Apex's).
_NEVER = 2 ** 31 - 1


def dense_values(grads: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views the kernels can work on in place: a sparse gradient's values (it must be coalesced)."""
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


def check_and_scale_(group: List[torch.Tensor], found_inf: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply one (device, dtype) group in place by ``factor`` and set ``found_inf`` to 1.0 where a value
    is inf/NaN: the fused kernel, with FP32 work copies for bf16 (the kernel has none for it on CUDA;
    bf16 -> FP32 is exact). ``found_inf`` and ``factor`` are one-element float32 tensors on the group's device.
    """
    if group[0].dtype == torch.bfloat16:
        work = [g.float() for g in group]
        _torch_compat.amp_foreach_non_finite_check_and_unscale_(work, found_inf, factor)
        _torch_compat.foreach_copy_(group, work)
    else:
        _torch_compat.amp_foreach_non_finite_check_and_unscale_(group, found_inf, factor)


@torch.no_grad()
def any_non_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` (sparse ones included) holds inf/NaN, values left as they are: one launch
    per (device, dtype), one host read."""
    values = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    flags = []
    for (device, _), indices in group_indices(values).items():
        group = pick(values, indices)
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        check_and_scale_(group, flag, torch.ones(1, dtype=torch.float32, device=device))
        flags.append(flag)
    if not flags:
        return False
    home = flags[0].device
    return bool(sum(f.to(home) for f in flags).item())


class _ScaleRecord:
    """One on-device scale update: a snapshot of ``[overflow flag, new scale]``, read back lazily.

    On CUDA the values are copied into pinned host memory asynchronously; reading them waits only for
    this copy, which by then has normally finished. ``found_inf`` is the snapshot's flag on the device,
    the one a fused optimizer step skips on.
    """

    def __init__(self, state: torch.Tensor, loss_id: int) -> None:
        self.loss_id = loss_id
        snapshot = state.clone()
        self.found_inf = snapshot[0:1]
        self._event = None
        if snapshot.device.type == "cuda":
            self._host = torch.empty(snapshot.shape, dtype=snapshot.dtype, pin_memory=True)
            self._host.copy_(snapshot, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = snapshot
        self._read: Optional[Tuple[bool, float]] = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def values(self) -> Tuple[bool, float]:
        """``(overflowed, scale after the update)``."""
        if self._read is None:
            if self._event is not None and not self._event.query():
                self._event.synchronize()
            found, scale = self._host.tolist()
            self._read = (found != 0.0, scale)
        return self._read


def _as_float32(value: float) -> float:
    """``value`` as the float32 the scale tensor holds (rounded on the host: no device read)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _kernels_run_on(device: torch.device) -> bool:
    """Whether torch's fused scale-update kernel exists for ``device`` (else the scale lives on the CPU)."""
    if device.type in ("cpu", "cuda"):
        return True
    try:
        return bool(_torch_compat.has_kernel_for_dispatch_key(
            "aten::_amp_update_scale_", _torch_compat.dispatch_key_name(device.type)))
    except RuntimeError:
        return False


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

    # Apex's class attributes, which legacy code may read. They were switches of Apex's Python fallback
    # (no amp_C extension); ampcompat always has its fused kernels, so they are constants.
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
        self.dynamic = loss_scale == "dynamic"
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_seq_len = scale_window
        self._scale_factor = scale_factor
        self._has_overflow = False
        self._loss_id = 0
        self._warned_below_one = False
        self._place(torch.device("cpu"), float(min(max_loss_scale, init_scale) if self.dynamic else loss_scale), 0)

    def _place(self, device: torch.device, scale: float, unskipped: int) -> None:
        """Put the authority on ``device``: ``[overflow flag, scale]`` in one tensor, and the counter."""
        self._state = torch.tensor([0.0, scale], dtype=torch.float32, device=device)
        self._flag = self._state[0:1]
        self._scale_t = self._state[1:2]
        self._tracker_t = torch.tensor([unskipped], dtype=torch.int32, device=device)
        self._legacy_flag: Optional[torch.Tensor] = None  # a buffer legacy code put in _overflow_buf
        self._flag_clear = True  # the flag is known to be 0 (no unscale or outside reader since it was)
        self._scale_on_host = _as_float32(scale)  # the scale's value, exact while no record is pending
        self._records: Deque[_ScaleRecord] = deque()  # on-device updates the host has not read yet
        self._inv_scale_cache: Dict[Tuple[torch.device, bool], list] = {}
        # 1/scale per device for fused steps, replaced (not refilled) when the scale changes: a step
        # launched after the scale update still reads the value its gradients carry.
        self._inv_scale_snapshots: Dict[torch.device, Tuple[float, torch.Tensor]] = {}

    # --- Apex's fields: views of the authority -----------------------------------------------------

    @property
    def _loss_scale(self) -> float:
        self.resolve()
        return self._scale_on_host

    @_loss_scale.setter
    def _loss_scale(self, value: float) -> None:
        self.resolve()
        self._scale_t.fill_(value)
        self._scale_on_host = _as_float32(value)

    @property
    def _unskipped(self) -> int:
        return int(self._tracker_t.item())

    @_unskipped.setter
    def _unskipped(self, value: int) -> None:
        self._tracker_t.fill_(value)

    @property
    def _overflow_buf(self) -> torch.Tensor:
        """Apex's overflow flag; legacy code may read, write or replace it (BERT swaps in its own)."""
        self._flag_clear = False  # the caller may write to it
        return self._flag if self._legacy_flag is None else self._legacy_flag

    @_overflow_buf.setter
    def _overflow_buf(self, buf: torch.Tensor) -> None:
        self._legacy_flag = None if buf is self._flag else buf

    # --- Apex's public surface -------------------------------------------------------------------

    def loss_scale(self) -> float:
        """The current scale (a method, as in Apex)."""
        return self._loss_scale

    def clear_overflow_state(self) -> None:
        """Forget any overflow recorded since the last :meth:`update_scale`."""
        self._has_overflow = False
        if self._legacy_flag is not None:
            self._legacy_flag.zero_()
        if not self._flag_clear:
            self._flag.zero_()
            self._flag_clear = True

    def update_scale(self) -> bool:
        """Apply the scale policy to this backward pass's overflow flag and read the verdict (one host sync).

        Returns:
            True if the gradients of this backward pass held inf/NaN and the step must be skipped.
        """
        if self._records:
            self.resolve()
        checks = self.dynamic or self._scale_on_host != 1.0  # a static scale of 1 is never checked (as Apex)
        if checks and not self._has_overflow and self._legacy_flag is None:
            self._update_scale_policy(self._flag)  # the usual case, without a call to _verdict_flag
        else:
            self._update_scale_policy(self._verdict_flag(checks))
        flag, scale = self._state.tolist()  # the one host read of a backward pass
        self._flag_clear = flag == 0.0
        self._scale_on_host = scale
        overflowed = checks and (flag != 0.0 or self._has_overflow)
        if overflowed and scale < 1.0:
            self._warn_if_below_one(scale)
        return overflowed

    # --- the policy: every path ------------------------------------------------------------------

    def _update_scale_policy(self, found_inf: torch.Tensor) -> None:
        """Apex's rules for one backward pass, applied on the device to the scale and the counter.

        ``found_inf`` (one float32 element, 0 or 1) says whether the pass overflowed. Dynamic: halve on
        overflow (floored at ``min_loss_scale``, or at the smallest float32 whose inverse is finite) and
        reset the count; else count, and after ``scale_window`` clean passes double (capped at
        ``max_loss_scale``) and reset the count. Static: the scale stays; the count resets on overflow.
        """
        if self.dynamic:
            _torch_compat.amp_update_scale_(self._scale_t, self._tracker_t, found_inf, self._scale_factor,
                                            1.0 / self._scale_factor, self._scale_seq_len)
            self._scale_t.clamp_(min=self._min_loss_scale or _SMALLEST_SCALE, max=self._max_loss_scale)
        else:
            _torch_compat.amp_update_scale_(self._scale_t, self._tracker_t, found_inf, 1.0, 1.0, _NEVER)

    def _verdict_flag(self, checks: bool) -> torch.Tensor:
        """The flag the policy reads: ours (a legacy buffer in ``_overflow_buf`` copied into it first), or
        an overflow when Apex's ``_has_overflow`` is set; a static scale of 1 never overflows (as Apex)."""
        if not checks:
            return torch.zeros_like(self._flag)
        if self._has_overflow:
            return torch.ones_like(self._flag)
        if self._legacy_flag is not None:
            self._flag.copy_(self._legacy_flag.reshape(1).clamp(max=1))
        return self._flag

    # --- the deferred path: no host sync per backward pass ----------------------------------------

    def can_defer(self) -> bool:
        """Whether this scaler can leave its verdict on the device (dynamic, and its own flag in use)."""
        return self.dynamic and self._legacy_flag is None

    def update_scale_on_device(self) -> _ScaleRecord:
        """:meth:`update_scale` without the host sync: the policy runs on the device and the verdict stays
        there for the optimizers' fused kernels; the host copies of Apex's fields catch up when read.

        Returns:
            The record of this update (its on-device flag, and the values read back lazily).
        """
        if self._has_overflow:
            self._flag.fill_(1.0)  # the record carries the verdict to the optimizers' kernels
        self._update_scale_policy(self._flag)
        record = _ScaleRecord(self._state, self._loss_id)
        self._flag_clear = False
        self._records.append(record)
        return record

    def resolve(self, block: bool = True) -> None:
        """Bring the host copy of the scale up to date with the device updates made so far (reads finished
        ones only when ``block`` is False)."""
        while self._records:
            record = self._records[0]
            if not block and not record.ready():
                return
            self._records.popleft()
            found, scale = record.values()
            self._scale_on_host = scale
            if found:
                self._warn_if_below_one(scale)

    # --- unscaling -----------------------------------------------------------------------------

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss.float() * scale`` (the device scale when the host copy is behind: same bits, no sync)."""
        if self._records:
            return loss.float() * self._scale_t.clone()  # a snapshot: the scale is updated in place later
        return loss.float() * self._scale_on_host

    def bind_device(self, device: Union[str, torch.device]) -> None:
        """Move the scale, counter and flag to ``device`` (``initialize`` binds the model's device)."""
        device = torch.device(device)
        if not _kernels_run_on(device):
            device = torch.device("cpu")
        if self._state.device != device:
            self.resolve()
            self._place(device, self._scale_on_host, self._unskipped)

    def _other_flag(self, device: torch.device) -> torch.Tensor:
        """A fresh flag for an unscale our own cannot take (grads on another device, or legacy code's
        buffer in ``_overflow_buf``), merged into the right one by :meth:`_merge_flag` afterwards."""
        return torch.zeros(1, dtype=torch.float32, device=device)

    def _merge_flag(self, flag: torch.Tensor) -> None:
        target = self._flag if self._legacy_flag is None else self._legacy_flag
        target.copy_(torch.maximum(target, flag.to(target.device, target.dtype)))

    def _inverse(self, device: torch.device) -> torch.Tensor:
        """``1/scale`` (the host copy's) as a one-element tensor on ``device``, made once per device and
        refilled in place when the scale changes (a fill kernel, no allocation: device memory stays flat)."""
        inv = self._inv_scale_cache.get(device)
        if inv is None or inv[0] != self._scale_on_host:
            if inv is None:
                inv = self._inv_scale_cache[device] = [None, torch.empty(1, dtype=torch.float32, device=device)]
            inv[0] = self._scale_on_host
            inv[1].fill_(1.0 / self._scale_on_host)
        return inv[1]

    def inverse_scale_snapshot(self, device: torch.device) -> torch.Tensor:
        """``1/scale`` for the gradients of the backward pass now ending: a one-element float32 tensor on
        ``device`` that no later scale update or unscale writes, for a fused step launched after the policy
        has updated the scale. Same bits as :meth:`unscale_groups_` divides by; made only when the scale
        changed (or, while device updates are unread, from the device scale without a sync)."""
        if self._records:
            return self._scale_t.double().reciprocal_().float().to(device)
        snapshot = self._inv_scale_snapshots.get(device)
        if snapshot is None or snapshot[0] != self._scale_on_host:
            snapshot = self._inv_scale_snapshots[device] = (
                self._scale_on_host, torch.full((1,), 1.0 / self._scale_on_host, dtype=torch.float32, device=device))
        return snapshot[1]

    def check_overflow_(self, device: torch.device, check: Any, inv_scale: torch.Tensor) -> None:
        """Record in the overflow flag whether gradients on ``device`` that carry this scale hold inf/NaN,
        with a read-only check of the caller's: ``check(inv_scale, flag)`` sets the one-element float32
        ``flag`` on ``device`` to 1.0 where a gradient times ``inv_scale`` is not finite. A static scale of
        1 is never checked (as :meth:`unscale_groups_`, and Apex)."""
        if self._scale_on_host == 1.0 and not self.dynamic and not self._records:
            return
        self._flag_clear = False
        flag = self._flag
        if flag.device != device or self._legacy_flag is not None:
            flag = self._other_flag(device)
        check(inv_scale, flag)
        if flag is not self._flag:
            self._merge_flag(flag)

    def unscale_(self, grads: Sequence[torch.Tensor], scale: Optional[float] = None) -> None:
        """Divide ``grads`` in place by the scale and record inf/NaN in the overflow flag.

        Args:
            grads: gradient tensors (any floating dtype, any mix of devices, sparse ones coalesced).
            scale: the scale the gradients carry; defaults to the current scale.
        """
        if grads:
            values = dense_values(grads)
            self.unscale_groups_([pick(values, indices) for indices in group_indices(values).values()], scale)

    def unscale_groups_(self, groups: Sequence[List[torch.Tensor]], scale: Optional[float] = None) -> None:
        """:meth:`unscale_` for dense gradients already grouped by (device, dtype): one launch per group.

        The optimizers group their parameters once, at lazy init, and call this on every backward pass.
        """
        if scale is not None:
            on_device = torch.full((1,), 1.0 / scale, dtype=torch.float32, device=self._state.device)
        elif self._records:
            # The host copy is behind the device: 1/scale from the device scale, in place on a fresh FP64
            # copy (bitwise GradScaler's; in-place ops meet no O1 autocast kernel: no Python call).
            on_device = self._scale_t.double().reciprocal_().float()
        else:
            on_device = None
            if self._scale_on_host == 1.0 and not self.dynamic:
                return  # a static scale of 1: nothing to divide, and no check (as Apex)
        self._flag_clear = False
        for group in groups:
            if not group:
                continue
            device = group[0].device
            flag = self._flag
            if flag.device != device or self._legacy_flag is not None:
                flag = self._other_flag(device)
            # The cached 1/scale and the non-bf16 kernel taken inline, not through _inverse/check_and_scale_:
            # measured, 2 Python calls fewer per step (tests/test_host_overhead.py, O1 AdamW: 266, else 268).
            inv = self._inv_scale_cache.get(device) if on_device is None else None
            if inv is not None and inv[0] == self._scale_on_host:
                inv = inv[1]
            else:
                inv = self._inverse(device) if on_device is None else on_device.to(device)
            if group[0].dtype == torch.bfloat16:
                check_and_scale_(group, flag, inv)
            else:
                _torch_compat.amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
            if flag is not self._flag:
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

    _APEX_FIELDS = ("dynamic", "_max_loss_scale", "_min_loss_scale", "_scale_seq_len", "_scale_factor",
                    "_has_overflow", "_loss_id", "_warned_below_one")

    def __getstate__(self) -> Dict[str, Any]:
        """Apex's fields (``_loss_scale``, ``_unskipped``... as plain numbers) and the device of the scale."""
        state = {name: self.__dict__[name] for name in self._APEX_FIELDS}
        state.update(_loss_scale=self._loss_scale, _unskipped=self._unskipped, _device=str(self._state.device))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Apex-era pickles lack ampcompat's fields (and hold an overflow buffer of their own): defaults.
        self.__dict__.update(dict(_scale_factor=2.0, _loss_id=0, _warned_below_one=False, _has_overflow=False,
                                  _min_loss_scale=None, _max_loss_scale=2.0 ** 24, _scale_seq_len=2000,
                                  dynamic=False))
        self.__dict__.update({k: v for k, v in state.items() if k in self._APEX_FIELDS})
        self._place(torch.device("cpu"), float(state.get("_loss_scale", 1.0)), int(state.get("_unskipped", 0)))
        device = state.get("_device", "cpu")
        if torch.device(device).type != "cuda" or torch.cuda.is_available():
            self.bind_device(device)


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
