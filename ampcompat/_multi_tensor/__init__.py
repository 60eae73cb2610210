"""Multi-tensor math shared by Apex's ``amp_C`` kernels and ``apex.optimizers``: tensor-list bookkeeping
(``tensor_lists``) and the fused optimizers' update rules (``update_rules``), on ``torch._foreach_*``.

Private to ampcompat: neither module is an Apex path. ``amp_C`` and ``optimizers`` both build on it,
so neither imports the other's internals.
"""
