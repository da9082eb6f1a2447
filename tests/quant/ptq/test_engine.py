"""The one PTQ engine (quant.ptq.engine) and the BlockModels built from models (quant.ptq.block_models): every
method on the project's GPT, a Llama (GQA, llama3 RoPE, untied), a Mistral (sliding window) and GPT-2 (fused
q|k|v) from tests/data/hf (tiny transformers 5.24.0 checkpoints, see scripts/make_hf_reference.py)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.tree import flatten
from quant.ptq import (
    AWQConfig, CodebookConfig, FlexRoundConfig, GPTQConfig, LoRCTransform, MixedPrecisionConfig, RSQConfig,
    RTNConfig, ZeroQuantFPConfig, awq, block_model, codebook_quantize, flexround, gptq, mixed_precision,
    quantize_layers, rsq, rtn, walk_blocks, zeroquant_fp,
)

HF = Path(__file__).resolve().parents[2] / "data" / "hf"
GS = 16


def _batch(vocab, n=6, t=16, seed=0, pad=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, t)).astype(np.int32)
    lens = rng.integers(t // 2, t + 1, size=n) if pad else np.full(n, t)
    lens[0] = t
    am = (np.arange(t)[None, :] < lens[:, None]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": am}


def _gpt():
    from jaxmodels.models.gpt import GPT

    # mlp_dim = width: every kernel 32x32, so each per-layer quantizer compiles once per method (not per shape)
    m = GPT(vocab_size=64, max_len=16, width=32, depth=2, num_heads=4, mlp_dim=32, ln_scaling=True,
            tie_embeddings=False)
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    return m, params, 64


def _hf(name):
    from jaxmodels.models import load_pretrained

    m, params = load_pretrained(HF / name, progress=False)
    vocab = m.config.vocab_size
    return m, params, vocab


MODELS = {"gpt": _gpt, "llama": lambda: _hf("llama"), "mistral": lambda: _hf("mistral"),
          "gpt2": lambda: _hf("gpt2")}


FIRST_NORM = {"gpt": "norm1", "llama": "input_layernorm", "mistral": "input_layernorm", "gpt2": "ln_1"}


def _outliers(params, bm, norm):
    """Real activations have a few large channels (AWQ's premise): scale 2 channels of each block's first norm."""
    out = dict(params)
    for bp in bm.block_paths:
        blk = dict(out[bp])
        blk[norm] = dict(blk[norm], scale=jnp.asarray(blk[norm]["scale"]).at[:2].multiply(6.0))
        out[bp] = blk
    return out


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            m, params, vocab = MODELS[name]()
            bm = block_model(m)
            cache[name] = (m, bm, _outliers(params, bm, FIRST_NORM[name]), _batch(vocab))
        return cache[name]

    return get


def _logits(m, params, batch):
    return m.apply({"params": params}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])) \
        if not hasattr(m, "placement") else m.apply({"params": params}, jnp.asarray(batch["input_ids"]))


@pytest.mark.parametrize("name", list(MODELS))
def test_block_model_forward_equals_model(models, name):
    m, bm, params, batch = models(name)
    ref = np.asarray(_logits(m, params, batch))
    got = np.asarray(bm.forward(params, batch))
    tok = batch["attention_mask"] > 0
    # the same modules applied block by block: equal up to XLA fusing the whole model differently (float32)
    np.testing.assert_allclose(got[tok], ref[tok], rtol=1e-5, atol=1e-5)


METHODS = {
    "rtn": lambda p, bm, b: rtn(p, bm, b, RTNConfig(4, GS), progress=False),
    "gptq": lambda p, bm, b: gptq(p, bm, b, GPTQConfig(4, GS, act_order=True), progress=False),
    "rsq": lambda p, bm, b: rsq(p, bm, b, RSQConfig(GPTQConfig(4, GS)), progress=False),
    "awq": lambda p, bm, b: awq(p, bm, b, AWQConfig(4, GS, n_grid=4), progress=False),
    "flexround": lambda p, bm, b: flexround(p, bm, b, FlexRoundConfig(4, GS, iters=2, chunk=2), progress=False),
    "zeroquant_fp": lambda p, bm, b: zeroquant_fp(p, bm, b, ZeroQuantFPConfig(group_size=GS), progress=False),
    "mixed_precision": lambda p, bm, b: mixed_precision(
        p, bm, b, MixedPrecisionConfig(budget=3.5, candidates=(3, 4), score="zd", group_size=GS), progress=False),
    "codebook": lambda p, bm, b: codebook_quantize(
        p, bm, b, CodebookConfig(bits=3, dim=1, group_rows=16, group_cols=16, kmeans_iters=2, error_feedback=False,
                                 layer_rounds=0, block_rounds=1, block_steps=1, remap=False), progress=False),
}
# every method on the GPT; on the Llama (GQA, untied head) the methods that run model-specific code: AWQ (its
# awq_groups: norm folds and the v->o / up->down prev-linear folds under GQA) and RSQ (its attention_fn over GQA
# heads). The other layer quantizers (RTN, GPTQ, FlexRound, ZeroQuant-FP, mixed precision, codebook) only see
# (kernel, Hessian) pairs from the same block walk, which the Llama AWQ/RSQ cases, the forward test and the Hessian
# streaming test already run; on the Llama they would repeat the GPT's code path with other shapes (and compiles).
# GPT-2's fused q|k|v with RSQ (its attention slices of c_attn; AWQ's fold into a LayerNorm is the GPT's);
# Mistral's sliding-window masks are covered by the forward test (a block walk applies the same block_kwargs)
CASES = [("gpt", m) for m in METHODS] + [("llama", "awq"), ("llama", "rsq"), ("gpt2", "rsq")]


@pytest.mark.slow
@pytest.mark.parametrize("name,method", CASES)
def test_every_method_on_every_block_model(models, name, method):
    m, bm, params, batch = models(name)
    q, rep = METHODS[method](params, bm, batch)
    flat, fq = flatten(params), flatten(q)
    assert set(flat) == set(fq)
    kernels = [p for p in flat if p.endswith("/kernel") and any(p.startswith(b + "/") for b in bm.block_paths)]
    assert set(rep["layers"]) == set(kernels), set(kernels) ^ set(rep["layers"])
    for p, r in rep["layers"].items():
        assert fq[p].shape == flat[p].shape and fq[p].dtype == flat[p].dtype
        np.testing.assert_array_equal(np.asarray(fq[p]), np.asarray(r["weight"]))
        assert not np.array_equal(np.asarray(fq[p]), np.asarray(flat[p])), p
        assert {"weight", "format", "bits", "group_size"} <= set(r), p
        assert np.isfinite(r["error"]) and r["error"] < 0.5, (p, r["error"])
    ref = np.asarray(_logits(m, params, batch))
    got = np.asarray(_logits(m, q, batch))
    tok = batch["attention_mask"] > 0
    rel = np.linalg.norm(got[tok] - ref[tok]) / np.linalg.norm(ref[tok])
    # a sanity bound (a broken walk or fold gives ~1 or more): 4-bit grids measure 0.05-0.3 here, the 3-bit
    # codebook without its fine-tuning ~0.5
    assert np.isfinite(rel) and 0 < rel < 0.75, rel
    if method == "awq":  # the q/k/v scale (alpha > 0 on the outlier channels) was folded into the norm before them
        norm = FIRST_NORM[name]
        assert any(not np.array_equal(np.asarray(q[b][norm]["scale"]), np.asarray(params[b][norm]["scale"]))
                   for b in bm.block_paths)


def test_awq_folds_into_norms_exactly_at_8_bits(models):
    """Pre-LN decoders: AWQ folds 1/s into the LayerNorm (scale and bias) before q/k/v and the MLP input; at 8 bits
    the deployed function must stay close to the float one (a wrong fold changes it by O(1))."""
    m, bm, params, batch = models("gpt")
    q, rep = awq(params, bm, batch, AWQConfig(8, GS, n_grid=4, auto_clip=False), progress=False)
    assert any(rep["alphas"].values())
    assert any(not np.array_equal(np.asarray(q[b]["norm1"]["scale"]), np.asarray(params[b]["norm1"]["scale"]))
               for b in bm.block_paths)
    ref = np.asarray(_logits(m, params, batch))
    got = np.asarray(_logits(m, q, batch))
    tok = batch["attention_mask"] > 0
    assert np.linalg.norm(got[tok] - ref[tok]) / np.linalg.norm(ref[tok]) < 0.02


def _hessians(params, bm, calib):
    out = {}

    def step(view):
        for n, st in view.hessians().items():
            out[f"{view.path}/{n}"] = (np.asarray(st.H), st.n_tokens)
        return view.params, {}, None

    walk_blocks(params, bm, calib, step, progress=False)
    return out


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_streamed_batches_equal_one_batch_and_padding_weighs_zero(models, name):
    m, bm, params, batch = models(name)
    one = _hessians(params, bm, batch)
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    two = _hessians(params, bm, halves)
    for k in one:
        assert one[k][1] == two[k][1] == float(batch["attention_mask"].sum())
        # Σ over two batches vs one: the same sums in another order (float32)
        np.testing.assert_allclose(two[k][0], one[k][0], rtol=2e-5, atol=1e-6 * np.abs(one[k][0]).max())
    # padding tokens weigh 0: other ids under the padding change no statistic (right padding, causal blocks)
    other = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"],
                                           (batch["input_ids"] + 7) % 64))
    moved = _hessians(params, bm, other)
    for k in one:
        np.testing.assert_allclose(moved[k][0], one[k][0], rtol=1e-6, atol=1e-7)


def test_gpt_rejects_left_padding(models):
    _, bm, params, batch = models("gpt")
    bad = dict(batch, attention_mask=batch["attention_mask"][:, ::-1].copy())
    with pytest.raises(ValueError, match="right-padded"):
        gptq(params, bm, bad, GPTQConfig(4, GS), progress=False)


def test_layer_quantizers_and_lorc_transform(models):
    from quant.formats import IntFormat

    _, bm, params, batch = models("gpt")
    q0, r0 = quantize_layers(params, bm, batch, "rtn", RTNConfig(3, GS), progress=False)
    q1, r1 = quantize_layers(params, bm, batch, "rtn", RTNConfig(3, GS), transforms=[LoRCTransform(4, None)],
                             progress=False)
    for p, r in r1["layers"].items():
        np.testing.assert_array_equal(np.asarray(r["stored"]), np.asarray(r0["layers"][p]["weight"]))
        assert r["lorc"]["error_after"] < r["lorc"]["error_before"]
        assert r["error"] < r0["layers"][p]["error"]
    fmt = IntFormat(4, symmetric=True, granularity="channel")
    _, r2 = quantize_layers(params, bm, None, "format", fmt, progress=False)
    assert all(r["format"] is fmt and "packed" in r for r in r2["layers"].values())
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_layers(params, bm, None, "gptq", GPTQConfig(4, GS))
    with pytest.raises(ValueError, match="unknown layer quantizer"):
        quantize_layers(params, bm, batch, "nope", None)


def test_block_model_rejects_unknown_model():
    with pytest.raises(ValueError, match="no block split"):
        block_model(object())
