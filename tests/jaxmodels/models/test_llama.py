"""Llama / Mistral / Qwen2 against transformers 5.24.0 (tests/data/hf, made by scripts/make_hf_reference.py).

The reference logits come from ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (eager
attention, float32) on tiny random checkpoints whose every parameter was redrawn (norms, biases included); the
greedy tokens from their ``generate(do_sample=False)`` on a batch with a left-padded row.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import LLAMA_RULES_FSDP, LLAMA_RULES_TP, LlamaBlock, LlamaConfig, generate, load_pretrained
from jaxmodels.models.llama import rope_inv_freq

DATA = Path(__file__).resolve().parents[2] / "data" / "hf"
NAMES = ["llama", "llama_tied", "mistral", "qwen2"]
# float32 against torch float32: same math, different kernels / reduction order; measured max error 2.1e-6.
TOL = 1e-5


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """The parity is float32 against torch float32 (TF32 off); GPUs may run float32 matmuls in TF32 by default."""
    with jax.default_matmul_precision("float32"):
        yield


@functools.lru_cache(maxsize=1)
def ref():
    return dict(np.load(DATA / "reference.npz"))


@functools.lru_cache(maxsize=None)
def loaded(name):
    return load_pretrained(DATA / name, progress=False)


@functools.lru_cache(maxsize=None)
def forward(model):
    return jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))


def logit_error(name, logits):
    r = ref()
    valid = r[f"{name}/attention_mask"] > 0  # padded query rows are undefined (they attend nothing / padding)
    return float(np.abs(np.asarray(logits) - r[f"{name}/logits"])[valid].max())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    model, params = loaded(name)
    r = ref()
    logits = forward(model)(params, r[f"{name}/input_ids"], r[f"{name}/attention_mask"])
    assert logits.dtype == jnp.float32 and logits.shape == (3, 10, model.config.vocab_size)
    assert logit_error(name, logits) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_generate_matches_transformers(name):
    model, params = loaded(name)
    r = ref()
    out = generate(model, params, r[f"{name}/gen_prompt"], 8, attention_mask=r[f"{name}/gen_mask"])
    assert r[f"{name}/gen_margin"] > 1e-3  # the reference's top-2 gap: a float32 difference cannot flip a token
    np.testing.assert_array_equal(np.asarray(out), r[f"{name}/gen_tokens"])


def test_blocks_apply_standalone():
    """embed -> LlamaBlock.apply per layer (the block walker's view) -> norm -> head == the whole model."""
    model, params = loaded("mistral")  # sliding window: the block derives it from layer_index
    c = model.config
    r = ref()
    ids, mask = r["mistral/input_ids"], r["mistral/attention_mask"]

    @jax.jit
    def by_blocks(p):
        h = p["embed_tokens"]["embedding"][ids]
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        for i in range(c.num_hidden_layers):
            h = LlamaBlock(c, layer_index=i).apply({"params": p[f"layers_{i}"]}, h, positions=pos,
                                                   attention_mask=mask)
        from jaxmodels.models.llama import LlamaRMSNorm
        h = LlamaRMSNorm(c.rms_norm_eps).apply({"params": p["norm"]}, h)
        return h @ p["lm_head"]["kernel"]

    assert logit_error("mistral", by_blocks(params)) <= TOL


def test_llama3_rope_scaling_regimes():
    """head_dim 8, theta 1e4, original context 64, factors 1/4: wavelengths 6.3 (< 16, kept), 63 (smoothed),
    628 and 6283 (> 64, divided by factor 8)."""
    inv = rope_inv_freq(loaded("llama")[0].config)
    base = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(inv[0], base[0], rtol=1e-6)
    assert base[1] / 8 < inv[1] < base[1]
    np.testing.assert_allclose(inv[2:], base[2:] / 8, rtol=1e-6)


def test_config_from_legacy_rope_scaling():
    """transformers 4's ``rope_theta`` + ``rope_scaling`` reads as transformers 5's ``rope_parameters``."""
    import json

    raw = json.loads((DATA / "llama" / "config.json").read_text())
    rope = dict(raw.pop("rope_parameters"))
    legacy = {**raw, "rope_theta": rope.pop("rope_theta"), "rope_scaling": {**rope, "type": rope.pop("rope_type")}}
    assert LlamaConfig.from_hf_dict(legacy) == loaded("llama")[0].config
    assert LlamaConfig.from_hf_dict(loaded("llama")[0].config.to_hf_dict()) == loaded("llama")[0].config


@pytest.mark.parametrize("kw, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple"),
    (dict(hidden_size=30, num_attention_heads=4), "divisible"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(model_type="gemma"), "model_type"),
])
def test_config_rejects(kw, match):
    base = dict(vocab_size=16, hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**base, **kw})


def test_input_errors():
    model, params = loaded("llama")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, np.zeros((1, 3), np.int32), 0)
    with pytest.raises(ValueError, match="left"):
        generate(model, params, np.ones((1, 3), np.int32), 2, attention_mask=np.array([[1, 1, 0]]))


@pytest.mark.parametrize("rules", [LLAMA_RULES_TP, LLAMA_RULES_FSDP], ids=["tp", "fsdp"])
def test_sharded_load_matches_unsharded(rules, mesh_2d):
    """Each tensor placed onto its rule's sharding as read; logits == the single-device ones. Tolerance: the
    row-parallel o_proj/down_proj contractions are summed per shard then all-reduced (another float32 order)."""
    model, params = load_pretrained(DATA / "llama", shardings=rules, mesh=mesh_2d, progress=False)
    if rules is LLAMA_RULES_TP and mesh_2d.shape["model"] > 1:
        assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
            None, "model")
        assert params["layers_0"]["mlp"]["down_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
            "model", None)
    r = ref()
    logits = forward(model)(params, r["llama/input_ids"], r["llama/attention_mask"])
    single = forward(loaded("llama")[0])(loaded("llama")[1], r["llama/input_ids"], r["llama/attention_mask"])
    valid = r["llama/attention_mask"] > 0
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(single)[valid], atol=2e-6, rtol=1e-6)
