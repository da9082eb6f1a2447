"""CIFAR-style ResNet-20 (He et al., 2016, "Deep Residual Learning for Image Recognition", §4.2) whose
downsampling positions are a config, the search space of pooling/downsampling-architecture search.

A 3x3 conv stem (layer 0) is followed by ``num_blocks`` basic blocks (block k holds conv layers 2k+1 and 2k+2)::

    y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))

where block k uses stride s = 2 and doubles the channel count iff ``k in downsample_at``. The standard ResNet-20
(9 blocks, 16-32-64 channels) downsamples at blocks (3, 6), i.e. at conv layers (7, 13): see
:func:`layers_to_blocks`. Global average pooling and a Dense head give the logits.

``shortcut``: "A" (He et al.'s CIFAR choice: identity, subsampled by the stride and zero-padded to the new channel
count, parameter-free) or "B" (1x1 conv + BN projection where the shape changes).

Parameter paths: ``stem_conv``, ``stem_bn``, ``block_{k}/{conv1,bn1,conv2,bn2}`` (+ ``block_{k}/shortcut_conv``,
``block_{k}/shortcut_bn`` with "B"), ``head``; the BatchNorm running statistics live in ``batch_stats`` with the
same paths. ``__call__(x, train=False)``: ``train=True`` normalizes with batch statistics and updates
``batch_stats`` (``mutable=["batch_stats"]``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = ["ResNet", "ResNetBlock", "ResNet20", "layers_to_blocks", "RESNET_RULES_DP", "RESNET_RULES_TP"]


def layers_to_blocks(layers: Sequence[int]) -> tuple[int, ...]:
    """Conv-layer indices of downsampling (stem = layer 0, block k's first conv = layer 2k+1) -> block indices:
    ``layers_to_blocks((7, 13)) == (3, 6)``. Only a block's first conv can carry the stride."""
    out = []
    for layer in layers:
        if layer < 1 or layer % 2 == 0:
            raise ValueError(f"downsampling conv layer {layer} is not the first conv of a block (odd index >= 1)")
        out.append((layer - 1) // 2)
    return tuple(out)


class ResNetBlock(nn.Module):
    """One basic block ``y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))`` (He et al., 2016, §4.2) on NHWC
    ``x [B, H, W, C] -> [B, H/s, W/s, features]``, ``s = stride``. ``shortcut`` "A" (identity, subsampled and
    zero-padded to ``features`` channels) or "B" (1x1 conv + BN projection) where the shape changes; parameters
    ``conv1``, ``bn1``, ``conv2``, ``bn2`` (+ ``shortcut_conv``, ``shortcut_bn``). ``__call__(x, train=False)``."""

    features: int
    stride: int = 1
    shortcut: str = "A"
    momentum: float = 0.9
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                                       dtype=self.dtype, name=name)
        conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding="SAME" if k > 1 else "VALID",
                                             use_bias=False, dtype=self.dtype, name=name)
        y = nn.relu(bn("bn1")(conv(self.features, 3, self.stride, "conv1")(x)))
        y = bn("bn2")(conv(self.features, 3, 1, "conv2")(y))
        r = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "B":
                r = bn("shortcut_bn")(conv(self.features, 1, self.stride, "shortcut_conv")(x))
            else:
                r = x[:, :: self.stride, :: self.stride, :]
                pad = self.features - x.shape[-1]
                r = jnp.pad(r, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
        return nn.relu(y + r)


class ResNet(nn.Module):
    """Images ``[B, H, W, C]`` -> logits ``[B, num_classes]``; ``downsample_at`` are block indices (0-based)."""

    num_blocks: int = 9
    downsample_at: Sequence[int] = (3, 6)
    width: int = 16
    num_classes: int = 10
    shortcut: str = "A"
    momentum: float = 0.9
    dtype: Any = None

    def _check(self, x):
        ds = tuple(self.downsample_at)
        if self.num_blocks < 1 or self.width < 1 or self.num_classes < 1:
            raise ValueError("ResNet: num_blocks, width and num_classes must be >= 1")
        if any(not 0 <= k < self.num_blocks for k in ds) or len(set(ds)) != len(ds):
            raise ValueError(f"ResNet: downsample_at={ds} must be distinct block indices in [0, {self.num_blocks})")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"ResNet: shortcut must be 'A' or 'B', got {self.shortcut!r}")
        if x.ndim != 4:
            raise ValueError(f"ResNet expects images [B, H, W, C], got shape {x.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check(x)
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                                 dtype=self.dtype, name="stem_bn")(x))
        features = self.width
        for k in range(self.num_blocks):
            stride = 1
            if k in tuple(self.downsample_at):
                stride, features = 2, features * 2
            x = ResNetBlock(features, stride, self.shortcut, self.momentum, self.dtype, name=f"block_{k}")(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


def ResNet20(num_classes: int = 10, downsample_at: Sequence[int] = (3, 6), **kw) -> ResNet:
    """ResNet-20: 9 basic blocks, widths 16-32-64 with the default downsampling at blocks (3, 6)."""
    return ResNet(num_blocks=9, downsample_at=tuple(downsample_at), width=16, num_classes=num_classes, **kw)


# Data parallel: replicate (the batch is sharded; BatchNorm statistics are over the global batch under jit).
RESNET_RULES_DP = [(r".*", P())]
# Tensor parallel: conv1 of every block output-channel-parallel, conv2 input-channel-parallel over "model"
# (the pair needs one all-reduce, as Megatron's column/row split); BN of the split channels follows conv1.
RESNET_RULES_TP = [
    (r"conv1/kernel$", P(None, None, None, "model")),
    (r"bn1/(scale|bias|mean|var)$", P("model")),
    (r"conv2/kernel$", P(None, None, "model", None)),
    (r".*", P()),
]
