"""``apex.fused_dense`` on native PyTorch: ``FusedDense`` and ``FusedDenseGeluDense``."""
from .fused_dense import (FusedDense, FusedDenseGeluDense, dense_no_bias_function, fused_dense_function,
                          fused_dense_gelu_dense_function)

__all__ = ["FusedDense", "FusedDenseGeluDense", "fused_dense_function", "dense_no_bias_function",
           "fused_dense_gelu_dense_function"]
