"""Data-free merge core (issue 13 items 1, 11, 12, 15 and the calling convention): every leaf keeps its own dtype,
NaN/Inf inputs are rejected before any work, interpolation factors may be traced under jit, one meaning of
``base`` and one name per hyper-parameter."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
from merging import registry
from merging.fisher import fisher_merge
from merging.linear import linear, uniform_soup
from merging.moe_expert_merge import merge_expert_groups
from merging.slerp import slerp
from merging.tall_masks import tall_mask_models, tall_masks
from merging.task_arithmetic import task_arithmetic
from merging.ties import ties
from merging.wise_ft import wise_ft
from tests.merging.helpers import assert_trees_close, assert_trees_equal, make_family

# bf16 kernels, fp32 biases, an fp16 scale: every leaf must come back in its own dtype
DTYPES = {"dense/kernel": jnp.bfloat16, "dense/bias": jnp.float32, "out/kernel": jnp.bfloat16,
          "scale": jnp.float16}


def _cast(tree, dtypes=DTYPES):
    return {"dense": {"kernel": tree["dense"]["kernel"].astype(dtypes["dense/kernel"]),
                      "bias": tree["dense"]["bias"].astype(dtypes["dense/bias"])},
            "out": {"kernel": tree["out"]["kernel"].astype(dtypes["out/kernel"])},
            "scale": tree["scale"].astype(dtypes["scale"])}


def _upcast(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _registered_call(name):
    """A call of the registered method with its config defaults (mapped to Python names) on a fitting family."""
    m = registry.get(name)
    kw = registry.python_kwargs(dict(m.defaults))
    if "density" in m.per_model:
        kw["density"] = 0.5
    if m.stochastic:
        kw["key"] = jax.random.key(3)
    n = 1 if name in ("slerp", "wise_ft") else 2 if name == "nuslerp" else 3
    return n, lambda b, ms: m(b, ms, **kw)


@pytest.fixture(scope="module")
def mixed_family():
    base, models = make_family(3)
    return _cast(base), [_cast(m) for m in models]


@pytest.mark.parametrize("name", merging.available())
def test_every_registered_method_keeps_each_leafs_dtype_bit_for_bit(name, mixed_family):
    """Item 1 + 15: a mixed bf16/fp32/fp16 tree comes back leaf by leaf in its own dtype, and equals the float32 merge
    of the same (exactly representable) values rounded once to that dtype, bit for bit (same float32 program on the
    same values; no sharding, so no reduction reordering)."""
    base, models = mixed_family
    n, call = _registered_call(name)
    got = call(base, models[:n])
    want = call(_upcast(base), [_upcast(m) for m in models[:n]])
    ref = _leaves(base)
    for path, g in _leaves(got).items():
        assert g.dtype == ref[path].dtype, (name, path, g.dtype, ref[path].dtype)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(_leaves(want)[path].astype(ref[path].dtype)),
                                      err_msg=f"{name} {path}")


def test_fisher_merge_keeps_each_leafs_dtype(mixed_family):
    base, models = mixed_family
    fishers = [jax.tree.map(lambda x: jnp.abs(x.astype(jnp.float32)) + 0.1, m) for m in models]
    # (base, models, fishers) -> MergeResult: the data-aware convention (helper A3's change of fisher.py)
    got = fisher_merge(None, models, fishers, weights=[1.0, 2.0, 0.5]).params
    want = fisher_merge(None, [_upcast(m) for m in models], fishers, weights=[1.0, 2.0, 0.5]).params
    ref = _leaves(base)
    for path, g in _leaves(got).items():
        assert g.dtype == ref[path].dtype, (path, g.dtype)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(_leaves(want)[path].astype(ref[path].dtype)))


def test_expert_merge_and_tall_models_keep_each_leafs_dtype(mixed_family):
    base, models = mixed_family
    experts = jax.tree.map(lambda *xs: jnp.stack(xs), *models)  # [3, ...] per leaf, dtypes as the models
    merged = merge_expert_groups(experts, np.array([0, 1, 0]), np.ones(3))
    for path, g in _leaves(merged).items():
        assert g.dtype == _leaves(base)[path].dtype and g.shape[0] == 2
    for rec in tall_mask_models(base, models, tall_lambda=0.4):
        assert {p: x.dtype for p, x in _leaves(rec).items()} == {p: x.dtype for p, x in _leaves(base).items()}


def test_uniform_soup_is_the_validated_average(mixed_family):
    base, models = mixed_family
    got = uniform_soup(models)
    want = linear(None, [_upcast(m) for m in models])
    for path, g in _leaves(got).items():
        assert g.dtype == _leaves(base)[path].dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(_leaves(want)[path].astype(g.dtype)))
    bad = dict(models[1], scale=jnp.zeros(4, jnp.float16))
    with pytest.raises(ValueError, match=r"model_1.*scale"):
        uniform_soup([models[0], bad])


# ---------------------------------------------------------------------------------------------------------------
# non-finite inputs (item 11)

def _with(tree, path, value, index=(0, 0)):
    t = jax.tree.map(lambda x: np.array(x), tree)
    node = t
    for k in path[:-1]:
        node = node[k]
    node[path[-1]][index] = value
    return t


@pytest.mark.parametrize("call", [
    lambda b, ms, **kw: ties(b, ms, density=0.5, **kw),
    lambda b, ms, **kw: task_arithmetic(b, ms, **kw),
    lambda b, ms, **kw: linear(None, ms, **kw),
], ids=["ties", "task_arithmetic", "linear"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_model_raises_naming_model_and_path(call, value):
    base, models = make_family(3)
    models[1] = _with(models[1], ("dense", "kernel"), value)
    with pytest.raises(ValueError, match=r"model_1 has 1 non-finite value.*'dense/kernel'.*check_finite=False"):
        call(base, models)


def test_nonfinite_base_and_bf16_are_caught():
    base, models = make_family(2)
    with pytest.raises(ValueError, match=r"base has 1 non-finite.*'scale'"):
        ties(_with(base, ("scale",), np.nan, index=1), models, density=0.5)
    bf = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), m) for m in models]
    bf[0] = jax.tree.map(lambda x: x, bf[0])
    bf[0]["out"]["kernel"] = bf[0]["out"]["kernel"].at[2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"model_0 has 1 non-finite.*'out/kernel'"):
        ties(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base), bf, density=0.5)


def test_ties_no_longer_hides_a_nan_and_the_check_runs_before_any_work(monkeypatch):
    """On 0cb843d, ties(b, [m_with_nan]) returned a clean tree: the NaN took a top-k slot and was then dropped."""
    base, models = make_family(1)
    bad = _with(models[0], ("dense", "kernel"), np.nan)
    import merging.gta as gta

    def boom(*a, **k):
        raise AssertionError("merge kernel ran before the finiteness check")

    monkeypatch.setattr(gta, "_gta_leaf", boom)
    with pytest.raises(ValueError, match="non-finite"):
        ties(base, [bad], density=0.5)
    monkeypatch.undo()
    # opting out merges anyway (the caller asked for it)
    out = ties(base, [bad], density=0.5, check_finite=False)
    assert out["dense"]["kernel"].shape == (16, 8)


def test_finite_check_is_skipped_for_traced_inputs_and_jit_matches_eager():
    """Under jax.jit the inputs are tracers (no values): the check is skipped (documented), the merge still traces."""
    base, models = make_family(2)
    f = jax.jit(lambda b, ms: ties(b, ms, density=0.5))
    assert_trees_close(f(base, models), ties(base, models, density=0.5), rtol=1e-6, atol=1e-6)
    bad = _with(models[0], ("scale",), np.nan, index=0)
    g = jax.jit(lambda b, ms: task_arithmetic(b, ms))
    assert bool(jnp.isnan(g(base, [bad, models[1]])["scale"][0]))  # not checked under jit: NaN passes through
    # concrete arrays closed over by a jitted function are staged out too (the count is a tracer): no crash
    h = jax.jit(lambda: ties(base, models, density=0.5))
    assert_trees_close(h(), ties(base, models, density=0.5), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# traced interpolation factors (item 12)

def test_slerp_and_wise_ft_take_a_traced_factor_under_jit():
    base, models = make_family(1)
    js = jax.jit(lambda t, b, m: slerp(b, [m], t=t))
    jw = jax.jit(lambda a, b, m: wise_ft(b, [m], alpha=a))
    for v in (0.0, 0.3, 1.0):
        assert_trees_close(js(jnp.float32(v), base, models[0]), slerp(base, models, t=v), rtol=1e-6, atol=1e-6)
        assert_trees_close(jw(jnp.float32(v), base, models[0]), wise_ft(base, models, alpha=v), rtol=1e-6,
                           atol=1e-6)
    # a concrete jax scalar is validated like a Python number
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(base, models, alpha=jnp.float32(1.5))
    with pytest.raises(ValueError, match="`t` must be finite"):
        slerp(base, models, t=float("nan"))
    with pytest.raises(ValueError, match="scalar"):
        jax.jit(lambda t, b, m: slerp(b, [m], t=t))(jnp.ones(2), base, models[0])


# ---------------------------------------------------------------------------------------------------------------
# calling convention: one meaning of base, one name per hyper-parameter (item 12, Consistency)

def test_averages_accept_and_ignore_an_unused_base():
    base, models = make_family(2)
    assert_trees_equal(linear(base, models), linear(None, models))
    # ignored entirely, as mergekit: not even checked against the models
    assert_trees_equal(linear({"other": np.zeros(3, np.float32)}, models), linear(None, models))


@pytest.mark.parametrize("name", merging.available())
def test_registered_signature_follows_the_convention(name):
    """(base, models, *, hparams): every config name maps to a keyword of the function (weight -> weights,
    lambda -> lambda_), hyper-parameters are keyword-only, every method has the check_finite opt-out."""
    m = registry.get(name)
    sig = inspect.signature(m.fn)
    ps = list(sig.parameters.values())
    assert [p.name for p in ps[:2]] == ["base", "models"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ps[2:]), name
    names = set(sig.parameters)
    for k in m.params:
        assert registry.python_kwargs({k: 0}).popitem()[0] in names, (name, k)
    assert "weight" not in names and "lambda" not in names and "check_finite" in names
    assert m.needs_base in (True, False, "optional")


def test_tall_masks_names_are_keyword_only():
    base, models = make_family(2)
    with pytest.raises(TypeError):
        tall_masks(base, models, 0.4)
    assert len(tall_masks(base, models, tall_lambda=0.4)) == 2
