import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels import sharding as S


def params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"Dense_0": {"kernel": jax.random.normal(k[0], (16, 32)), "bias": jnp.zeros(32)},
            "Dense_1": {"kernel": jax.random.normal(k[1], (32, 8)), "bias": jnp.zeros(8)},
            "odd": jax.random.normal(k[2], (3, 5))}


RULES = [
    (r"Dense_0/kernel$", P(None, "model")),
    (r"Dense_0/bias$", P("model")),
    (r"Dense_1/kernel$", P("model", None)),
    (r"odd$", P("data", None)),  # 3 rows do not divide the data axis -> replicated with a warning
]


def test_make_mesh_shapes():
    n = jax.device_count()
    m = S.make_mesh()
    assert m.axis_names == ("data", "model") and m.shape["data"] == n and m.shape["model"] == 1
    if n % 2 == 0:
        m2 = S.make_mesh(model=2)
        assert dict(m2.shape) == {"data": n // 2, "model": 2}
    with pytest.raises(ValueError, match="needs"):
        S.make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="model axis"):
        S.make_mesh(model=0)


def test_rules_first_match_unmatched_replicated_and_fallback(mesh_2d):
    p = params()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sh = S.rules_to_shardings(p, RULES + [(r"Dense_0", P("data"))], mesh_2d)
    assert sh["Dense_0"]["kernel"].spec == P(None, "model")  # first match wins over the later "Dense_0" rule
    assert sh["Dense_1"]["bias"].spec == P()  # unmatched -> replicated
    if mesh_2d.shape["data"] > 1 and 3 % mesh_2d.shape["data"]:
        assert sh["odd"].spec == P()
        assert any("'odd'" in str(x.message) and "does not divide" in str(x.message) for x in w)
    too_long = S.rules_to_shardings({"v": jnp.zeros(4)}, [(r"v", P(None, "model"))], mesh_2d, warn=False)
    assert too_long["v"].spec == P()


def test_sharded_function_equals_unsharded_and_keeps_sharding(mesh_2d):
    p = params()
    x = jax.random.normal(jax.random.key(1), (8, 16))

    def fwd(p, x):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], jax.tree.map(lambda a: a * 2.0, p)

    ref_out, ref_tree = jax.jit(fwd)(p, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_sh = S.shard(p, RULES, mesh_2d)
        out_sh = S.rules_to_shardings(p, RULES, mesh_2d)
    x_sh = jax.device_put(x, S.data_sharding(mesh_2d, 2))
    f = S.jit_sharded(fwd, in_shardings=(out_sh, S.data_sharding(mesh_2d, 2)),
                      out_shardings=(S.data_sharding(mesh_2d, 2), out_sh))
    out, tree = f(p_sh, x_sh)
    # Sharded matmuls reduce in a different order: allow float32 rounding (~1e-6 relative).
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree)):
        np.testing.assert_array_equal(a, b)  # elementwise op: bit-exact
    assert tree["Dense_0"]["kernel"].sharding.is_equivalent_to(out_sh["Dense_0"]["kernel"], 2)
    assert tree["Dense_1"]["kernel"].sharding.spec == P("model", None)
    assert out.sharding.spec == P("data", None)
    assert len(p_sh["Dense_0"]["kernel"].sharding.device_set) == jax.device_count()


def test_spec_for_accepts_shape_dtype_structs(mesh):
    t = {"w": jax.ShapeDtypeStruct((8 * jax.device_count(), 4), jnp.float32)}
    sh = S.rules_to_shardings(t, [(r"w", P("data"))], mesh)
    assert isinstance(sh["w"], NamedSharding) and sh["w"].spec == P("data")
