"""Projection head: feature weights against NumPy, the balanced-network exponents l/L, the representation variant, the
spectral contrastive loss against a NumPy double loop, 8-device sharded inputs, validation, and the paper's
layer-wise progressive feature weighting on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis.projection_head import (
    feature_weights,
    representation_feature_weights,
    spectral_contrastive_loss,
)
from jaxmodels.datasets import load_digits_split


def test_matches_numpy_and_balanced_exponents(mesh):
    r = np.random.default_rng(0)
    ks = [r.standard_normal((6, 5)).astype(np.float32), r.standard_normal((5, 4)).astype(np.float32),
          r.standard_normal((4, 3)).astype(np.float32)]
    before = [k.copy() for k in ks]
    fw = jax.jit(lambda ks: feature_weights(ks, k=3))(ks)
    k64 = [np.float64(k) for k in ks]
    prods = [k64[0], k64[0] @ k64[1], k64[0] @ k64[1] @ k64[2]]
    v = np.linalg.svd(prods[-1])[0][:, :3]
    w = np.stack([np.linalg.norm(v.T @ q, axis=1) for q in prods])
    np.testing.assert_allclose(np.asarray(fw.weights), w, rtol=1e-4)
    exps = [np.polyfit(np.log(w[-1]), np.log(w[l]), 1)[0] for l in range(3)]
    np.testing.assert_allclose(np.asarray(fw.exponents), exps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fw.unevenness), w.max(1) / w.min(1), rtol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, ks, before)
    # a balanced two-layer network (W1 = V S^½ Qᵀ, W2 = Q S^½ Uᵀ): feature i weighted s_i^½ then s_i
    v, _ = np.linalg.qr(r.standard_normal((6, 4)))
    q, _ = np.linalg.qr(r.standard_normal((4, 4)))
    u, _ = np.linalg.qr(r.standard_normal((3, 3)))
    s = np.array([4.0, 2.0, 1.0])
    w1 = (v[:, :3] * np.sqrt(s)) @ q[:, :3].T
    w2 = (q[:, :3] * np.sqrt(s)) @ u.T
    bal = jax.jit(lambda a, b: feature_weights([a, b], k=3))(w1.astype(np.float32), w2.astype(np.float32))
    np.testing.assert_allclose(np.asarray(bal.exponents), [0.5, 1.0], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(bal.unevenness), [2.0, 4.0], rtol=1e-4)
    # representations of a linear encoder on inputs spanning the space give the same weights
    x = r.standard_normal((64, 6)).astype(np.float32)
    h1, h2 = x @ ks[0], x @ ks[0] @ ks[1]
    rep, ref = jax.jit(lambda x, a, b, ks: (representation_feature_weights(x, [a, b], k=3, ridge=0.0),
                                            feature_weights(ks, k=3)))(x, h1, h2, ks[:2])
    np.testing.assert_allclose(np.asarray(rep.weights), np.asarray(ref.weights), rtol=1e-3)
    # spectral contrastive loss against the double loop
    z1, z2 = r.standard_normal((8, 3)).astype(np.float32), r.standard_normal((8, 3)).astype(np.float32)
    loop = -2 * np.mean([z1[i] @ z2[i] for i in range(8)]) + np.mean(
        [(np.float64(z1[i]) @ z2[j]) ** 2 for i in range(8) for j in range(8) if i != j])
    np.testing.assert_allclose(float(spectral_contrastive_loss(z1, z2)), loop, rtol=1e-5)
    # examples sharded over 8 devices: same loss and representation weights up to reduction order
    sh = NamedSharding(mesh, P("data"))
    put = lambda a: jax.device_put(jnp.asarray(a), sh)  # noqa: E731
    np.testing.assert_allclose(float(jax.jit(spectral_contrastive_loss)(put(z1), put(z2))), loop, rtol=1e-5)
    rep_s = jax.jit(lambda x, a, b: representation_feature_weights(x, [a, b], k=3, ridge=0.0))(put(x), put(h1),
                                                                                                put(h2))
    np.testing.assert_allclose(np.asarray(rep_s.weights), np.asarray(rep.weights), rtol=1e-3)


def test_validation():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="non-empty sequence"):
        feature_weights([])
    with pytest.raises(ValueError, match="outputs"):
        feature_weights([w, w])
    with pytest.raises(ValueError, match="NaN"):
        feature_weights([np.full_like(w, np.nan)])
    with pytest.raises(ValueError, match="k must be"):
        feature_weights([w], k=4)
    with pytest.raises(ValueError, match="directions must be"):
        feature_weights([w], directions=np.ones((3, 1), np.float32))
    with pytest.raises(ValueError, match="rows"):
        representation_feature_weights(np.ones((5, 4), np.float32), [np.ones((4, 3), np.float32)])
    with pytest.raises(ValueError, match="z2 must have"):
        spectral_contrastive_loss(w, w[:2])
    with pytest.raises(ValueError, match="at least 2"):
        spectral_contrastive_loss(w[:1], w[:1])


STEPS = 1500


def test_claim_progressive_feature_weighting_on_digits():
    """Xue et al.'s theorem at digits scale: a two-layer linear network, encoder 64 -> 32 and projection head
    32 -> 16, from small init (N(0, 0.03²)) trained with the spectral contrastive loss (1500 full-batch SGD steps,
    lr 0.02) on 512 centered digits, each step a pair of 16 fixed augmented views (keep each pixel with p = 0.7,
    rescaled, plus N(0, 0.1²) noise). Over the top 8 features of the end-to-end map, measured: loss -0.004 -> -5.14;
    the pre-projection weights follow the post-projection weights with exponent 0.475 (theory: 1/2), unevenness
    (max / min weight) 2.93 before the head vs 9.57 after it (√9.57 = 3.09): lower layers weight the features more
    equally."""
    x = load_digits_split().x_train[:512]
    x = x - x.mean(0)
    r = np.random.default_rng(0)
    # 16 augmented views drawn once with NumPy (each step pairs two of them): cheap steps, no RNG in the loop
    views = (x * (r.random((16,) + x.shape) < 0.7) / 0.7 + 0.1 * r.standard_normal((16,) + x.shape)).astype(np.float32)
    pairs = r.integers(0, 16, (STEPS, 2)).astype(np.int32)
    pairs[:, 1] = np.where(pairs[:, 1] == pairs[:, 0], (pairs[:, 1] + 1) % 16, pairs[:, 1])
    p = {"enc": (0.03 * r.standard_normal((64, 32))).astype(np.float32),
         "head": (0.03 * r.standard_normal((32, 16))).astype(np.float32)}
    tx = optax.sgd(0.02)

    @jax.jit
    def train(p, views, pairs):
        def body(c, ij):
            def loss(p):
                w = p["enc"] @ p["head"]
                return spectral_contrastive_loss(views[ij[0]] @ w, views[ij[1]] @ w)

            lval, g = jax.value_and_grad(loss)(c[0])
            u, o = tx.update(g, c[1], c[0])
            return (optax.apply_updates(c[0], u), o), lval

        (p, _), losses = jax.lax.scan(body, (p, tx.init(p)), pairs)
        return p, losses, feature_weights([p["enc"], p["head"]], k=8)

    p, losses, fw = train(p, views, pairs)
    exps, unev = np.asarray(fw.exponents), np.asarray(fw.unevenness)
    print("loss", float(losses[0]), "->", float(losses[-1]), "exponents", exps, "unevenness", unev)
    assert float(losses[-1]) < -2.0  # trained (from ~0)
    assert 0.35 < exps[0] < 0.6, exps  # measured 0.475
    assert unev[1] > 2.5 * unev[0], unev  # measured 9.57 vs 2.93
    assert unev[0] ** 2 / 2 < unev[1] < 2 * unev[0] ** 2, unev  # ~ balanced: unevenness squares with depth
