"""NC1-NC4 against a NumPy float64 transcription of Papyan, Han & Donoho's notebook, sharded features, input
validation, and the terminal-phase claim on a digits MLP (tests/jaxmodels/analysis/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis import neural_collapse_metrics


def nc_numpy(h, y, C, kernel, bias):
    """The notebook's measurements in float64 (Sw over samples, muG = mean of class means, svds(Sb, C-1))."""
    h = np.asarray(h, np.float64)
    N, D = h.shape
    mean = np.stack([h[y == c].mean(0) for c in range(C)])
    M_ = (mean - mean.mean(0)).T
    Sw = sum((h[y == c] - mean[c]).T @ (h[y == c] - mean[c]) for c in range(C)) / N
    ev, U = np.linalg.eigh(M_ @ M_.T / C)
    inv_Sb = U[:, -(C - 1):] @ np.diag(1 / ev[-(C - 1):]) @ U[:, -(C - 1):].T

    def geometry(V):
        n = np.linalg.norm(V, axis=0)
        cos = (V / n).T @ (V / n)
        off = cos[~np.eye(C, dtype=bool)]
        gram = V.T @ V
        etf = (np.eye(C) - 1.0 / C) / np.sqrt(C - 1)
        return [n.std(ddof=1) / n.mean(), off.std(ddof=1), np.abs(off + 1 / (C - 1)).mean(),
                np.linalg.norm(gram / np.linalg.norm(gram) - etf)]

    W = np.asarray(kernel, np.float64).T  # classifier.weight [C, D]
    gm, gw = geometry(M_), geometry(W.T)
    nc3 = np.linalg.norm(W.T / np.linalg.norm(W) - M_ / np.linalg.norm(M_)) ** 2
    ncc = np.argmin(((h[:, None, :] - mean[None]) ** 2).sum(-1), 1)
    nc4 = 1 - np.mean((h @ W.T + bias).argmax(1) == ncc)
    return [np.trace(Sw @ inv_Sb) / C, gm[0], gw[0], gm[1], gw[1], gm[2], gw[2], gm[3], gw[3], nc3, nc4]


def _data(seed=0, n=200, d=12, c=5):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)]).astype(np.int32)
    h = (2.0 * rng.standard_normal((c, d))[y] + rng.standard_normal((n, d))).astype(np.float32)
    return h, y, rng.standard_normal((d, c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def test_matches_numpy_reference_and_sharded(mesh):
    h, y, k, b = _data()
    before = [a.copy() for a in (h, y, k, b)]

    @jax.jit
    def both(h, y, k, b):  # with the classifier, and without (NC1 and the class-mean geometry only)
        return neural_collapse_metrics(h, y, 5, kernel=k, bias=b), neural_collapse_metrics(h, y, 5)

    got, no_w = both(jnp.asarray(h), jnp.asarray(y), jnp.asarray(k), jnp.asarray(b))
    ref = nc_numpy(h, y, 5, k, b)
    # float32 class statistics and a 5 x 5 eigh (Σ_B⁺ from the Gram of the means): rounding only, measured <= 1.8e-7
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(no_w.nc1), ref[0], rtol=1e-5)
    assert np.isnan(float(no_w.nc3_self_duality)) and np.isnan(float(no_w.nc4_ncc_mismatch))
    for a, a0 in zip((h, y, k, b), before):
        np.testing.assert_array_equal(a, a0)
    # features and labels sharded over the batch on 8 devices: the class sums reduce across shards
    sh = NamedSharding(mesh, P("data"))
    hs, ys = jax.device_put(jnp.asarray(h), sh), jax.device_put(jnp.asarray(y), sh)
    sharded = jax.jit(lambda h, y, k, b: neural_collapse_metrics(h, y, 5, kernel=k, bias=b))
    np.testing.assert_allclose(np.asarray(sharded(hs, ys, jnp.asarray(k), jnp.asarray(b))), np.asarray(got),
                               rtol=1e-5, atol=1e-6)


def test_validation_rejects_bad_input():
    h, y, k, b = _data()
    with pytest.raises(ValueError, match="every class must occur.*\\[4\\]"):
        neural_collapse_metrics(h[y != 4], y[y != 4], 5)
    with pytest.raises(ValueError, match="labels must lie"):
        neural_collapse_metrics(h, y, 4)
    with pytest.raises(ValueError, match="labels must have shape"):
        neural_collapse_metrics(h, y[:-1], 5)
    with pytest.raises(TypeError, match="integers"):
        neural_collapse_metrics(h, y.astype(np.float32), 5)
    with pytest.raises(ValueError, match="kernel must have shape"):
        neural_collapse_metrics(h, y, 5, kernel=k.T)
    with pytest.raises(ValueError, match="bias given without kernel"):
        neural_collapse_metrics(h, y, 5, bias=b)
    with pytest.raises(ValueError, match="features holds NaN"):
        neural_collapse_metrics(np.full_like(h, np.nan), y, 5)
    with pytest.raises(ValueError, match="num_classes"):
        neural_collapse_metrics(h, y, 1)


def test_claim_terminal_phase_collapse(collapsed_mlp):
    """Papyan et al.'s claim at digits scale: training well past zero training error (terminal phase) shrinks the
    within-class variability (NC1) and moves the class means toward a simplex ETF (NC2). MLP 64-64-64-10 on 200
    digits, MSE loss, SGD(0.1, momentum 0.9, wd 1e-3), 1500 full-batch steps (conftest.py). Measured, seeds 0/1/2
    (first zero-error checkpoint, steps 100/100/300 -> step 1500): NC1 0.1116 -> 0.0162 / 0.1112 -> 0.0108 /
    0.0474 -> 0.0125 (>= 3.8x less); NC2 max-angle 0.154 -> 0.108 / 0.148 -> 0.101 / 0.132 -> 0.121 (<= 0.92x);
    ETF distance 0.563 -> 0.454 / 0.595 -> 0.433 / 0.527 -> 0.476 (<= 0.90x); equinorm 0.177 -> 0.154 /
    0.168 -> 0.161 / 0.165 -> 0.146; NC3 0.73 -> 0.35 / 0.68 -> 0.33 / 0.59 -> 0.34; NC4 ends at 0. (With
    cross-entropy at this cost NC1 moved little and not monotonically, so the test uses the MSE loss.)"""
    _, _, ckpts = collapsed_mlp
    first = next(i for i, (_, err, _) in enumerate(ckpts) if err == 0.0)
    step0, _, early = ckpts[first]
    step1, err1, late = ckpts[-1]
    assert err1 == 0.0 and step1 >= 3 * step0  # well past zero training error
    assert late.nc1 < early.nc1 / 3.0
    assert late.nc2_maxangle_means < 0.95 * early.nc2_maxangle_means
    assert late.nc2_etf_distance_means < 0.95 * early.nc2_etf_distance_means
    assert late.nc2_equinorm_means < early.nc2_equinorm_means
    assert late.nc3_self_duality < early.nc3_self_duality
    assert late.nc4_ncc_mismatch <= early.nc4_ncc_mismatch
