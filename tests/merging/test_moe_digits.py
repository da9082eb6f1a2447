"""MC-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy") on a
real task: a sparse mixture-of-experts MLP trained on scikit-learn's digits, its 8 experts merged into 4.

Model: ``h = relu(Σ_{e ∈ top-2(r(x))} g_e(x) FFN_e(x))``, ``logits = h W_out + b``, with a linear router
``r(x) = x W_r`` over the 64 pixels, top-2 routing with the two gates renormalized (``g = softmax`` over the two
selected logits), 8 independently initialized experts ``FFN_e(x) = relu(x W1_e + b1_e) W2_e + b2_e`` (64 → 32 → 32),
trained with Adam on cross-entropy plus the Switch Transformer load-balancing term ``α E Σ_e f_e P_e`` (``f_e``:
fraction of routed slots, ``P_e``: mean router probability), so that every expert is used but not uniformly.

Compression 8 → 4 experts, the router kept as is (a token routed to expert ``e`` uses merged expert ``g(e)``):

- MC-SMoE: the 4 most used experts are dominant, every other expert joins the dominant expert with the most similar
  router-logit column (cosine over the training set), experts are permutation-aligned to their dominant expert
  (weight matching), and each group is averaged with usage-frequency weights (``mc_smoe_merge``);
- uniform: the same groups and alignment, plain average (the paper's "average merging");
- random grouping: the same dominant experts, every other expert joins a random one, aligned, frequency-weighted
  (mean over 5 draws);
- drop: keep the 4 most used experts unchanged, route among them only (expert pruning by usage).

The paper's qualitative claim: MC-SMoE's merge beats all three; the numbers (and how the margins were chosen) are in
:func:`test_mc_smoe_beats_uniform_random_grouping_and_dropping_on_digits`. Independent initialization is the
paper's setting (Switch Transformer experts), hence the alignment; here it is not decisive (seeds 0-5: accuracy
0.848 aligned vs 0.833 not, cross-entropy 0.572 vs 0.518), the frequency weights and the grouping are.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.datasets import load_digits_split
from merging.moe_expert_merge import align_experts, group_experts, mc_smoe_merge, merge_expert_groups
from merging.permutation import permutation_spec_from_axes_to_perm

E, TOP_K, HIDDEN, WIDTH, GROUPS = 8, 2, 32, 32, 4
ALPHA, STEPS, LR, BATCH = 0.03, 600, 3e-3, 128
# one expert's hidden units: columns of w1, entries of b1, rows of w2
EXPERT_SPEC = permutation_spec_from_axes_to_perm({"w1": (None, "h"), "b1": ("h",), "w2": ("h", None),
                                                 "b2": (None,)})


def _init(seed):
    k = jax.random.split(jax.random.key(seed), 4)

    def dense(key, shape, fan_in):
        return jax.random.normal(key, shape) / np.sqrt(fan_in)

    return {"router": dense(k[0], (64, E), 64) * 0.1,
            "experts": {"w1": dense(k[1], (E, 64, HIDDEN), 64), "b1": jnp.zeros((E, HIDDEN)),
                        "w2": dense(k[2], (E, HIDDEN, WIDTH), HIDDEN), "b2": jnp.zeros((E, WIDTH))},
            "head": {"w": dense(k[3], (WIDTH, 10), WIDTH), "b": jnp.zeros(10)}}


def _forward(params, x, experts, expert_map, keep):
    """Logits and router logits. ``experts``: leaves [E', ...]; ``expert_map``: [E] original -> merged index;
    ``keep``: [E] bool, experts the router may pick (dropped ones are masked out before top-k)."""
    router_logits = x @ params["router"]
    top, idx = jax.lax.top_k(jnp.where(keep, router_logits, -jnp.inf), TOP_K)
    gates = jax.nn.softmax(top, axis=-1)
    z = jax.nn.relu(jnp.einsum("td,edh->teh", x, experts["w1"]) + experts["b1"])
    y = jnp.einsum("teh,ehw->tew", z, experts["w2"]) + experts["b2"]  # every expert on every token (tiny sizes)
    y = jnp.take_along_axis(y, expert_map[idx][..., None], axis=1)  # [T, top_k, WIDTH]
    h = jax.nn.relu((gates[..., None] * y).sum(1))
    return h @ params["head"]["w"] + params["head"]["b"], router_logits


def _loss(params, x, y):
    out, router_logits = _forward(params, x, params["experts"], jnp.arange(E), jnp.ones(E, bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    _, idx = jax.lax.top_k(router_logits, TOP_K)
    routed = jax.nn.one_hot(idx, E).sum(1).mean(0) / TOP_K  # f_e (no gradient: argmax)
    prob = jax.nn.softmax(router_logits, axis=-1).mean(0)  # P_e
    return ce + ALPHA * E * jnp.sum(routed * prob)


_TX = optax.adam(LR)


@jax.jit
def _step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = _TX.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _train(data, seed):
    params = _init(seed)
    state = _TX.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        i = rng.integers(0, len(data.x_train), BATCH)
        params, state = _step(params, state, data.x_train[i], data.y_train[i])
    return params


@jax.jit
def _scores(params, experts, expert_map, keep, x, y):
    out, _ = _forward(params, x, experts, expert_map, keep)
    return (out.argmax(-1) == y).mean(), optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def run_experiment(seed, data=None, n_random=5):
    """{method: (test accuracy, test cross-entropy)} for the unmerged model and the four 8 -> 4 compressions."""
    data = load_digits_split() if data is None else data
    params = _train(data, seed)
    experts = params["experts"]
    router_logits = np.asarray(data.x_train @ params["router"])  # collected on the training set

    def score(merged=experts, expert_map=np.arange(E), keep=np.ones(E, bool)):
        acc, ce = _scores(params, merged, jnp.asarray(expert_map, jnp.int32), jnp.asarray(keep), data.x_test,
                          data.y_test)
        return float(acc), float(ce)

    res = {"unmerged": score()}
    mc = mc_smoe_merge(experts, router_logits, GROUPS, top_k=TOP_K, align_spec=EXPERT_SPEC)
    group, dominant, freq = (np.asarray(a) for a in (mc.group_of_expert, mc.dominant, mc.frequency))
    res["mc_smoe"] = score(mc.experts, group)
    aligned = align_experts(experts, group, dominant, EXPERT_SPEC)
    res["uniform"] = score(merge_expert_groups(aligned, group, np.ones(E)), group)
    rng = np.random.default_rng(seed + 1000)
    draws = []
    for _ in range(n_random):
        rand = group.copy()
        others = np.setdiff1d(np.arange(E), dominant)
        rand[others] = rng.integers(0, GROUPS, len(others))
        draws.append(score(merge_expert_groups(align_experts(experts, rand, dominant, EXPERT_SPEC), rand, freq),
                           rand))
    res["random"] = tuple(float(v) for v in np.mean(draws, axis=0))
    keep = np.zeros(E, bool)
    keep[np.argsort(-freq, kind="stable")[:GROUPS]] = True
    res["drop"] = score(keep=keep)
    res["frequency"] = tuple(freq)
    # sanity: the grouping the library used is the one its public pieces compute
    np.testing.assert_array_equal(np.asarray(group_experts(router_logits, GROUPS, top_k=TOP_K)[0]), group)
    return res


SEEDS = range(6)


def test_mc_smoe_beats_uniform_random_grouping_and_dropping_on_digits():
    """Mean over 6 seeds of test accuracy / cross-entropy, 8 -> 4 experts (CPU; seeds 0-5):
    unmerged 0.966 / 0.110 (8 experts), MC-SMoE 0.848 / 0.572, uniform 0.794 / 0.708, random grouping 0.797 / 0.659,
    drop 0.829 / 0.944.

    Margins: measured on 32 seeds (0-31) the 6-seed means of (MC-SMoE - baseline) were, min over the 27 windows /
    mean: accuracy vs uniform +0.011 / +0.030, vs random +0.019 / +0.044, vs drop -0.013 / +0.023; cross-entropy
    (baseline - MC-SMoE) vs uniform +0.020 / +0.077, vs random +0.063 / +0.131, vs drop +0.339 / +0.584. The
    thresholds below sit under those minima. Dropping experts keeps 4 intact experts whose argmax survives for many
    tokens while the rerouted tokens become badly calibrated: merging wins clearly in cross-entropy, in accuracy only
    on average (32-seed means 0.827 vs 0.807), so accuracy is asserted against drop with a -0.02 tolerance. The
    claim depends on load balancing (alpha = 0.03 here): with alpha = 0.01-0.02 usage is skewed and dropping the
    rarely used experts is as accurate as merging (6-seed means over seeds 0-15: -0.002 to -0.008 vs drop); with
    alpha = 0.05 usage is near uniform and frequency weights equal uniform averaging (+0.009 vs uniform).
    """
    data = load_digits_split()
    runs = [run_experiment(s, data) for s in SEEDS]
    acc = {k: float(np.mean([r[k][0] for r in runs])) for k in ("unmerged", "mc_smoe", "uniform", "random", "drop")}
    ce = {k: float(np.mean([r[k][1] for r in runs])) for k in acc}
    print("accuracy", acc, "cross-entropy", ce)
    assert acc["unmerged"] > 0.95  # the SMoE itself learned the task
    assert all(acc["unmerged"] > acc[k] for k in ("mc_smoe", "uniform", "random", "drop"))
    # usage is spread over the experts (load balancing works) but not uniform (frequency weights matter)
    freq = np.array([r["frequency"] for r in runs])
    assert freq.min() > 0.01 and freq.max() / freq.min() > 2
    assert acc["mc_smoe"] >= acc["uniform"] + 0.005 and ce["mc_smoe"] <= ce["uniform"] - 0.01
    assert acc["mc_smoe"] >= acc["random"] + 0.01 and ce["mc_smoe"] <= ce["random"] - 0.03
    assert acc["mc_smoe"] >= acc["drop"] - 0.02 and ce["mc_smoe"] <= ce["drop"] - 0.2
