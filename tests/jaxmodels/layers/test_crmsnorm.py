"""Jiang et al. 2023: Pre-LN, Pre-RMSNorm and Pre-CRMSNorm transformers are equivalent after the weight conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import (
    PreNormTransformer,
    compress_input,
    fold_norm_affine,
    pre_ln_to_pre_rmsnorm,
    pre_rmsnorm_to_pre_crmsnorm,
    recenter_output,
)
from jaxmodels.tree import flatten

from .helpers import assert_sharded_matches

V, T = 13, 12
CFG = dict(vocab_size=V, d_model=16, num_heads=2, num_layers=2, mlp_dim=32, max_len=16)


def _pre_ln(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (4, T), 0, V)
    m = PreNormTransformer(norm="layernorm", **CFG)
    p = m.init(jax.random.key(seed + 1), tokens)["params"]
    # Non-trivial LayerNorm affines (init is scale 1, bias 0, which would hide folding bugs).
    rng = np.random.default_rng(seed)
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: a + rng.normal(0, 0.5, a.shape).astype(np.float32) if "norm" in jax.tree_util.keystr(path)
        else a, p)
    return m, p, tokens


def test_equivalence_pre_ln_rms_crms():
    m, p, tokens = _pre_ln()
    y_ln = jax.jit(m.apply)({"params": p}, tokens)
    p_rms = pre_ln_to_pre_rmsnorm(p)
    y_rms = jax.jit(PreNormTransformer(norm="rmsnorm", **CFG).apply)({"params": p_rms}, tokens)
    p_crms = pre_rmsnorm_to_pre_crmsnorm(p_rms)
    y_crms = jax.jit(PreNormTransformer(norm="crmsnorm", **CFG).apply)({"params": p_crms}, tokens)
    # Same function up to float32 rounding of re-associated sums (logits are O(1..10)); 1e-4 absolute.
    np.testing.assert_allclose(y_rms, y_ln, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(y_crms, y_ln, atol=1e-4, rtol=1e-4)
    # The compressed model really is smaller: residual width d-1.
    assert p_crms["tok_embed"]["embedding"].shape == (V, CFG["d_model"] - 1)
    assert p_crms["block_0"]["query"]["kernel"].shape == (CFG["d_model"] - 1, CFG["d_model"])


def test_residual_stream_is_zero_mean_after_conversion():
    m, p, tokens = _pre_ln(1)
    p_rms = pre_ln_to_pre_rmsnorm(p)
    model = PreNormTransformer(norm="rmsnorm", **CFG)
    _, inter = model.apply({"params": p_rms}, tokens, capture_intermediates=True)
    for path, val in flatten(inter["intermediates"]).items():
        if path.startswith("block_") and path.count("/") == 1:  # block outputs = residual stream
            np.testing.assert_allclose(np.asarray(val).mean(-1), 0.0, atol=1e-5)


def test_conversion_does_not_modify_input():
    _, p, _ = _pre_ln(2)
    before = jax.tree.map(np.array, p)
    pre_rmsnorm_to_pre_crmsnorm(pre_ln_to_pre_rmsnorm(p))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)


def test_primitives_against_numpy():
    rng = np.random.default_rng(0)
    g, b = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    w, c = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    n = rng.normal(size=(7, 5)).astype(np.float32)
    w2, c2 = fold_norm_affine(jnp.asarray(g), jnp.asarray(b), jnp.asarray(w), jnp.asarray(c))
    np.testing.assert_allclose(n @ w2 + c2, (n * g + b) @ w + c, rtol=1e-5, atol=1e-5)
    k, kb = recenter_output(jnp.asarray(w), jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(n @ k + kb).mean(-1), 0.0, atol=1e-5)
    z = n - n.mean(-1, keepdims=True)
    np.testing.assert_allclose(z[:, :-1] @ compress_input(jnp.asarray(w)), z @ w, rtol=1e-5, atol=1e-5)


def test_wrong_params_rejected():
    _, p, tokens = _pre_ln()
    with pytest.raises(ValueError, match="RMSNorm"):
        pre_rmsnorm_to_pre_crmsnorm(p)
    # An RMSNorm model whose residual stream is not zero-mean cannot be compressed.
    p_rms = PreNormTransformer(norm="rmsnorm", **CFG).init(jax.random.key(3), tokens)["params"]
    with pytest.raises(ValueError, match="zero-mean"):
        pre_rmsnorm_to_pre_crmsnorm(p_rms)
    with pytest.raises(ValueError, match="norm must be"):
        PreNormTransformer(norm="batchnorm", **CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_sharded_crms_model(mesh):
    m, p, _ = _pre_ln()
    p_crms = pre_rmsnorm_to_pre_crmsnorm(pre_ln_to_pre_rmsnorm(p))
    tokens = jax.random.randint(jax.random.key(5), (16, T), 0, V)
    model = PreNormTransformer(norm="crmsnorm", **CFG)
    assert_sharded_matches(functools.partial(model.apply, {"params": p_crms}), tokens, mesh, atol=1e-4)


def test_conversion_under_jit_with_tensor_parallel_params(mesh_2d):
    from jax.sharding import PartitionSpec as P

    from jaxmodels.sharding import shard

    _, p, tokens = _pre_ln()
    rules = [(r"(query|key|value|fc1)/kernel$", P(None, "model")), (r"(out|fc2)/kernel$", P("model", None))]
    sp = shard(p, rules, mesh_2d)
    convert = jax.jit(lambda q: pre_rmsnorm_to_pre_crmsnorm(pre_ln_to_pre_rmsnorm(q)))
    out = convert(sp)
    ref = pre_rmsnorm_to_pre_crmsnorm(pre_ln_to_pre_rmsnorm(p))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
