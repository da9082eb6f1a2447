"""Fisher, Fisher merging, RegMean, RegMean++: NumPy references from the papers' equations, invariants, sharding."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.capture import collect_stats
from jaxmodels.models import MLP, MLP_RULES_TP
from jaxmodels.sharding import shard
from merging.fisher import diagonal_fisher, fisher_merge
from merging.regmean import regmean, regmean_from_data, regmean_plusplus


class Linear(nn.Module):
    out: int = 3
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, use_bias=self.bias, name="Dense_0")(x)


def _linear_softmax(seed=0, d=5, k=3):
    model = Linear(k)
    params = model.init(jax.random.key(seed), jnp.zeros((1, d)))["params"]
    return params, lambda p, x: model.apply({"params": p}, x)


def _np_grad_sq(params, x, y):
    """Per-example ∇ log softmax(xW+b)[y] for a linear softmax model: dW = x (e_y - p)ᵀ, db = e_y - p."""
    W, b = np.asarray(params["Dense_0"]["kernel"], np.float64), np.asarray(params["Dense_0"]["bias"], np.float64)
    z = x @ W + b
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    e = np.eye(W.shape[1])[y] - p
    return (x[:, :, None] * e[:, None, :]) ** 2, e ** 2, p


def test_empirical_fisher_matches_numpy():
    params, apply_fn = _linear_softmax()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = rng.integers(0, 3, 12).astype(np.int32)
    F = diagonal_fisher(apply_fn, params, [(x[:5], y[:5]), (x[5:], y[5:])], progress=False)
    gW, gb, _ = _np_grad_sq(params, x.astype(np.float64), y)
    # float32 gradients of O(1) values: relative error ~1e-6.
    np.testing.assert_allclose(F["Dense_0"]["kernel"], gW.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(F["Dense_0"]["bias"], gb.mean(0), rtol=1e-4, atol=1e-6)


def test_sampled_fisher_is_unbiased_for_true_fisher():
    params, apply_fn = _linear_softmax(1)
    rng = np.random.default_rng(1)
    x = np.repeat(rng.normal(size=(2, 5)).astype(np.float32), 2000, axis=0)
    F = diagonal_fisher(apply_fn, params, [(x, np.zeros(len(x), np.int32))], mode="sampled",
                        key=jax.random.key(3), progress=False)
    # true Fisher: E_{y~p}[(e_y - p)²] per class = p(1-p) for the bias.
    _, _, p = _np_grad_sq(params, x[[0, 2000]].astype(np.float64), np.zeros(2, int))
    true_b = (p * (1 - p)).mean(0)
    # Monte Carlo with 4000 samples of a Bernoulli-like variable: std error ~ 0.25/sqrt(2000) ≈ 0.006.
    np.testing.assert_allclose(F["Dense_0"]["bias"], true_b, atol=0.03)
    with pytest.raises(ValueError, match="key"):
        diagonal_fisher(apply_fn, params, [(x, x)], mode="sampled")
    with pytest.raises(ValueError, match="mode"):
        diagonal_fisher(apply_fn, params, [(x, x)], mode="exact")


def test_fisher_sharded_equals_unsharded(mesh):
    params, apply_fn = _linear_softmax(2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    ref = diagonal_fisher(apply_fn, params, [(x, y)], progress=False)
    sh = diagonal_fisher(apply_fn, params, [(x, y)], mesh=mesh, progress=False)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(sh)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # summation order only


def _mlps(n=3, seed=0, features=(8, 6), d=4):
    model = MLP(features=features, num_outputs=4)
    ps = [model.init(jax.random.key(seed + i), jnp.zeros((1, d)))["params"] for i in range(n)]
    return ps, lambda p, x: model.apply({"params": p}, x)


def test_fisher_merge_reference_and_invariants():
    ps, _ = _mlps()
    rng = np.random.default_rng(0)
    fs = [jax.tree.map(lambda a: jnp.asarray(rng.random(a.shape), jnp.float32), p) for p in ps]
    out = fisher_merge(None, ps, fs, weights=[1.0, 2.0, 0.5], fisher_floor=1e-6).params
    lam = np.array([1.0, 2.0, 0.5])
    for path in [("Dense_0", "kernel"), ("Dense_2", "bias")]:
        th = np.stack([np.asarray(p[path[0]][path[1]], np.float64) for p in ps])
        F = np.maximum(np.stack([np.asarray(f[path[0]][path[1]], np.float64) for f in fs]), 1e-6)
        w = lam.reshape(-1, *([1] * (th.ndim - 1))) * F
        np.testing.assert_allclose(out[path[0]][path[1]], (w * th).sum(0) / w.sum(0), rtol=1e-5, atol=1e-6)
    # equal Fishers (and zero Fishers, via the floor) give the plain average
    avg = jax.tree.map(lambda *a: sum(a) / 3, *ps)
    for f in (fs[0], jax.tree.map(jnp.zeros_like, fs[0])):
        out = fisher_merge(None, ps, [f] * 3).params
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(avg)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # bf16 in -> bf16 out
    pb = [jax.tree.map(lambda a: a.astype(jnp.bfloat16), p) for p in ps]
    assert jax.tree.leaves(fisher_merge(None, pb, fs).params)[0].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="floor"):
        fisher_merge(None, ps, fs, fisher_floor=0.0)
    with pytest.raises(ValueError, match="Fishers"):
        fisher_merge(None, ps, fs[:2])


def test_fisher_merge_sharded(mesh_2d):
    ps, _ = _mlps(2, features=(8, 8))
    fs = [jax.tree.map(lambda a: jnp.abs(a) + 0.1, p) for p in ps]
    ref = fisher_merge(None, ps, fs).params
    sh = fisher_merge(None, [shard(p, MLP_RULES_TP, mesh_2d) for p in ps],
                      [shard(f, MLP_RULES_TP, mesh_2d) for f in fs]).params
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(sh)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_regmean_identical_models_return_model():
    ps, apply_fn = _mlps(1)
    rng = np.random.default_rng(0)
    b = [rng.normal(size=(10, 4)).astype(np.float32)]
    for fn in (regmean_from_data, regmean_plusplus):
        out = fn(None, [ps[0]] * 3, apply_fn, [b, b, b], alpha=0.7, progress=False).params
        for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(ps[0])):
            # a linear solve (Σ G̃) W = (Σ G̃) W₀ in float32: condition-number-limited error.
            np.testing.assert_allclose(a, c, rtol=1e-3, atol=1e-4)


def test_regmean_recovers_joint_least_squares():
    """Two linear regressors fitted on disjoint data: RegMean (α=1) = least squares on the union (the paper's
    motivating derivation)."""
    rng = np.random.default_rng(0)
    model = Linear(2, bias=False)
    Xs = [rng.normal(size=(40, 6)) for _ in range(2)]
    Ys = [X @ rng.normal(size=(6, 2)) + 0.1 * rng.normal(size=(40, 2)) for X in Xs]
    ps = [{"Dense_0": {"kernel": jnp.asarray(np.linalg.lstsq(X, Y, rcond=None)[0], jnp.float32)}}
          for X, Y in zip(Xs, Ys)]
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    out = regmean_from_data(None, ps, apply_fn, [[X.astype(np.float32)] for X in Xs], alpha=1.0,
                            progress=False).params
    joint = np.linalg.lstsq(np.concatenate(Xs), np.concatenate(Ys), rcond=None)[0]
    # well-conditioned 6x6 normal equations in float32: ~1e-5 relative error.
    np.testing.assert_allclose(out["Dense_0"]["kernel"], joint, rtol=1e-3, atol=1e-4)
    # the plain average is far from it (the test can fail)
    assert np.abs((ps[0]["Dense_0"]["kernel"] + ps[1]["Dense_0"]["kernel"]) / 2 - joint).max() > 0.05


def test_regmean_numpy_reference_alpha():
    ps, apply_fn = _mlps(2)
    rng = np.random.default_rng(1)
    grams = []
    for _ in ps:
        g = {}
        for layer, d in (("Dense_0", 4), ("Dense_1", 8)):
            X = rng.normal(size=(20, d))
            g[layer] = jnp.asarray(X.T @ X, jnp.float32)
        grams.append(g)
    alpha = 0.6
    out = regmean(None, ps, grams, alpha=alpha).params
    for layer in ("Dense_0", "Dense_1"):
        Gt = [alpha * np.asarray(g[layer], np.float64) + (1 - alpha) * np.diag(np.diag(np.asarray(g[layer])))
              for g in grams]
        Ws = [np.asarray(p[layer]["kernel"], np.float64) for p in ps]
        ref = np.linalg.solve(sum(Gt), sum(G @ W for G, W in zip(Gt, Ws)))
        np.testing.assert_allclose(out[layer]["kernel"], ref, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(out[layer]["bias"], (ps[0][layer]["bias"] + ps[1][layer]["bias"]) / 2,
                                   rtol=1e-6)
    # layers without Grams are averaged
    np.testing.assert_allclose(out["Dense_2"]["kernel"], (ps[0]["Dense_2"]["kernel"] + ps[1]["Dense_2"]["kernel"]) / 2,
                               rtol=1e-6)
    # α = 0: per-row Gram-diagonal weighted average
    out0 = regmean(None, ps, grams, alpha=0.0).params
    d = [np.diag(np.asarray(g["Dense_0"], np.float64))[:, None] for g in grams]
    ref0 = sum(di * np.asarray(p["Dense_0"]["kernel"]) for di, p in zip(d, ps)) / sum(d)
    np.testing.assert_allclose(out0["Dense_0"]["kernel"], ref0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        regmean(None, ps, grams, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        regmean(None, ps, [{"Dense_0": jnp.eye(3)}] * 2)


def test_regmean_plusplus_differs_only_after_first_layer():
    ps, apply_fn = _mlps(2)
    rng = np.random.default_rng(2)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in ps]
    a = regmean_from_data(None, ps, apply_fn, bs, alpha=0.9, progress=False).params
    b = regmean_plusplus(None, ps, apply_fn, bs, alpha=0.9, progress=False).params
    # layer 0 sees the raw inputs in both: identical; deeper layers see merged-model features in RegMean++.
    np.testing.assert_allclose(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(a["Dense_1"]["kernel"]) - np.asarray(b["Dense_1"]["kernel"])).max() > 1e-3
    # RegMean++'s Gram for layer 1 is that of the merged model's features: check the reference directly
    G = [collect_stats(apply_fn, {**a, "Dense_1": a["Dense_1"]}, bb, include="^Dense_1$", progress=False)
         ["Dense_1"].gram for bb in bs]
    ref = regmean(None, ps, [{"Dense_1": g} for g in G], alpha=0.9).params
    np.testing.assert_allclose(b["Dense_1"]["kernel"], ref["Dense_1"]["kernel"], rtol=1e-3, atol=1e-4)


def test_regmean_sharded(mesh, mesh_2d):
    ps, apply_fn = _mlps(2, features=(8, 8))
    rng = np.random.default_rng(3)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in ps]
    ref = regmean_from_data(None, ps, apply_fn, bs, progress=False).params
    sh = regmean_from_data(None, [shard(p, MLP_RULES_TP, mesh_2d) for p in ps], apply_fn, bs, mesh=mesh_2d,
                           progress=False).params
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(sh)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 summation order in the Grams


def test_regmean_conv_layers_use_im2col_grams():
    """Conv kernels are merged as [kh·kw·c_in, c_out] matrices against the im2col Gram; identical models return
    themselves and RegMean(α=1) of two convs is the least-squares solution on the union of their patches."""

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (2, 2), padding="VALID", use_bias=False, name="conv")(x)

    net = Conv()
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 5, 5, 2)).astype(np.float32) for _ in range(2)]
    ps = [net.init(jax.random.key(i), xs[0])["params"] for i in range(2)]
    same = regmean_from_data(None, [ps[0], ps[0]], apply_fn, [[xs[0]], [xs[1]]], alpha=1.0,
                             progress=False).params
    np.testing.assert_allclose(same["conv"]["kernel"], ps[0]["conv"]["kernel"], rtol=1e-3, atol=1e-4)
    out = regmean_from_data(None, ps, apply_fn, [[xs[0]], [xs[1]]], alpha=1.0, progress=False).params
    # NumPy reference: explicit patches in (kh, kw, c_in) order, joint least squares on both models' outputs.
    def patches(x):
        return np.stack([x[:, i:i + 2, j:j + 2, :].reshape(x.shape[0], -1) for i in range(4) for j in range(4)],
                        1).reshape(-1, 8).astype(np.float64)

    X = [patches(x) for x in xs]
    Y = [Xi @ np.asarray(p["conv"]["kernel"], np.float64).reshape(8, 3) for Xi, p in zip(X, ps)]
    ref = np.linalg.lstsq(np.concatenate(X), np.concatenate(Y), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(out["conv"]["kernel"]).reshape(8, 3), ref, rtol=1e-3, atol=1e-4)


class CausalTokens(nn.Module):
    """A tiny causal sequence classifier: logits at position t depend on tokens 0..t only (a running mean of
    embeddings), so right-padding cannot change the real positions' logits."""

    vocab: int = 7

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(self.vocab, 5)(x)
        h = jnp.cumsum(h, axis=-2) / jnp.arange(1, x.shape[-1] + 1, dtype=jnp.float32)[:, None]
        return nn.Dense(self.vocab)(jnp.tanh(h))


def test_sequence_fisher_masks_padding():
    """Issue 13 item 12: padded positions (and all-padding rows) leave the sequence Fisher unchanged. Reference:
    the Fisher of each unpadded sequence on its own (one batch per example, its true length), averaged."""
    net = CausalTokens()
    rng = np.random.default_rng(0)
    lengths = [5, 3, 5, 3]  # two shapes: two compilations of the reference
    seqs = [rng.integers(1, 7, n) for n in lengths]
    labels = [rng.integers(0, 7, n) for n in lengths]
    params = net.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    per_example = [diagonal_fisher(apply_fn, params, [(s[None], y[None])], progress=False)
                   for s, y in zip(seqs, labels)]
    ref = jax.tree.map(lambda *f: sum(np.asarray(a, np.float64) for a in f) / len(f), *per_example)
    T = 8  # right-padded to 8 with token 0 / label 0, plus one all-padding row
    x = np.zeros((5, T), np.int32)
    y = np.zeros((5, T), np.int32)
    m = np.zeros((5, T), np.int32)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        x[i, :len(s)], y[i, :len(s)], m[i, :len(s)] = s, l, 1
    got = diagonal_fisher(apply_fn, params, [(x, y, m)], progress=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        # float32 per-example gradients summed in another order: ~1e-7 relative.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
    # without the mask the padding tokens count (the test can fail): the Fisher differs
    unmasked = diagonal_fisher(apply_fn, params, [(x, y)], progress=False)
    diff = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(unmasked), jax.tree.leaves(ref)))
    assert diff > 1e-3
    # sampled mode honours the mask as well (the pad positions draw labels too, but add no gradient)
    k = jax.random.key(1)
    a = diagonal_fisher(apply_fn, params, [(x, y, m)], mode="sampled", key=k, progress=False)
    x2 = x.copy()
    x2[m == 0] = 3  # other pad tokens: same Fisher
    b = diagonal_fisher(apply_fn, params, [(x2, y, m)], mode="sampled", key=k, progress=False)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="mask shape"):
        diagonal_fisher(apply_fn, params, [(x, y, m[:, :4])], progress=False)


def test_regmean_rank_deficient_gram_is_least_squares_and_warns():
    """Issue 13 item 6: 2 models, 3 samples each, d_in = 16, α = 1: Σ G has rank 6. The old plain solve returned
    max|W| ≈ 64 from max|W_i| ≈ 2.3 silently; now: the least-squares solution closest to the average, a warning
    naming the layer, and the layer listed in info. Reference: W̄ + pinv(A)(B − A W̄) in float64."""
    rng = np.random.default_rng(0)
    ps = [{"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}} for _ in range(2)]
    Xs = [rng.normal(size=(3, 16)) for _ in range(2)]
    grams = [{"Dense_0": jnp.asarray(X.T @ X, jnp.float32)} for X in Xs]
    with pytest.warns(UserWarning, match="Dense_0.*rank 6"):
        res = regmean(None, ps, grams, alpha=1.0)
    assert res.info["rank_deficient"] == ("Dense_0",) and res.info["ranks"] == {"Dense_0": 6}
    W = np.asarray(res.params["Dense_0"]["kernel"], np.float64)
    Ws = [np.asarray(p["Dense_0"]["kernel"], np.float64) for p in ps]
    A = sum(X.T @ X for X in Xs)
    B = sum(X.T @ X @ Wi for X, Wi in zip(Xs, Ws))
    W_avg = sum(Ws) / 2
    ref = W_avg + np.linalg.pinv(A, rcond=1e-10) @ (B - A @ W_avg)
    # float32 eigendecomposition of a 16x16 Gram with λ_max/λ_min(kept) ~ 30: ~1e-5 relative.
    np.testing.assert_allclose(W, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(A @ W, B, rtol=1e-3, atol=1e-3 * np.abs(B).max())  # the normal equations hold
    assert np.abs(W).max() < 2 * max(np.abs(w).max() for w in Ws)  # bounded (old code: 64 vs 2.3)
    # each model's outputs on its own inputs: the least-squares fit is at least as good as the average's
    loss = lambda w: sum(np.sum((X @ (w - Wi)) ** 2) for X, Wi in zip(Xs, Ws))  # noqa: E731
    assert loss(W) <= loss(W_avg) * (1 + 1e-4)
    # a full-rank layer (α < 1 with live inputs) neither warns nor changes the closed form
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res9 = regmean(None, ps, grams, alpha=0.9)
    assert res9.info["rank_deficient"] == ()
    Gt = [0.9 * X.T @ X + 0.1 * np.diag(np.diag(X.T @ X)) for X in Xs]
    np.testing.assert_allclose(res9.params["Dense_0"]["kernel"],
                               np.linalg.solve(sum(Gt), sum(G @ Wi for G, Wi in zip(Gt, Ws))), rtol=1e-3, atol=1e-4)


def _reference_compute_grams(batches):
    """Independent NumPy transcription of bloomberg/dataless-model-merging ``compute_grams`` (local_trainer.py): a
    forward hook keeps, per linear module, the running per-token mean of ``xᵀx`` over the batches."""
    cov, n = None, 0
    for x in batches:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        xtx = x.T @ x
        if cov is None:
            cov, n = xtx / x.shape[0], x.shape[0]
        else:
            cov = (cov * n + xtx) / (x.shape[0] + n)
            n += x.shape[0]
    return cov


def _reference_regmean(weights_torch_layout, covs, a):
    """The same repository's ``regmean_mean_params`` (avg_merger.py): ``reduce_non_diag`` multiplies the
    off-diagonal entries by ``a``; ``Wᵀ = inverse(Σ cov) Σ cov Wᵀ``; returns ``W`` in nn.Linear's ``[out, in]``."""
    def reduce_non_diag(c):
        return c * (np.diag(np.ones(c.shape[0]) - a) + a)

    cs = [reduce_non_diag(c) for c in covs]
    wt = np.linalg.inv(sum(cs)) @ sum(c @ w.T for c, w in zip(cs, weights_torch_layout))
    return wt.T


def test_regmean_gram_weighting_mean_matches_reference_code():
    """``gram_weighting="mean"`` reproduces the reference code's per-token mean Grams with unequal calibration sizes
    (model 0: 40 tokens in two batches, model 1: 6); the default ``"sum"`` weighs model 0 more and differs."""
    model = Linear(3)
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    rng = np.random.default_rng(4)
    ps = [model.init(jax.random.key(i), jnp.zeros((1, 5)))["params"] for i in range(2)]
    batches = [[rng.normal(size=(25, 5)).astype(np.float32), rng.normal(size=(15, 5)).astype(np.float32)],
               [(rng.normal(size=(6, 5)) * 2 + 1).astype(np.float32)]]
    alpha = 0.8
    torch_w = [np.asarray(p["Dense_0"]["kernel"], np.float64).T for p in ps]  # nn.Linear.weight is [out, in]
    ref = _reference_regmean(torch_w, [_reference_compute_grams(b) for b in batches], alpha).T  # back to [in, out]
    got = regmean_from_data(None, ps, apply_fn, batches, alpha=alpha, gram_weighting="mean", progress=False)
    # well-conditioned 5x5 solve in float32: ~1e-6 relative.
    np.testing.assert_allclose(got.params["Dense_0"]["kernel"], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.params["Dense_0"]["bias"], (ps[0]["Dense_0"]["bias"] + ps[1]["Dense_0"]["bias"]) / 2,
                               rtol=1e-6)
    summed = regmean_from_data(None, ps, apply_fn, batches, alpha=alpha, progress=False).params
    assert np.abs(np.asarray(summed["Dense_0"]["kernel"]) - ref).max() > 1e-2
    # raw Gram arrays: the same with explicit token counts; without counts "mean" is an error
    raw = [{"Dense_0": jnp.asarray(sum(np.asarray(x, np.float64).T @ x for x in b), jnp.float32)} for b in batches]
    via_counts = regmean(None, ps, raw, alpha=alpha, gram_weighting="mean", token_counts=[40, 6]).params
    np.testing.assert_allclose(via_counts["Dense_0"]["kernel"], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="token counts"):
        regmean(None, ps, raw, gram_weighting="mean")
    with pytest.raises(ValueError, match="gram_weighting"):
        regmean(None, ps, raw, gram_weighting="tokens")
    # RegMean++ uses the same weighting: its first layer equals RegMean's (same raw inputs)
    pp = regmean_plusplus(None, ps, apply_fn, batches, alpha=alpha, gram_weighting="mean", progress=False)
    np.testing.assert_allclose(pp.params["Dense_0"]["kernel"], ref, rtol=1e-4, atol=1e-5)
