"""Apex's ``apex.parallel.optimized_sync_batchnorm`` module path: the same ``SyncBatchNorm``."""
from .sync_batchnorm import SyncBatchNorm  # noqa: F401
