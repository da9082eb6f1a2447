"""Shared test helpers: small random pytrees with shapes that shard over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SHAPES = {"dense": {"kernel": (16, 8), "bias": (8,)}, "out": {"kernel": (8, 24)}, "scale": (3,)}


def make_tree(seed, scale=1.0, dtype=np.float32, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(dtype), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def make_family(n, seed=0, tau_scale=0.1, dtype=np.float32):
    """A base and n fine-tuned models base + tau_t."""
    base = make_tree(seed, dtype=np.float32)
    models = [jax.tree.map(lambda b, t: (b + t).astype(dtype), base, make_tree(seed + 1 + i, tau_scale))
              for i in range(n)]
    return jax.tree.map(lambda b: b.astype(dtype), base), models


def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def shard_tree(tree, mesh):
    """Shard the leading axis over "data" where divisible, else replicate."""
    n = mesh.shape["data"]

    def put(x):
        spec = P("data") if x.ndim and x.shape[0] % n == 0 else P()
        return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                                         rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
