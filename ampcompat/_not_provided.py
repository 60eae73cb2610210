"""Apex modules ampcompat does not provide: importing one raises :class:`ApexModuleNotProvided`.

Each such module is a three-line stub under the Apex path it stands for (``ampcompat/transformer``,
``ampcompat/contrib/sparsity``, ...) that calls :func:`refuse_import` with its own ``__name__``. The
error is a ``ModuleNotFoundError`` (so an ``ImportError``): code that guards an Apex import with
``try/except ImportError`` -- as code must for Apex's optional extensions -- takes its fallback, and
code that needs the module stops at the import, with a message naming the native replacement,
instead of failing later in the middle of a run.
"""
from __future__ import annotations

from typing import Dict, NoReturn, Tuple

__all__ = ["ApexModuleNotProvided", "NOT_PROVIDED", "refuse_import", "message_for"]


class ApexModuleNotProvided(ModuleNotFoundError):
    """An Apex module that ampcompat does not stand in for was imported.

    Attributes:
        name: the ampcompat module that refused (``ampcompat.transformer``).
        apex_name: the Apex path (``apex.transformer``).
    """

    def __init__(self, message: str, *, name: str, apex_name: str) -> None:
        super().__init__(message, name=name)
        self.apex_name = apex_name


NOT_PROVIDED: Dict[str, Tuple[str, str]] = {
    # apex path: (what it was, what to use instead)
    "apex.transformer": (
        "Apex's Megatron-style tensor/pipeline parallelism (parallel_state, tensor_parallel, pipeline_parallel)",
        "Megatron-Core (`pip install megatron-core`: `megatron.core.parallel_state`, `megatron.core.tensor_parallel`),"
        " or torch.distributed.tensor.parallel / torch.distributed.pipelining"),
    "apex.RNN": ("Apex's pre-cuDNN RNN cells (removed from Apex in 2019)", "torch.nn.LSTM / torch.nn.GRU / torch.nn.RNN"),
    "apex.pyprof": ("Apex's NVTX profiler (moved out of Apex in 2020)",
                    "torch.autograd.profiler.emit_nvtx() with Nsight Systems, or torch.profiler"),
    "apex.contrib.sparsity": (
        "ASP, Apex's 2:4 structured-sparsity pruning",
        "torch.ao.pruning (WeightNormSparsifier(sparse_block_shape=(1, 4), zeros_per_block=2)) and "
        "torch.sparse.to_sparse_semi_structured for 2:4 sparse inference"),
    "apex.contrib.multihead_attn": (
        "SelfMultiheadAttn / EncdecMultiheadAttn, Apex's fused multi-head attention",
        "torch.nn.MultiheadAttention or torch.nn.functional.scaled_dot_product_attention"),
    "apex.contrib.fmha": ("Apex's fused multi-head attention kernels (FMHA)",
                          "torch.nn.functional.scaled_dot_product_attention"),
    "apex.contrib.bottleneck": ("Apex's fused ResNet bottleneck blocks (cuDNN fusions, spatial halo exchange)",
                                "torchvision.models.resnet.Bottleneck with channels_last and torch.compile"),
    "apex.contrib.conv_bias_relu": ("Apex's fused convolution + bias (+ mask) + ReLU",
                                    "torch.nn.Conv2d followed by torch.relu, under torch.compile"),
    "apex.contrib.groupbn": ("Apex's NHWC batch norm with group (multi-GPU) statistics",
                             "torch.nn.SyncBatchNorm (with a process group) on channels_last tensors"),
    "apex.contrib.cudnn_gbn": ("Apex's cuDNN group batch norm", "torch.nn.SyncBatchNorm with a process group"),
    "apex.contrib.index_mul_2d": ("Apex's fused index + multiply", "`in1[idx1] * in2` (torch.index_select)"),
    "apex.contrib.transducer": ("Apex's RNN-T joint network and loss",
                                "torchaudio.functional.rnnt_loss (and a plain broadcast add for the joint)"),
    "apex.contrib.peer_memory": ("Apex's CUDA peer-memory halo exchangers",
                                 "torch.distributed send/recv or torch.distributed._symmetric_memory"),
    "apex.contrib.nccl_allocator": ("Apex's NCCL memory-pool allocator",
                                    "torch.cuda.MemPool with an NCCL allocator (torch.distributed)"),
    "apex.contrib.gpu_direct_storage": ("Apex's GPUDirect Storage bindings", "torch.cuda.gds"),
    "apex.contrib.openfold_triton": ("Apex's Triton kernels for OpenFold",
                                     "torch.nn.functional.layer_norm / scaled_dot_product_attention (OpenFold's own "
                                     "kernels), under torch.compile"),
    "apex.contrib.torchsched": ("Apex's multi-stream scheduling backend for torch.compile", "torch.compile"),
    "apex.contrib.optimizers.distributed_fused_adam": (
        "DistributedFusedAdam, Apex's ZeRO-sharded Adam",
        "torch.distributed.fsdp.fully_shard (FSDP2) or torch.distributed.optim.ZeroRedundancyOptimizer with "
        "torch.optim.AdamW(fused=True)"),
    "apex.contrib.optimizers.distributed_fused_lamb": (
        "DistributedFusedLAMB, Apex's ZeRO-sharded LAMB",
        "torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=ampcompat.optimizers.FusedLAMB)"),
}
"""Every Apex module path that imports as a refusal, with what it was and its native replacement."""


def _apex_name(module_name: str) -> str:
    return "apex" + module_name[len("ampcompat"):] if module_name.startswith("ampcompat.") else module_name


def message_for(apex_name: str) -> str:
    """The error message for importing ``apex_name`` (a key of :data:`NOT_PROVIDED`).

    Raises:
        KeyError: if ``apex_name`` is not one of the refused modules.
    """
    what, instead = NOT_PROVIDED[apex_name]
    return (f"{apex_name} is not provided by ampcompat: {what}. Use {instead} instead, or install an NVIDIA Apex "
            f"built with this extension. See 'Apex modules ampcompat does not provide' in migration_guide.md.")


def refuse_import(module_name: str) -> NoReturn:
    """Raise :class:`ApexModuleNotProvided` for the stub module ``module_name`` (its ``__name__``).

    Raises:
        ApexModuleNotProvided: always.
    """
    apex_name = _apex_name(module_name)
    raise ApexModuleNotProvided(message_for(apex_name), name=module_name, apex_name=apex_name)
