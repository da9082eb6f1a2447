"""quant.pruning on single layers: NumPy references of magnitude / Wanda (exact masks, ties included) and of
SparseGPT's ``fasterprune`` (float64 transcription), exact counts, the N:M pattern, sharded == single device,
bad configs rejected before any work, and the optax wrapper keeping the zeros through Adam steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quant.ptq.gptq import hessian_from_inputs
from quant.pruning import (
    MagnitudeConfig, SparseGPTConfig, WandaConfig, apply_masks, mask_sparsity, masked, magnitude_prune_weight,
    prune_magnitude, prune_mask, sparsegpt, sparsegpt_prune_weight, wanda, wanda_prune_weight,
)


def _layer(rng, n=256, d_in=32, d_out=12, ties=False):
    """Correlated inputs with a few large channels (as real activations) and a Flax kernel [in, out]; ``ties``:
    weights on a coarse grid and inputs with repeated norms, so that many scores tie exactly."""
    mix = rng.standard_normal((d_in, d_in)).astype(np.float32) / np.sqrt(d_in)
    x = rng.standard_normal((n, d_in)).astype(np.float32) @ (np.eye(d_in, dtype=np.float32) + mix)
    x[:, :3] *= 8.0
    w = rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.1
    if ties:
        w = np.round(w * 16) / 16
    return x, w


# ------------------------------------------------------------------------------------------------ references

def _np_prune_groups(metric, n_prune):
    """Prune the ``n_prune`` smallest entries of every row of ``metric`` (stable ascending sort: among ties the
    lowest index goes first, Wanda's ``torch.sort(W_metric, dim=-1, stable=True)``). Returns the kept mask."""
    idx = np.argsort(metric, axis=-1, kind="stable")[..., :n_prune]
    keep = np.ones(metric.shape, bool)
    np.put_along_axis(keep, idx, False, axis=-1)
    return keep


def _np_mask(metric, sparsity, nm=None, group="layer"):
    """locuslab/wanda ``prune_magnitude`` / ``prune_wanda`` mask rules on ``metric[out, in]`` with the exact count
    ``int(n * sparsity)`` (the reference's magnitude threshold ``<= sort[int(n·s)]`` prunes one more)."""
    R, C = metric.shape
    if nm is not None:  # for ii in range(0, C, m): topk(metric[:, ii:ii+m], n, largest=False)
        n, m = nm
        return _np_prune_groups(metric.reshape(R, C // m, m), n).reshape(R, C)
    if group == "row":  # sort_res[1][:, :int(C * s)]
        return _np_prune_groups(metric, int(C * sparsity))
    return _np_prune_groups(metric.reshape(1, -1), int(R * C * sparsity)).reshape(R, C)


def test_magnitude_and_wanda_masks_match_numpy_reference():
    rng = np.random.default_rng(1)
    for ties, d_in in ((False, 32), (True, 32), (True, 96)):  # rows of <= 64 inputs: pairwise ranks; 96: top_k
        x, w = _layer(rng, d_in=d_in, ties=ties)
        sq = (x**2).mean(0).astype(np.float32)  # E[x_j²]
        if ties:
            sq = np.round(sq)  # repeated norms: |W_ij|·‖X_j‖ ties across columns too
        cases = [(0.7, None, "layer"), (0.3, None, "row"), (0.5, (2, 4), "layer"), (0.5, "1:4", "row")]
        if d_in == 96:
            cases = cases[1:2]
        for s, nm, group in cases:
            nmt = tuple(int(v) for v in nm.split(":")) if isinstance(nm, str) else nm
            mag = magnitude_prune_weight(w, None, MagnitudeConfig(s, nm, group))
            ref = _np_mask(np.abs(w.T), s, nmt, group).T
            np.testing.assert_array_equal(np.asarray(mag["mask"]), ref)
            np.testing.assert_array_equal(np.asarray(mag["weight"]), np.where(ref, w, 0))
            # Wanda: W_metric = |W| · sqrt(scaler_row), in float32 as the reference's torch tensors
            wd = wanda_prune_weight(w, sq, WandaConfig(s, nm, group))
            ref = _np_mask(np.abs(w.T) * np.sqrt(sq)[None, :], s, nmt, group).T
            np.testing.assert_array_equal(np.asarray(wd["mask"]), ref)
            np.testing.assert_array_equal(np.asarray(wd["weight"]), np.where(ref, w, 0))
            for r in (mag, wd):  # exact counts, the N:M pattern
                keep = np.asarray(r["mask"])
                if nmt is None:
                    n_groups, size = (w.shape[1], w.shape[0]) if group == "row" else (1, w.size)
                    assert (~keep).sum() == r["n_pruned"] == n_groups * int(size * s)
                else:  # m consecutive inputs of every output: exactly n pruned
                    assert ((~keep.reshape(w.shape[0] // nmt[1], nmt[1], w.shape[1])).sum(1) == nmt[0]).all()
                assert r["sparsity"] == pytest.approx((~keep).mean())


def _np_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """NumPy float64 transcription of IST-DASLab/sparsegpt ``SparseGPT.fasterprune`` (sparsegpt.py at 147d215),
    line by line, on ``W[out, in]``. One change: the unstructured mask of a block prunes exactly
    ``int(R·i2·s) − int(R·i1·s)`` entries (stable ascending sort of ``tmp``; the reference's ``tmp <= thresh``
    prunes ``int(R·B·s) + 1``), and the N:M ``topk(largest=False)`` is a stable sort too (tie order defined).
    Returns ``(W, mask of kept, loss)``."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, columns = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = np.zeros(rows)
    damp = percdamp * np.mean(np.diag(H))
    H[np.diag_indices(columns)] += damp
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # cholesky -> cholesky_inverse -> cholesky(upper=True)
    keep = np.ones(W.shape, bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Losses1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (np.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
            mask1 = np.zeros(tmp.size, bool)
            mask1[np.argsort(tmp.reshape(-1), kind="stable")[:k]] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = np.zeros_like(W1, dtype=bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (np.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                np.put_along_axis(mask1[:, i:i + prunem], idx, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += np.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~mask1
    return W, keep, Losses.sum()


@pytest.mark.parametrize("cfg,dead", [(dict(sparsity=0.6, block_size=16), True),  # 115.2 per block: 115, 115
                                      (dict(sparsity=0.5, nm=(2, 4), block_size=16), False)])
def test_sparsegpt_matches_numpy_fasterprune(cfg, dead):
    rng = np.random.default_rng(3)
    x, w = _layer(rng)
    if dead:  # a dead input feature: its weights are zeroed before anything else, as the reference
        x[:, 5] = 0.0
    H = np.asarray(hessian_from_inputs(x))
    c = SparseGPTConfig(**cfg)
    w0, H0 = w.copy(), H.copy()
    got = sparsegpt_prune_weight(w, H, c)
    np.testing.assert_array_equal(w, w0)  # the inputs are not modified
    np.testing.assert_array_equal(H, H0)
    n, m = (tuple(int(v) for v in c.nm.split(":")) if isinstance(c.nm, str) else c.nm) if c.nm else (0, 0)
    W_ref, keep_ref, loss_ref = _np_fasterprune(w.T, H, c.sparsity, n, m, c.block_size)
    keep = np.asarray(got["mask"]).T
    # float32 Cholesky / OBS updates vs float64: a mask can only differ where two saliencies are within float32
    # rounding of each other (none here: the masks agree exactly); the weights differ by the float32 rounding of the
    # inverse-Hessian factor (κ(H + λI) ~ 1e4 here: at worst ~eps32·κ ~ 1e-3 relative) carried through the column
    # loop. Measured: max |ΔW| 3.4e-8 (unstructured) / 1.1e-7 (2:4) with max |w| = 0.31, loss 6e-8 / 2.5e-7
    # relative; the bounds below (6e-6 absolute, 1e-4 relative) sit between the measured and the worst case.
    np.testing.assert_array_equal(keep, keep_ref)
    np.testing.assert_allclose(np.asarray(got["weight"]).T, W_ref, rtol=0, atol=2e-5 * np.abs(w).max())
    assert got["loss"] == pytest.approx(loss_ref, rel=1e-4)
    assert (np.asarray(got["weight"])[~np.asarray(got["mask"])] == 0).all()
    if c.nm is None:
        assert (~keep).sum() == int(w.size * c.sparsity)
    else:
        assert ((~keep.reshape(w.shape[1], -1, m)).sum(-1) == n).all()
    # the OBS update beats plain masking of the same weights on the calibration outputs
    err = lambda wh: np.sum((x @ w - x @ wh) ** 2)  # noqa: E731
    assert err(np.asarray(got["weight"])) < 0.8 * err(np.where(np.asarray(got["mask"]), w, 0))


def test_sharded_equals_single_device(mesh_2d):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(6)
    x, w = _layer(rng)
    H = hessian_from_inputs(x)
    sq = jnp.asarray((x**2).mean(0))
    ws = jax.device_put(jnp.asarray(w), NamedSharding(mesh_2d, P(None, "model")))
    Hs = jax.device_put(H, NamedSharding(mesh_2d, P("model", None)))
    sqs = jax.device_put(sq, NamedSharding(mesh_2d, P("model")))
    assert not ws.sharding.is_fully_replicated
    for fn, st, cfg in [(magnitude_prune_weight, None, MagnitudeConfig(0.5, (2, 4))),
                        (wanda_prune_weight, (sqs, sq), WandaConfig(0.3, None, "row")),
                        (sparsegpt_prune_weight, (Hs, H), SparseGPTConfig(0.6, block_size=16))]:
        a = fn(ws, None if st is None else st[0], cfg)
        b = fn(w, None if st is None else st[1], cfg)
        np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
        # masking is exact; SparseGPT's OBS updates may be fused / contracted differently by the partitioned
        # program (1 ulp of float32: 1.5e-8 measured on weights ~0.1)
        np.testing.assert_allclose(np.asarray(a["weight"]), np.asarray(b["weight"]), rtol=1e-6, atol=1e-7)
    # the mask rule itself under jit, on a sharded score
    f = jax.jit(prune_mask, static_argnames=("sparsity", "nm", "group"))
    np.testing.assert_array_equal(np.asarray(f(jnp.abs(ws), 0.7)), np.asarray(prune_mask(jnp.abs(w), 0.7)))


# ------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("make", [
    lambda: MagnitudeConfig(sparsity=1.0), lambda: MagnitudeConfig(sparsity=-0.1), lambda: WandaConfig(sparsity=1.5),
    lambda: SparseGPTConfig(sparsity="0.5"), lambda: MagnitudeConfig(nm="4:2"), lambda: WandaConfig(nm=(3, 3)),
    lambda: SparseGPTConfig(nm="0:4"), lambda: MagnitudeConfig(nm="2-4"), lambda: WandaConfig(group="column"),
    lambda: MagnitudeConfig(scope="model"), lambda: SparseGPTConfig(nm="2:4", block_size=6),
    lambda: SparseGPTConfig(percdamp=0.0), lambda: MagnitudeConfig(nm="2:5"),
])
def test_bad_config_rejected_before_any_work(make):
    from quant.ptq.blocks import BlockModel

    calls = []

    def spy(*a, **k):  # every step of a walk: must never run
        calls.append(1)
        raise AssertionError("work started")

    model = BlockModel(embed=spy, block=None, block_paths=["b0"], head=spy, token_weight=spy)
    params = {"b0": {"lin": {"kernel": jnp.ones((32, 8))}}}
    cfg = make()
    method = {MagnitudeConfig: prune_magnitude, WandaConfig: wanda, SparseGPTConfig: sparsegpt}[type(cfg)]
    layer = {MagnitudeConfig: magnitude_prune_weight, WandaConfig: wanda_prune_weight,
             SparseGPTConfig: sparsegpt_prune_weight}[type(cfg)]
    with pytest.raises(ValueError):
        method(params, model, {"input_ids": np.zeros((1, 4), np.int32)}, cfg)
    with pytest.raises(ValueError):
        layer(params["b0"]["lin"]["kernel"], jnp.eye(32), cfg)
    assert not calls


def test_layer_shapes_checked_before_any_work():
    from quant.ptq.blocks import BlockModel

    def spy(*a, **k):
        raise AssertionError("work started")

    model = BlockModel(embed=spy, block=None, block_paths=["b0", "b1"], head=spy, token_weight=spy)
    params = {"b0": {"lin": {"kernel": jnp.ones((32, 8))}}, "b1": {"lin": {"kernel": jnp.ones((30, 8))}}}
    for fn, cfg in [(wanda, WandaConfig(nm="2:4")), (sparsegpt, SparseGPTConfig(nm="2:4")),
                    (prune_magnitude, MagnitudeConfig(nm="2:4"))]:
        with pytest.raises(ValueError, match="b1/lin/kernel has 30 input features, not a multiple of m=4"):
            fn(params, model, {"input_ids": np.zeros((1, 4), np.int32)}, cfg)
    with pytest.raises(ValueError, match="needs calibration data"):
        wanda(params, model, None, WandaConfig())
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_prune_weight(jnp.ones((32, 8)), jnp.eye(16), SparseGPTConfig())


# ------------------------------------------------------------------------------------------------ optax wrapper

def test_masked_adam_keeps_pruned_weights_zero():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), "bias": jnp.ones(8)},
              "b": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}}
    pruned, rep = prune_magnitude(params, config=MagnitudeConfig(0.5))
    masks = rep["masks"]
    assert masks["a"]["bias"] is None and masks["a"]["kernel"].dtype == jnp.bool_
    assert mask_sparsity(masks) == pytest.approx(0.5)
    tx = masked(optax.adamw(1e-2, weight_decay=0.1), masks)
    # start from params whose pruned entries are NOT zero: the first step re-masks them
    p = jax.tree_util.tree_map(lambda v: v + 0.01, pruned)
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    for t in range(5):
        g = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), p)
        p, state = step(p, state, g)
        for path in ("a", "b"):
            k, m = np.asarray(p[path]["kernel"]), np.asarray(masks[path]["kernel"])
            assert (k[~m] == 0).all(), (t, path)
            assert (k[m] != np.asarray(pruned[path]["kernel"])[m]).all()  # the kept weights train
    mu = state.inner[0].mu  # the inner Adam's first moments never see the pruned gradients
    assert (np.asarray(mu["a"]["kernel"])[~np.asarray(masks["a"]["kernel"])] == 0).all()
    np.testing.assert_array_equal(np.asarray(apply_masks(p, masks)["a"]["kernel"]), np.asarray(p["a"]["kernel"]))
    with pytest.raises(ValueError, match="shape"):
        masked(optax.sgd(0.1), {"a": {"kernel": masks["b"]["kernel"], "bias": None}, "b": masks["b"]}).init(params)


def test_global_magnitude_matches_numpy_reference():
    """One threshold over every kernel: exactly ⌊N·s⌋ of all N weights (ties: lowest index of the concatenated
    ``W[out, in]`` flattenings, in path order); biases untouched."""
    rng = np.random.default_rng(2)
    params = {"a": {"kernel": jnp.asarray(np.round(rng.standard_normal((16, 8)) * 8) / 8, jnp.float32),
                    "bias": jnp.ones(8)},
              "b": {"kernel": jnp.asarray(np.round(rng.standard_normal((8, 4)) * 4) / 4, jnp.float32)}}
    q, rep = prune_magnitude(params, config=MagnitudeConfig(0.6, scope="global"))
    flat = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).T.reshape(-1) for k in ("a", "b")])
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:int(flat.size * 0.6)]] = False
    got = np.concatenate([np.asarray(rep["masks"][k]["kernel"]).T.reshape(-1) for k in ("a", "b")])
    np.testing.assert_array_equal(got, keep)
    assert rep["sparsity"] == int(flat.size * 0.6) / flat.size and rep["layers"]["a/kernel"]["sparsity"] != 0.6
    np.testing.assert_array_equal(np.asarray(q["a"]["bias"]), 1.0)


def test_allocate_sparsity_is_the_exact_knapsack_optimum():
    """The DP allocation (quant.ptq's multiple-choice knapsack) against exhaustive search on random convex-ish
    distortion curves: min Σ D_l(s_l) subject to Σ n_l (1 − s_l) <= (1 − S) Σ n_l."""
    import itertools

    from quant.pruning import allocate_sparsity

    rng = np.random.default_rng(0)
    levels, S = 5, 0.5
    cand = [d / levels for d in range(levels)]
    sizes = {"a": 64, "b": 128, "c": 256, "d": 192}
    curves = {p: {s: float(rng.uniform(0.5, 2) * s**2 + rng.uniform(0, 0.1) * s) for s in cand} for p in sizes}
    got = allocate_sparsity(curves, sizes, S, levels)
    best = None
    for choice in itertools.product(cand, repeat=len(sizes)):
        kept = sum(n * (1 - s) for n, s in zip(sizes.values(), choice))
        if kept <= (1 - S) * sum(sizes.values()) + 1e-9:
            cost = sum(curves[p][s] for p, s in zip(sizes, choice))
            best = cost if best is None or cost < best else best
    assert sum(curves[p][s] for p, s in got.items()) == pytest.approx(best)
    assert sum(n * (1 - got[p]) for p, n in sizes.items()) <= (1 - S) * sum(sizes.values()) + 1e-9
    with pytest.raises(ValueError, match="multiple of 1/5"):
        allocate_sparsity({"a": {0.3: 1.0}}, {"a": 64}, S, levels)
