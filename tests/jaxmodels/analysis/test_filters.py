"""CNN Filter DB: degeneration measures against a NumPy/SciPy transcription of torchconvquality's rules, the
distribution-shift drift against a NumPy transcription of the notebook's histogram KL, invariants, sharding,
validation, and the claim that training moves 3x3 filters away from the random regime on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis.filters import (filter_distribution_shift, filter_orthogonality,
                                        filter_pca, filter_quality, filter_sparsity, kernel_filters,
                                        layer_filter_quality, scale_filters, variance_entropy)
from tests.jaxmodels.analysis.digits_cnn import init_params, trained_cnns


def np_quality(kf, eps=0.01):
    """torchconvquality.measure_conv_weight_quality on the PyTorch weight [M, C, kh, kw], in NumPy float64."""
    w4 = np.transpose(np.asarray(kf, np.float64), (3, 2, 0, 1))
    w = w4.reshape(-1, w4.shape[2] * w4.shape[3])
    n = w.shape[0]
    t = np.abs(w).max() * eps
    sparse = (np.abs(w) >= t).sum(1) == 0

    def ve(x):
        s = np.linalg.svd(x - x.mean(0), compute_uv=False)
        v = s ** 2 / (len(x) - 1)
        h = scipy.stats.entropy(v / v.sum(), base=10)
        thr = 1.2618047 / (1 + np.exp(-0.88767525 * (np.log2(len(x)) - 2.30436435))) - 0.31050834
        return h, h / thr

    wo = w4.reshape(w4.shape[0], -1)
    wn = wo / np.linalg.norm(wo, axis=1, keepdims=True)
    orth = 1 - np.abs(wn @ wn.T - np.eye(len(wo))).sum() / (len(wo) * (len(wo) - 1))
    return (n, sparse.mean(), *ve(w), *ve(w[~sparse]), orth)


def np_drift(fa, fb, bins):
    """The notebook: peak scaling, PCA on the pooled filters (sign: largest |entry| positive), 70-bin densities
    over the shared range, eps for empty bins, variance-weighted symmetric KL (scipy.stats.entropy)."""
    def scale(x):
        den = np.abs(x).max(1)
        return x / np.where(den == 0, 1, den)[:, None]

    a, b = scale(np.asarray(fa, np.float64)), scale(np.asarray(fb, np.float64))
    pool = np.concatenate([a, b])
    mean = pool.mean(0)
    _, s, vt = np.linalg.svd(pool - mean, full_matrices=False)
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    w = s ** 2 / np.sum(s ** 2)
    ca, cb = (a - mean) @ vt.T, (b - mean) @ vt.T
    rng = (min(ca.min(), cb.min()), max(ca.max(), cb.max()))

    def dist(x):
        v, _ = np.histogram(x, range=rng, bins=bins, density=True)
        v[v == 0] = np.finfo(np.float32).eps
        return v / v.sum()

    return sum(w[k] * (scipy.stats.entropy(dist(ca[:, k]), dist(cb[:, k]))
                       + scipy.stats.entropy(dist(cb[:, k]), dist(ca[:, k]))) for k in range(len(w)))


def test_quality_matches_torchconvquality_rules():
    r = np.random.default_rng(0)
    kf = r.standard_normal((3, 3, 4, 6)).astype(np.float32)
    kf[:, :, 1, 2] = 1e-4  # two degenerate (sparse) filters
    kf[:, :, 3, 0] = 0.0
    before = kf.copy()
    q = filter_quality(kf)
    np.testing.assert_allclose([float(v) for v in q], np_quality(kf), rtol=2e-5)
    assert float(q.sparsity) == pytest.approx(2 / 24)
    np.testing.assert_array_equal(kf, before)
    h, hn = variance_entropy(kernel_filters(kf))
    np.testing.assert_allclose([float(h), float(hn)], np_quality(kf)[2:4], rtol=2e-5)
    # PyTorch's filter order: weight[M, C, kh, kw].reshape(-1, 9)
    np.testing.assert_array_equal(np.asarray(kernel_filters(kf))[1 * 4 + 3], kf[:, :, 3, 1].reshape(-1))


def test_drift_matches_notebook_transcription():
    r = np.random.default_rng(1)
    fa = r.standard_normal((300, 9)).astype(np.float32)
    fb = (r.standard_normal((200, 9)) * np.linspace(0.2, 2, 9) + 0.3).astype(np.float32)
    got = filter_distribution_shift(fa, fb)  # the paper's 70 bins
    np.testing.assert_allclose(float(got.drift), np_drift(fa, fb, 70), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got.pca.explained_variance_ratio).sum(), 1.0, rtol=1e-6)


def test_invariants():
    r = np.random.default_rng(2)
    q, _ = np.linalg.qr(r.standard_normal((18, 18)))
    ortho = q[:, :4].reshape(3, 3, 2, 4).astype(np.float32)  # 4 mutually orthogonal output filters
    assert float(filter_orthogonality(ortho)) == pytest.approx(1.0, abs=1e-6)
    same = np.repeat(r.standard_normal((3, 3, 2, 1)), 4, axis=-1).astype(np.float32)  # same shape: one compile
    assert float(filter_orthogonality(same)) == pytest.approx(0.0, abs=1e-6)
    rank1 = (r.standard_normal((1, 1, 1, 8)) * r.standard_normal((3, 3, 1, 1))).astype(np.float32)
    rank1 = np.concatenate([rank1, rank1], axis=2)
    assert float(filter_quality(rank1).variance_entropy) == pytest.approx(0.0, abs=1e-5)  # all filters alike
    f = r.standard_normal((64, 9)).astype(np.float32)
    assert float(filter_distribution_shift(f, f).drift) == pytest.approx(0.0, abs=1e-6)
    pos = r.uniform(0.5, 3.0, (64, 1)).astype(np.float32)  # peak scaling: per-filter positive scale is invisible
    g = r.standard_normal((64, 9)).astype(np.float32)
    np.testing.assert_allclose(float(filter_distribution_shift(f * pos, g).drift),
                               float(filter_distribution_shift(f, g).drift), rtol=1e-4)
    assert float(filter_sparsity(np.zeros((3, 9), np.float32))) == 1.0
    pca = filter_pca(scale_filters(f))  # orthonormal basis, sign: largest |entry| positive
    np.testing.assert_allclose(np.asarray(pca.components @ pca.components.T), np.eye(9), atol=1e-5)
    assert (np.asarray(pca.components)[np.arange(9), np.abs(np.asarray(pca.components)).argmax(1)] > 0).all()


def test_jit_and_sharded_equal_single_device(mesh):
    kf = np.random.default_rng(3).standard_normal((3, 3, 4, 16)).astype(np.float32)
    f = jax.jit(filter_quality)
    q1 = f(jnp.asarray(kf))
    q2 = f(jax.device_put(jnp.asarray(kf), NamedSharding(mesh, P(None, None, None, "data"))))
    np.testing.assert_allclose([float(v) for v in q2], [float(v) for v in q1], rtol=1e-5)  # SVD/reduction order


def test_validation_errors():
    with pytest.raises(ValueError, match="4-D"):
        filter_quality(np.ones((3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        filter_quality(np.full((3, 3, 2, 2), np.inf, np.float32))
    with pytest.raises(ValueError, match="sparsity_eps"):
        filter_quality(np.ones((3, 3, 2, 2), np.float32), sparsity_eps=1.5)
    with pytest.raises(ValueError, match="2 output channels"):
        filter_orthogonality(np.ones((3, 3, 2, 1), np.float32))
    with pytest.raises(ValueError, match="sizes differ"):
        filter_distribution_shift(np.ones((4, 9), np.float32), np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="value_range"):
        filter_distribution_shift(np.ones((4, 9), np.float32), np.ones((4, 9), np.float32), value_range=(1, 0))
    with pytest.raises(ValueError, match="no conv kernel"):
        layer_filter_quality({"Dense_0": {"kernel": np.ones((3, 3), np.float32)}})


def test_claim_training_moves_filters_out_of_the_random_regime():
    """Gavrikov & Keuper: random filter sets sit at normalised variance entropy ~1 (the authors' fit h(n)); trained
    layers have lower entropy (more structure, fewer effective filter patterns) and their filter distribution
    drifts away from the random one far more than two random initialisations differ."""
    _, p0, plain, _ = trained_cnns()
    q0, q1 = layer_filter_quality(p0), layer_filter_quality(plain)
    ve0 = {k: float(v.variance_entropy_norm) for k, v in q0.items()}
    ve1 = {k: float(v.variance_entropy_norm) for k, v in q1.items()}
    # measured: conv1 1.06 -> 1.01 (32 one-channel filters: within the 1.02-1.07 spread of other inits, so only
    # "below its own init" is asserted), conv2 1.00 -> 0.72, conv3 1.00 -> 0.75
    for k in ("conv2/kernel", "conv3/kernel"):
        assert 0.9 < ve0[k] < 1.1 and ve1[k] < ve0[k] - 0.15, (ve0, ve1)
    assert ve1["conv1/kernel"] < ve0["conv1/kernel"], (ve0, ve1)
    other = init_params(5)
    f0, f1, fo = (kernel_filters(p["conv2"]["kernel"]) for p in (p0, plain, other))
    drift_trained = float(filter_distribution_shift(f0, f1, bins=10).drift)
    drift_init = float(filter_distribution_shift(f0, fo, bins=10).drift)
    assert drift_trained > 5 * drift_init, (drift_trained, drift_init)  # measured 1.29 vs 0.066
    assert float(q1["conv2/kernel"].sparsity) == 0.0  # no degenerate (all-zero) filters at this scale
