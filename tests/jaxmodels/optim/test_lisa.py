
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxmodels.optim import LisaState, lisa, lisa_layers, scale_by_lisa
from jaxmodels.tree import flatten, tree_bytes
from tests.jaxmodels.optim.helpers import assert_tree_close, check_sharded_equals_unsharded, text_ids, tiny_decoder


def stacked_tree(L=6, d=8, h=12, V=10, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    f = lambda *s: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {"embed": {"embedding": f(V, d)},
            "layers": {"w1": f(L, d, h), "b1": f(L, h), "w2": f(L, h, d), "scale": f(L, d)},
            "head": {"kernel": f(d, V)}}


def run_lisa(tx, params, grads):
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    actives, ups = [], []
    for g in grads:
        params, state, u = step(params, state, g)
        actives.append(np.asarray(lisa_layers(state)))
        ups.append(u)
    return params, state, actives, ups


def lisa_numpy(params, grads, actives, lr, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4):
    """LISA + AdamW from the paper: frozen layers get no update; each active layer carries its own Adam state,
    fresh (zero moments, t = 0) when it becomes active, kept while it stays active."""
    p = {k: v.astype(np.float64) for k, v in flatten(params).items()}
    st = {k: k.startswith("layers/") for k in p}
    state = {}  # (key, layer or None) -> (m, v, t)

    def adamw(key, w, g):
        m, v, t = state.get(key, (np.zeros_like(w), np.zeros_like(w), 0))
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        state[key] = (m, v, t)
        return -lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * w)

    prev = None
    for g, act in zip(grads, actives):
        g = flatten(g)
        if prev is not None and not np.array_equal(prev, act):
            for k in list(state):  # drop the state of layers that left the active set
                if k[1] is not None and k[1] not in act:
                    del state[k]
        prev = act
        for k in p:
            if st[k]:
                for layer in act:
                    p[k][layer] = p[k][layer] + adamw((k, int(layer)), p[k][layer], g[k][layer])
            else:
                p[k] = p[k] + adamw((k, None), p[k], g[k])
    return p


def test_lisa_matches_numpy_reference_and_freezes_inactive_layers():
    params = stacked_tree()
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), params)
             for _ in range(9)]
    out, _, actives, ups = run_lisa(lisa(1e-2, gamma=2, interval=3, weight_decay=1e-4, seed=3), params, grads)
    # active sets: gamma distinct sorted layers, changing only at steps 3, 6 (multiples of the interval)
    for a in actives:
        assert len(set(a.tolist())) == 2 and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 6
    for i in range(9):
        if i % 3:
            np.testing.assert_array_equal(actives[i], actives[i - 1])
    assert len({tuple(a) for a in actives}) > 1
    for u, a in zip(ups, actives):  # frozen layers get exactly zero update
        frozen = np.setdiff1d(np.arange(6), a)
        assert np.all(np.asarray(u["layers"]["w1"])[frozen] == 0)
        assert np.all(np.asarray(u["layers"]["w1"])[a] != 0)
    # float32 vs float64 over 9 Adam steps: ~1e-6 relative
    assert_tree_close(out, lisa_numpy(params, grads, actives, 1e-2), 2e-5, 2e-6)


def test_lisa_sampling_is_reproducible_and_covers_layers():
    params = stacked_tree(L=8)
    grads = [jax.tree.map(jnp.zeros_like, params)] * 60
    tx = scale_by_lisa(optax.scale_by_adam(), gamma=2, interval=2, seed=0)
    _, _, a1, _ = run_lisa(tx, params, grads)
    _, _, a2, _ = run_lisa(tx, params, grads)
    _, _, a3, _ = run_lisa(scale_by_lisa(optax.scale_by_adam(), gamma=2, interval=2, seed=1), params, grads)
    np.testing.assert_array_equal(np.stack(a1), np.stack(a2))
    assert not np.array_equal(np.stack(a1), np.stack(a3))
    counts = np.bincount(np.concatenate(a1[::2]), minlength=8)  # 30 periods x 2 layers = 60 draws over 8 layers
    assert counts.min() >= 1  # P(some layer never drawn) < 8 * (6/8)^30 ~ 1e-3


def test_lisa_sampling_is_uniform_without_replacement():
    """Pan et al. Alg. 1: every K steps A ~ Uniform({S ⊂ {0..L-1}: |S| = γ}), independently of the last period. The
    sampler alone (identity inner, one scanned jit): 3000 periods of K=2 steps, L=6, γ=2 (15 subsets, 200 expected
    each). Fixed seed, so the statistics are fixed numbers (measured: subset chi² 14.6, overlap chi² 1.3); the bounds
    are the 0.999 quantiles, so any uniform sampler passes with probability 0.999 per check whatever the seed, while
    e.g. one layer weighted 1.3x (simulated: subset chi² ~ 75, always above the bound), a reused key (overlap always
    γ) or a deterministic rotation fails."""
    import itertools
    from math import comb

    from scipy import stats

    L, gamma, K, N = 6, 2, 2, 3000
    params = {"layers": {"w": jnp.zeros((L, 1))}, "head": jnp.zeros((1,))}
    tx = scale_by_lisa(optax.identity(), gamma=gamma, interval=K, seed=0)

    @jax.jit
    def draws(p):
        def body(s, _):
            _, s = tx.update(p, s, p)
            return s, lisa_layers(s)

        return jax.lax.scan(body, tx.init(p), None, length=N * K)[1]

    steps = np.asarray(draws(params))
    per = steps[::K]
    np.testing.assert_array_equal(steps[1::K], per)  # the active set only changes at multiples of K
    assert np.all(np.diff(per, axis=1) > 0) and per.min() >= 0 and per.max() < L  # γ distinct sorted layers
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(L), gamma))}
    counts = np.bincount([subsets[tuple(a)] for a in per.tolist()], minlength=len(subsets))
    expected = N / len(subsets)
    chi2_subsets = float(((counts - expected) ** 2 / expected).sum())
    # consecutive periods are independent: |A_t ∩ A_{t+1}| is hypergeometric, P(k) = C(γ,k) C(L-γ,γ-k) / C(L,γ)
    overlap = np.array([len(set(a) & set(b)) for a, b in zip(per[:-1].tolist(), per[1:].tolist())])
    p_k = np.array([comb(gamma, k) * comb(L - gamma, gamma - k) for k in range(gamma + 1)]) / comb(L, gamma)
    o_exp = p_k * (N - 1)
    chi2_overlap = float(((np.bincount(overlap, minlength=gamma + 1) - o_exp) ** 2 / o_exp).sum())
    print(f"subset chi2 {chi2_subsets:.1f} (14 dof), overlap chi2 {chi2_overlap:.1f} (2 dof)")
    assert chi2_subsets < stats.chi2.ppf(0.999, len(subsets) - 1)  # 36.1
    assert chi2_overlap < stats.chi2.ppf(0.999, gamma)  # 13.8


def test_lisa_state_memory_is_gamma_over_L():
    L, gamma = 8, 2
    params = stacked_tree(L=L, d=32, h=64, V=16)
    f = flatten(params)
    per_layer = sum(v[0].size for k, v in f.items() if k.startswith("layers/"))
    always = sum(v.size for k, v in f.items() if not k.startswith("layers/"))
    full = tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
    ours = tree_bytes(jax.eval_shape(lisa(1e-3, gamma=gamma).init, params))
    expected = (gamma * per_layer + always) / (L * per_layer + always)
    ratio = ours / full
    print(f"LISA state bytes {ours} vs AdamW {full}: ratio {ratio:.4f}, (gamma+always)/(L+always) {expected:.4f}")
    # extra bytes: gamma per-layer counts, the key and the active indices (a few dozen bytes)
    assert abs(ratio - expected) < 0.01


def test_lisa_rejects_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        lisa(1e-3, gamma=0)
    with pytest.raises(ValueError, match="interval"):
        lisa(1e-3, interval=0)
    with pytest.raises(ValueError, match="exceeds"):
        lisa(1e-3, gamma=7).init(stacked_tree(L=6))
    with pytest.raises(ValueError, match="leading layer axis"):
        lisa(1e-3).init({"layers": {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}})
    with pytest.raises(ValueError, match="no leaf"):
        lisa(1e-3).init({"w": np.zeros((3, 2))})


def test_lisa_sharded_equals_unsharded(mesh_2d):
    params = stacked_tree(L=4, d=8, h=16)
    rng = np.random.default_rng(2)
    grads = [jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), params)
             for _ in range(4)]
    rules = [(r"layers/w1$", P(None, None, "model")), (r"layers/w2$", P(None, "model", None)),
             (r"embed/embedding$", P(None, "model")), (r".*", P())]
    tx = lisa(1e-2, gamma=2, interval=2)
    n = check_sharded_equals_unsharded(tx, mesh_2d, params=params, rules=rules, grads=grads)
    assert n >= 4  # the always-trained leaves' mu/nu carry the params' sharding
    # after steps, the gathered per-layer state keeps the model-axis split of its parameter (leading axis gamma)
    from jaxmodels.sharding import rules_to_shardings
    from tests.jaxmodels.optim.helpers import run

    shard = rules_to_shardings(params, rules, mesh_2d)
    _, state = run(tx, jax.device_put(params, shard), [jax.device_put(g, shard) for g in grads])
    lstate = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LisaState))
              if isinstance(s, LisaState)][0]
    mu = lstate.stacked[0].mu["layers/w1"]
    assert mu.shape == (2, 8, 16)
    assert mu.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh_2d, P(None, None, "model")), 3)


# ---- paper claim: LISA reaches a loss close to full AdamW on a small decoder --------------------------------------
def train_decoder(tx, steps=300, batch=256, C=8, seed=0):
    """Train ``tiny_decoder`` for ``steps`` AdamW-style steps on random windows, return the held-out loss. The whole
    run (init, scanned steps, evaluation) is one jitted program; it is execution-bound, so it is compiled at XLA's
    default backend optimization level (the same HLO and float semantics; conftest lowers the level for the
    compile-bound rest of the suite, which makes this loop ~2x slower to run)."""
    ids, V = text_ids()
    params, apply = tiny_decoder(V, C=C)
    n_train = int(0.9 * len(ids))
    window = np.arange(-C, 0)
    rng = np.random.default_rng(seed)
    pos = np.stack([rng.integers(C, n_train, batch) for _ in range(steps)])  # a step-by-step loop's draws, in order
    ev = np.arange(n_train, len(ids))

    def loss_fn(p, ctx, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, ctx), y).mean()

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 3})
    def fit(p, ctx, y, ctx_eval, y_eval):
        def step(carry, batch):
            p, s = carry
            u, s = tx.update(jax.grad(loss_fn)(p, *batch), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), (ctx, y))
        return loss_fn(p, ctx_eval, y_eval)

    return float(fit(params, ids[pos[..., None] + window], ids[pos], ids[ev[:, None] + window], ids[ev]))


@pytest.mark.slow
def test_paper_claim_lisa_close_to_adamw_on_small_decoder():
    """Pan et al.: sampling gamma=2 of L=8 layers per period reaches a loss close to full AdamW. Character-level
    decoder on scikit-learn's dataset descriptions (real English, 43 kB), 200 steps of batch 128. Measured held-out
    loss (CPU, data seeds 0/1/2): AdamW 2.601/2.579/2.593, LISA 2.745/2.716/2.739 (+5.5/5.3/5.6%), middle layers
    frozen (embeddings + head only) 2.916/2.908/2.918: LISA recovers 54/59/55% of what training the middle layers
    buys with a quarter of the layer updates per step. (300 steps of batch 256, seed 0: AdamW 2.33, LISA 2.49,
    frozen 2.69; 500 steps: AdamW 2.18, LISA 2.35.) Asserted with margin for other backends: within 10% of AdamW and
    > 40% of the gap recovered."""
    steps, batch = 200, 128
    sched = optax.cosine_decay_schedule(3e-3, steps)
    full = train_decoder(optax.adamw(sched, weight_decay=1e-4), steps, batch)
    sampled = train_decoder(lisa(sched, gamma=2, interval=20, weight_decay=1e-4), steps, batch)
    frozen = train_decoder(optax.chain(optax.masked(optax.adamw(sched, weight_decay=1e-4),
                                                    lambda t: jax.tree_util.tree_map_with_path(
                                                        lambda p, _: "layers" not in str(p), t)),
                                       optax.masked(optax.set_to_zero(), lambda t: jax.tree_util.tree_map_with_path(
                                           lambda p, _: "layers" in str(p), t))), steps, batch)
    print(f"held-out loss: AdamW {full:.3f}  LISA {sampled:.3f}  frozen middle {frozen:.3f}")
    assert sampled < 1.10 * full
    assert sampled < frozen - 0.4 * (frozen - full)
