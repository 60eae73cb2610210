"""Apex's ``apex.parallel`` on native ``torch.distributed``.

``DistributedDataParallel`` is torch's DDP configured like Apex's (see :mod:`.distributed`),
``SyncBatchNorm``/``convert_syncbn_model`` use torch.nn.SyncBatchNorm's kernels on GPUs, ``LARC`` is the module
holding the ``LARC`` optimizer wrapper, and ``multiproc`` is Apex's per-GPU launcher (not imported
here, so ``python -m ampcompat.parallel.multiproc`` runs it cleanly).
"""
from torch.distributed import ReduceOp

from . import LARC, distributed, sync_batchnorm  # noqa: F401  (submodules, as in Apex)
from .distributed import DistributedDataParallel, Reducer
from .sync_batchnorm import SyncBatchNorm, convert_syncbn_model, create_syncbn_process_group

__all__ = [
    "DistributedDataParallel",
    "Reducer",
    "SyncBatchNorm",
    "convert_syncbn_model",
    "create_syncbn_process_group",
    "ReduceOp",
    "LARC",
    "distributed",
    "sync_batchnorm",
]
