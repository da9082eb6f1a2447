"""HT-SR metrics against weightwatcher 0.7.7 (tests/jaxmodels/analysis/data, made by
scripts/make_weightwatcher_reference.py), the Hill estimator against a NumPy transcription of the FARMS /
TempBalance code, the per-layer walk over a params tree, sharded inputs and input validation."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis import spectral as S

DATA = Path(__file__).with_name("data")
REF = np.load(DATA / "weightwatcher_reference.npz")
CASES = sorted({k.split("/")[0] for k in REF.files})
METRICS = ("alpha", "alpha_weighted", "D", "xmin", "sigma", "norm", "log_norm", "spectral_norm", "log_spectral_norm",
           "stable_rank", "log_alpha_norm")


def _kernel(name):
    """weightwatcher's torch-layout weight -> Flax layout."""
    w = REF[f"{name}/weight"]
    return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T


def _hill_numpy(eigs, xmin_pos=2):
    """tempbalance_farms.py analysis_esd, pl_fitting='median' (filter_zeros=False), in float64."""
    e = np.sort(np.asarray(eigs, np.float64))
    i = int(len(e) / xmin_pos)
    n = float(len(e) - i)
    loge = np.log(e)
    alpha = 1 + n / (np.sum(loge[i:]) - n * loge[i])
    d = np.max(np.abs(1 - (e[i:] / e[i]) ** (-alpha + 1) - np.arange(n) / n))
    return alpha, e[i], d


HILL_EIGS = np.random.default_rng(3).pareto(2.5, 301).astype(np.float32) + 0.1
HILL_LOW = np.concatenate([np.full(40, 1e-7, np.float32), HILL_EIGS[40:]])  # 40 eigenvalues below the threshold


def _params():
    return {"Dense_0": {"kernel": jnp.asarray(_kernel("gauss_64x64")), "bias": jnp.zeros(64)},
            "Conv_0": {"kernel": jnp.asarray(_kernel("conv_16x8x3x3")), "bias": jnp.zeros(16)},
            "Dense_1": {"kernel": jnp.ones((4, 3))}}  # 3 eigenvalues < min_evals: skipped, as weightwatcher


@pytest.fixture(scope="module")
def ours():
    """Everything single-device in one compilation: the ESDs of all cases (conv: weightwatcher's get_ESD reports the
    slices without conv2d_norm, its analyze() fits them with it), all the fits, the Hill fits, the tree walk."""
    kernels = [jnp.asarray(_kernel(n)) for n in CASES]

    @jax.jit
    def run(kernels, hill_eigs, hill_low, params):
        plain = [S.esd(k, conv2d_norm=False) for k in kernels]
        scaled = [S.esd(k) for k in kernels]
        # zero padding is invisible to the fit (zeros <= thresh are dropped, as weightwatcher drops them) and to
        # the norm metrics (Σλ, λmax, Σλ^α): one vmapped fit for all cases
        n = max(e.shape[0] for e in scaled)
        metrics = jax.vmap(S.esd_metrics)(jnp.stack([jnp.pad(e, (n - e.shape[0], 0)) for e in scaled]))
        hill = (S.hill_alpha(hill_eigs), S.hill_alpha(hill_eigs, xmin_pos=3), S.hill_alpha(hill_low, thresh=1e-5))
        layers = (S.layer_metrics(params, exclude="Conv"), S.layer_metrics(params, include="Dense", min_evals=65))
        return plain, metrics, hill, layers

    params = _params()
    before = jax.tree.map(np.array, params)
    plain, metrics, hill, layers = run(kernels, jnp.asarray(HILL_EIGS), jnp.asarray(HILL_LOW), params)
    jax.tree.map(np.testing.assert_array_equal, params, before)  # inputs untouched
    return dict(zip(CASES, plain)), metrics, hill, layers


def test_esd_matches_weightwatcher(ours):
    esds = ours[0]
    for name in CASES:
        ref = REF[f"{name}/evals"]
        got = np.asarray(esds[name], np.float64)
        assert got.shape == ref.shape, name
        # float32 eigvalsh of the Gram matrix: absolute error ~ M·eps32·λmax (<= 5e-6 λmax here); measured <= 3.3e-7
        np.testing.assert_allclose(got, ref, rtol=0, atol=5e-6 * ref.max(), err_msg=name)


def test_metrics_match_weightwatcher(ours):
    m = ours[1]
    for i, name in enumerate(CASES):
        assert int(m.num_pl_spikes[i]) == int(REF[f"{name}/num_pl_spikes"]), f"{name}: another xmin won the KS min"
        for f in METRICS:
            # same xmin -> only float32 rounding of n ~ 100 log-ratios / sums: measured <= 2.3e-6 relative
            np.testing.assert_allclose(float(getattr(m, f)[i]), float(REF[f"{name}/{f}"]), rtol=2e-5,
                                       err_msg=f"{name}/{f}")
    assert np.isclose(float(REF["smalln_30x12/num_evals"]), 12)  # the case that exercises the small-N fit


def test_hill_alpha_matches_reference_code(ours):
    f2, f3, f_low = ours[2]
    for fit, xmin_pos in ((f2, 2), (f3, 3)):
        a, xmin, d = _hill_numpy(HILL_EIGS, xmin_pos)
        np.testing.assert_allclose(float(fit.alpha), a, rtol=1e-5)
        np.testing.assert_allclose(float(fit.xmin), xmin, rtol=1e-6)
        np.testing.assert_allclose(float(fit.D), d, rtol=1e-4, atol=1e-6)
        assert int(fit.num_pl_spikes) == 301 - int(301 / xmin_pos)
    # a threshold drops the small eigenvalues first: the same as fitting the remaining ones
    np.testing.assert_allclose(float(f_low.alpha), _hill_numpy(HILL_EIGS[40:])[0], rtol=1e-5)


def test_layer_metrics_over_a_params_tree(ours):
    out, none = ours[3]
    assert list(out) == ["Dense_0/kernel"]  # biases (1-D), the excluded conv and the 3-eigenvalue kernel skipped
    assert none == {}  # 64 eigenvalues < min_evals = 65
    for f in METRICS:
        np.testing.assert_allclose(float(getattr(out["Dense_0/kernel"], f)), float(REF[f"gauss_64x64/{f}"]),
                                   rtol=2e-5)


def test_sharded_kernel_equals_single_device(mesh, ours):
    # rows of the kernel sharded over the 8 devices: the Gram matmul reduces across shards, else identical (the
    # fit then runs on the replicated eigenvalues, the same program as on one device)
    w = jax.device_put(jnp.asarray(_kernel("gauss_64x64")), NamedSharding(mesh, P("data", None)))
    got = jax.jit(S.esd)(w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ours[0]["gauss_64x64"]), rtol=1e-5,
                               atol=1e-6 * float(got.max()))


def test_validation_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 2-D"):
        S.esd(np.ones(5, np.float32))
    with pytest.raises(TypeError, match="floating"):
        S.esd(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        S.esd(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        S.fit_power_law(np.ones(1, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        S.fit_power_law(np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="thresh"):
        S.fit_power_law(np.ones(8, np.float32), thresh=-1.0)
    with pytest.raises(ValueError, match="xmin_pos"):
        S.hill_alpha(np.ones(8, np.float32), xmin_pos=1.0)
    with pytest.raises(ValueError, match="fit must be"):
        S.esd_metrics(np.ones(8, np.float32), fit="mle")
    with pytest.raises(ValueError, match="min_evals"):
        S.layer_metrics({"k": np.ones((4, 4), np.float32)}, min_evals=1)
    with pytest.raises(ValueError, match="Dense_0/kernel holds NaN"):
        S.layer_metrics({"Dense_0": {"kernel": np.full((16, 16), np.inf, np.float32)}})
