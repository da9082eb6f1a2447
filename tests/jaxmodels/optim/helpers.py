"""Shared test helpers for jaxmodels.optim: random trees, stepping an optimizer, the sharded-vs-unsharded check."""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.models.mlp import MLP_RULES_TP
from jaxmodels.sharding import rules_to_shardings
from jaxmodels.tree import flatten, path_to_str


def random_tree(seed: int = 0, scale: float = 1.0) -> dict:
    """A small MLP-like tree (Flax layouts) with a 4-D conv kernel and a norm scale."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {
        "Conv_0": {"kernel": f(3, 3, 2, 8), "bias": f(8)},
        "Dense_0": {"kernel": f(8, 16), "bias": f(16)},
        "LayerNorm_0": {"scale": 1.0 + 0.1 * f(16)},
        "Dense_1": {"kernel": f(16, 4), "bias": f(4)},
    }


def grad_seq(n: int, seed: int = 1) -> list[dict]:
    return [random_tree(seed + 100 * i, scale=0.1) for i in range(n)]


def run(tx, params, grads, jit: bool = True):
    """Apply ``tx`` for len(grads) steps; return (params, state) as NumPy / device trees."""
    init = jax.jit(tx.init) if jit else tx.init

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    p = jax.tree.map(jnp.asarray, params)
    s = init(p)
    for g in grads:
        p, s = step(p, s, jax.tree.map(jnp.asarray, g))
    return p, s


def assert_tree_close(a, b, rtol, atol):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol, err_msg=k)


def check_sharded_equals_unsharded(tx, mesh, params=None, steps=3, rtol=1e-5, atol=1e-6, check_state=True,
                                   rules=None, grads=None):
    """Run ``steps`` jitted steps on params/grads sharded with tensor-parallel rules over ``mesh`` and compare with
    the single-device run; every state leaf that mirrors a param (its path ends with the param's path and has its
    shape) must carry the param's sharding. Tolerance: only the reduction order of the norms differs (float32)."""
    params = random_tree(0) if params is None else params
    grads = grad_seq(steps) if grads is None else grads
    ref_p, _ = run(tx, params, grads)
    if rules is None:
        rules = MLP_RULES_TP + [(r"Conv_0/kernel$", jax.sharding.PartitionSpec(None, None, None, "model"))]
    shard = rules_to_shardings(params, rules, mesh)
    sp = jax.device_put(params, shard)
    sg = [jax.device_put(g, shard) for g in grads]
    out_p, state = run(tx, sp, sg)
    assert_tree_close(out_p, ref_p, rtol, atol)
    fshard = flatten(shard)
    fparams = flatten(params)
    assert any(not s.is_fully_replicated for s in fshard.values())
    for k, leaf in flatten(out_p).items():
        assert leaf.sharding.is_equivalent_to(fshard[k], leaf.ndim), k
    if check_state:
        checked = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            sp_ = path_to_str(path)
            for k, s in fshard.items():
                if sp_.endswith(k) and np.shape(leaf) == np.shape(fparams[k]):
                    assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (sp_, leaf.sharding, s)
                    checked += 1
        return checked
    return 0


def text_ids():
    """Character ids of the scikit-learn dataset descriptions (offline text) and the vocabulary size."""
    import sklearn.datasets

    d = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    text = "".join(open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(d, "*.rst"))))
    text = "".join(c for c in text if 32 <= ord(c) < 127 or c == "\n")
    vocab = sorted(set(text))
    return np.asarray([vocab.index(c) for c in text], np.int32), len(vocab)


def tiny_decoder(V, C=8, E=16, D=64, H=128, L=8, seed=0):
    """A char-level decoder over a context window of C characters: embed -> proj -> L stacked pre-norm residual MLP
    blocks (``lax.scan`` over ``layers/*``, leading axis L) -> head."""
    k = jax.random.split(jax.random.key(seed), 5)
    n = jax.random.normal
    params = {"embed": {"embedding": 0.5 * n(k[0], (V, E)), "proj": n(k[1], (C * E, D)) / np.sqrt(C * E)},
              "layers": {"scale": jnp.ones((L, D)), "w1": n(k[2], (L, D, H)) / np.sqrt(D), "b1": jnp.zeros((L, H)),
                         "w2": n(k[3], (L, H, D)) / np.sqrt(H) / np.sqrt(L)},
              "head": {"kernel": n(k[4], (D, V)) / np.sqrt(D), "bias": jnp.zeros((V,))}}

    def apply(p, ctx):
        x = p["embed"]["embedding"][ctx].reshape(ctx.shape[0], -1) @ p["embed"]["proj"]

        def block(h, lp):
            z = h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * lp["scale"]
            return h + jax.nn.gelu(z @ lp["w1"] + lp["b1"]) @ lp["w2"], None

        x, _ = jax.lax.scan(block, x, p["layers"])
        return x @ p["head"]["kernel"] + p["head"]["bias"]

    return params, apply
