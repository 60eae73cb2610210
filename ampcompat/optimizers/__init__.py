"""``apex.optimizers`` on native PyTorch: Apex's fused optimizers with Apex's signatures and defaults.

Adam/AdamW, SGD and Adagrad run torch's own fused (or foreach) kernels; LAMB (also
``FusedMixedPrecisionLamb``, with FP32 masters of FP16/BF16 parameters) and NovoGrad, which torch lacks,
are written with ``torch._foreach_*``. All are ordinary ``torch.optim.Optimizer`` subclasses, so
they work with ``amp.initialize`` at every opt level, LR schedulers and ``torch.amp.GradScaler``.

``FP16_Optimizer`` and ``FusedAdam``'s 2019 keywords and ``step`` arguments are the API this package had
until September 2019 (see ``fp16_optimizer``).
"""
from .fp16_optimizer import FP16_Optimizer
from .fused_adagrad import FusedAdagrad
from .fused_adam import FusedAdam
from .fused_lamb import FusedLAMB
from .fused_mixed_precision_lamb import FusedMixedPrecisionLamb
from .fused_novograd import FusedNovoGrad
from .fused_sgd import FusedSGD

__all__ = ["FP16_Optimizer", "FusedAdagrad", "FusedAdam", "FusedLAMB", "FusedMixedPrecisionLamb", "FusedNovoGrad", "FusedSGD"]
