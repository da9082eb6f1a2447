"""Every PTQ result of quant.ptq exports (issue 13 items 7, 8): pack -> save -> load -> dequantize gives back the
method's own quantized weights, bit for bit with float32 scales, and the same codes with float16 scales.

On 0cb843d: RTN without a model had no config (TypeError in quantized_tree), AWQ sym stored scale=None, and export
re-encoded every kernel on an asymmetric INT grid, so FP4 codes, codebooks, per-format RTN and LoRC factors could
not be packed at all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant.formats import FloatFormat, NF4Format
from quant.ptq.awq import AWQConfig, awq
from quant.ptq.codebook import CodebookConfig, codebook_quantize
from quant.ptq.export import QuantizedLinear, load_quantized, materialize, pack_layer, quantized_tree, save_quantized
from quant.ptq.flexround import FlexRoundConfig, flexround
from quant.ptq.gptq import GPTQConfig, gptq
from quant.ptq.lorc import lorc
from quant.ptq.mixed_precision import MixedPrecisionConfig, mixed_precision
from quant.ptq.rsq import RSQConfig, rsq
from quant.ptq.rtn import RTNConfig, rtn, rtn_format
from quant.ptq.zeroquant_fp import ZeroQuantFPConfig, zeroquant_fp
from quant.qarray import dequantize
from quant.packing import unpack_bits

from .toy import toy_bert


@pytest.fixture(scope="module")
def toy():
    return toy_bert(inter=32)  # every linear 32x32: one compile per per-layer function and shape-dependent step


@pytest.fixture(scope="module")
def results(toy):
    """``get(name)``: the method's ``(params, report)`` on the toy, computed once per module (the float16-scale
    test reads the same results as the round-trip test)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _run(name, *toy)
        return cache[name]

    return get


def _run(name, model, params, batch):
    if name == "rtn-no-model":
        return rtn(params, None, None, RTNConfig(4, 16), progress=False)
    if name == "rtn-sym-channel":
        return rtn(params, model, batch, RTNConfig(3, -1, sym=True), progress=False)
    if name == "gptq-act-order":
        return gptq(params, model, batch, GPTQConfig(4, 16, act_order=True), progress=False)
    if name == "gptq-sym-static":
        return gptq(params, model, batch, GPTQConfig(3, 16, sym=True, act_order=True, static_groups=True),
                    progress=False)
    if name == "awq":
        return awq(params, model, batch, AWQConfig(4, 16, n_grid=4), progress=False)
    if name == "awq-sym":
        return awq(params, model, batch, AWQConfig(3, 16, sym=True, n_grid=4), progress=False)
    if name == "rsq":
        return rsq(params, model, batch, RSQConfig(GPTQConfig(4, 16, act_order=True)), progress=False)
    if name == "flexround":
        return flexround(params, model, batch, FlexRoundConfig(3, 16, iters=6, batch_size=4, chunk=6),
                         progress=False)
    if name == "zeroquant-fp4":
        return zeroquant_fp(params, model, batch, ZeroQuantFPConfig(group_size=16), progress=False)
    if name == "fp4-rtn-no-pow2":
        return zeroquant_fp(params, model, None, ZeroQuantFPConfig(group_size=16, pow2=None, algorithm="rtn",
                                                                   act_format=None), progress=False)
    if name == "mixed-precision":
        cfg = MixedPrecisionConfig(budget=3.5, candidates=(2, 3, 4, 8), score="zd", method="gptq", act_order=True,
                                   group_size=16)
        return mixed_precision(params, model, batch, cfg, progress=False)
    if name == "codebook":
        # one step of each fine-tuning stage (a codebook the steps changed must still pack to its record)
        cfg = CodebookConfig(bits=2, dim=2, group_rows=16, group_cols=16, kmeans_iters=2, layer_rounds=1,
                             layer_steps=1, block_rounds=1, block_steps=1)
        return codebook_quantize(params, model, batch, cfg, progress=False)
    if name == "rtn+lorc":
        q, rep = rtn(params, model, None, RTNConfig(3, 16), progress=False)
        return lorc(params, q, 4, report=rep, progress=False)
    if name == "rtn-format-nf4":
        return rtn_format(params, NF4Format(group_size=16))
    if name == "rtn-format-fp8-channel":
        return rtn_format(params, FloatFormat("e4m3", granularity="channel"))
    raise KeyError(name)


METHODS = ["rtn-no-model", "rtn-sym-channel", "gptq-act-order", "gptq-sym-static", "awq", "awq-sym", "rsq",
           "flexround", "zeroquant-fp4", "fp4-rtn-no-pow2", "mixed-precision", "codebook", "rtn+lorc",
           "rtn-format-nf4", "rtn-format-fp8-channel"]
# the loaded kernel is a float32 matmul of stored pieces (Hadamard rotation, LoRC factors): equal up to its rounding
PRODUCT = {"rsq", "rtn+lorc"}


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


@pytest.mark.parametrize("name", METHODS)
def test_every_result_packs_and_reloads_bit_for_bit(results, tmp_path, name):
    q, rep = results(name)
    assert rep["layers"]
    for r in rep["layers"].values():  # one report schema: every record names its own code layout
        assert {"weight", "format", "bits", "group_size"} <= set(r)
    tree = quantized_tree(q, rep, scale_dtype=jnp.float32)
    save_quantized(tmp_path / "q.safetensors", tree)
    loaded = load_quantized(tmp_path / "q.safetensors")
    mat = jax.jit(materialize)(loaded)
    for p, r in rep["layers"].items():
        got = np.asarray(_get(mat, p))
        want = np.asarray(jnp.asarray(r["weight"], jnp.float32))
        if name in PRODUCT:
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=p)
            leaf = _get(loaded, p)  # the stored pieces themselves are exact
            np.testing.assert_array_equal(np.asarray(dequantize(leaf.q, jnp.float32)[
                np.argsort(np.asarray(leaf.in_perm))] if leaf.in_perm is not None
                else dequantize(leaf.q, jnp.float32)), np.asarray(r["stored"], np.float32), err_msg=p)
            if name == "rtn+lorc":
                np.testing.assert_array_equal(np.asarray(dequantize(leaf.lorc_u)), np.asarray(r["lorc"]["U"]))
                np.testing.assert_array_equal(np.asarray(dequantize(leaf.lorc_v)), np.asarray(r["lorc"]["V"]))
        else:
            np.testing.assert_array_equal(got, want, err_msg=p)
        np.testing.assert_array_equal(np.asarray(_get(q, p), np.float32), want, err_msg=p)  # params = records
    # the other leaves come back unchanged
    for a, b in zip(jax.tree_util.tree_leaves(mat), jax.tree_util.tree_leaves(q)):
        assert a.shape == b.shape


@pytest.mark.parametrize("name", ["gptq-act-order", "awq", "zeroquant-fp4", "mixed-precision"])
def test_float16_scales_keep_the_codes(results, name):
    q, rep = results(name)
    t16, t32 = quantized_tree(q, rep), quantized_tree(q, rep, scale_dtype=jnp.float32)
    for p, r in rep["layers"].items():
        a, b = _get(t16, p), _get(t32, p)
        assert isinstance(a, QuantizedLinear) and a.q.scale.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(a.q.packed), np.asarray(b.q.packed))
        if r["format"] == "int":
            n_in = np.shape(r["codes"])[0]
            codes = unpack_bits(b.q.packed, r["bits"], np.shape(r["codes"])[1])
            order = np.asarray(b.in_perm) if b.in_perm is not None else np.arange(n_in)
            np.testing.assert_array_equal(np.asarray(codes), np.asarray(r["codes"])[order])
        w16, w32 = np.asarray(a.dequantize()), np.asarray(b.dequantize())
        # float16 scales (and AWQ input scales): a relative change of <= 2^-11 each (twice for AWQ)
        np.testing.assert_array_less(np.abs(w16 - w32), 2.0**-10 * np.abs(w32) + 1e-30 + (w32 == 0))


def test_rtn_without_model_has_config_and_exports(toy):
    """Issue 13 item 7: the simplest RTN call (no model) was not exportable (no config -> TypeError)."""
    _, params, _ = toy
    q, rep = rtn(params, None, None, RTNConfig(4, 16), progress=False)
    assert rep["config"] == {"bits": 4, "group_size": 16, "sym": False}
    tree = quantized_tree(q, rep)
    assert all(isinstance(_get(tree, p), QuantizedLinear) for p in rep["layers"])


def test_export_rejects_what_it_cannot_pack(toy):
    model, params, batch = toy
    q, rep = rtn(params, None, None, RTNConfig(4, 16), progress=False)
    p = next(iter(rep["layers"]))
    bad = {**rep["layers"][p], "codes": jnp.zeros_like(rep["layers"][p]["codes"])}
    with pytest.raises(ValueError, match="do not reproduce"):
        pack_layer(bad)
    with pytest.raises(ValueError, match="format"):
        pack_layer({"weight": rep["layers"][p]["weight"]})
    q2, rep2 = lorc(params, q, 2, progress=False)  # without the base report: no codes to pack
    with pytest.raises(ValueError, match="report="):
        quantized_tree(q2, rep2)
    q3, rep3 = lorc(params, q, 2, report=rep, factor_format=None, progress=False)
    with pytest.raises(ValueError, match="factor_format"):
        quantized_tree(q3, rep3)
