import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels import tree as T


def make_tree():
    return {"params": {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((3,))},
                       "LayerNorm_0": {"scale": jnp.ones((3,))}},
            "stats": [jnp.arange(2.0), jnp.array(1, jnp.int32)]}


def test_flatten_paths_and_roundtrip():
    t = make_tree()
    flat = T.flatten(t)
    assert list(flat) == ["params/Dense_0/bias", "params/Dense_0/kernel", "params/LayerNorm_0/scale",
                          "stats/0", "stats/1"]
    back = T.unflatten(flat, like=t)
    assert jax.tree.structure(back) == jax.tree.structure(t)
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(back)):
        assert a is b


def test_unflatten_without_template_builds_nested_dicts():
    flat = {"a/b/c": 1, "a/d": 2, "e": 3}
    assert T.unflatten(flat) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
    with pytest.raises(ValueError, match="nests under a leaf"):
        T.unflatten({"a": 1, "a/b": 2})


def test_unflatten_template_errors_name_path():
    t = make_tree()
    flat = T.flatten(t)
    del flat["stats/1"]
    with pytest.raises(ValueError, match="'stats/1'"):
        T.unflatten(flat, like=t)
    flat = T.flatten(t)
    flat["extra/x"] = 1
    with pytest.raises(ValueError, match="'extra/x'"):
        T.unflatten(flat, like=t)


def test_namedtuple_and_nnx_state_paths():
    class S(NamedTuple):
        mu: jax.Array
        nu: jax.Array

    assert list(T.flatten(S(jnp.ones(1), jnp.ones(2)))) == ["mu", "nu"]
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = T.flatten(state)
    assert set(flat) == {"bias/value", "kernel/value"} or set(flat) == {"bias", "kernel"}
    back = T.unflatten(flat, like=state)
    assert jax.tree.structure(back) == jax.tree.structure(state)


def test_check_compatible_ok_and_shape_error_names_first_path():
    a = make_tree()
    T.check_compatible(a, jax.tree.map(lambda x: x + 1, a))
    b = make_tree()
    b["params"]["Dense_0"]["kernel"] = jnp.ones((4, 5))
    b["params"]["LayerNorm_0"]["scale"] = jnp.ones((7,))
    with pytest.raises(ValueError) as e:
        T.check_compatible(a, b, names=["base", "model_1"])
    msg = str(e.value)
    # First differing path in flatten order is the kernel; both shapes are shown.
    assert "'params/Dense_0/kernel'" in msg and "(4, 3)" in msg and "(4, 5)" in msg
    assert "'model_1'" in msg and "'base'" in msg
    assert "LayerNorm" not in msg


def test_check_compatible_dtype_missing_and_extra():
    a = make_tree()
    b = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, a)
    with pytest.raises(ValueError, match=r"'params/Dense_0/bias'.*float32.*bfloat16"):
        T.check_compatible(a, b)
    T.check_compatible(a, b, check_dtype=False)
    c = make_tree()
    del c["params"]["LayerNorm_0"]
    with pytest.raises(ValueError, match=r"'params/LayerNorm_0/scale': missing in 'tree 1'"):
        T.check_compatible(a, c)
    with pytest.raises(ValueError, match=r"'params/LayerNorm_0/scale': extra leaf"):
        T.check_compatible(c, a)


def test_select_and_filter_paths():
    t = make_tree()
    mask = T.select(t, include=r"kernel$|scale$", exclude="LayerNorm")
    assert T.flatten(mask) == {"params/Dense_0/bias": False, "params/Dense_0/kernel": True,
                               "params/LayerNorm_0/scale": False, "stats/0": False, "stats/1": False}
    assert list(T.filter_paths(t, include=[r"bias", re.compile(r"^stats/0$")])) == ["params/Dense_0/bias", "stats/0"]
    assert all(jax.tree.leaves(T.select(t)))  # include=None -> everything


def test_map_with_path():
    t = make_tree()
    out = T.map_with_path(lambda p, x: p, t)
    assert out["params"]["Dense_0"]["kernel"] == "params/Dense_0/kernel"
    s = T.map_with_path(lambda p, x, y: x + y, t, t)
    np.testing.assert_array_equal(s["stats"][0], [0.0, 2.0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_compute_in_float32(dtype):
    seen = {}

    @T.compute_in_float32
    def f(x, y):
        seen["x"], seen["y"] = x.dtype, y.dtype
        return {"sum": x + y, "mask": x > 0}

    x = jnp.full((3,), 1.0009765625, dtype)  # 1 + 2^-10: exact in fp16/f32, rounds in bf16
    out = f(x, jnp.ones((3,), dtype))
    assert seen == {"x": jnp.float32, "y": jnp.float32}
    assert out["sum"].dtype == dtype and out["mask"].dtype == jnp.bool_


def test_compute_in_float32_under_jit_and_output_dtype_argument():
    f = jax.jit(T.compute_in_float32(lambda a, b: a * b, dtype_from=1))
    out = f(jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


def test_compute_in_float32_returns_each_leaf_in_its_own_dtype():
    """Issue 13 item 1: 0cb843d cast every output leaf to the first floating leaf's dtype (all bf16 here)."""
    tree = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2, jnp.float32), "c": jnp.ones(2, jnp.float16),
            "i": jnp.ones(2, jnp.int32)}
    seen = {}

    def twice(t):
        seen.update({k: v.dtype for k, v in t.items()})
        return jax.tree.map(lambda x: x * 2 if jnp.issubdtype(x.dtype, jnp.floating) else x, t)

    out = T.compute_in_float32(twice)(tree)
    assert seen == {"a": jnp.float32, "b": jnp.float32, "c": jnp.float32, "i": jnp.int32}
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in tree.items()}
    # a list of trees (``models``): the output takes the per-leaf dtypes of its first element, also under jit
    f = jax.jit(T.compute_in_float32(lambda ms: jax.tree.map(lambda *xs: sum(xs), *ms)))
    out = f([tree, tree])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in tree.items()}
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32), [2, 2])


def test_compute_in_float32_new_structure_from_mixed_inputs_raises():
    mixed = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    with pytest.raises(ValueError, match="mix floating dtypes"):
        T.compute_in_float32(lambda t: {"s": t["a"] + t["b"]})(mixed)
    # a single input dtype still defines the output of a new structure
    out = T.compute_in_float32(lambda t: {"s": t["a"] + t["a"]})({"a": jnp.ones(2, jnp.bfloat16)})
    assert out["s"].dtype == jnp.bfloat16


def test_tree_bytes():
    assert T.tree_bytes({"a": jnp.ones((4, 3)), "b": jnp.ones(2, jnp.bfloat16)}) == 48 + 4
