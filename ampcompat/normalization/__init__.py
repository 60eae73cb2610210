"""``apex.normalization`` on native PyTorch: Apex's fused layer/RMS norms as ``nn.LayerNorm``/``nn.RMSNorm``.

Apex's package exported the four modules; the functional forms live in
:mod:`ampcompat.normalization.fused_layer_norm` (as in Apex) and are re-exported here for convenience.
"""
from .fused_layer_norm import (FusedLayerNorm, FusedRMSNorm, MixedFusedLayerNorm, MixedFusedRMSNorm,
                               fused_layer_norm, fused_layer_norm_affine, fused_rms_norm, fused_rms_norm_affine,
                               mixed_dtype_fused_layer_norm_affine, mixed_dtype_fused_rms_norm_affine)

__all__ = [
    "FusedLayerNorm", "FusedRMSNorm", "MixedFusedLayerNorm", "MixedFusedRMSNorm",
    "fused_layer_norm", "fused_layer_norm_affine", "fused_rms_norm", "fused_rms_norm_affine",
    "mixed_dtype_fused_layer_norm_affine", "mixed_dtype_fused_rms_norm_affine",
]
