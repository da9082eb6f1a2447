"""LEVI: the adapting layers and ensemble against a NumPy transcription, stop-gradient on the frozen views,
validation, jit + 8-device sharding, and the OOD claim on digits (shifted / noisy mirrored digits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.adapters.levi import init_levi, levi_logits, levi_loss, levi_num_params
from tests.jaxmodels.adapters import papers_helpers as H


def _setup(seed=0, B=16):
    rng = np.random.default_rng(seed)
    levi = init_levi(jax.random.PRNGKey(seed), [6, 5], 8, (7, 4), 3)
    levi = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), levi)
    feats = [jnp.asarray(rng.standard_normal((B, d)), jnp.float32) for d in (6, 5)]
    x = jnp.asarray(rng.standard_normal((B, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, B))
    return levi, feats, x, y


def levi_numpy(levi, feats, x, y):
    """z_k = [h_k ; g(x)] W_k + b_k, g a ReLU MLP; z = Σ softmax(β)_k z_k; L = CE(z) + mean_k CE(z_k)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    g = f64(x)
    for p in levi["small"]:
        g = np.maximum(g @ f64(p["kernel"]) + f64(p["bias"]), 0)
    zs = np.stack([np.concatenate([f64(h), g], 1) @ f64(a["kernel"]) + f64(a["bias"])
                   for h, a in zip(feats, levi["adapt"])])
    b = f64(levi["beta"])
    w = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
    z = np.tensordot(w, zs, 1)

    def ce(z):
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        return np.mean(lse - z[np.arange(len(y)), np.asarray(y)])
    return z, zs, ce(z) + np.mean([ce(zk) for zk in zs])


def test_logits_and_loss_match_numpy():
    levi, feats, x, y = _setup()
    out = jax.jit(levi_logits)(levi, feats, x)
    z, zs, loss = levi_numpy(levi, feats, x, y)
    np.testing.assert_allclose(out.per_layer, zs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logits, z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(levi_loss)(levi, feats, x, y), loss, rtol=1e-4)
    # β = 0 (the init): the ensemble is the plain average; the frozen views get no gradient
    fresh = init_levi(jax.random.PRNGKey(0), [6, 5], 8, (7, 4), 3)
    o = jax.jit(levi_logits)(fresh, feats, x)
    np.testing.assert_allclose(o.logits, np.asarray(o.per_layer).mean(0), rtol=1e-5, atol=1e-6)
    gf = jax.jit(jax.grad(lambda f: levi_loss(fresh, f, x, y)))(feats)
    assert all(float(jnp.abs(g).max()) == 0 for g in gf)
    assert levi_num_params(fresh) == 8 * 7 + 7 + 7 * 4 + 4 + (10 * 3 + 3) + (9 * 3 + 3) + 2


def test_validation():
    levi, feats, x, y = _setup()
    with pytest.raises(ValueError, match="n_classes"):
        init_levi(jax.random.PRNGKey(0), [6], 8, (4,), 0)
    with pytest.raises(ValueError, match="small model needs"):
        init_levi(jax.random.PRNGKey(0), [6], 8, (), 3)
    with pytest.raises(ValueError, match="1 pre-trained features for 2"):
        levi_logits(levi, feats[:1], x)
    with pytest.raises(ValueError, match="feature 1 has shape"):
        levi_logits(levi, [feats[0], feats[0]], x)
    with pytest.raises(ValueError, match="input"):
        levi_logits(levi, feats, x[:, :5])
    with pytest.raises(ValueError, match="pre_features has 1 non-finite"):
        levi_logits(levi, [feats[0].at[0, 0].set(jnp.nan), feats[1]], x)


def test_jit_sharded_equals_single_device(mesh):
    levi, feats, x, y = _setup(B=32)
    step = jax.jit(jax.value_and_grad(levi_loss))
    ref = step(levi, feats, x, y)
    sh = NamedSharding(mesh, P("data"))
    out = step(levi, [jax.device_put(f, sh) for f in feats], jax.device_put(x, sh), jax.device_put(y, sh))
    # batch-sharded means: float32 reduction order only
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, ref)


def _shift_down(a):
    im = np.asarray(a).reshape(-1, 8, 8)
    out = np.roll(im, 1, 1)
    out[:, 0] = 0
    return jnp.asarray(out.reshape(-1, 64))


def _hidden(p, x):
    h0 = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return [h0, jax.nn.relu(h0 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])]


@pytest.mark.slow
def test_claim_layerwise_ensemble_improves_ood():
    """LEVI's claim (better OOD accuracy than full fine-tuning and linear probing) on digits. Pre-trained model: the
    MLP trained on the original digits. Fine-tuning task: the mirrored digits, 300 rows, 250 Adam steps for each arm
    (one scan): full fine-tuning, linear probing (a fresh head on the frozen model), LEVI (both hidden outputs of
    the frozen model + a 64-32 small model from scratch, two adapting layers). OOD: the mirrored test digits moved
    one pixel down, and with additive N(0, 2²) noise (clipped to [0, 16]). Measured (ID / mean OOD): full FT
    0.938 / 0.253, LP 0.851 / 0.249, LEVI 0.949 / 0.285 (OOD down-shift 0.352 / 0.343 / 0.379-0.392, noise
    0.154 / 0.156 / 0.194-0.198 over two LEVI inits). Not asserted: a one-pixel right shift, where LEVI is on par
    with full FT (0.49 vs 0.49)."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    rng = np.random.default_rng(0)
    noisy = jnp.asarray(np.clip(np.asarray(xt) + rng.normal(0, 2, xt.shape), 0, 16).astype(np.float32))
    head0 = jax.tree.map(jnp.zeros_like, base["Dense_2"])
    arms = {"ft": base, "lp": head0, "levi": init_levi(jax.random.PRNGKey(1), [64, 64], 64, (32,), 10)}

    def loss(p, xb, yb):
        return (H.xent(H.MODEL.apply({"params": p["ft"]}, xb), yb)
                + H.xent(H.MODEL.apply({"params": H.with_head(base, p["lp"])}, xb), yb)
                + levi_loss(p["levi"], _hidden(base, xb), xb, yb))

    p, _ = H.fit(loss, arms, x[:300], y[:300], 250, 1e-2, batch=100)

    @jax.jit
    def accs(p, xx):
        z = {"ft": H.MODEL.apply({"params": p["ft"]}, xx), "lp": H.MODEL.apply({"params": H.with_head(base, p["lp"])},
                                                                                 xx),
             "levi": levi_logits(p["levi"], _hidden(base, xx), xx).logits}
        return {k: jnp.mean(jnp.argmax(v, -1) == yt) for k, v in z.items()}

    ev = jax.device_get([accs(p, xx) for xx in (xt, _shift_down(xt), noisy)])
    ood = {k: (ev[1][k] + ev[2][k]) / 2 for k in arms}
    assert ood["levi"] > ood["ft"] + 0.01 and ood["levi"] > ood["lp"] + 0.01, ood
    assert ev[0]["levi"] > ev[0]["lp"] + 0.03 and ev[0]["levi"] > ev[0]["ft"] - 0.02, ev[0]
