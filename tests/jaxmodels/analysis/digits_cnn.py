"""A small all-3x3 CNN trained on the 8x8 digits twice from one random init, without and with the OCNN kernel
orthogonality penalty on conv2/conv3 (one vmapped, compiled step for both runs); shared by the NormGrad, CNN
Filter DB and orthogonality claims (cached per process)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.analysis.orthogonality import orthogonality_penalty
from jaxmodels.datasets import load_digits_split

LAMBDA, STEPS, BATCH, LR = 3e-3, 100, 64, 1e-2
SHAPES = {"conv1": (3, 3, 1, 32), "conv2": (3, 3, 32, 16), "conv3": (3, 3, 16, 16)}


class DigitsCNN(nn.Module):
    """conv1 (1 -> 32) -> conv2 (32 -> 16) -> conv3 (16 -> 16), 3x3 SAME + ReLU, global mean, Dense head."""

    @nn.compact
    def __call__(self, x):
        for name, shape in SHAPES.items():
            x = nn.relu(nn.Conv(shape[-1], (3, 3), name=name)(x))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


MODEL = DigitsCNN()


def apply_fn(p, x):
    return MODEL.apply({"params": p}, x)


def init_params(seed):
    """Flax's default init drawn with NumPy (no compilation): N(0, 1/fan_in) kernels, zero biases."""
    r = np.random.default_rng(seed)
    p = {}
    for name, (kh, kw, c, m) in SHAPES.items():
        p[name] = {"kernel": (r.standard_normal((kh, kw, c, m)) / np.sqrt(kh * kw * c)).astype(np.float32),
                   "bias": np.zeros(m, np.float32)}
    p["head"] = {"kernel": (r.standard_normal((16, 10)) / 4.0).astype(np.float32), "bias": np.zeros(10, np.float32)}
    return p


@functools.lru_cache(maxsize=None)
def trained_cnns():
    """``(data, p0, plain, regularized)``: the init and the two trained parameter trees (NumPy arrays)."""
    d = load_digits_split(images=True)
    p0 = init_params(0)
    tx = optax.adam(LR)

    def loss(p, lam, xb, yb):
        ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb).mean()
        return ce + lam * orthogonality_penalty(p, include=r"conv[23]")

    def step(p, o, lam, xb, yb):
        u, o = tx.update(jax.grad(loss)(p, lam, xb, yb), o, p)
        return optax.apply_updates(p, u), o

    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, None)))
    ps = jax.tree.map(lambda a: jnp.stack([a, a]), p0)
    opt = jax.vmap(tx.init)(ps)
    lams = jnp.asarray([0.0, LAMBDA], jnp.float32)
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    for _ in range(STEPS):
        idx = rng.integers(0, len(d.x_train), BATCH)
        ps, opt = vstep(ps, opt, lams, x[idx], y[idx])
    ps = jax.tree.map(np.asarray, ps)
    return d, p0, jax.tree.map(lambda a: a[0], ps), jax.tree.map(lambda a: a[1], ps)
