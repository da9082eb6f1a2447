"""Fisher, Fisher merging, RegMean, RegMean++: NumPy references from the papers' equations, invariants, sharding."""

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
    out = fisher_merge(ps, fs, weights=[1.0, 2.0, 0.5], fisher_floor=1e-6)
    lam = np.array([1.0, 2.0, 0.5])
    for path in [("Dense_0", "kernel"), ("Dense_2", "bias")]:
        th = np.stack([np.asarray(p[path[0]][path[1]], np.float64) for p in ps])
        F = np.maximum(np.stack([np.asarray(f[path[0]][path[1]], np.float64) for f in fs]), 1e-6)
        w = lam.reshape(-1, *([1] * (th.ndim - 1))) * F
        np.testing.assert_allclose(out[path[0]][path[1]], (w * th).sum(0) / w.sum(0), rtol=1e-5, atol=1e-6)
    # equal Fishers (and zero Fishers, via the floor) give the plain average
    avg = jax.tree.map(lambda *a: sum(a) / 3, *ps)
    for f in (fs[0], jax.tree.map(jnp.zeros_like, fs[0])):
        out = fisher_merge(ps, [f] * 3)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(avg)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # bf16 in -> bf16 out
    pb = [jax.tree.map(lambda a: a.astype(jnp.bfloat16), p) for p in ps]
    assert jax.tree.leaves(fisher_merge(pb, fs))[0].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="floor"):
        fisher_merge(ps, fs, fisher_floor=0.0)
    with pytest.raises(ValueError, match="Fishers"):
        fisher_merge(ps, fs[:2])


def test_fisher_merge_sharded(mesh_2d):
    ps, _ = _mlps(2, features=(8, 8))
    fs = [jax.tree.map(lambda a: jnp.abs(a) + 0.1, p) for p in ps]
    ref = fisher_merge(ps, fs)
    sh = fisher_merge([shard(p, MLP_RULES_TP, mesh_2d) for p in ps], [shard(f, MLP_RULES_TP, mesh_2d) for f in fs])
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(sh)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_regmean_identical_models_return_model():
    ps, apply_fn = _mlps(1)
    rng = np.random.default_rng(0)
    b = [rng.normal(size=(10, 4)).astype(np.float32)]
    for fn in (regmean_from_data, regmean_plusplus):
        out = fn(apply_fn, [ps[0]] * 3, [b, b, b], alpha=0.7, progress=False)
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
    out = regmean_from_data(apply_fn, ps, [[X.astype(np.float32)] for X in Xs], alpha=1.0, progress=False)
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
    out = regmean(ps, grams, alpha=alpha)
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
    out0 = regmean(ps, grams, alpha=0.0)
    d = [np.diag(np.asarray(g["Dense_0"], np.float64))[:, None] for g in grams]
    ref0 = sum(di * np.asarray(p["Dense_0"]["kernel"]) for di, p in zip(d, ps)) / sum(d)
    np.testing.assert_allclose(out0["Dense_0"]["kernel"], ref0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        regmean(ps, grams, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        regmean(ps, [{"Dense_0": jnp.eye(3)}] * 2)


def test_regmean_plusplus_differs_only_after_first_layer():
    ps, apply_fn = _mlps(2)
    rng = np.random.default_rng(2)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in ps]
    a = regmean_from_data(apply_fn, ps, bs, alpha=0.9, progress=False)
    b = regmean_plusplus(apply_fn, ps, bs, alpha=0.9, progress=False)
    # layer 0 sees the raw inputs in both: identical; deeper layers see merged-model features in RegMean++.
    np.testing.assert_allclose(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(a["Dense_1"]["kernel"]) - np.asarray(b["Dense_1"]["kernel"])).max() > 1e-3
    # RegMean++'s Gram for layer 1 is that of the merged model's features: check the reference directly
    G = [collect_stats(apply_fn, {**a, "Dense_1": a["Dense_1"]}, bb, include="^Dense_1$", progress=False)
         ["Dense_1"].gram for bb in bs]
    ref = regmean(ps, [{"Dense_1": g} for g in G], alpha=0.9)
    np.testing.assert_allclose(b["Dense_1"]["kernel"], ref["Dense_1"]["kernel"], rtol=1e-3, atol=1e-4)


def test_regmean_sharded(mesh, mesh_2d):
    ps, apply_fn = _mlps(2, features=(8, 8))
    rng = np.random.default_rng(3)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in ps]
    ref = regmean_from_data(apply_fn, ps, bs, progress=False)
    sh = regmean_from_data(apply_fn, [shard(p, MLP_RULES_TP, mesh_2d) for p in ps], bs, mesh=mesh_2d,
                           progress=False)
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
    same = regmean_from_data(apply_fn, [ps[0], ps[0]], [[xs[0]], [xs[1]]], alpha=1.0, progress=False)
    np.testing.assert_allclose(same["conv"]["kernel"], ps[0]["conv"]["kernel"], rtol=1e-3, atol=1e-4)
    out = regmean_from_data(apply_fn, ps, [[xs[0]], [xs[1]]], alpha=1.0, progress=False)
    # NumPy reference: explicit patches in (kh, kw, c_in) order, joint least squares on both models' outputs.
    def patches(x):
        return np.stack([x[:, i:i + 2, j:j + 2, :].reshape(x.shape[0], -1) for i in range(4) for j in range(4)],
                        1).reshape(-1, 8).astype(np.float64)

    X = [patches(x) for x in xs]
    Y = [Xi @ np.asarray(p["conv"]["kernel"], np.float64).reshape(8, 3) for Xi, p in zip(X, ps)]
    ref = np.linalg.lstsq(np.concatenate(X), np.concatenate(Y), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(out["conv"]["kernel"]).reshape(8, 3), ref, rtol=1e-3, atol=1e-4)
