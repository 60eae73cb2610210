"""``apex.fp16_utils`` on native PyTorch: FP16 model casting, manual master weights, ``FP16_Optimizer``.

The names (and what ``from ampcompat.fp16_utils import *`` brings) are exactly Apex's. Note the
two ``LossScaler`` classes: the one exported here is the legacy static scaler whose ``loss_scale``
is a property; ``FP16_Optimizer`` itself uses amp's ``ampcompat.amp.scaler.LossScaler``.
"""
from . import fp16_optimizer, fp16util, loss_scaler
from .fp16_optimizer import FP16_Optimizer
from .fp16util import (
    BN_convert_float,
    FP16Model,
    clip_grad_norm,
    convert_module,
    convert_network,
    master_params_to_model_params,
    model_grads_to_master_grads,
    network_to_half,
    prep_param_lists,
    to_python_float,
    tofp16,
)
from .loss_scaler import DynamicLossScaler, LossScaler

__all__ = [
    "BN_convert_float",
    "DynamicLossScaler",
    "FP16Model",
    "FP16_Optimizer",
    "LossScaler",
    "clip_grad_norm",
    "convert_module",
    "convert_network",
    "fp16_optimizer",
    "fp16util",
    "loss_scaler",
    "master_params_to_model_params",
    "model_grads_to_master_grads",
    "network_to_half",
    "prep_param_lists",
    "to_python_float",
    "tofp16",
]
