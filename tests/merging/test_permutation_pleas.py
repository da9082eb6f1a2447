"""PLeaS: invariants at the two ends of the width range, the width/accuracy trade-off, sharded inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import MLP, MLP_RULES_TP
from jaxmodels.sharding import shard
from merging.permutation import apply_permutation, identity_permutation, mlp_permutation_spec
from merging.pleas import pleas_mlp


def _setup(features=(12, 10), d=6, out=4):
    model = MLP(features=features, num_outputs=out)
    a = model.init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    b = model.init(jax.random.key(1), jnp.zeros((1, d)))["params"]
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(300, d)).astype(np.float32)
    xb = (rng.normal(size=(300, d)) + 0.5).astype(np.float32)
    return model, a, b, xa, xb


def _f(features, p, x, out=4):
    return np.asarray(MLP(features=features, num_outputs=out).apply({"params": p}, x), np.float64)


def test_width_ratio_two_is_the_logit_ensemble():
    model, a, b, xa, xb = _setup()
    res = pleas_mlp(None, [a, b], [xa, xb], width_ratio=2.0)
    assert res.info["widths"] == (24, 20) and res.info["merged_pairs"] == (0, 0)
    x = np.concatenate([xa, xb])
    ens = 0.5 * (_f((12, 10), a, x) + _f((12, 10), b, x))
    # exactly representable targets; the solve's float64 error plus the float32 storage of the result (~1e-6).
    np.testing.assert_allclose(_f(res.info["widths"], res.params, x), ens, rtol=1e-4, atol=1e-4)


def test_full_merge_of_permuted_copy_recovers_the_model():
    model, a, _, xa, xb = _setup()
    spec = mlp_permutation_spec(2)
    rng = np.random.default_rng(1)
    perm = {k: rng.permutation(len(v)) for k, v in identity_permutation(a, spec).items()}
    b = apply_permutation(a, spec, perm)
    res = pleas_mlp(None, [a, b], [xa, xb], width_ratio=1.0)
    assert res.info["widths"] == (12, 10) and res.info["merged_pairs"] == (12, 10)
    x = np.concatenate([xa, xb])
    np.testing.assert_allclose(_f(res.info["widths"], res.params, x), _f((12, 10), a, x), rtol=1e-4, atol=1e-4)


def test_wider_merge_is_closer_to_the_ensemble():
    """The paper's trade-off: a larger target width gives a better merged model (here: closer to the ensemble)."""
    model, a, b, xa, xb = _setup()
    x = np.concatenate([xa, xb])
    ens = 0.5 * (_f((12, 10), a, x) + _f((12, 10), b, x))
    errs = []
    for r in (1.0, 1.25, 1.5, 1.75, 2.0):
        res = pleas_mlp(None, [a, b], [xa, xb], width_ratio=r)
        errs.append(float(np.mean((_f(res.info["widths"], res.params, x) - ens) ** 2)))
    assert all(e1 >= e2 - 1e-9 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[0] > 10 * errs[-1] + 1e-6
    naive = jax.tree.map(lambda u, v: (u + v) / 2, a, b)
    assert errs[0] < float(np.mean((_f((12, 10), naive, x) - ens) ** 2))  # beats plain averaging at equal size


def test_pleas_validation_and_sharded_inputs(mesh_2d):
    model, a, b, xa, xb = _setup(features=(8, 8))
    with pytest.raises(ValueError, match="width_ratio"):
        pleas_mlp(None, [a, b], [xa, xb], width_ratio=2.5)
    with pytest.raises(ValueError, match="width ratios"):
        pleas_mlp(None, [a, b], [xa, xb], width_ratio=[1.5])
    ref = pleas_mlp(None, [a, b], [xa, xb], width_ratio=[1.5, 1.25])
    sh = pleas_mlp(None, [shard(a, MLP_RULES_TP, mesh_2d), shard(b, MLP_RULES_TP, mesh_2d)], [xa, xb],
                   width_ratio=[1.5, 1.25])
    assert sh.info["widths"] == ref.info["widths"] == (12, 10)
    for u, v in zip(jax.tree.leaves(sh.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(u, v)
