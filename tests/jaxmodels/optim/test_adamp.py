import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.optim import adamp, radial_projection, sgdp
from jaxmodels.tree import flatten, unflatten
from tests.jaxmodels.optim.helpers import (assert_tree_close, check_sharded_equals_unsharded, grad_seq, random_tree,
                                         run)

# float32 against a float64 NumPy reference over 5 steps: ~1e-6 relative; formula errors (wrong view, missing
# wd_ratio, wrong Nesterov) are >= 1e-3.
RTOL, ATOL = 2e-5, 2e-6


# ---- NumPy reference, transcribed from clovaai/AdamP (PyTorch layout: output channel = axis 0) -----------------
def _to_torch(x):
    return np.moveaxis(x, -1, 0) if x.ndim > 1 else x


def _from_torch(x):
    return np.moveaxis(x, 0, -1) if x.ndim > 1 else x


def _cos(x, y, eps, view):
    x, y = view(x), view(y)
    return np.abs((x * y).sum(1)) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), eps)


def _projection(p, grad, perturb, delta, wd_ratio, eps):
    wd = 1.0
    expand = (-1,) + (1,) * (p.ndim - 1)
    for view in (lambda x: x.reshape(x.shape[0], -1), lambda x: x.reshape(1, -1)):
        cos = _cos(grad, p, eps, view)
        if cos.max() < delta / np.sqrt(view(p).shape[1]):
            p_n = p / (np.linalg.norm(view(p), axis=1).reshape(expand) + eps)
            perturb = perturb - p_n * view(p_n * perturb).sum(1).reshape(expand)
            return perturb, wd_ratio
    return perturb, wd


def adamp_numpy(params, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, delta=0.1, wd_ratio=0.1, nesterov=False):
    p = {k: _to_torch(v.astype(np.float64)) for k, v in flatten(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        g = {k: _to_torch(x.astype(np.float64)) for k, x in flatten(g).items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v[k]) / np.sqrt(1 - b2 ** t) + eps
            step = lr / (1 - b1 ** t)
            perturb = (b1 * m[k] + (1 - b1) * g[k]) / denom if nesterov else m[k] / denom
            ratio = 1.0
            if p[k].ndim > 1:
                perturb, ratio = _projection(p[k], g[k], perturb, delta, wd_ratio, eps)
            if wd > 0:
                p[k] = p[k] * (1 - lr * wd * ratio)
            p[k] = p[k] - step * perturb
    return {k: _from_torch(x) for k, x in p.items()}


def sgdp_numpy(params, grads, lr, momentum=0.0, wd=0.0, nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1):
    p = {k: _to_torch(v.astype(np.float64)) for k, v in flatten(params).items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for g in grads:
        g = {k: _to_torch(x.astype(np.float64)) for k, x in flatten(g).items()}
        for k in p:
            buf[k] = momentum * buf[k] + g[k]
            d_p = g[k] + momentum * buf[k] if nesterov else buf[k]
            ratio = 1.0
            if p[k].ndim > 1:
                d_p, ratio = _projection(p[k], g[k], d_p, delta, wd_ratio, eps)
            if wd != 0:
                p[k] = p[k] * (1 - lr * wd * ratio / (1 - momentum))
            p[k] = p[k] - lr * d_p
    return {k: _from_torch(x) for k, x in p.items()}


def _scale_invariant_grads(params, n, seed=1):
    """Random grads, except: Dense_0/kernel orthogonal to w per output channel (channel view triggers) and
    Conv_0/kernel orthogonal to w as a whole (only the layer view triggers). The weights change a little per step,
    so the grads are made orthogonal to the *initial* weights; with lr 1e-3 the cosines stay far below threshold."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in flatten(params).items()}
        w = flatten(params)["Dense_0/kernel"]
        gk = g["Dense_0/kernel"]
        g["Dense_0/kernel"] = gk - w * (gk * w).sum(0, keepdims=True) / (w * w).sum(0, keepdims=True)
        w = flatten(params)["Conv_0/kernel"]
        gk = g["Conv_0/kernel"]
        g["Conv_0/kernel"] = gk - w * (gk * w).sum() / (w * w).sum()
        out.append(unflatten(g, like=params))
    return out


def test_views_trigger_as_constructed():
    params = random_tree(0)
    g = flatten(_scale_invariant_grads(params, 1)[0])
    f = flatten(params)
    trig = {k: bool(radial_projection(g[k], g[k], f[k])[1]) for k in f}
    assert trig["Dense_0/kernel"] and trig["Conv_0/kernel"]
    assert not any(trig[k] for k in f if k not in ("Dense_0/kernel", "Conv_0/kernel"))
    # Conv: only the layer view triggers (channel view does not) -> the layer-wise projection is used.
    w, gc = f["Conv_0/kernel"], g["Conv_0/kernel"]
    ch = np.abs((w * gc).sum((0, 1, 2))) / (np.linalg.norm(w.reshape(-1, 8), axis=0) *
                                            np.linalg.norm(gc.reshape(-1, 8), axis=0))
    assert ch.max() >= 0.1 / np.sqrt(18)


@pytest.mark.parametrize("kw", [dict(), dict(wd=0.01), dict(wd=0.01, nesterov=True), dict(wd_ratio=0.5, wd=0.1)])
def test_adamp_matches_reference(kw):
    params = random_tree(0)
    grads = _scale_invariant_grads(params, 5)
    tx = adamp(1e-3, weight_decay=kw.get("wd", 0.0), nesterov=kw.get("nesterov", False),
               wd_ratio=kw.get("wd_ratio", 0.1))
    out, _ = run(tx, params, grads)
    assert_tree_close(out, adamp_numpy(params, grads, 1e-3, **kw), RTOL, ATOL)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, wd=0.01), dict(momentum=0.9, wd=0.01, nesterov=True)])
def test_sgdp_matches_reference(kw):
    params = random_tree(0)
    grads = _scale_invariant_grads(params, 5)
    tx = sgdp(1e-2, momentum=kw.get("momentum", 0.0), weight_decay=kw.get("wd", 0.0),
              nesterov=kw.get("nesterov", False))
    out, _ = run(tx, params, grads)
    assert_tree_close(out, sgdp_numpy(params, grads, 1e-2, **kw), RTOL, ATOL)


def test_channel_axis_zero_is_pytorch_layout():
    """channel_axis=0 on the transposed kernel gives the transposed result."""
    params = random_tree(0)
    grads = _scale_invariant_grads(params, 3)
    tr = lambda t: jax.tree.map(lambda x: np.moveaxis(np.asarray(x), -1, 0) if x.ndim > 1 else x, t)  # noqa: E731
    a, _ = run(adamp(1e-3, weight_decay=0.01), params, grads)
    b, _ = run(adamp(1e-3, weight_decay=0.01, channel_axis=0), tr(params), [tr(g) for g in grads])
    assert_tree_close(tr(a), b, 1e-6, 1e-7)


def test_adamp_equals_adamw_on_non_scale_invariant_weights():
    params = random_tree(0)
    rng = np.random.default_rng(3)
    # gradients with a strong radial component: cos(g, w) ~ 0.7 >> delta / sqrt(d), so nothing triggers
    grads = [jax.tree.map(lambda w: (w + rng.standard_normal(w.shape)).astype(np.float32), params) for _ in range(5)]
    a, _ = run(adamp(1e-3, weight_decay=0.01), params, grads)
    b, _ = run(optax.adamw(1e-3, weight_decay=0.01), params, grads)
    # nothing triggers, so adamp computes adamw's update op for op: bit-equal on CPU; a GPU compiles the two programs
    # separately and may fuse / reorder them (FMA contraction), so allow a few float32 ulps (|w| ~ 1: 2.4e-7 each)
    assert_tree_close(a, b, 5e-7, 1e-8)
    c, _ = run(sgdp(1e-2, momentum=0.9, weight_decay=0.01), params, grads)
    d, _ = run(optax.chain(optax.trace(0.9), optax.add_decayed_weights(0.01 / (1 - 0.9)), optax.sgd(1e-2)),
               params, grads)
    assert_tree_close(c, d, 1e-7, 1e-7)


def _normalized_model_norms(tx, steps=200):
    """x -> Dense (kernel [64, 32]) -> per-channel batch normalisation -> relu -> Dense head. The first kernel is
    channel-wise scale-invariant. Returns (||W_0|| trajectory, first-step per-channel <u, w> / (|u||w|))."""
    from jaxmodels.datasets import load_digits_split

    data = load_digits_split(seed=0)
    rng = np.random.default_rng(0)
    params = {"w0": (rng.standard_normal((64, 32)) / 8).astype(np.float32),
              "w1": (rng.standard_normal((32, 10)) / 6).astype(np.float32), "b1": np.zeros(10, np.float32)}

    def loss_fn(p, x, y):
        h = x @ p["w0"]
        h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
        logits = jax.nn.relu(h) @ p["w1"] + p["b1"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    s = tx.init(params)
    norms, first_cos = [float(np.linalg.norm(params["w0"]))], None
    for i in range(steps):
        idx = rng.integers(0, len(data.x_train), 64)
        w_before = params["w0"]
        params, s, u = step(params, s, data.x_train[idx], data.y_train[idx])
        if first_cos is None:
            uu, ww = np.asarray(u["w0"]), np.asarray(w_before)
            first_cos = np.abs((uu * ww).sum(0)) / (np.linalg.norm(uu, axis=0) * np.linalg.norm(ww, axis=0))
        norms.append(float(np.linalg.norm(params["w0"])))
    return np.asarray(norms), first_cos


def test_paper_claim_adamp_slows_norm_growth_of_scale_invariant_weight():
    """Heo et al.: momentum optimizers inflate the norm of scale-invariant weights; AdamP's projection removes the
    radial component (update orthogonal to w, |cos| ~ 1e-7 vs ~1e-2 for Adam) so ||w|| grows much less
    (measured over 200 steps: Adam +53%, AdamP +4%)."""
    n_adam, cos_adam = _normalized_model_norms(optax.adam(1e-2))
    n_adamp, cos_adamp = _normalized_model_norms(adamp(1e-2))
    assert cos_adamp.max() < 1e-4  # orthogonal up to float32 rounding
    assert cos_adam.max() > 1e-3
    growth_adam, growth_adamp = n_adam[-1] / n_adam[0] - 1, n_adamp[-1] / n_adamp[0] - 1
    print(f"norm growth adam {growth_adam:.3f} adamp {growth_adamp:.3f}")
    assert growth_adamp < 0.5 * growth_adam
    # the radial projection keeps the norm monotone only through the second-order term: ||w + u||^2 = ||w||^2 + ||u||^2
    assert np.all(np.diff(n_adamp) > -1e-5)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_sharded_equals_unsharded(name, mesh_2d):
    tx = adamp(1e-3, weight_decay=0.01, nesterov=True) if name == "adamp" else sgdp(1e-2, 0.9, weight_decay=0.01)
    n = check_sharded_equals_unsharded(tx, mesh_2d)
    assert n >= 7


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="delta"):
        adamp(1e-3, delta=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        sgdp(1e-3, momentum=1.0)


def test_callable_mask_is_called_on_params():
    """optax convention (issue 13 item 12): a callable ``mask`` describes the *params*. Here it selects by weight
    value (max |w| > 5: only the x10-scaled Dense_0 kernel); the Adam updates are O(1), so the old code, which called
    it on the updates, selected nothing and reduced to plain Adam. Reference: the NumPy AdamP on the selected leaf,
    AdamP with delta=0 (nothing triggers, i.e. Adam) elsewhere; Conv_0's kernel would be projected if selected."""
    params = random_tree(0)
    params["Dense_0"]["kernel"] = 10.0 * params["Dense_0"]["kernel"]
    grads = _scale_invariant_grads(params, 5)
    seen = []

    def mask(tree):
        seen.append(tree)
        return jax.tree.map(lambda w: bool(np.abs(np.asarray(w)).max() > 5.0), tree)

    out, _ = run(adamp(1e-3, mask=mask), params, grads, jit=False)
    assert len(seen) == 5
    np.testing.assert_array_equal(flatten(seen[0])["Dense_0/kernel"], flatten(params)["Dense_0/kernel"])
    proj, plain = adamp_numpy(params, grads, 1e-3), adamp_numpy(params, grads, 1e-3, delta=0.0)
    want = {k: (proj[k] if k == "Dense_0/kernel" else plain[k]) for k in proj}
    assert_tree_close(out, unflatten(want, like=params), RTOL, ATOL)
    assert not np.allclose(proj["Conv_0/kernel"], plain["Conv_0/kernel"], rtol=1e-4)  # the mask matters there
    # the same mask as a static tree (and as a prefix tree) gives the same result under jit
    static = jax.tree.map(lambda w: bool(np.abs(w).max() > 5.0), params)
    out_t, _ = run(adamp(1e-3, mask=static), params, grads)
    prefix = {k: (v if k == "Dense_0" else False) for k, v in static.items()}
    out_p, _ = run(sgdp(1e-2, mask=prefix), params, grads)
    assert_tree_close(out_t, out, RTOL, ATOL)
    assert_tree_close(out_p, unflatten(dict(sgdp_numpy(params, grads, 1e-2, delta=0.0),
                                            **{"Dense_0/kernel": sgdp_numpy(params, grads, 1e-2)["Dense_0/kernel"]}),
                                       like=params), RTOL, ATOL)


def test_traced_or_misshaped_mask_is_a_clear_error():
    params = random_tree(0)
    traced = adamp(1e-3, mask=lambda p: jax.tree.map(lambda w: jnp.max(w) > 0, p))
    with pytest.raises(ValueError, match="static"):
        run(traced, params, grad_seq(1))
    with pytest.raises(ValueError, match="structure of params"):
        run(adamp(1e-3, mask={"Dense_0": True}), params, grad_seq(1))
