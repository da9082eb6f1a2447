"""EVA: the streaming PCA against scikit-learn's IncrementalPCA and the exact SVD, the rank redistribution
against a NumPy transcription, the LoRA it builds, sharded batches, and the faster-convergence claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.adapters import LoraConfig, init_lora, merge
from jaxmodels.adapters.eva import EvaConfig, eva_init, ipca_init, ipca_update, redistribute_ranks
from tests.jaxmodels.adapters import papers_helpers as H


def _data(seed=0, n=240, d=12):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 2.0).astype(np.float32)


def test_ipca_matches_sklearn_and_exact_svd():
    from sklearn.decomposition import IncrementalPCA

    X = _data()
    sk = IncrementalPCA(n_components=5)
    st, full = ipca_init(12, 5), ipca_init(12, 12)
    for i in range(0, 240, 60):
        sk.partial_fit(X[i:i + 60])
        st = ipca_update(st, jnp.asarray(X[i:i + 60]))
        full = ipca_update(full, jnp.asarray(X[i:i + 60]))
    # float32 SVDs of the same stacked matrices (sklearn: float64): rounding only
    np.testing.assert_allclose(np.asarray(st.components), sk.components_, atol=2e-5)
    np.testing.assert_allclose(np.asarray(st.singular_values), sk.singular_values_, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(st.explained_variance_ratio), sk.explained_variance_ratio_, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(st.mean), sk.mean_, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st.var), sk.var_, rtol=1e-4)
    # keeping every component the stream is exact: the SVD of the centred full matrix (up to sign)
    Xc = X.astype(np.float64) - X.mean(0)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    np.testing.assert_allclose(np.asarray(full.singular_values), S, rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(full.components) * Vt, 1)), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(full.explained_variance_ratio).sum(), 1.0, rtol=1e-5)


def ranks_numpy(ratios, budget):
    """PEFT's _get_rank_distribution: take the budget largest ratios one by one, count them per layer."""
    pool = [(v, -li, -i, name) for li, (name, r) in enumerate(ratios.items()) for i, v in enumerate(r)]
    counts = {name: 0 for name in ratios}
    for _ in range(budget):
        best = max(pool)
        pool.remove(best)
        counts[best[3]] += 1
    return counts


def test_redistribute_ranks_matches_numpy_rule():
    rng = np.random.default_rng(0)
    for _ in range(5):
        ratios = {f"l{i}": np.sort(rng.dirichlet(np.ones(12)))[::-1][:8] for i in range(4)}
        assert redistribute_ranks(ratios, 16) == ranks_numpy(ratios, 16)
    ratios = {"a": np.array([0.5, 0.3, 0.1, 0.05]), "b": np.array([0.2, 0.01, 0.0, 0.0]), "c": np.zeros(4)}
    assert redistribute_ranks(ratios, 6) == {"a": 4, "b": 2, "c": 0} == ranks_numpy(ratios, 6)


def _apply(p, x):
    return H.MODEL.apply({"params": p}, x)


@pytest.fixture(scope="module")
def eva3():
    """EVA on the three Dense layers of the digits MLP, r = 4, over the mirrored digits (batches of 256 rows)."""
    base = H.base_params()
    x = np.asarray(H.mirrored()[0])
    cfg = H.lora_config(("Dense_0", "Dense_1", "Dense_2"), 4)
    ad, new = eva_init(_apply, base, [x[i:i + 256] for i in range(0, 1280, 256)], cfg, EvaConfig(rho=2.0, tau=0.99))
    return cfg, ad, new


def test_eva_init_builds_lora_from_top_singular_vectors(eva3):
    base = H.base_params()
    x = np.asarray(H.mirrored()[0])
    _, ad, new = eva3
    ranks = {m: ad[m]["lora_A"].shape[-1] for m in ad}
    assert sum(ranks.values()) == 12 and all(new.rank_for(m) == r for m, r in ranks.items())
    jax.tree.map(np.testing.assert_array_equal, merge(base, ad, new), base)  # B = 0: the model is unchanged
    # Dense_1's inputs are relu(Dense_0(x)): its A spans the top right-singular vectors of those activations
    h = np.maximum(x[:1280] @ np.asarray(base["Dense_0"]["kernel"]) + np.asarray(base["Dense_0"]["bias"]), 0)
    _, S, Vt = np.linalg.svd(h - h.mean(0), full_matrices=False)
    A = np.asarray(ad["Dense_1"]["lora_A"])
    r = A.shape[1]
    cos = np.linalg.svd(Vt[:r] @ A, compute_uv=False)  # cosines of the principal angles
    assert cos.min() > 0.99, cos
    np.testing.assert_allclose(A.T @ A, np.eye(r), atol=1e-5)


def test_eva_validation():
    base = H.base_params()
    with pytest.raises(ValueError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        EvaConfig(tau=1.5)
    cfg = H.lora_config(("Dense_0",), 4)
    with pytest.raises(ValueError, match="empty"):
        eva_init(_apply, base, [], cfg)
    with pytest.raises(ValueError, match="selects no"):
        eva_init(_apply, base, [np.zeros((16, 64), np.float32)], LoraConfig(rank=2, target="nothing"))
    with pytest.raises(ValueError, match="fewer than"):
        eva_init(_apply, base, [np.zeros((4, 64), np.float32)], cfg)
    bad = jax.tree.map(lambda a: a, base)
    bad["Dense_0"] = dict(bad["Dense_0"], bias=bad["Dense_0"]["bias"].at[0].set(jnp.inf))
    with pytest.raises(ValueError, match="non-finite.*Dense_0/bias"):
        eva_init(_apply, bad, [np.zeros((16, 64), np.float32)], cfg)


def test_eva_sharded_batches_equal_single_device(mesh, eva3):
    base = H.base_params()
    x = np.asarray(H.mirrored()[0])
    cfg, ref, ref_cfg = eva3
    sh = NamedSharding(mesh, P("data"))
    batches = [jax.device_put(x[i:i + 256], sh) for i in range(0, 1280, 256)]
    out, out_cfg = eva_init(_apply, base, batches, cfg, EvaConfig(rho=2.0, tau=0.99))
    assert out_cfg.rank_pattern == ref_cfg.rank_pattern
    # the same SVDs of activations computed with batch-sharded matmuls: float32 rounding of the sums only
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), out, ref)


def test_claim_eva_converges_faster_than_random_init(eva3):
    """EVA's claim (faster convergence than LoRA's random init) on mirrored digits, LoRA r = 4 on the three
    Dense layers (same alpha, same 300 Adam steps at lr 1e-2). Measured: mean loss over the first 50 steps EVA
    1.62 vs random 2.27, last 50 steps 0.042 vs 0.048, test accuracy 0.967 vs 0.962."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    cfg, eva_ad, eva_cfg = eva3
    rnd = init_lora(jax.random.PRNGKey(1), base, cfg)
    arms = {"eva": (eva_ad, eva_cfg), "random": (rnd, cfg)}

    def both(a, xb, yb):  # both trainings in one scan: independent adapters, summed losses
        ls = {n: H.xent(_apply(merge(base, a[n], arms[n][1]), xb), yb) for n in arms}
        return sum(ls.values()), ls

    p, losses = H.fit(both, {n: v[0] for n, v in arms.items()}, x, y, 300, 1e-2, has_aux=True)
    le, lr_ = losses["eva"], losses["random"]
    acc_e, acc_r = (H.accuracy(merge(base, p[n], arms[n][1]), xt, yt) for n in ("eva", "random"))
    assert le[:50].mean() < 0.85 * lr_[:50].mean(), (le[:50].mean(), lr_[:50].mean())
    assert acc_e >= acc_r - 0.01 and acc_e > 0.95, (acc_e, acc_r)
