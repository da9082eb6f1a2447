"""WINA (weight-informed activation sparsity) and TEAL (magnitude thresholds) of quant.pruning.activation_sparsity.

NumPy references of the paper's rules (scores, per-token top-k, the calibrated quantile threshold, the sparsified
Dense, the output error), invariants (exact counts, WINA's optimality after the orthogonalizing rotation, by brute
force), jit + 8-device sharding, validation, and the claims on the tiny decoder of tests/data/tiny_decoder: at
50% activation sparsity WINA has a lower output error than TEAL (on average, and with the paper's orthogonalizing
transform at every linear), and with the transform a lower perplexity.
"""

from itertools import combinations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from quant.pruning.activation_sparsity import (
    ActivationSparsityConfig, SparseForward, activation_mask, activation_scores, calibrate_activation_sparsity,
    calibrate_threshold, output_error, row_norms, sparse_dense, sparse_forward, threshold_mask, topk_mask,
    wina_orthogonalize,
)

from tests.tiny_decoder import SEQ, tiny_decoder


def _np_keep_topk(scores, s):
    """Reference per-token top-k: keep the n − ⌊n s⌋ largest, ties pruning the lowest index first."""
    n = scores.shape[-1]
    n_prune = int(n * s)
    flat = scores.reshape(-1, n)
    keep = np.ones(flat.shape, bool)
    for t, row in enumerate(flat):
        keep[t, np.argsort(row, kind="stable")[:n_prune]] = False
    return keep.reshape(scores.shape)


def _np_threshold(scores, s, tok=None):
    """Reference TEAL threshold: the ⌊N s⌋-th smallest calibration score of the real tokens (0 if ⌊N s⌋ = 0)."""
    a = scores if tok is None else scores[np.asarray(tok) > 0]
    a = np.sort(a.reshape(-1))
    k = int(a.size * s)
    return 0.0 if k == 0 else a[k - 1]


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32) * rng.uniform(0.2, 3.0, 32).astype(np.float32)
    w = (rng.standard_normal((32, 16)) * rng.uniform(0.1, 2.0, (32, 1))).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    return x, w, b


def test_scores_masks_forward_match_numpy(layer):
    x, w, b = layer
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    norms = np.sqrt((w64**2).sum(1))  # ‖W_{j,:}‖₂ of the Flax kernel [in, out]
    np.testing.assert_allclose(np.asarray(row_norms(w)), norms, rtol=1e-6)
    ref = {"teal": np.abs(x64), "wina": np.abs(x64) * norms}
    for method in ("teal", "wina"):
        sc = np.asarray(activation_scores(x, w, method))
        np.testing.assert_allclose(sc, ref[method], rtol=1e-6)
        for s in (0.0, 0.3, 0.5, 0.75):
            keep = np.asarray(topk_mask(sc, s))
            np.testing.assert_array_equal(keep, _np_keep_topk(sc, s))
            assert (keep.sum(-1) == 32 - int(32 * s)).all()
            cfg = ActivationSparsityConfig(s, method)
            np.testing.assert_array_equal(np.asarray(activation_mask(x, w, cfg)), keep)
            y = np.asarray(sparse_dense(x, w, b, config=cfg))
            np.testing.assert_allclose(y, (x64 * keep) @ w64 + b, rtol=1e-4, atol=1e-4)
            e = float(output_error(x, w, keep))
            e_ref = (((x64 * ~keep) @ w64) ** 2).sum() / ((x64 @ w64) ** 2).sum()
            np.testing.assert_allclose(e, e_ref, rtol=1e-4)
        # the calibrated threshold, with and without padding tokens
        tok = np.ones(x.shape[:2], np.float32)
        tok[0, 3:] = 0.0
        for s in (0.0, 0.5, 0.9):
            for tw in (None, tok):
                t = float(calibrate_threshold(sc, s, tw))
                np.testing.assert_allclose(t, _np_threshold(sc, s, tw), rtol=1e-6)
                cfg = ActivationSparsityConfig(s, method, "threshold")
                keep = np.asarray(activation_mask(x, w, cfg, t))
                np.testing.assert_array_equal(keep, sc > t)
                real = keep if tw is None else keep[tok > 0]
                assert abs((1 - real.mean()) - s) < 1e-9 + 1 / real.size  # prunes ⌊N s⌋ of the calibration entries


def test_invariants(layer):
    x, w, b = layer
    x0, w0 = x.copy(), w.copy()
    # WINA with equal row norms is TEAL; WINA's mask does not change when W is scaled
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((32, 32)))
    w_eq = q[:, :16].astype(np.float32) * 3.0  # orthonormal columns... rows of equal norm after scaling below
    w_eq = w_eq / np.linalg.norm(w_eq, axis=1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(topk_mask(activation_scores(x, w_eq, "wina"), 0.5)),
                                  np.asarray(topk_mask(activation_scores(x, w_eq, "teal"), 0.5)))
    cfg = ActivationSparsityConfig(0.5, "wina")
    np.testing.assert_array_equal(np.asarray(activation_mask(x, w, cfg)), np.asarray(activation_mask(x, 7.0 * w, cfg)))
    # sparsity 0 is the dense layer; inputs not modified
    np.testing.assert_allclose(np.asarray(sparse_dense(x, w, b, config=ActivationSparsityConfig(0.0))), x @ w + b,
                               rtol=1e-5, atol=1e-5)
    # the rotation is exact: x W = (x Q)(Qᵀ W), Q orthogonal, Qᵀ W row-orthogonal
    Q, w_rot = wina_orthogonalize(w)
    Q, w_rot = np.asarray(Q, np.float64), np.asarray(w_rot, np.float64)
    np.testing.assert_allclose(Q.T @ Q, np.eye(32), atol=1e-5)
    g = w_rot @ w_rot.T
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-4)
    np.testing.assert_allclose((x @ Q) @ w_rot, x @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


def test_orthogonalized_wina_is_the_optimal_subset():
    # the paper's theorem: with row-orthogonal W, WINA's top-k minimizes ‖xW − x_S W‖ over all |S| = k; TEAL not
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    w = (rng.standard_normal((8, 6)) * rng.uniform(0.1, 3.0, (8, 1))).astype(np.float32)
    Q, w_rot = wina_orthogonalize(w)
    xr = np.asarray(x @ np.asarray(Q), np.float64)
    wr = np.asarray(w_rot, np.float64)
    subsets = np.array([[j in c for j in range(8)] for c in combinations(range(8), 4)])  # 70 kept sets
    errs = {}
    for method in ("wina", "teal"):
        keep = np.asarray(topk_mask(activation_scores(xr.astype(np.float32), wr.astype(np.float32), method), 0.5))
        errs[method] = (((xr * ~keep) @ wr) ** 2).sum(-1)
    best = np.array([min((((xt * ~s) @ wr) ** 2).sum() for s in subsets) for xt in xr])
    np.testing.assert_allclose(errs["wina"], best, rtol=1e-5, atol=1e-9)
    assert (errs["teal"] >= best - 1e-9).all() and (errs["teal"] > best * (1 + 1e-6)).mean() > 0.5


def test_jit_and_sharded_equal_single_device(layer, mesh):
    x, w, b = layer
    x = np.tile(x, (8, 1, 1))  # 24 token rows, sharded 3 per device
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    for method in ("wina", "teal"):
        for mode in ("topk", "threshold"):
            cfg = ActivationSparsityConfig(0.5, method, mode)
            t = calibrate_threshold(activation_scores(x, w, method), 0.5) if mode == "threshold" else None
            ts = jax.jit(lambda a: calibrate_threshold(activation_scores(a, w, method), 0.5))(xs)
            if t is not None:
                assert float(ts) == float(t)
            f = jax.jit(lambda a, tt, cfg=cfg: (activation_mask(a, w, cfg, tt), sparse_dense(a, w, b, config=cfg,
                                                                                             threshold=tt)))
            m1, y1 = f(x, t)
            m8, y8 = f(xs, ts if t is not None else None)
            np.testing.assert_array_equal(np.asarray(m8), np.asarray(m1))
            np.testing.assert_allclose(np.asarray(y8), np.asarray(y1), rtol=1e-5, atol=1e-5)


def test_validation(layer):
    x, w, _ = layer
    for bad in (dict(sparsity=1.0), dict(sparsity=-0.1), dict(method="cats"), dict(mode="greedy"),
                dict(transform=1)):
        with pytest.raises(ValueError):
            ActivationSparsityConfig(**bad)
    cfg = ActivationSparsityConfig(0.5)
    with pytest.raises(ValueError, match="features"):
        activation_mask(x[..., :31], w, cfg)
    with pytest.raises(ValueError, match="2-D"):
        activation_mask(x, w[None], cfg)
    with pytest.raises(ValueError, match="NaN"):
        activation_mask(np.where(x > 2, np.nan, x), w, cfg)
    with pytest.raises(ValueError, match="threshold"):
        activation_mask(x, w, ActivationSparsityConfig(0.5, mode="threshold"))
    with pytest.raises(ValueError, match="threshold"):
        activation_mask(x, w, ActivationSparsityConfig(0.5, mode="threshold"), -1.0)
    with pytest.raises(ValueError, match="kernel"):
        activation_scores(x, None, "wina")
    with pytest.raises(ValueError, match="non-negative"):
        calibrate_threshold(x, 0.5)
    with pytest.raises(ValueError, match="token_weights"):
        calibrate_threshold(np.abs(x), 0.5, np.ones(3))
    with pytest.raises(ValueError, match="sparsity"):
        topk_mask(np.abs(x), 1.5)
    with pytest.raises(ValueError, match="bias"):
        sparse_dense(x, w, np.ones(3), config=cfg)
    with pytest.raises(ValueError, match="keep"):
        output_error(x, w, np.ones((3, 5, 31), bool))
    with pytest.raises(ValueError, match="config"):
        activation_mask(x, w, {"sparsity": 0.5})
    assert np.asarray(threshold_mask(np.abs(x), 0.0)).all()


# ------------------------------------------------------------------------------------------------ tiny decoder

@pytest.fixture(scope="module")
def decoder():
    from quant.ptq.block_models import block_model

    model, params, windows, test = tiny_decoder(4)  # 16 held-out windows of 128 tokens
    calib = {"input_ids": windows}
    return model, params, block_model(model), calib, test


@pytest.fixture(scope="module")
def calibrated(decoder):
    _, params, bm, calib, _ = decoder
    out = {}
    for method, mode, transform in (("teal", "topk", False), ("wina", "topk", False), ("wina", "threshold", True)):
        cfg = ActivationSparsityConfig(0.5, method, mode, transform)
        out[method, mode, transform] = (cfg, *calibrate_activation_sparsity(params, bm, calib, cfg, progress=False))
    return out


def test_wina_lower_output_error_than_teal(decoder, calibrated):
    _, teal, rep_t = calibrated["teal", "topk", False]
    _, _, rep_w = calibrated["wina", "topk", False]
    _, thr, rep_wt = calibrated["wina", "threshold", True]
    assert len(rep_t["layers"]) == 21 and rep_t["method"] == "teal" and rep_w["method"] == "wina"
    ratios = []
    for path, r in rep_t["layers"].items():
        rw, rwt = rep_w["layers"][path], rep_wt["layers"][path]
        assert r["sparsity"] == rw["sparsity"] == 0.5  # exact per-token counts
        assert abs(rwt["sparsity"] - 0.5) < 1e-3 and rwt["threshold"] > 0  # the calibrated thresholds hit 50%
        assert 0 < rw["error"] < 1.01 * r["error"], (path, rw["error"], r["error"])
        assert rwt["error"] < 0.5 * r["error"], (path, rwt["error"], r["error"])  # transform: every layer
        ratios.append(rw["error"] / r["error"])
    # measured (4 calibration windows, seeds 0 / 1 / 2): mean relative output error TEAL 0.0367 / 0.0365 / 0.0365,
    # WINA 0.0356 / 0.0355 / 0.0355, WINA ÷ TEAL per layer from 0.80 up to 0.999 / 0.997 / 1.005 (mean 0.963 /
    # 0.962 / 0.966: lower at all 21 linears for seeds 0 and 1); WINA with the transform (calibrated thresholds)
    # 0.0051, at most 0.33x TEAL's error at any linear
    assert np.mean(ratios) < 0.98 and sum(q < 1 for q in ratios) >= 19, ratios
    assert rep_wt["error"] < 0.25 * rep_t["error"], (rep_wt["error"], rep_t["error"])
    assert set(thr) == {p[: -len("/kernel")] for p in rep_wt["layers"]} and teal == {}


def test_wina_transform_lower_perplexity_than_teal(decoder, calibrated):
    import optax

    from jaxmodels.perplexity import evaluate_perplexity, perplexity_windows

    model, params, bm, calib, test = decoder
    ppl_teal = evaluate_perplexity(SparseForward(bm, ActivationSparsityConfig(0.5, "teal")),
                                   {"params": params, "thresholds": {}}, test, SEQ, batch_size=16, progress=False)
    cfg, thr, _ = calibrated["wina", "threshold", True]
    ids = perplexity_windows(test, SEQ)  # the same 16 windows, every token after the first of a window predicted
    logits = sparse_forward(params, bm, {"input_ids": ids}, cfg, thr)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    ppl_wina = float(np.exp(np.mean(np.asarray(nll, np.float64))))
    # measured (dense 11.62 on these 16 windows; 4 calibration windows, seeds 0 / 1 / 2): TEAL (top-k) 13.83,
    # WINA with the transform (calibrated thresholds) 12.02 / 11.99 / 12.01. Off-line: TEAL with thresholds 13.86 /
    # 13.92 / 13.88, TEAL with the transform (the reference's teal_transform) 13.65 / 13.91 / 13.51, WINA without
    # it 13.92 -- on this model the column norms alone lower the layers' errors (test above) but not the
    # perplexity; the rotation that makes the kernel rows orthogonal is what the paper's error bound needs
    assert ppl_wina < 0.95 * ppl_teal, (ppl_wina, ppl_teal)
