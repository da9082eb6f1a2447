"""QLoRA (quant.qlora): NF4 base with double-quantized scales under jaxmodels.adapters.

- the dequantized weight is NF4 of W with scales off by at most the FP8 rounding of c2 - μ (NumPy reference);
- the frozen base's stored bytes, measured from its leaves, are <= 0.3x the bf16 bytes of the same weights;
- the LoRA forward on the frozen base equals the forward on the dequantized float params, and gradients reach
  only the adapters.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels import adapters as ad
from jaxmodels.models.llama import Llama, LlamaConfig
from quant.formats import NF4_LEVELS
from quant.qlora import dequantize_base, frozen_bytes, is_qlora_weight, qlora_base, quantize_base



@pytest.fixture(autouse=True)
def _float32_matmuls():
    """float32 matmuls on every backend (GPUs default to TF32 for float32, far outside these tolerances)."""
    with jax.default_matmul_precision("float32"):
        yield


def test_dequantize_matches_numpy_nf4():
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)  # the Llama kernels' shape: one compile
    q = quantize_base(jnp.asarray(w))
    got = np.asarray(jax.jit(dequantize_base)(q))
    blocks = w.reshape(1, 64, 64)
    c2 = np.abs(blocks).max(1, keepdims=True)
    codes = np.abs(blocks[..., None] / c2[..., None] - NF4_LEVELS).argmin(-1)
    # FP8 E4M3 (3 mantissa bits) of c2 - mu with per-256 absmax scale: relative error <= 2^-4 of max|c2 - mu|
    dev = np.abs(c2 - c2.mean()).max()
    scale_err = np.abs(got.reshape(1, 64, 64) - NF4_LEVELS[codes] * c2).max()
    assert scale_err <= dev * 2.0 ** -4 + 1e-6
    assert np.abs(got - w).max() <= 0.2 * np.abs(w).max()


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)
    model = Llama(cfg)
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    rng = np.random.default_rng(1)  # NumPy-filled params of the model's shapes: nothing to compile
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.bfloat16),
                          jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    return model, params, ids


def test_frozen_base_bytes_and_forward(llama):
    model, params, ids = llama
    target = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
    frozen = qlora_base(params, target=target)
    flat_p = jaxmodels.flatten(params)
    kernels = [k for k in flat_p if re.search(target, k)]
    get = lambda tree, path: functools.reduce(lambda node, key: node[key], path.split("/"), tree)
    assert len(kernels) == 7 and all(is_qlora_weight(get(frozen, k)) for k in kernels)
    bf16_bytes = sum(flat_p[k].size * flat_p[k].dtype.itemsize for k in kernels)  # measured: bf16 leaves
    q_bytes = frozen_bytes([get(frozen, k) for k in kernels])  # measured: stored leaves (codes, fp8 c2, c1, mu)
    assert q_bytes <= 0.3 * bf16_bytes, (q_bytes, bf16_bytes)
    cfg = ad.LoraConfig(rank=4, alpha=8, target=r"(q_proj|v_proj)$")
    shapes = jax.eval_shape(lambda f: ad.init_lora(jax.random.key(1), f, cfg, materialize=dequantize_base), frozen)
    rng = np.random.default_rng(2)
    lora = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)
    deq = jax.tree.map(dequantize_base, frozen, is_leaf=lambda x: not isinstance(x, dict))

    @jax.jit
    def both(frozen, deq, lora):
        loss = lambda l: ad.apply(model, frozen, l, cfg, ids, materialize=dequantize_base).sum()
        a, g = jax.value_and_grad(loss)(lora)  # differentiable w.r.t. the adapters only: the base is not a float
        return a, ad.apply(model, deq, lora, cfg, ids).sum(), g

    a, b, g = both(frozen, deq, lora)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)  # the same bf16 ops on the same weights
    assert jax.tree.structure(g) == jax.tree.structure(lora)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
