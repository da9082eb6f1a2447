"""A plain multi-layer perceptron: x -> [Dense -> act]* -> Dense."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


class MLP(nn.Module):
    """``features`` are the hidden widths; ``num_outputs`` the logits. Layers are named ``Dense_0 .. Dense_L``."""

    features: Sequence[int] = (128, 128)
    num_outputs: int = 10
    activation: Callable = nn.relu
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for i, f in enumerate(self.features):
            x = self.activation(nn.Dense(f, dtype=self.dtype, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_outputs, dtype=self.dtype, name=f"Dense_{len(self.features)}")(x)


# Data parallel: parameters replicated (the batch is sharded by the train step).
MLP_RULES_DP = [(r".*", P())]
# Tensor parallel (Megatron style): even layers column-parallel, odd layers row-parallel over "model".
MLP_RULES_TP = [
    (r"Dense_\d*[02468]/kernel$", P(None, "model")),
    (r"Dense_\d*[02468]/bias$", P("model")),
    (r"Dense_\d*[13579]/kernel$", P("model", None)),
    (r".*", P()),
]
