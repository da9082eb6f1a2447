"""DAS: the skipped forward against a NumPy transcription (adapter in place of the layer), leave-one-out
significance, skip selection, savings, validation, jit + 8-device sharding, and the claim (skipping the least
significant layers with adapters cuts computation at matched accuracy) on digits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.adapters.das import (das_apply, das_savings, identity_adapters, init_das, layer_significance,
                                    select_skips)
from jaxmodels.models import MLP
from tests.jaxmodels.adapters import papers_helpers as H

DEEP = MLP(features=(128, 128, 128, 128), num_outputs=10)
HIDDEN = ["Dense_1", "Dense_2", "Dense_3"]


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    model = MLP(features=(6, 6, 6), num_outputs=3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), params)
    ad = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32),
                      init_das(jax.random.PRNGKey(1), {"Dense_1": 6}, rank=2))
    return model, params, ad, rng


def mlp_numpy(params, ad, x):
    """The MLP with Dense_1 replaced by the adapter x + relu(x Wd + bd) Wu + bu (then the activation)."""
    h = x
    for i in range(4):
        p = {k: np.asarray(v, np.float64) for k, v in params[f"Dense_{i}"].items()}
        if f"Dense_{i}" in ad:
            a = {k: np.asarray(v, np.float64) for k, v in ad[f"Dense_{i}"].items()}
            z = h + np.maximum(h @ a["down"] + a["b_down"], 0) @ a["up"] + a["b_up"]
        else:
            z = h @ p["kernel"] + p["bias"]
        h = np.maximum(z, 0) if i < 3 else z
    return h


def test_skipped_forward_significance_and_savings_match_numpy():
    model, params, ad, rng = _setup()
    x = rng.standard_normal((7, 5))
    np.testing.assert_allclose(das_apply(model, params, ad, jnp.asarray(x, jnp.float32)), mlp_numpy(params, ad, x),
                               rtol=1e-5, atol=1e-5)
    # a fresh adapter is the identity: the same as removing the layer
    fresh = init_das(jax.random.PRNGKey(2), {"Dense_1": 6}, rank=2)
    np.testing.assert_allclose(das_apply(model, params, fresh, x), das_apply(model, params, identity_adapters(
        ["Dense_1"]), x), rtol=1e-6)
    y = rng.integers(0, 3, 7)
    loss = jax.jit(lambda a: H.xent(das_apply(model, params, a, jnp.asarray(x, jnp.float32)), y))
    s = layer_significance(loss, ["Dense_1", "Dense_2"])
    for m in ("Dense_1", "Dense_2"):
        ref = mlp_numpy(params, {m: {"down": np.zeros((6, 1)), "b_down": np.zeros(1), "up": np.zeros((1, 6)),
                                     "b_up": np.zeros(6)}}, x)
        ce = lambda z: np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(7), y])  # noqa: E731
        assert s[m] == pytest.approx(ce(ref) - ce(mlp_numpy(params, {}, x)), rel=1e-4, abs=1e-5)
    assert select_skips({"a": 0.3, "b": 0.01, "c": 0.1}, 2) == ["b", "c"]
    assert das_savings(params, ad) == (6 * 6 + 6, 6 * 2 + 2 + 2 * 6 + 6)


def test_validation():
    model, params, ad, _ = _setup()
    with pytest.raises(ValueError, match="rank"):
        init_das(jax.random.PRNGKey(0), {"Dense_1": 6}, rank=0)
    with pytest.raises(ValueError, match="not modules"):
        das_apply(model, params, {"Dense_9": ad["Dense_1"]}, jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="do not fit"):
        das_apply(model, params, {"Dense_1": {**ad["Dense_1"], "up": jnp.zeros((3, 6))}}, jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        das_apply(model, params, {"Dense_1": {**ad["Dense_1"], "b_up": jnp.full((6,), jnp.inf)}}, jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="has d=6"):
        das_apply(model, params, {"Dense_0": ad["Dense_1"]}, jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="exceeds"):
        select_skips({"a": 0.0}, 2)


def test_jit_sharded_equals_single_device(mesh):
    model, params, ad, rng = _setup()
    x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    ref = das_apply(model, params, ad, x)
    out = jax.jit(lambda p, a, x: das_apply(model, p, a, x))(params, ad, jax.device_put(x, NamedSharding(
        mesh, P("data", None))))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not out.sharding.is_fully_replicated


@functools.lru_cache(maxsize=None)
def _deep_params():
    x, y, _, _ = H.digits()
    p = DEEP.init(jax.random.PRNGKey(0), x[:1])["params"]
    return H.fit(lambda p, xb, yb: H.xent(DEEP.apply({"params": p}, xb), yb), p, x, y, 300, 3e-3)[0]


@pytest.mark.slow
def test_claim_skipping_least_significant_layers_with_adapters_keeps_accuracy():
    """DAS's claim on digits: an MLP with four 128-wide hidden layers trained on digits (300 Adam steps); the
    three square hidden layers are ranked by leave-one-out significance on 300 training rows; the two least
    significant are skipped and replaced by rank-8 adapters, trained alone (150 Adam steps), against skipping the
    two MOST significant ones with the same adapters and training. Measured: full 0.978, DAS 0.958, most-significant
    skip 0.953, the two layers removed without adapters 0.07; 33024 parameters removed for 4368 adapter ones.
    Asserted: DAS within 0.03 of the full model, and not worse (0.01 slack) than skipping the most significant
    layers. NOT robust at smaller scale: with 64-wide layers (exploratory) the most-significant skip won (0.947 vs
    0.931), so the leave-one-out ranking is a weak stand-in for the paper's RL estimate there."""
    params = _deep_params()
    x, y, xt, yt = H.digits()
    acc = lambda a: float(jax.jit(lambda a: jnp.mean(jnp.argmax(das_apply(DEEP, params, a, xt), -1) == yt))(a))  # noqa
    s = layer_significance(jax.jit(lambda a: H.xent(das_apply(DEEP, params, a, x[:300]), y[:300])), HIDDEN)
    least, most = select_skips(s, 2), sorted(sorted(HIDDEN, key=lambda m: -s[m])[:2])
    arms = {"das": init_das(jax.random.PRNGKey(1), {m: 128 for m in least}),
            "most": init_das(jax.random.PRNGKey(1), {m: 128 for m in most})}
    loss = lambda a, xb, yb: sum(H.xent(das_apply(DEEP, params, a[k], xb), yb) for k in a)  # noqa: E731
    tr, _ = H.fit(loss, arms, x, y, 150, 3e-3)
    full, a_das, a_most = acc({}), acc(tr["das"]), acc(tr["most"])
    removed, added = das_savings(params, tr["das"])
    assert a_das >= full - 0.03 and a_das >= a_most - 0.01, (full, a_das, a_most)
    assert removed == 2 * (128 * 128 + 128) and added < removed / 7
