"""One training-step recipe per precision mode, so every benchmark compares modes on the same footing.

A recipe owns a (model, optimizer) pair prepared for its mode and splits a training step into the
phases the speed benchmark times separately::

    with recipe.autocast():
        loss = loss_fn(recipe.model(recipe.cast_inputs(x)), y)
    recipe.scaled(loss).backward()   # GradScaler.scale / entering amp.scale_loss
    recipe.after_backward()          # leaving amp.scale_loss (unscale + overflow check)
    recipe.clip(max_norm)            # optional
    recipe.step()                    # optimizer.step / GradScaler.step + update
    recipe.zero_grad()

Modes:
    fp32         FP32 model and optimizer, no autocast.
    native_fp16  ``torch.autocast(float16)`` + ``torch.amp.GradScaler``.
    native_bf16  ``torch.autocast(bfloat16)``, no scaler.
    pure_fp16    the model cast to fp16 (affine BatchNorm kept FP32, as O2 does), the optimizer stepping
                 the fp16 parameters directly: no master weights, no loss scaling. The speed floor for O2.
    manual_o2    O2 written by hand on native PyTorch, as a user migrating off Apex would: the fp16 model,
                 FP32 master copies stepped by the optimizer, ``torch.amp.GradScaler`` on the masters.
    O0 ... O5    ampcompat's ``amp.initialize(model, optimizer, opt_level=...)`` (O4/O5 are bf16).
    O2_unfused   ampcompat O2 with ``AMPCOMPAT_FUSED_O2=0`` set around ``amp.initialize``: the path O2 took
                 before the fused step (and takes where the fused step does not apply).

ampcompat is imported lazily so the native modes work (and can be tested) without it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

AMPCOMPAT_LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")
#: ampcompat modes beside the levels: ``mode -> (opt level, environment set around amp.initialize)``.
AMPCOMPAT_VARIANTS = {"O2_unfused": ("O2", {"AMPCOMPAT_FUSED_O2": "0"})}
NATIVE_MODES = ("fp32", "native_fp16", "native_bf16", "pure_fp16", "manual_o2")
ALL_MODES = NATIVE_MODES + AMPCOMPAT_LEVELS + tuple(AMPCOMPAT_VARIANTS)

MODE_DESCRIPTIONS: Dict[str, str] = {
    "fp32": "FP32, no autocast",
    "native_fp16": "torch.autocast fp16 + GradScaler",
    "native_bf16": "torch.autocast bf16, no scaler",
    "pure_fp16": "fp16 params, no masters, no scaler (floor)",
    "manual_o2": "hand-written O2: fp16 model, FP32 masters, GradScaler",
    "O0": "ampcompat O0 (FP32)",
    "O1": "ampcompat O1 (autocast fp16, dynamic scale)",
    "O2": "ampcompat O2 (fp16 model, FP32 masters, dynamic scale; the fused O2 step where it applies)",
    "O2_unfused": "ampcompat O2 with the fused step switched off (AMPCOMPAT_FUSED_O2=0): FP32 master grads, "
                  "the optimizer's own step, the copy back",
    "O3": "ampcompat O3 (pure fp16, static scale 1)",
    "O4": "ampcompat O4 (autocast bf16, no scaling)",
    "O5": "ampcompat O5 (bf16 model, FP32 masters, no scaling)",
}

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_adamw_factory(
    lr: float,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    param_groups: Optional[Callable[[nn.Module], List[dict]]] = None,
    fused: bool = True,
) -> OptimizerFactory:
    """A function building ``torch.optim.AdamW`` over a model (fused kernel where the device has one).

    Args:
        lr, weight_decay, betas, eps: AdamW hyper-parameters, identical for every mode.
        param_groups: optional ``model -> list of param-group dicts`` (e.g. no decay on norms).
        fused: ask for ``fused=True``; falls back to the ``foreach`` implementation where the
            parameters' device or dtype has no fused AdamW.
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def build(model: nn.Module) -> torch.optim.Optimizer:
        params = list(param_groups(model) if param_groups is not None else model.parameters())
        if fused:
            try:
                return torch.optim.AdamW(params, fused=True, **hyper)
            except RuntimeError:  # no fused AdamW for this device or dtype
                pass
        return torch.optim.AdamW(params, foreach=True, **hyper)

    return build


def autocast_dtype_for(device: torch.device, dtype: torch.dtype) -> ContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype)


class Recipe:
    """FP32 training; the base every other mode refines.

    Attributes:
        name: the mode's name (a key of ``MODE_DESCRIPTIONS``).
        model, optimizer: the objects to train (already prepared for the mode).
        last_step_skipped: whether the most recent step was skipped because of inf/NaN gradients;
            only maintained when ``track_skips`` is true (tracking costs host syncs for some modes).
    """

    name = "fp32"

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device,
                 track_skips: bool = False):
        self.device = device
        self.track_skips = track_skips
        self.last_step_skipped = False
        self.model = self._prepare_model(model)
        self.optimizer = make_optimizer(self.model)
        self._finish_setup()

    # Hooks for subclasses -------------------------------------------------------------------------
    def _prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def _finish_setup(self) -> None:
        pass

    # The phases of a step ---------------------------------------------------------------------------
    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    def cast_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs as this mode's model expects them (only the pure-fp16 model needs a cast)."""
        return inputs

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_backward(self) -> None:
        pass

    def clip_params(self) -> Iterable[torch.Tensor]:
        # The optimizer's order (as amp.master_params gives it), so every mode sums the norm alike.
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.clip_params(), max_norm)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def loss_scale(self) -> Optional[float]:
        """The current loss scale, or ``None`` for modes without loss scaling."""
        return None

    def close(self) -> None:
        """Undo any process-wide state the mode installed (ampcompat's amp state)."""

    def paths(self) -> Optional[dict]:
        """How gradients reached the update, where the mode has a choice (ampcompat's O2/O5); else None."""
        return None

    # The whole step -----------------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                   clip_norm: float = 0.0) -> torch.Tensor:
        """One optimisation step; returns the detached loss (no host sync)."""
        with self.autocast():
            loss = loss_fn(self.model(self.cast_inputs(inputs)), targets)
        self.scaled(loss).backward()
        self.after_backward()
        if clip_norm:
            self.clip(clip_norm)
        self.step()
        self.zero_grad()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        with self.autocast():
            return loss_fn(self.model(self.cast_inputs(inputs)), targets).float()


class NativeBF16(Recipe):
    name = "native_bf16"

    def autocast(self) -> ContextManager:
        return autocast_dtype_for(self.device, torch.bfloat16)


class NativeFP16(Recipe):
    """``torch.autocast`` fp16 with ``torch.amp.GradScaler``, unscaled before clipping as documented."""

    name = "native_fp16"

    def _finish_setup(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type)

    def autocast(self) -> ContextManager:
        return autocast_dtype_for(self.device, torch.float16)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def clip(self, max_norm: float) -> None:
        self.scaler.unscale_(self.optimizer)
        super().clip(max_norm)

    def step(self) -> None:
        before = self.scaler.get_scale() if self.track_skips else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.track_skips:
            self.last_step_skipped = self.scaler.get_scale() < before

    def loss_scale(self) -> Optional[float]:
        return float(self.scaler.get_scale())


def cast_model_keep_batchnorm(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter and buffer to ``dtype`` except affine BatchNorm layers."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.float()
    return model


class PureFP16(Recipe):
    """fp16 parameters stepped directly: the cost of O2 minus masters and loss scaling."""

    name = "pure_fp16"

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        return cast_model_keep_batchnorm(model, torch.float16)

    def cast_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.half() if inputs.is_floating_point() else inputs


class ManualO2(NativeFP16):
    """O2 by hand: an fp16 model (affine BatchNorm FP32), FP32 masters, ``GradScaler`` on the masters.

    After backward the fp16 gradients are copied into the masters' FP32 gradients and unscaled there
    (``scaler.unscale_``: the check and the division in one multi-tensor pass); ``scaler.step`` lets a
    fused optimizer skip an overflowing step on the device; the masters are copied back afterwards.
    """

    name = "manual_o2"

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device,
                 track_skips: bool = False):
        model = cast_model_keep_batchnorm(model, torch.float16)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        self.masters = [p.detach().float().requires_grad_(True) if p.dtype == torch.float16 else p
                        for p in self.model_params]
        self._half_pairs = [(p, m) for p, m in zip(self.model_params, self.masters) if p is not m]
        super().__init__(model, lambda _model: make_optimizer(_MasterView([n for n, _ in named], self.masters)), device, track_skips)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    def cast_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.half() if inputs.is_floating_point() else inputs

    def after_backward(self) -> None:
        models = [p for p, _ in self._half_pairs if p.grad is not None]
        masters = [m for p, m in self._half_pairs if p.grad is not None]
        for m in masters:
            m.grad = torch.empty_like(m)
        if masters:
            torch._foreach_copy_([m.grad for m in masters], [p.grad for p in models])
        self.scaler.unscale_(self.optimizer)

    def clip(self, max_norm: float) -> None:
        Recipe.clip(self, max_norm)  # already unscaled in after_backward

    def step(self) -> None:
        super().step()
        with torch.no_grad():
            torch._foreach_copy_([p for p, _ in self._half_pairs], [m for _, m in self._half_pairs])

    def zero_grad(self) -> None:
        super().zero_grad()
        for p in self.model_params:
            p.grad = None


class _MasterView(nn.Module):
    """A model's parameter names over its FP32 masters, for a model-taking optimizer factory."""

    def __init__(self, names: List[str], masters: List[torch.Tensor]):
        super().__init__()
        self._named = list(zip(names, masters))

    def parameters(self, recurse: bool = True):  # noqa: D102 - mirrors nn.Module.parameters
        return iter([p for _, p in self._named])

    def named_parameters(self, *args, **kwargs):  # noqa: D102
        return iter(self._named)


class Ampcompat(Recipe):
    """``amp.initialize`` at one opt level, then Apex's ``scale_loss`` protocol.

    The ``with amp.scale_loss(...)`` block is entered and left by hand (as Lightning did) so the
    benchmark can time its entry and exit separately from ``backward()``.
    """

    def __init__(self, opt_level: str, model: nn.Module, make_optimizer: OptimizerFactory,
                 device: torch.device, track_skips: bool = False, name: Optional[str] = None,
                 environment: Optional[Dict[str, str]] = None):
        self.name = name or opt_level
        self.opt_level = opt_level
        self._environment = environment or {}
        import ampcompat  # noqa: PLC0415
        from ampcompat import amp  # noqa: PLC0415

        self._ampcompat = ampcompat
        self.amp = amp
        ampcompat.reset()
        self._scale_ctx = None
        self._scale_before: Optional[float] = None
        try:
            super().__init__(model, make_optimizer, device, track_skips)
        except BaseException:
            ampcompat.reset()  # leave no half-initialised amp state (e.g. O1's autocast) to the next mode
            raise

    def _finish_setup(self) -> None:
        saved = {key: os.environ.get(key) for key in self._environment}
        os.environ.update(self._environment)  # read by amp.initialize (the fused O2 step's switch)
        try:
            self.model, self.optimizer = self.amp.initialize(
                self.model, self.optimizer, opt_level=self.opt_level, verbosity=0
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def paths(self) -> Optional[dict]:
        """How the optimizer's gradients reached the update (O2/O5: ``unscale_paths`` and ``unfused_reason``)."""
        stash = getattr(self.optimizer, "_amp_stash", None)
        if stash is None or not hasattr(stash, "unfused_reason"):
            return None
        return {"unscale_paths": dict(stash.unscale_paths), "unfused_reason": stash.unfused_reason}

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        self._scale_ctx = self.amp.scale_loss(loss, self.optimizer)
        self._scale_before = self.loss_scale() if self.track_skips else None
        return self._scale_ctx.__enter__()

    def after_backward(self) -> None:
        ctx, self._scale_ctx = self._scale_ctx, None
        ctx.__exit__(None, None, None)
        if self.track_skips:
            self.last_step_skipped = self._pending_skip()

    def _pending_skip(self) -> bool:
        stash = getattr(self.optimizer, "_amp_stash", None)
        if stash is not None and hasattr(stash, "already_patched"):
            return bool(stash.already_patched)
        return self.loss_scale() < self._scale_before

    def clip_params(self) -> Iterable[torch.Tensor]:
        return self.amp.master_params(self.optimizer)

    def loss_scale(self) -> Optional[float]:
        return float(self.amp._amp_state.loss_scalers[0].loss_scale())

    def close(self) -> None:
        self._ampcompat.reset()


def make_recipe(name: str, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device,
                track_skips: bool = False) -> Recipe:
    """Prepare ``model`` (FP32, already on ``device``) and a fresh optimizer for mode ``name``.

    Raises:
        ValueError: for an unknown mode name.
    """
    if name in AMPCOMPAT_LEVELS:
        return Ampcompat(name, model, make_optimizer, device, track_skips)
    if name in AMPCOMPAT_VARIANTS:
        level, environment = AMPCOMPAT_VARIANTS[name]
        return Ampcompat(level, model, make_optimizer, device, track_skips, name=name, environment=environment)
    classes = {cls.name: cls for cls in (Recipe, NativeFP16, NativeBF16, PureFP16, ManualO2)}
    if name not in classes:
        raise ValueError(f"Unknown mode {name!r}; choose from {', '.join(ALL_MODES)}.")
    return classes[name](model, make_optimizer, device, track_skips)


def parse_modes(text: str, allowed=ALL_MODES) -> List[str]:
    """Split a comma-separated mode list, checking each name.

    Raises:
        ValueError: naming the unknown modes and the allowed ones.
    """
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in allowed]
    if unknown or not modes:
        raise ValueError(f"Unknown mode(s) {unknown or text!r}; choose from {', '.join(allowed)}.")
    return modes
