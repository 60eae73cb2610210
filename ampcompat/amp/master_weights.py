"""The gradient strategy with FP32 master weights (O2, O5): masters, master gradients, the copy back.

At lazy init every trainable half parameter inside the optimizer's ``param_groups`` is replaced by an
FP32 master (its optimizer state moves along), so LR schedulers, ``amp.master_params`` and the
optimizer's own state all see the masters. Each backward pass's half gradients are copied into the
masters' FP32 gradients and unscaled there, the FP32 parameters' gradients in place; after each step the
masters are copied back into the model. All of it is multi-tensor: a fixed number of kernel launches
per backward pass whatever the number of parameters.

Which unscale path an exit takes is decided at the block's entry, not found by luck: a pass that
accumulates onto nothing (no master holds a gradient, no FP32 gradient was put aside) takes the fast
path; FP32 gradients that this optimizer's own ``zero_grad`` zeroed and nothing wrote since are known
zeros, so they need not be put aside (the usual BatchNorm case). Each exit counts its path in
``unscale_paths``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .. import _torch_compat
from .model_gradients import (HALF_TYPES, all_params, coalesce_sparse, param_type_error, set_aside,
                              split_new_grads)
from .optimizer_lifecycle import OptimizerLifecycle, param_counts
from .scaler import LossScaler


class MasterWeightsPlan:
    """The lists an optimizer with FP32 masters works with, decided at lazy init (Apex's names: the
    per-group ``fp16_groups``, ``fp32_from_fp16_groups``, ``fp32_from_fp32_groups`` and their flat lists).

    Args:
        groups: per param group, ``(half params, their masters, FP32 params)``.
        frozen_half: half params left out of the masters because they did not require grad.
        param_count: the param groups' sizes these lists were made from.
    """

    def __init__(self, groups: List[Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]],
                 frozen_half: List[torch.Tensor], param_count: List[int]) -> None:
        self.fp16_groups = [half for half, _, _ in groups]
        self.fp32_from_fp16_groups = [masters for _, masters, _ in groups]
        self.fp32_from_fp32_groups = [fp32 for _, _, fp32 in groups]
        self.half = [p for g in self.fp16_groups for p in g]
        self.masters = [p for g in self.fp32_from_fp16_groups for p in g]
        self.fp32 = [p for g in self.fp32_from_fp32_groups for p in g]
        self.model_side = self.half + self.fp32  # the parameters backward writes gradients to
        # Masters and FP32 params share one (device, dtype): a clean pass unscales them with one launch.
        self.one_group = len({(p.device, p.dtype) for p in self.masters + self.fp32}) <= 1
        self.frozen_half = frozen_half
        self.param_count = param_count


def _class_method(optimizer: Any, name: str) -> Any:
    """The optimizer class's own method, bound — bypassing the instance attributes amp installs."""
    return getattr(type(optimizer), name).__get__(optimizer, type(optimizer))


def replace_with_masters(optimizer: Any, params: List[torch.Tensor],
                         known: Optional[Dict[int, torch.Tensor]] = None):
    """Swap each trainable half param in ``params`` (in place) for an FP32 master; move its state.

    ``known`` maps ``id(master)`` to its model param for masters already in ``params`` (a rebuild).

    Returns:
        ``(half params, their masters, FP32 params)``.

    Raises:
        TypeError: Apex's error for a parameter that is neither FP32 nor half (``params`` is unchanged).
    """
    known = known or {}
    for p in params:
        if id(p) not in known and p.requires_grad and p.dtype not in HALF_TYPES and p.dtype != torch.float32:
            raise param_type_error(p)
    half, masters, fp32 = [], [], []
    for i, p in enumerate(params):
        if id(p) in known:
            half.append(known[id(p)])
            masters.append(p)
        elif not p.requires_grad:
            continue
        elif p.dtype in HALF_TYPES:
            master = p.detach().clone().float().requires_grad_(True)
            params[i] = master
            if p in optimizer.state:
                optimizer.state[master] = optimizer.state.pop(p)
            half.append(p)
            masters.append(master)
        else:
            fp32.append(p)
    return half, masters, fp32


class MasterWeights(OptimizerLifecycle):
    """The lifecycle of an optimizer that steps FP32 masters of the model's half parameters (O2, O5)."""

    HOLDS_MASTERS = True

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer)
        # Gradients amp's zero_grad zeroed, with their version counters: known zeros until written again.
        self._zeroed: Optional[Tuple[List[torch.Tensor], List[int]]] = None
        self._refresh_from_model = False  # a checkpoint without masters was loaded: rebuild stale ones
        #: Why the last block's exit did not take the fused O2 step (None: it did, or no exit yet); for an
        #: optimizer amp.initialize gave the unfused strategy, why it did (see ``fused_master_weights``).
        self.unfused_reason: Optional[str] = None

    # --- lazy init and the masters ------------------------------------------------------------------

    def _lazy_init(self) -> None:
        if self._plan is None:
            self._build_masters()

    def _build_masters(self, known: Optional[Dict[int, torch.Tensor]] = None) -> None:
        """Put FP32 masters in place of the trainable half params of every group; ``known``
        (``id(master) -> model param``) keeps the masters that already exist (a rebuild)."""
        optimizer = self._optimizer
        groups = [replace_with_masters(optimizer, group["params"], known) for group in optimizer.param_groups]
        frozen = [p for p in all_params(optimizer) if p.dtype in HALF_TYPES]
        self._plan = MasterWeightsPlan(groups, frozen, param_counts(optimizer))
        if optimizer.state:
            # Re-cast state moved onto the masters (e.g. momentum created for half params) to FP32.
            _class_method(optimizer, "load_state_dict")(_class_method(optimizer, "state_dict")())

    def _masters_for_unfrozen_params(self) -> None:
        """Give FP32 masters to half params frozen at lazy init and unfrozen since (else the optimizer
        would step the half param itself, with its still-scaled gradient)."""
        plan = self._plan
        self._build_masters({id(m): p for p, m in zip(plan.half, plan.masters)})

    def refresh_from_model(self) -> None:
        """After loading a checkpoint without masters, re-derive the masters the model disagrees with.

        A master that rounds to its model weight is kept (it may be a more precise value the user restored,
        as NVIDIA's BERT recipe does); one that does not is stale and is rebuilt from the model. Runs once
        per such load, with one host read.
        """
        if not self._refresh_from_model:
            return
        self._refresh_from_model = False
        pairs = list(zip(self._plan.half, self._plan.masters))
        if not pairs:
            return
        with torch.no_grad():
            differs = torch.stack([(m.to(p.dtype) != p).any().cpu() for p, m in pairs]).tolist()
            stale = [(p, m) for (p, m), d in zip(pairs, differs) if d]
            if stale:
                _torch_compat.foreach_copy_([m for _, m in stale], [p for p, _ in stale])

    def copy_masters_to_model(self) -> None:
        """The masters' values into the model's half params (Apex's ``_master_params_to_model_params``)."""
        plan = self._plan
        if plan is not None and plan.half:
            grad_was_enabled = torch.is_grad_enabled()  # torch.no_grad() without its Python context manager
            _torch_compat.set_grad_enabled(False)
            try:
                _torch_compat.foreach_copy_(plan.half, plan.masters)
            finally:
                _torch_compat.set_grad_enabled(grad_was_enabled)

    # --- the lifecycle's hooks ----------------------------------------------------------------------

    def _set_aside_grads(self) -> None:
        plan = self._plan
        if plan is None:
            self._lazy_init()
            plan = self._plan
        for p in plan.frozen_half:
            if p.requires_grad:
                self._masters_for_unfrozen_params()
                plan = self._plan
                break
        if self._refresh_from_model:
            self.refresh_from_model()
        # The model's half grads are dropped (as Apex): the masters' grads carry any accumulation. (Kept
        # for an abort; set_aside's body inline: measured, one Python call per step fewer.)
        half_before = [p.grad for p in plan.half]
        for p in plan.half:
            p.grad = None
        fp32_aside = None  # no FP32 gradient yet: nothing to put aside
        zeroed, self._zeroed = self._zeroed, None
        for p in plan.fp32:
            if p.grad is not None:  # a plain loop: ``None in grads`` would compare tensors with ==
                fp32_aside = _KEPT_ZEROS if _known_zeros(plan.fp32, zeroed) else set_aside(plan.fp32)
                break
        self._set_aside = (half_before, fp32_aside)

    def _unscale_grads(self, scaler: LossScaler) -> bool:
        plan = self._plan
        if plan is None:
            self._lazy_init()
            plan = self._plan
        aside, self._set_aside = self._set_aside, None
        fp32_aside = aside[1] if aside is not None else None
        if fp32_aside is _KEPT_ZEROS:
            fp32_aside = None  # backward added this pass's gradients to zeros: they are this pass's alone
        produced = self._unscale_fast(scaler) if fp32_aside is None and plan.one_group else None
        if produced is None:
            self.unscale_paths["general"] += 1
            produced = self._unscale_general(scaler, fp32_aside or [None] * len(plan.fp32))
        return produced

    def _unscale_fast(self, scaler: LossScaler) -> Optional[bool]:
        """A pass that accumulates onto nothing, in a few multi-tensor calls; None when it does not apply
        after all: a master already holds a gradient (a second pass before the step), or a half param got
        no gradient or a sparse one."""
        plan = self._plan
        masters = plan.masters
        grads16 = [p.grad for p in plan.half]
        grads32 = [g for p in plan.fp32 if (g := p.grad) is not None]
        # Plain loops of identity tests: ``None in grads`` / ``.count(None)`` compare tensors with ``==``
        # (~15 us each) and generator expressions add a Python call per item.
        for grad in grads16:
            if grad is None or grad.is_sparse:
                return None
        for master in masters:
            if master.grad is not None:
                return None
        for grad in grads32:
            if grad.is_sparse:
                return None
        fresh = [torch.empty_like(m) for m in masters]
        if fresh:
            _torch_compat.foreach_copy_(fresh, grads16)
            for master, grad in zip(masters, fresh):
                master.grad = grad
        grads = fresh + grads32
        scaler.unscale_groups_((grads,))
        self.unscale_paths["fast"] += 1
        return bool(grads)

    def _unscale_general(self, scaler: LossScaler, fp32_aside: List[Optional[torch.Tensor]]) -> bool:
        """Any pass: half grads into new or accumulating master grads, sparse ones too; FP32 params' grads
        unscaled with those put aside added back."""
        plan = self._plan
        coalesce_sparse(plan.half)
        fresh_dst, fresh_src, acc_dst, acc_src, sparse = [], [], [], [], []
        for model_p, master in zip(plan.half, plan.masters):
            grad = model_p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                sparse.append((master, grad.float()))
            elif master.grad is None:
                master.grad = torch.empty_like(master)
                fresh_dst.append(master.grad)
                fresh_src.append(grad)
            else:
                acc_dst.append(master.grad)
                acc_src.append(grad)
        if fresh_dst:
            # Copy, then unscale below with the FP32 params' grads. Unscaling each large FP16 grad into
            # its master in one pass saves bytes but costs a launch per tensor: no faster on an H100.
            _torch_compat.foreach_copy_(fresh_dst, fresh_src)
        new, accumulating, previous = split_new_grads(plan.fp32, fp32_aside)
        scaler.unscale_(fresh_dst + new + [g for _, g in sparse])  # one launch per (device, dtype)
        if accumulating:
            _torch_compat.foreach_add_(accumulating, previous)
        scaler.unscale_add_(acc_dst, acc_src)
        for master, grad in sparse:
            master.grad = grad if master.grad is None else master.grad + grad
        return bool(fresh_dst or acc_dst or sparse or new)

    def _restore_grads(self) -> None:
        aside, self._set_aside = self._set_aside, None
        if aside is None:
            return
        plan = self._plan
        half_before, fp32_aside = aside
        for p, old in zip(plan.half, half_before):
            p.grad = old
        if fp32_aside is None:  # there were none: drop what the aborted backward made
            for p in plan.fp32:
                p.grad = None
        elif fp32_aside is not _KEPT_ZEROS:
            for p, old in zip(plan.fp32, fp32_aside):
                p.grad = old
        else:  # known zeros were left in place: the aborted backward may have written into them
            grads = [g for p in plan.fp32 if (g := p.grad) is not None]
            if grads:
                _torch_compat.foreach_zero_(grads)
                if len(grads) == len(plan.fp32):  # zeros again, known as such
                    self._zeroed = (grads, list(map(_torch_compat.tensor_version, grads)))

    def _after_step(self) -> None:
        # The masters reach the model, their gradients are dropped (as Apex). copy_masters_to_model's body
        # inline: measured, one Python call per step fewer.
        plan = self._plan
        if plan.half:
            grad_was_enabled = torch.is_grad_enabled()
            _torch_compat.set_grad_enabled(False)
            try:
                _torch_compat.foreach_copy_(plan.half, plan.masters)
            finally:
                _torch_compat.set_grad_enabled(grad_was_enabled)
        for p in plan.masters:
            p.grad = None

    def materialise_master_grads(self) -> None:
        """Make sure the masters' FP32 gradients exist for user code about to read them (clipping, say): they
        always do here, from the block's exit on; the fused strategy makes them only when asked."""

    def _after_skip(self) -> None:
        if self._plan is not None:
            for p in self._plan.masters:
                p.grad = None

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Apex's ``zero_grad``: the model's grads zeroed in place (``set_to_none=True``: dropped), the
        masters' dropped. Not a move of the lifecycle: the state stays as it is."""
        plan = self._plan
        if plan is None:
            self._lazy_init()
            plan = self._plan
        if set_to_none:
            for p in plan.model_side:
                p.grad = None
            self._zeroed = None
        else:
            grads = [g for p in plan.model_side if (g := p.grad) is not None]
            for g in grads:
                if g.grad_fn is not None:
                    g.detach_()
                elif g.requires_grad:
                    g.requires_grad_(False)
            if grads:
                _torch_compat.foreach_zero_(grads)
            if plan.fp32 and len(grads) == len(plan.model_side):
                fp32_grads = grads[len(plan.half):]
                self._zeroed = (fp32_grads, list(map(_torch_compat.tensor_version, fp32_grads)))
            else:
                self._zeroed = None
        for p in plan.masters:
            p.grad = None

    # --- add_param_group and checkpoints ------------------------------------------------------------

    def _admit(self, params: List[torch.Tensor]) -> Any:
        return replace_with_masters(self._optimizer, params)

    def _admitted(self, admitted: Any) -> None:
        plan = self._plan
        half, masters, fp32 = admitted
        groups = list(zip(plan.fp16_groups, plan.fp32_from_fp16_groups, plan.fp32_from_fp32_groups))
        frozen = plan.frozen_half + [p for g in self._optimizer.param_groups[-1:] for p in g["params"]
                                     if p.dtype in HALF_TYPES]
        self._plan = MasterWeightsPlan(groups + [(half, masters, fp32)], frozen, param_counts(self._optimizer))

    def saved_masters(self) -> List[torch.Tensor]:
        """The masters' values for a checkpoint (stale ones refreshed first)."""
        self._lazy_init()
        self.refresh_from_model()
        return [m.detach() for m in self._plan.masters]

    def check_saved_masters(self, masters: Optional[List[torch.Tensor]]) -> None:
        """Raise if checkpointed ``masters`` (None: an Apex-era checkpoint without them) cannot be loaded.

        Raises:
            ValueError: if their number differs from this optimizer's masters.
        """
        own = self._lists("all_fp32_from_fp16_params").masters
        if masters is not None and len(masters) != len(own):
            raise ValueError(
                "The optimizer state_dict holds {} FP32 master weights but this optimizer has {}; it was saved "
                "from a different model or opt_level.".format(len(masters), len(own)))

    def restore_masters(self, masters: Optional[List[torch.Tensor]]) -> None:
        """After the optimizer's own state loaded: copy checkpointed ``masters`` in or, for an Apex-era
        checkpoint without them (None), rebuild the stale ones from the model at the next backward."""
        own = self._plan.masters
        if masters is None:
            self._refresh_from_model = True
        elif masters:
            with torch.no_grad():
                _torch_compat.foreach_copy_(own, [m.to(own[0].device) for m in masters])
            self._refresh_from_model = False

    # --- Apex's names for the lists and the gradient stashes ----------------------------------------

    @property
    def fp16_groups(self) -> List[List[torch.Tensor]]:
        return self._lists("fp16_groups").fp16_groups

    @property
    def fp32_from_fp16_groups(self) -> List[List[torch.Tensor]]:
        return self._lists("fp32_from_fp16_groups").fp32_from_fp16_groups

    @property
    def fp32_from_fp32_groups(self) -> List[List[torch.Tensor]]:
        return self._lists("fp32_from_fp32_groups").fp32_from_fp32_groups

    @property
    def all_fp16_params(self) -> List[torch.Tensor]:
        return self._lists("all_fp16_params").half

    @property
    def all_fp32_from_fp16_params(self) -> List[torch.Tensor]:
        return self._lists("all_fp32_from_fp16_params").masters

    @property
    def all_fp32_from_fp32_params(self) -> List[torch.Tensor]:
        return self._lists("all_fp32_from_fp32_params").fp32

    @property
    def all_fp16_grad_stash(self) -> List[Optional[torch.Tensor]]:
        return [None] * len(self._lists("all_fp16_grad_stash").half)  # Apex drops the half grads

    @property
    def all_fp32_from_fp32_grad_stash(self) -> List[Optional[torch.Tensor]]:
        plan = self._lists("all_fp32_from_fp32_grad_stash")
        aside = self._set_aside[1] if self._set_aside is not None else None
        return list(aside) if aside is not None and aside is not _KEPT_ZEROS else [None] * len(plan.fp32)


#: In ``_set_aside``: the FP32 gradients were known zeros, left in place for backward to add to.
_KEPT_ZEROS = ("kept in place: known zeros",)


def _known_zeros(params: List[torch.Tensor], zeroed: Optional[Tuple[List[torch.Tensor], List[int]]]) -> bool:
    """Whether every one of ``params`` holds the gradient amp's ``zero_grad`` zeroed, unwritten since."""
    if zeroed is None:
        return False
    grads, versions = zeroed
    if len(grads) != len(params):
        return False
    for p, g in zip(params, grads):
        if p.grad is not g:
            return False
    return list(map(_torch_compat.tensor_version, grads)) == versions


def master_params(optimizer: Any) -> Iterator[torch.Tensor]:
    """Yield the parameters an amp optimizer actually steps: the FP32 masters under O2/O5.

    Use it for gradient clipping: ``clip_grad_norm_(amp.master_params(optimizer), max_norm)``.

    Args:
        optimizer: an optimizer returned by ``amp.initialize`` (or any object with ``param_groups``).

    Yields:
        Each parameter of every param group, in order.
    """
    stash = getattr(optimizer, "_amp_stash", None)
    if isinstance(stash, MasterWeights):
        if stash._refresh_from_model:
            stash.refresh_from_model()
        stash.materialise_master_grads()
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p
