"""Git Re-Basin permutation alignment and the linear-mode-connectivity barrier."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import MLP, MLP_RULES_TP, ViT
from jaxmodels.sharding import shard
from merging.lmc import interpolation_path, loss_barrier
from merging.permutation import (activation_matching, apply_permutation, identity_permutation, invert_permutation,
                                 matching_objective, mlp_permutation_spec, vit_permutation_spec, weight_matching)


def _mlp(seed=0, features=(8, 6), d=5):
    model = MLP(features=features, num_outputs=4)
    p = model.init(jax.random.key(seed), jnp.zeros((1, d)))["params"]
    return model, p, jax.jit(lambda q, x: model.apply({"params": q}, x))


def _random_perm(spec, params, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.permutation(len(v)) for k, v in identity_permutation(params, spec).items()}


def test_permuted_mlp_same_function():
    model, p, f = _mlp()
    spec = mlp_permutation_spec(2)
    perm = _random_perm(spec, p, 0)
    q = apply_permutation(p, spec, perm)
    x = np.random.default_rng(1).normal(size=(11, 5)).astype(np.float32)
    # same sums over hidden units in another order: float32 rounding only (~1e-7 relative).
    np.testing.assert_allclose(f(q, x), f(p, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(q["Dense_0"]["kernel"], p["Dense_0"]["kernel"])
    # inverse undoes it exactly (pure re-indexing)
    back = apply_permutation(q, spec, invert_permutation(perm))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not a leaf"):
        apply_permutation(p, mlp_permutation_spec(3), perm)
    # one argument order (trees first, then the spec): the old (spec, perm, params) order is a clear error
    with pytest.raises(TypeError, match=r"\(params, spec, perm\)"):
        apply_permutation(spec, perm, p)
    with pytest.raises(TypeError, match="trees first"):
        weight_matching(spec, p, p)


def test_permuted_vit_same_function():
    model = ViT(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=24, num_classes=5)
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    p = model.init(jax.random.key(0), x)["params"]
    # non-zero class token so its permutation matters
    p = {**p, "cls": jax.random.normal(jax.random.key(1), p["cls"].shape)}
    spec = vit_permutation_spec(2)
    perm = _random_perm(spec, p, 3)
    q = apply_permutation(p, spec, perm)
    f = jax.jit(lambda w, z: model.apply({"params": w}, z))
    # LayerNorm statistics and matmuls summed in another order: float32 rounding (~1e-6).
    np.testing.assert_allclose(f(q, x), f(p, x), rtol=1e-4, atol=1e-5)


def test_weight_matching_recovers_hidden_permutation():
    model, a, f = _mlp(1, features=(16, 12))
    spec = mlp_permutation_spec(2)
    perm = _random_perm(spec, a, 5)
    b = apply_permutation(a, spec, perm)
    found = weight_matching(a, b, spec, progress=False)
    b_aligned = apply_permutation(b, spec, found)
    for x, y in zip(jax.tree.leaves(b_aligned), jax.tree.leaves(a)):
        np.testing.assert_array_equal(x, y)
    for k in perm:
        np.testing.assert_array_equal(found[k], invert_permutation(perm)[k])


def test_weight_matching_single_layer_is_brute_force_optimal():
    """One hidden layer: the objective is linear in P, so LSA is globally optimal; check against all 5! perms."""
    model, a, _ = _mlp(2, features=(5,))
    _, b, _ = _mlp(3, features=(5,))
    spec = mlp_permutation_spec(1)
    found = weight_matching(a, b, spec, progress=False)
    best = max(matching_objective(a, apply_permutation(b, spec, {"P_0": np.array(pi)}), spec)
               for pi in itertools.permutations(range(5)))
    got = matching_objective(a, apply_permutation(b, spec, found), spec)
    np.testing.assert_allclose(got, best, rtol=1e-9)
    assert got >= matching_objective(a, b, spec) - 1e-9


def test_weight_matching_sharded(mesh_2d):
    _, a, _ = _mlp(4, features=(8, 8))
    _, b, _ = _mlp(5, features=(8, 8))
    spec = mlp_permutation_spec(2)
    ref = weight_matching(a, b, spec, progress=False)
    sa, sb = shard(a, MLP_RULES_TP, mesh_2d), shard(b, MLP_RULES_TP, mesh_2d)
    got = weight_matching(sa, sb, spec, progress=False)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    pb = jax.jit(lambda q: apply_permutation(q, spec, got))(sb)
    for x, y in zip(jax.tree.leaves(pb), jax.tree.leaves(apply_permutation(b, spec, ref))):
        np.testing.assert_array_equal(x, y)


def test_activation_matching_recovers_permutation():
    model, a, f = _mlp(6, features=(10, 7))
    spec = mlp_permutation_spec(2)
    perm = _random_perm(spec, a, 8)
    b = apply_permutation(a, spec, perm)
    xs = [np.random.default_rng(i).normal(size=(64, 5)).astype(np.float32) for i in range(2)]
    apply_fn = lambda q, x: model.apply({"params": q}, x)  # noqa: E731
    found = activation_matching(a, b, apply_fn, xs, {"P_0": "Dense_0", "P_1": "Dense_1"},
                                activation=jax.nn.relu, progress=False)
    for k in perm:
        np.testing.assert_array_equal(found[k], invert_permutation(perm)[k])


def test_lmc_barrier_reference():
    rng = np.random.default_rng(0)
    a = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    b = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    # L(θ) = -||θ||²: L(t) - line = t(1-t)||a-b||², maximal at t = 1/2.
    path = interpolation_path(lambda p: -jnp.sum(p["w"] ** 2), a, b, num_points=11, progress=False)
    d2 = float(np.sum((np.asarray(a["w"]) - np.asarray(b["w"])) ** 2))
    np.testing.assert_allclose(path.barrier, d2 / 4, rtol=1e-5)
    np.testing.assert_allclose(path.values[0], -np.sum(np.asarray(a["w"]) ** 2), rtol=1e-6)
    assert loss_barrier(lambda p: -jnp.sum(p["w"] ** 2), a, a, progress=False) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="num_points"):
        loss_barrier(lambda p: 0.0, a, b, num_points=1)


@pytest.mark.parametrize("placement,tie", [("pre", True), ("post", False), ("peri", True)])
def test_permuted_gpt_same_function(placement, tie):
    from jaxmodels.models.gpt import GPT
    from merging.permutation import gpt_permutation_spec

    model = GPT(vocab_size=11, width=16, depth=2, num_heads=2, mlp_dim=24, max_len=8, placement=placement,
                tie_embeddings=tie)
    tok = np.random.default_rng(0).integers(0, 11, size=(2, 8)).astype(np.int32)
    p = model.init(jax.random.key(0), tok)["params"]
    # perturb norm parameters so their permutation is visible
    p = jax.tree_util.tree_map_with_path(
        lambda k, v: v + 0.1 * jax.random.normal(jax.random.key(len(str(k))), v.shape) if "norm" in str(k) else v, p)
    spec = gpt_permutation_spec(2, placement=placement, tie_embeddings=tie)
    perm = _random_perm(spec, p, 4)
    q = apply_permutation(p, spec, perm)
    f = jax.jit(lambda w, z: model.apply({"params": w}, z))
    # float32 rounding of re-ordered sums through 2 blocks (~1e-6).
    np.testing.assert_allclose(f(q, tok), f(p, tok), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_permuted_resnet20_same_function(shortcut):
    from jaxmodels.models.resnet import ResNet
    from merging.permutation import resnet_permutation_spec

    model = ResNet(num_blocks=3, downsample_at=(1, 2), width=4, num_classes=5, shortcut=shortcut)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    v = model.init(jax.random.key(0), x)
    # non-trivial BN statistics and affine parameters so that their permutation matters
    v = jax.tree_util.tree_map_with_path(
        lambda k, a: a + 0.5 * jnp.abs(jax.random.normal(jax.random.key(len(str(k))), a.shape))
        if a.ndim == 1 else a, v)
    spec = resnet_permutation_spec(3, (1, 2), shortcut=shortcut)
    perm = _random_perm(spec, v, 7)
    w = apply_permutation(v, spec, perm)
    f = jax.jit(lambda q, z: model.apply(q, z))
    # float32 rounding of re-ordered conv sums (~1e-6).
    np.testing.assert_allclose(f(w, x), f(v, x), rtol=1e-4, atol=1e-5)
    if shortcut == "B":
        assert "P_stage_2" in spec.perm_to_axes
    # weight matching recovers the permutation of a permuted copy
    found = weight_matching(v, w, spec, progress=False)
    back = apply_permutation(w, spec, found)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v)):
        np.testing.assert_array_equal(a, b)
