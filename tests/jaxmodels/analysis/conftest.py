"""A digits MLP trained far into the terminal phase (zero training error), shared by the neural-collapse claim and
FARMS's per-layer α: one compiled 100-step segment, called repeatedly, with NC1-NC4 recorded after each."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.analysis import neural_collapse_metrics
from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP

N_SUB, SEGMENT, SEGMENTS = 200, 100, 15


def features(params, x):
    """The penultimate activations of ``MLP(features=(64, 64))`` (what the last Dense classifies)."""
    h = x
    for i in range(2):
        h = nn.relu(h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"])
    return h


def train_collapse(seed: int, lr: float = 0.1, segments: int = SEGMENTS):
    """MSE loss on one-hot targets (Han, Papyan & Donoho 2022: neural collapse under MSE), full-batch SGD with
    momentum 0.9, lr 0.1, weight decay 1e-3, on 200 digits. Returns (init params, final params, checkpoints) with
    checkpoints ``[(step, train_error, NeuralCollapse)]`` every 100 steps."""
    d = load_digits_split()
    x, y = jnp.asarray(d.x_train[:N_SUB]), jnp.asarray(d.y_train[:N_SUB])
    model = MLP(features=(64, 64), num_outputs=10)
    tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(lr, momentum=0.9))

    def loss(p):
        out = model.apply({"params": p}, x)
        return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(y, 10)) ** 2, -1))

    @jax.jit
    def segment(p, o):
        def body(c, _):
            p, o = c
            u, o = tx.update(jax.grad(loss)(p), o, p)
            return (optax.apply_updates(p, u), o), None

        (p, o), _ = jax.lax.scan(body, (p, o), None, length=SEGMENT)
        err = 1.0 - jnp.mean(model.apply({"params": p}, x).argmax(-1) == y)
        nc = neural_collapse_metrics(features(p, x), y, 10, kernel=p["Dense_2"]["kernel"], bias=p["Dense_2"]["bias"])
        return p, o, err, nc

    r = np.random.default_rng(seed)  # Flax's default init, drawn with NumPy: N(0, 1/fan_in) kernels, zero biases
    p0 = {f"Dense_{i}": {"kernel": (r.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
                         "bias": np.zeros(b, np.float32)} for i, (a, b) in enumerate([(64, 64), (64, 64), (64, 10)])}
    p, o, checkpoints = p0, jax.jit(tx.init)(p0), []
    for k in range(segments):
        p, o, err, nc = segment(p, o)
        checkpoints.append(((k + 1) * SEGMENT, float(err), jax.tree.map(float, nc)))
    return p0, p, checkpoints


@pytest.fixture(scope="session")
def collapsed_mlp():
    return train_collapse(seed=0)
