"""Layer-wise (heterogeneous) model averaging, Lin et al. "Mitigating the Alignment Tax of RLHF": the interpolation
against a NumPy reference, α all equal == WiSE-FT bit for bit, the reference code's block split and normalized
sigmoids, bad input, jit + sharding, the learned α's, and the claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP
from jaxmodels.sharding import shard
from jaxmodels.tree import flatten
from merging.wise_ft import (assign_groups, depth_groups, layerwise_wise_ft, learn_layerwise_alphas,
                             normalized_alphas, wise_ft)
from tests.merging.helpers import assert_trees_close, assert_trees_equal, make_family, np_tree, shard_tree

GROUPS = [r"^dense/", r"^out/", r".*"]  # dense/kernel, dense/bias -> 0; out/kernel -> 1; scale -> 2


def test_interpolation_matches_numpy_and_groups_first_match_wins():
    base, (ft,) = make_family(1)
    alphas = [0.1, 0.7, 0.4]
    got = flatten(layerwise_wise_ft(base, [ft], alphas=alphas, groups=GROUPS))
    b, f = flatten(np_tree(base)), flatten(np_tree(ft))
    part = {"dense/kernel": 0, "dense/bias": 0, "out/kernel": 1, "scale": 2}
    assert assign_groups(base, GROUPS) == part
    for p, k in part.items():
        ref = (1 - alphas[k]) * b[p].astype(np.float64) + alphas[k] * f[p].astype(np.float64)
        np.testing.assert_allclose(got[p], ref, rtol=1e-6, atol=1e-6)
    # the first matching regex wins: ".*" first puts every leaf in part 0
    assert set(assign_groups(base, [r".*", r"^dense/"]).values()) == {0}


def test_equal_alphas_are_wise_ft_bit_for_bit_and_dtypes_are_kept():
    base, (ft,) = make_family(1)
    cast = lambda t: {**t, "dense": {"kernel": t["dense"]["kernel"].astype(jnp.bfloat16),  # noqa: E731
                                     "bias": t["dense"]["bias"]}, "scale": t["scale"].astype(jnp.float16)}
    base, ft = cast(base), cast(ft)
    for a in (0.0, 0.3, 1.0):
        got = layerwise_wise_ft(base, [ft], alphas=[a, a, a], groups=GROUPS)
        assert_trees_equal(got, wise_ft(base, [ft], alpha=a))
        assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, base)
    before = np_tree(base)
    layerwise_wise_ft(base, [ft], alphas=[0.2, 0.5, 0.9], groups=GROUPS)
    assert_trees_equal(np_tree(base), before)  # inputs untouched


def test_depth_groups_is_the_reference_block_split():
    tree = {f"Dense_{i}": {"kernel": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)} for i in range(5)}
    part = assign_groups(tree, depth_groups(tree, 2))
    # block{K}: L // K = 2 layers per block, the remainder in the last one (mask_trainer.py's rule)
    assert [part[f"Dense_{i}/kernel"] for i in range(5)] == [0, 0, 1, 1, 1]
    assert all(part[f"Dense_{i}/bias"] == part[f"Dense_{i}/kernel"] for i in range(5))
    assert [assign_groups(tree, depth_groups(tree, 5))[f"Dense_{i}/bias"] for i in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot be split"):
        depth_groups(tree, 6)
    with pytest.raises(ValueError, match="no layer index"):
        depth_groups({**tree, "scale": np.ones(2, np.float32)}, 2)


def test_bad_input_is_rejected_before_any_work():
    base, (ft,) = make_family(1)
    ok = dict(alphas=[0.1, 0.2, 0.3], groups=GROUPS)
    with pytest.raises(ValueError, match="matches none"):
        layerwise_wise_ft(base, [ft], alphas=[0.1, 0.2], groups=GROUPS[:2])
    with pytest.raises(ValueError, match="2 alphas for 3 groups"):
        layerwise_wise_ft(base, [ft], alphas=[0.1, 0.2], groups=GROUPS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        layerwise_wise_ft(base, [ft], alphas=[0.1, 1.2, 0.3], groups=GROUPS)
    with pytest.raises(ValueError, match="one ratio per group"):
        layerwise_wise_ft(base, [ft], alphas=0.5, groups=GROUPS)
    with pytest.raises(TypeError, match="list/tuple of path regexes"):
        layerwise_wise_ft(base, [ft], alphas=[0.5], groups=".*")
    with pytest.raises(ValueError, match="does not compile"):
        layerwise_wise_ft(base, [ft], alphas=[0.5], groups=["("])
    with pytest.raises(ValueError, match="one fine-tuned model"):
        layerwise_wise_ft(base, [ft, ft], **ok)
    with pytest.raises(ValueError, match="needs the pre-trained"):
        layerwise_wise_ft(None, [ft], **ok)
    with pytest.raises(ValueError, match="scale"):
        layerwise_wise_ft(base, [{**ft, "scale": np.zeros(4, np.float32)}], **ok)
    bad = jax.tree.map(np.array, ft)
    bad["out"]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"model_0.*out/kernel"):
        layerwise_wise_ft(base, [bad], **ok)
    obj = lambda p: jnp.sum(p["scale"])  # noqa: E731
    with pytest.raises(ValueError, match="init"):
        learn_layerwise_alphas(base, [ft], obj, groups=GROUPS, init=0.0)
    with pytest.raises(ValueError, match="steps"):
        learn_layerwise_alphas(base, [ft], obj, groups=GROUPS, steps=0)
    with pytest.raises(ValueError, match="reg_weights"):
        learn_layerwise_alphas(base, [ft], obj, groups=GROUPS, reg_weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="callable"):
        learn_layerwise_alphas(base, [ft], None, groups=GROUPS)


def test_traced_alphas_under_jit_and_sharded_equal_single_device(mesh):
    base, (ft,) = make_family(1)
    alphas = jnp.asarray([0.25, 0.6, 0.9])
    ref = layerwise_wise_ft(base, [ft], alphas=alphas, groups=GROUPS)
    fn = jax.jit(lambda a, b, f: layerwise_wise_ft(b, [f], alphas=a, groups=GROUPS))
    got = fn(alphas, shard_tree(base, mesh), shard_tree(ft, mesh))
    assert got["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("data")  # stays sharded
    assert_trees_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fn(jnp.ones(2), base, ft)


def test_normalized_alphas_reference():
    w = np.array([-1.0, 0.3, 2.0, 0.0], np.float32)
    s = 1 / (1 + np.exp(-w.astype(np.float64))) + 0.2
    np.testing.assert_allclose(normalized_alphas(w, mean=0.3, epsilon=0.2), 0.3 * 4 * s / s.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.mean(normalized_alphas(w, mean=0.3, epsilon=0.0)), 0.3, rtol=1e-6)


def test_learned_alphas_lower_the_objective_and_keep_the_mean(mesh_2d):
    """A target between the two models, nearer θ_ft in part 0 and nearer θ_0 in part 2: learning must lower the
    objective from the uniform start, keep mean α = ᾱ (the paper's sum constraint) and move α_0 above α_2; the
    returned params are layerwise_wise_ft at the returned α's; reg pulls the α's back to ᾱ; a batch stream
    takes the same steps; sharded == single device."""
    base, (ft,) = make_family(1)
    target = layerwise_wise_ft(base, [ft], alphas=[0.9, 0.5, 0.1], groups=GROUPS)
    obj = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))  # noqa
    kw = dict(groups=GROUPS, steps=60, tx=optax.adam(0.1), init=0.5, progress=False)
    res = learn_layerwise_alphas(base, [ft], obj, **kw)
    a = res.info["alphas"]
    assert res.info["losses"][-1] < 0.2 * res.info["losses"][0]  # measured: 0.0025 of the start
    np.testing.assert_allclose(a.mean(), 0.5, rtol=1e-5)
    assert a[0] > 0.5 + 0.2 and a[2] < 0.5 - 0.2
    assert_trees_close(res.params, layerwise_wise_ft(base, [ft], alphas=a, groups=GROUPS), rtol=1e-6, atol=1e-6)
    tied = learn_layerwise_alphas(base, [ft], obj, **kw, reg=100.0).info["alphas"]  # same program: reg is an arg
    assert np.max(np.abs(tied - 0.5)) < 0.3 * np.max(np.abs(a - 0.5))
    # a batch stream (objective(params, batch), one jitted step per batch) follows the same trajectory
    batched = learn_layerwise_alphas(base, [ft], lambda p, b: obj(p) * b, **{**kw, "steps": 4},
                                     batches=[jnp.float32(1.0)])
    np.testing.assert_allclose(batched.info["losses"], res.info["losses"][:4], rtol=1e-5)
    rules = [(r"kernel$", jax.sharding.PartitionSpec("data", None)), (r".*", jax.sharding.PartitionSpec())]
    sh = learn_layerwise_alphas(shard(base, rules, mesh_2d), [shard(ft, rules, mesh_2d)], obj, **kw)
    np.testing.assert_allclose(sh.info["alphas"], a, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the claim at small scale

N_OLD, N_NEW = 10, 3  # old task: the digit (logits 0-9); new task: digit mod 3 on 3 new output units (10-12)


def _mlp_params(sizes, seed):
    """jaxmodels MLP params (Dense_i kernel/bias), LeCun-normal kernels drawn with NumPy (no eager flax init)."""
    rng = np.random.default_rng(seed)
    return {f"Dense_{i}": {"kernel": (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
                           "bias": np.zeros(b, np.float32)} for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def pre_and_fine_tuned(seed):
    """θ_pre trained on the old task, θ_ft = θ_pre fine-tuned on the new task only (the same inputs, a new
    behaviour of the shared head, as RLHF): 200 Adam steps each, batch 64."""
    d = load_digits_split(seed=0)
    model = MLP(features=(32, 32), num_outputs=N_OLD + N_NEW)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    x = jnp.asarray(d.x_train)
    y_old, y_new = jnp.asarray(d.y_train), jnp.asarray(N_OLD + d.y_train % N_NEW)
    on_old = jnp.arange(N_OLD + N_NEW) < N_OLD

    @jax.jit
    def train(params, y, valid, key):  # the softmax over the task's own outputs
        tx = optax.adam(1e-2)

        def step(c, k):
            p, s = c
            idx = jax.random.randint(k, (64,), 0, x.shape[0])
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                jnp.where(valid, apply(p, x[idx]), -1e9), y[idx]).mean())(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, 200))[0][0]

    key = jax.random.key(seed)
    pre = train(_mlp_params((64, 32, 32, N_OLD + N_NEW), seed), y_old, on_old, jax.random.fold_in(key, 1))
    ft = train(pre, y_new, ~on_old, jax.random.fold_in(key, 2))
    logits = jax.jit(apply)

    def accs(p):
        z = np.asarray(logits(p, d.x_test))
        return np.array([np.mean(z[:, :N_OLD].argmax(-1) == d.y_test),
                         np.mean(z[:, N_OLD:].argmax(-1) == d.y_test % N_NEW)])

    def new_loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x)[:, N_OLD:], y_new - N_OLD).mean()

    return pre, ft, accs, new_loss


def trade_offs(pre, ft, accs, new_loss):
    """(old, new) test accuracies of uniform WiSE-FT α = 0.2, layer-wise α = [0, 0.2, 0.4] and the learned α's."""
    groups = depth_groups(pre, 3)  # Dense_0 | Dense_1 | Dense_2 (the head)
    res = learn_layerwise_alphas(pre, [ft], new_loss, groups=groups, steps=100, tx=optax.adam(0.1), init=0.2,
                                 progress=False)
    return (accs(wise_ft(pre, [ft], alpha=0.2)),
            accs(layerwise_wise_ft(pre, [ft], alphas=[0.0, 0.2, 0.4], groups=groups)), accs(res.params), res)


def test_claim_layerwise_averaging_beats_uniform_wise_ft_at_the_same_mean_alpha():
    """At the paper's ᾱ = 0.2 (init_val): keeping the low layer at θ_pre and moving the head further,
    α = [0, 0.2, 0.4] (mean 0.2), gives a better old/new trade-off than uniform WiSE-FT α = 0.2 (new-task accuracy
    up, old accuracy kept), and so do the α's that learn_layerwise_alphas finds from the new-task loss alone with the
    mean fixed at 0.2."""
    uni, low, learned, res = trade_offs(*pre_and_fine_tuned(0))
    np.testing.assert_allclose(res.info["alphas"].mean(), 0.2, rtol=1e-5)
    assert res.info["objective"][-1] < res.info["objective"][0]
    print(f"uniform {uni}, layer-wise {low}, learned {res.info['alphas']} -> {learned}")
    # measured, seed 0: uniform old/new 0.951/0.423; layer-wise +0.000/+0.060; learned α [0.07, 0.12, 0.40]
    # +0.002/+0.036. Seeds 0-4, old+new gain over uniform: layer-wise +0.060, +0.060, +0.091, +0.056, +0.111;
    # learned +0.038, +0.036, +0.031, +0.038, +0.102; old accuracy change >= -0.007 in all of them.
    assert low.sum() > uni.sum() + 0.03 and low[0] >= uni[0] - 0.01
    assert learned.sum() > uni.sum() + 0.02 and learned[0] >= uni[0] - 0.01
