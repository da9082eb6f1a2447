import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.optim.dp_clip import PerLayerClipState, clip_layers, layer_clip_norms, per_layer_clip
from jaxmodels.tree import flatten
from tests.jaxmodels.optim.helpers import random_tree


def clip_numpy(tree, c, allocation, mode):
    """The module docstring's equations in float64, leaf order as jax.tree.leaves."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    sizes = np.asarray([x.size for x in leaves], np.float64)
    cl = (c / np.sqrt(len(leaves)) * np.ones(len(leaves)) if allocation == "uniform"
          else c * np.sqrt(sizes / sizes.sum()))
    norms = np.asarray([np.linalg.norm(x) for x in leaves])
    if mode == "clip":
        return [x * min(1.0, b / n) if n > 0 else x for x, b, n in zip(leaves, cl, norms)], cl
    total = np.sqrt(np.sum(norms ** 2))
    return [x if total < c else x / (n + 1e-10) * b for x, b, n in zip(leaves, cl, norms)], cl


@pytest.mark.parametrize("allocation,mode", [("uniform", "clip"), ("dimension", "clip"), ("uniform", "normalize"),
                                             ("dimension", "normalize")])
def test_clip_layers_matches_numpy_and_bounds_hold(allocation, mode):
    tree = random_tree(0, scale=0.3)  # leaf norms 0.3 .. 3: some layers above their bound, some below
    c = 2.0
    bounds = jax.tree.leaves(layer_clip_norms(tree, c, allocation))
    assert math.isclose(sum(b * b for b in bounds), c * c, rel_tol=1e-12)  # Σ C_l² = C²
    before = {k: np.array(v) for k, v in flatten(tree).items()}
    fn = jax.jit(functools.partial(clip_layers, clip_norm=c, allocation=allocation, mode=mode))
    out = fn(tree)
    assert all(np.array_equal(before[k], v) for k, v in flatten(tree).items())  # input not modified
    ref, cl = clip_numpy(tree, c, allocation, mode)
    got = jax.tree.leaves(out)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=2e-6, atol=1e-7)
    norms = np.asarray([np.linalg.norm(np.asarray(g, np.float64)) for g in got])
    in_norms = np.asarray([np.linalg.norm(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
    assert np.sqrt(np.sum(norms ** 2)) <= c * (1 + 1e-6)  # the sensitivity bound C holds in both modes
    if mode == "clip":
        assert np.all(norms <= cl * (1 + 1e-6))  # every layer within its own bound
        assert np.any(in_norms > cl)
    else:  # ‖g‖ ≥ C here: every layer rescaled to exactly C_l
        assert np.sqrt(np.sum(in_norms ** 2)) >= c
        np.testing.assert_allclose(norms, cl, rtol=1e-5)
    small = jax.tree.map(lambda x: 1e-3 * x, tree)  # ‖g‖ < C: normalize passes it unchanged, clip too
    for g, x in zip(jax.tree.leaves(fn(small)), jax.tree.leaves(small)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=1e-6)


def test_per_example_matches_optax_dp_aggregate_and_layer_clip():
    rng = np.random.default_rng(0)
    one = {"w": jnp.asarray(rng.standard_normal((6, 3, 4)), jnp.float32)}  # one leaf: per-layer == flat DP-SGD
    ours = per_layer_clip(1.0, noise_multiplier=0.7, key=jax.random.key(3), per_example=True)
    ref = optax.contrib.differentially_private_aggregate(1.0, 0.7, key=jax.random.key(3))
    so, sr = ours.init(one), ref.init(one)
    upd_o, upd_r = jax.jit(ours.update), jax.jit(ref.update)
    for _ in range(2):  # same key schedule: the second step's noise matches too
        uo, so = upd_o(one, so)
        ur, sr = upd_r(one, sr)
        np.testing.assert_allclose(uo["w"], ur["w"], rtol=1e-6, atol=1e-7)
    two = {"a": jnp.asarray(rng.standard_normal((6, 3, 4)), jnp.float32),
           "b": jnp.asarray(10 * rng.standard_normal((6, 7)), jnp.float32)}  # norms differ 10x
    summed, _ = jax.jit(optax.per_example_layer_norm_clip)(jax.tree.leaves(two), 1.5)  # uniform: C/√L
    tx = per_layer_clip(1.5, per_example=True)
    u, _ = jax.jit(tx.update)(two, tx.init(two))
    for s, x in zip(summed, jax.tree.leaves(u)):
        np.testing.assert_allclose(np.asarray(s) / 6, np.asarray(x), rtol=1e-6, atol=1e-7)


def test_noise_matches_its_keys_has_std_sigma_c_and_sharded_equals_single_device(mesh_2d):
    sigma, c = 0.5, 2.0
    tree = {"big": jnp.zeros((100, 100)), "w": jnp.asarray(np.random.default_rng(1).standard_normal((100, 100)),
                                                            jnp.float32)}
    key = jax.random.key(7)
    tx = per_layer_clip(c, noise_multiplier=sigma, key=key)
    state = tx.init(tree)
    assert isinstance(state, PerLayerClipState)
    upd = jax.jit(tx.update)
    out, state2 = upd(tree, state)
    new_key, *rngs = jax.random.split(key, 3)  # the optax key schedule, leaves in tree order
    clipped, _ = clip_numpy(tree, c, "uniform", "clip")
    for leaf, cl, r in zip(jax.tree.leaves(out), clipped, rngs):
        np.testing.assert_allclose(np.asarray(leaf), cl + sigma * c * np.asarray(jax.random.normal(r, cl.shape)),
                                   rtol=1e-5, atol=1e-6)
    assert np.array_equal(jax.random.key_data(state2.rng_key), jax.random.key_data(new_key))
    noise = np.asarray(out["big"], np.float64)  # a zero leaf: pure noise, 10000 draws (std error 0.7%)
    assert abs(noise.std() / (sigma * c) - 1) < 0.02 and abs(noise.mean()) < 0.03
    out2, _ = upd(tree, state2)
    assert not np.allclose(out2["big"], out["big"])  # fresh noise every step
    # the jitted update on sharded updates (split over "data" x "model") equals the single-device one, sharding kept
    shard = {"big": NamedSharding(mesh_2d, P(None, "model")), "w": NamedSharding(mesh_2d, P("data", "model"))}
    sout, _ = upd(jax.device_put(tree, shard), state)
    for k in tree:
        np.testing.assert_allclose(np.asarray(sout[k]), np.asarray(out[k]), rtol=1e-6, atol=1e-6)  # norm order
        assert sout[k].sharding.is_equivalent_to(shard[k], 2), k
    quiet = per_layer_clip(c)  # no noise: no key needed, the update is just clipped
    small = {"w": tree["w"]}
    np.testing.assert_allclose(quiet.update(small, quiet.init(small))[0]["w"], clip_numpy(small, c, "uniform",
                                                                                         "clip")[0][0], rtol=1e-6)


def test_bad_hyper_parameters_rejected():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_norm"):
            per_layer_clip(bad)
    with pytest.raises(TypeError, match="clip_norm"):
        per_layer_clip([1.0])
    with pytest.raises(ValueError, match="allocation"):
        per_layer_clip(1.0, allocation="proportional")
    with pytest.raises(ValueError, match="mode"):
        per_layer_clip(1.0, mode="flat")
    with pytest.raises(ValueError, match="noise_multiplier"):
        per_layer_clip(1.0, noise_multiplier=-0.1)
    with pytest.raises(ValueError, match="needs a `key`"):
        per_layer_clip(1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="key"):
        per_layer_clip(1.0, noise_multiplier=1.0, key="seed")
    tx = per_layer_clip(1.0, per_example=True)
    bad = {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match="leading batch axis"):
        tx.update(bad, tx.init(bad))
    with pytest.raises(ValueError, match="no leaves"):
        layer_clip_norms({}, 1.0)
