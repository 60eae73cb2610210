"""Opt levels as data, the validating ``Properties`` object, and Apex's printed option block.

Each opt level is one row of :data:`OPT_LEVELS`; nothing else in the package branches on a level's
name. Behaviour is keyed on properties instead (``patch_torch_functions`` means "autocast",
``cast_model_type`` means "cast the model", ``master_weights`` means "FP32 masters"). O0-O3 are
NVIDIA Apex's levels exactly; O4 (bf16 O1) and O5 (bf16 O2) are ROCm Apex's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from .option_validation import (
    check_cast_model_type,
    check_keep_batchnorm_fp32,
    check_loss_scale,
    check_master_weights,
)
from .process_state import warn_or_err

#: Options in Apex's print order. ``patch_torch_functions_type`` (ROCm's key) is printed only by
#: the levels that come from ROCm Apex, so NVIDIA levels print NVIDIA's block byte for byte.
_NVIDIA_KEYS: Tuple[str, ...] = (
    "enabled",
    "opt_level",
    "cast_model_type",
    "patch_torch_functions",
    "keep_batchnorm_fp32",
    "master_weights",
    "loss_scale",
)
_ROCM_KEYS: Tuple[str, ...] = _NVIDIA_KEYS[:4] + ("patch_torch_functions_type",) + _NVIDIA_KEYS[4:]


@dataclass(frozen=True)
class OptLevel:
    """One row of the opt-level table: the defaults a level sets, and how its block prints."""

    name: str
    brief: str
    defaults: Dict[str, Any]
    printed_keys: Tuple[str, ...] = _NVIDIA_KEYS
    key_width: int = 22


def _defaults(**kw: Any) -> Dict[str, Any]:
    return dict(enabled=True, **kw)


OPT_LEVELS: Dict[str, OptLevel] = {
    level.name: level
    for level in (
        OptLevel(
            "O0",
            "O0:  Pure FP32 training.\n",
            _defaults(opt_level="O0", cast_model_type=torch.float32, patch_torch_functions=False,
                      patch_torch_functions_type=None, keep_batchnorm_fp32=None, master_weights=False,
                      loss_scale=1.0),
        ),
        OptLevel(
            "O1",
            "O1:  Insert automatic casts around Pytorch functions and Tensor methods.\n",
            _defaults(opt_level="O1", cast_model_type=None, patch_torch_functions=True,
                      patch_torch_functions_type=torch.float16, keep_batchnorm_fp32=None,
                      master_weights=None, loss_scale="dynamic"),
        ),
        OptLevel(
            "O2",
            "O2:  FP16 training with FP32 batchnorm and FP32 master weights.\n",
            _defaults(opt_level="O2", cast_model_type=torch.float16, patch_torch_functions=False,
                      patch_torch_functions_type=None, keep_batchnorm_fp32=True, master_weights=True,
                      loss_scale="dynamic"),
        ),
        OptLevel(
            "O3",
            "O3:  Pure FP16 training.",
            _defaults(opt_level="O3", cast_model_type=torch.float16, patch_torch_functions=False,
                      patch_torch_functions_type=None, keep_batchnorm_fp32=False, master_weights=False,
                      loss_scale=1.0),
        ),
        OptLevel(
            "O4",
            "O4:  Insert automatic casts around Pytorch functions and Tensor methods.\n",
            _defaults(opt_level="O4", cast_model_type=None, patch_torch_functions=True,
                      patch_torch_functions_type=torch.bfloat16, keep_batchnorm_fp32=None,
                      master_weights=None, loss_scale=1.0),
            printed_keys=_ROCM_KEYS,
            key_width=26,
        ),
        OptLevel(
            "O5",
            "O5:  BFLOAT16 training with FP32 batchnorm and FP32 master weights.\n",
            _defaults(opt_level="O5", cast_model_type=torch.bfloat16, patch_torch_functions=None,
                      patch_torch_functions_type=None, keep_batchnorm_fp32=True, master_weights=True,
                      loss_scale=1.0),
            printed_keys=_ROCM_KEYS,
            key_width=26,
        ),
    )
}

#: Levels whose casts are inserted around functions (autocast) rather than into the model.
_FUNCTION_CASTING_LEVELS = frozenset(
    name for name, level in OPT_LEVELS.items() if level.defaults["patch_torch_functions"]
)

# Apex's sentence, then the two levels ampcompat adds.
_UNKNOWN_LEVEL = (
    "Unexpected optimization level {}. Options are 'O0', 'O1', 'O2', 'O3'.  Note that in `O0`, `O1`, etc., "
    "the prefix O is the letter O, not the number zero. ampcompat also accepts 'O4' and 'O5' (O1 and O2 in "
    "bfloat16, as in ROCm Apex)."
)

#: The order in which ``initialize`` applies user overrides (Apex's order).
OVERRIDE_ORDER: Tuple[str, ...] = (
    "enabled",
    "opt_level",
    "cast_model_type",
    "patch_torch_functions",
    "patch_torch_functions_type",
    "keep_batchnorm_fp32",
    "master_weights",
    "loss_scale",
)


def get_opt_level(name: Any) -> OptLevel:
    """Look up an opt level by name.

    Raises:
        RuntimeError: Apex's message for an unknown level (e.g. ``"01"`` typed with a zero).
    """
    try:
        return OPT_LEVELS[name]
    except (KeyError, TypeError):
        raise RuntimeError(_UNKNOWN_LEVEL.format(name)) from None


class Properties:
    """The active amp options, validated on assignment with Apex's rules and messages.

    Options live in ``self.options`` (a dict, as in Apex) and read as attributes:
    ``props.loss_scale``. Assigning an option runs its setter rule (Apex's ``apex/amp/frontend.py``).
    """

    def __init__(self) -> None:
        self.options: Dict[str, Any] = {
            "enabled": False,
            "opt_level": None,
            "cast_model_type": None,
            "patch_torch_functions": False,
            "patch_torch_functions_type": None,
            "keep_batchnorm_fp32": None,
            "master_weights": None,
            "loss_scale": 1.0,
        }

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError("'{}' object has no attribute '{}'".format(type(self).__name__, name))

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is None or name not in options:
            super().__setattr__(name, value)
            return
        options[name] = self._validated(name, value)

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _casts_functions(self) -> bool:
        return self.options["opt_level"] in _FUNCTION_CASTING_LEVELS

    def _validated(self, name: str, value: Any) -> Any:
        if name == "cast_model_type":
            if self._casts_functions() and value not in (None, False, torch.float32):
                warn_or_err(
                    "O1 inserts casts around Torch functions rather than model weights, so with O1, "
                    "the model weights themselves should remain FP32. If you wish to cast the model to "
                    "a different type, use opt_level='O2' or 'O3'. cast_model_type was {}".format(value)
                )
            return check_cast_model_type(value)
        if name == "patch_torch_functions":
            if not self._casts_functions() and value:
                warn_or_err(
                    "Currently, patch_torch_functions=True should only be set by selecting opt_level='O1'."
                )
            return value
        if name == "patch_torch_functions_type":
            if value is not None and value not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    "patch_torch_functions_type must be torch.float16, torch.bfloat16 or None, "
                    "found {}".format(value)
                )
            if value is not None and not self._casts_functions():
                warn_or_err(
                    "Currently, patch_torch_functions_type should only be set by selecting "
                    "opt_level='O1' or 'O4'."
                )
            return value
        if name == "keep_batchnorm_fp32":
            if self._casts_functions() and value is not None:
                warn_or_err(
                    "With opt_level O1, batchnorm functions are automatically patched to run in FP32, "
                    "so keep_batchnorm_fp32 should be None. keep_batchnorm_fp32 was {}".format(value)
                )
            return check_keep_batchnorm_fp32(value)
        if name == "master_weights":
            if self._casts_functions() and value is not None:
                warn_or_err(
                    "It doesn't make sense to use master_weights with O1. With O1, your model weights "
                    "themselves should be FP32."
                )
            return check_master_weights(value)
        if name == "loss_scale":
            return check_loss_scale(value)
        if name == "opt_level" and value is not None:
            get_opt_level(value)
        return value

    def apply_level(self, level: OptLevel) -> None:
        """Set every option to ``level``'s default, through the validating setters (Apex's order)."""
        for key, value in level.defaults.items():
            setattr(self, key, value)

    def autocast_dtype(self) -> torch.dtype:
        """The dtype O1-style autocast runs in (fp16 unless the level or an override says bf16)."""
        return self.options["patch_torch_functions_type"] or torch.float16


def format_options(properties: Properties, level: OptLevel) -> str:
    """Apex's ``"{:22} : {}"`` option lines, in Apex's key order."""
    return "\n".join(
        "{} : {}".format(key.ljust(level.key_width), properties.options[key]) for key in level.printed_keys
    )
