"""GPT-2 against transformers 5.24.0's ``GPT2LMHeadModel`` (tests/data/hf/gpt2, scripts/make_hf_reference.py)."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import GPT2_RULES_TP, GPT2Block, GPT2Config, generate, load_pretrained

DATA = Path(__file__).resolve().parents[2] / "data" / "hf"
TOL = 1e-5  # float32 vs torch float32 (measured max error 1.7e-6)


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """The parity is float32 against torch float32 (TF32 off); GPUs may run float32 matmuls in TF32 by default."""
    with jax.default_matmul_precision("float32"):
        yield


@functools.lru_cache(maxsize=1)
def ref():
    return dict(np.load(DATA / "reference.npz"))


@functools.lru_cache(maxsize=1)
def loaded():
    return load_pretrained(DATA / "gpt2", progress=False)


def _valid_error(logits):
    r = ref()
    valid = r["gpt2/attention_mask"] > 0
    return float(np.abs(np.asarray(logits) - r["gpt2/logits"])[valid].max())


@functools.lru_cache(maxsize=1)
def unsharded_logits():
    model, params = loaded()
    r = ref()
    return jax.jit(lambda p: model.apply({"params": p}, r["gpt2/input_ids"], r["gpt2/attention_mask"]))(params)


def test_logits_match_transformers():
    logits = unsharded_logits()
    assert logits.dtype == jnp.float32 and logits.shape == (3, 10, 128)
    assert _valid_error(logits) <= TOL


def test_conv1d_weights_load_untransposed():
    """HF Conv1D stores [in, out] (x @ W): the flax kernel is the tensor as stored."""
    from safetensors.numpy import load_file

    _, params = loaded()
    raw = load_file(DATA / "gpt2" / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(params["layers_0"]["attn"]["c_attn"]["kernel"]),
                                  raw["transformer.h.0.attn.c_attn.weight"])
    assert params["layers_1"]["mlp"]["c_fc"]["kernel"].shape == (32, 128)


def test_generate_matches_transformers():
    model, params = loaded()
    r = ref()
    out = generate(model, params, r["gpt2/gen_prompt"], 8, attention_mask=r["gpt2/gen_mask"])
    assert r["gpt2/gen_margin"] > 1e-3
    np.testing.assert_array_equal(np.asarray(out), r["gpt2/gen_tokens"])


def test_generate_eos_pads_finished_rows():
    """After eos a row emits pad (transformers' unfinished-sequence rule); the reference's 3rd new token as eos."""
    model, params = loaded()
    r = ref()
    tokens = r["gpt2/gen_tokens"]
    eos = int(tokens[0, 6 + 2])
    out = np.asarray(generate(model, params, r["gpt2/gen_prompt"], 8, attention_mask=r["gpt2/gen_mask"],
                              eos_token_id=eos, pad_token_id=0))
    for b in range(2):
        new = tokens[b, 6:]
        stop = int(np.argmax(new == eos)) if (new == eos).any() else len(new)
        np.testing.assert_array_equal(out[b, :6 + stop + 1], tokens[b, :6 + stop + 1])
        assert (out[b, 6 + stop + 1:] == 0).all()


def test_block_standalone():
    model, params = loaded()
    c = model.config
    r = ref()
    ids, mask = r["gpt2/input_ids"], r["gpt2/attention_mask"]

    @jax.jit
    def by_blocks(p):
        h = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][:ids.shape[1]][None]
        for i in range(c.n_layer):
            h = GPT2Block(c, i).apply({"params": p[f"layers_{i}"]}, h, attention_mask=mask)
        import flax.linen as nn
        h = nn.LayerNorm(epsilon=c.layer_norm_epsilon, use_fast_variance=False).apply({"params": p["ln_f"]}, h)
        return h @ p["wte"]["embedding"].T

    assert _valid_error(by_blocks(params)) <= TOL


def test_sharded_tp_matches_unsharded(mesh_2d):
    """Tolerance: row-parallel c_proj sums per shard then all-reduces (another float32 order)."""
    model, params = load_pretrained(DATA / "gpt2", shardings=GPT2_RULES_TP, mesh=mesh_2d, progress=False)
    r = ref()
    logits = jax.jit(lambda p: model.apply({"params": p}, r["gpt2/input_ids"], r["gpt2/attention_mask"]))(params)
    valid = r["gpt2/attention_mask"] > 0
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(unsharded_logits())[valid], atol=2e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("flag", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"])
def test_unsupported_flags_rejected(flag):
    raw = json.loads((DATA / "gpt2" / "config.json").read_text())
    with pytest.raises(ValueError, match=flag):
        GPT2Config.from_hf_dict({**raw, flag: True})


def test_config_errors_and_length():
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Config(activation_function="swish")
    model, params = loaded()
    with pytest.raises(ValueError, match="n_positions"):
        generate(model, params, np.ones((1, 60), np.int32), 8)
    assert GPT2Config.from_hf_dict(model.config.to_hf_dict()) == model.config
