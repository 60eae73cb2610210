"""Models and data shared by the benchmarks: a byte-level GPT-style LM, the standard library as corpus.

Everything here is deterministic given a seed, needs no download, and runs on any device, so that every
precision mode of a benchmark trains the same network on the same bytes in the same order.
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Data: the standard library's own source files
# --------------------------------------------------------------------------------------------------

VAL_EVERY_NTH_FILE = 10
# Directories under the standard library that are not its own source, or are mostly data tables.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})


def stdlib_source_files() -> List[Path]:
    """The standard library's ``.py`` files (tests, installed packages and codec tables excluded).

    Sorted by path relative to the library root, so the order (and the split built on it) is the
    same on every run of the same Python.
    """
    root = Path(os.path.dirname(os.__file__))
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        found += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (uint8 tensors on the CPU), split by file."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: Tuple[str, ...]
    val_files: Tuple[str, ...]

    def describe(self) -> dict:
        return {
            "source": f"Python {platform.python_version()} standard library .py files (no tests)",
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "split": f"every {VAL_EVERY_NTH_FILE}th file (sorted by name) is validation",
        }


def load_stdlib_corpus(max_files: Optional[int] = None) -> Corpus:
    """Read the standard library's sources into a fixed train/validation split.

    Every ``VAL_EVERY_NTH_FILE``-th file in name order is held out, so both halves sample the
    whole alphabet of modules and no file contributes to both.

    Args:
        max_files: read only the first ``max_files`` files (quick tests); ``None`` reads all.

    Raises:
        RuntimeError: if the standard library's sources cannot be found (e.g. a zipped stdlib).
    """
    files = stdlib_source_files()
    if max_files is not None:
        files = files[:max_files]
    if len(files) < VAL_EVERY_NTH_FILE:
        raise RuntimeError(
            f"Found only {len(files)} .py files next to {os.__file__}; the benchmarks need the "
            "standard library as plain source files (not a zipped stdlib)."
        )
    root = os.path.dirname(os.__file__)
    train_parts, val_parts, train_names, val_names = [], [], [], []
    for index, path in enumerate(files):
        raw, name = path.read_bytes(), os.path.relpath(path, root)
        if index % VAL_EVERY_NTH_FILE == VAL_EVERY_NTH_FILE - 1:
            val_parts.append(raw)
            val_names.append(name)
        else:
            train_parts.append(raw)
            train_names.append(name)
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train_parts), as_tensor(val_parts), tuple(train_names), tuple(val_names))


def byte_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, seed: int, device: torch.device | str = "cpu"
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of ``(inputs, targets)`` windows drawn at random offsets of ``data``.

    The offsets come from a private ``torch.Generator`` seeded with ``seed``, so two streams with the
    same arguments yield identical batches whatever else the process does with the global RNG.
    Targets are the inputs shifted by one byte. Both are int64 tensors of shape ``(batch, seq_len)``.
    """
    if data.numel() <= seq_len + 1:
        raise ValueError(f"Corpus of {data.numel()} bytes is too short for windows of {seq_len + 1} bytes.")
    generator = torch.Generator().manual_seed(seed)
    window = torch.arange(seq_len + 1)
    non_blocking = torch.device(device).type == "cuda"
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        chunk = data[starts.unsqueeze(1) + window].long()
        if non_blocking:
            chunk = chunk.pin_memory()
        chunk = chunk.to(device, non_blocking=non_blocking)
        yield chunk[:, :-1], chunk[:, 1:]


def fixed_batches(
    data: torch.Tensor, count: int, batch_size: int, seq_len: int, seed: int, device: torch.device | str = "cpu"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches from :func:`byte_batches`, materialised (a fixed evaluation set)."""
    stream = byte_batches(data, batch_size, seq_len, seed, device)
    return [next(stream) for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# Byte-level GPT-style language model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """Shape of :class:`GPT`. The defaults are a small byte-level model."""

    vocab_size: int = 256
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    tie_weights: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


GPT2_124M = GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.d_model % config.n_head:
            raise ValueError(f"d_model={config.d_model} is not divisible by n_head={config.n_head}.")
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        heads = lambda t: t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x GELU MLP, each with a residual connection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2-style decoder: token + learned position embeddings, pre-norm blocks, tied output head.

    ``forward(tokens)`` takes int64 ``(batch, time)`` and returns logits ``(batch, time, vocab)``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                is_residual_out = name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight")
                nn.init.normal_(param, mean=0.0, std=residual_std if is_residual_out else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        time = tokens.shape[1]
        if time > self.config.seq_len:
            raise ValueError(f"Sequence of {time} tokens is longer than the model's seq_len={self.config.seq_len}.")
        positions = torch.arange(time, device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in FP32 whatever the logits' dtype."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def gpt_train_flops(config: GPTConfig, batch_size: int) -> float:
    """Approximate FLOPs of one training step (forward + backward) of :class:`GPT`.

    Uses the usual 6 * params * tokens for the dense layers plus 12 * layers * tokens * seq * width for
    the attention score and value products (forward 2 products x 2 FLOPs, backward twice that).
    """
    d, layers, seq = config.d_model, config.n_layer, config.seq_len
    dense_params = layers * 12 * d * d + config.vocab_size * d
    tokens = batch_size * seq
    return 6.0 * dense_params * tokens + 12.0 * layers * tokens * seq * d


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """AdamW parameter groups: decay on matrices, none on biases, norms and position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "wpe" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# Other speed-benchmark workloads
# --------------------------------------------------------------------------------------------------


def build_mlp(width: int = 256, depth: int = 4, in_features: int = 256, classes: int = 10) -> nn.Module:
    """A plain ReLU MLP: ``depth`` hidden layers of ``width``, small enough that host time dominates."""
    layers: List[nn.Module] = []
    features = in_features
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)


def torchvision_or_none() -> Optional[ModuleType]:
    """``torchvision.models`` if torchvision imports cleanly, else ``None`` (ResNet is then skipped)."""
    try:
        import torchvision.models as models
    except Exception:  # ImportError, or a torchvision built for another torch
        return None
    return models


def build_resnet(tiny: bool) -> nn.Module:
    """torchvision ResNet-50 (ImageNet head), or ResNet-18 with 10 classes for tiny smoke runs.

    Raises:
        ImportError: when torchvision is not importable.
    """
    models = torchvision_or_none()
    if models is None:
        raise ImportError("torchvision is not importable; the ResNet workload needs it.")
    return models.resnet18(num_classes=10) if tiny else models.resnet50()


class _BasicBlock(nn.Module):
    """ResNet's two-3x3-conv residual block (BatchNorm after each conv, projection shortcut when needed)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 images, as CIFAR research code writes it: a 3x3 stem without max-pooling,
    four stages of two basic blocks (``width``, 2x, 4x, 8x channels), global average pool, linear head.

    At ``width=64`` it has 11.2M parameters, the network of the common CIFAR-10 training scripts.
    """

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks: List[nn.Module] = []
        in_channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            channels = width * 2 ** stage
            blocks += [_BasicBlock(in_channels, channels, stride), _BasicBlock(channels, channels, 1)]
            in_channels = channels
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
