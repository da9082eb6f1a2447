"""MemControl: masks, masked fine-tuning, the label-memorization measure and the Pareto/score outer level against
NumPy transcriptions, validation, jit + 8-device sharding, and the claim (a small selected subset memorizes far
less than full fine-tuning at close task quality) on digits with noisy labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.adapters.memcontrol import (label_memorization, train_subset, memcontrol_search, pareto_front,
                                           subset_mask, trainable_fraction)
from tests.jaxmodels.adapters import papers_helpers as H


def _params(rng):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"Dense_0": {"kernel": f(16, 8), "bias": f(8)}, "Dense_1": {"kernel": f(8, 4), "bias": f(4)}}


def pareto_numpy(q, m):
    """Loop transcription: i is dominated iff some j has q_j >= q_i, m_j <= m_i and one strict."""
    out = []
    for i in range(len(q)):
        out.append(not any(q[j] >= q[i] and m[j] <= m[i] and (q[j] > q[i] or m[j] < m[i]) for j in range(len(q))))
    return np.array(out)


def test_masks_search_and_memorization_match_numpy():
    rng = np.random.default_rng(0)
    params = _params(rng)
    mask = subset_mask(params, r"/bias$")
    assert jax.tree.leaves(mask) == [True, False, True, False]
    assert trainable_fraction(params, mask) == pytest.approx(12 / (128 + 8 + 32 + 4))
    g = jax.tree.map(jnp.ones_like, params)
    tx = train_subset(optax.sgd(0.5), mask)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(u["Dense_0"]["bias"], -0.5)
    np.testing.assert_array_equal(u["Dense_1"]["kernel"], 0.0)
    q, m = rng.uniform(size=12), rng.uniform(size=12)
    q[3], m[3] = q[5], m[5]  # a tie: neither dominates the other
    np.testing.assert_array_equal(pareto_front(q, m), pareto_numpy(q, m))
    res = memcontrol_search({f"c{i}": (q[i], m[i], i / 12) for i in range(12)}, lam=0.7)
    np.testing.assert_allclose(res.score, q - 0.7 * m)
    assert res.best == f"c{int(np.argmax(q - 0.7 * m))}"
    logits = rng.standard_normal((50, 10))
    noisy, wrong = rng.integers(0, 10, 50), rng.uniform(size=50) < 0.4
    ref = np.mean((logits.argmax(-1) == noisy)[wrong])
    np.testing.assert_allclose(label_memorization(jnp.asarray(logits), jnp.asarray(noisy), jnp.asarray(wrong)), ref,
                               rtol=1e-6)


def test_validation():
    params = _params(np.random.default_rng(1))
    with pytest.raises(ValueError, match="selects no parameter"):
        subset_mask(params, "nothing")
    with pytest.raises(ValueError, match="invalid regex"):
        subset_mask(params, "(")
    with pytest.raises(ValueError, match="lam"):
        memcontrol_search({"a": (1.0, 0.0, 1.0)}, lam=-1)
    with pytest.raises(ValueError, match="non-finite"):
        memcontrol_search({"a": (float("nan"), 0.0, 1.0)})
    with pytest.raises(ValueError, match="do not fit"):
        label_memorization(jnp.zeros((4, 3)), jnp.zeros(5, jnp.int32), jnp.zeros(5, bool))
    with pytest.raises(ValueError, match="equal 1-D"):
        pareto_front(np.zeros(3), np.zeros(4))


def test_jit_sharded_masked_step_equals_single_device(mesh):
    rng = np.random.default_rng(2)
    params, x = _params(rng), jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    tx = train_subset(optax.sgd(1e-2), subset_mask(params, r"^Dense_1/"))

    def step(p, x):
        g = jax.grad(lambda p: jnp.mean((jax.nn.relu(x @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"]) ** 2))(p)
        u, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, u)

    ref = step(params, x)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    out = jax.jit(step)(params, xs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref)
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


@pytest.mark.slow
def test_claim_selected_subset_memorizes_less_at_close_quality():
    """MemControl's claim on digits: fine-tuning a small selected parameter subset reduces memorization while
    keeping task quality. Task: mirrored digits, 300 training rows, 40% of them given a wrong random label; the
    pre-trained MLP is fine-tuned (250 Adam steps) on four candidate subsets in one scan; quality = test accuracy,
    memorization = the fraction of mislabeled training rows whose wrong label is predicted. Asserted: the search
    (λ = 1) picks a subset of < 25% of the parameters whose memorization is at most half of full fine-tuning's and
    whose quality is within 0.08 of it."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    n = 300
    rng = np.random.default_rng(0)
    wrong = rng.uniform(size=n) < 0.4
    y_noisy = np.where(wrong, (np.asarray(y[:n]) + rng.integers(1, 10, n)) % 10, np.asarray(y[:n]))
    xn, yn = x[:n], jnp.asarray(y_noisy, jnp.int32)
    cands = {"full": r".*", "head": r"^Dense_2/", "bias": r"/bias$", "Dense_1+head": r"^Dense_[12]/"}
    masks = {k: subset_mask(base, v) for k, v in cands.items()}
    loss = lambda p, xb, yb: sum(H.xent(H.MODEL.apply({"params": p[k]}, xb), yb) for k in p)  # noqa: E731
    tx = H.joint({k: train_subset(optax.adam(1e-2), m) for k, m in masks.items()})
    tuned, _ = H.fit(loss, {k: base for k in cands}, xn, yn, 250, 1e-2, batch=100, tx=tx)
    results = {}
    for k, p in tuned.items():
        mem = float(label_memorization(H.MODEL.apply({"params": p}, xn), yn, jnp.asarray(wrong)))
        results[k] = (H.accuracy(p, xt, yt), mem, trainable_fraction(base, masks[k]))
    res = memcontrol_search(results, lam=1.0)
    q, m, f = results[res.best]
    assert res.best != "full" and f < 0.25, results
    assert m <= 0.5 * results["full"][1] and q >= results["full"][0] - 0.08, results
    assert res.pareto[res.names.index(res.best)]

