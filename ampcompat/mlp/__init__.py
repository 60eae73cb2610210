"""``apex.mlp`` on native PyTorch: ``MLP`` and ``mlp_function`` as ``torch.nn.functional.linear`` layers."""
from .mlp import MLP, mlp_function

__all__ = ["MLP", "mlp_function"]
