"""FlexRound (Lee et al., ICML 2023): NumPy reference of the quantizer and of its STE gradient (the reciprocal rule),
exact reduction to RTN at zero steps, layer-wise and block-wise reconstruction beating RTN, export round trip, and
the real all-MiniLM-L6-v2 at W3 g128."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.tree import flatten
from quant.ptq.export import load_quantized, materialize, pack_layer, quantized_tree, save_quantized
from quant.ptq.flexround import FlexRoundConfig, flexround, flexround_init, flexround_quantize_weight, flexround_weight
from quant.ptq.rtn import RTNConfig, rtn, rtn_quantize_weight
from quant.qarray import dequantize
from quant.packing import unpack_bits

from .toy import toy_bert


def _layer(seed, n=512, d_in=64, d_out=24):
    # correlated inputs with a few large channels, as real activations (same recipe as the GPTQ tests)
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in)).astype(np.float32) / np.sqrt(d_in)
    x = rng.standard_normal((n, d_in)).astype(np.float32) @ (np.eye(d_in, dtype=np.float32) + mix)
    x[:, :3] *= 8.0
    w = rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.1  # Flax kernel [in, out]
    return x, w


def _np_grid(W, bits, gs, sym):
    """Min/max grid of each (row, group) of W[out, in] written from scratch (GPTQ/RTN ``find_params``), in float32
    like the torch reference (an all-zero row's zero point -(-1)/(2/7) sits on a rounding tie: 3 in float32)."""
    o, i = W.shape
    g = W.reshape(o, i // gs, gs).astype(np.float32)
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    both = (lo == 0) & (hi == 0)
    lo[both], hi[both] = -1, 1
    maxq = np.float32(2**bits - 1)
    s = (hi - lo) / maxq
    z = np.full_like(s, (maxq + 1) / 2) if sym else np.round(-lo / s)
    return s.astype(np.float64), z.astype(np.float64)


def _np_flexround(W, d1, d2, d3, d4, s1_0, z, bits):
    """The paper's quantizer in float64: Ŵ = s1·(clamp(⌊W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4)⌉ + z, 0, 2^b−1) − z) with
    s1 = s1⁰·exp(δ1) per group, S2 = exp(Δ2), s3 = exp(δ3) per row, s4 = exp(δ4) per column. Also returns the STE
    gradient dŴ/dΔ2 = −s1·W/(s1 S2 s3 s4) (= −W/(S2 s3 s4): proportional to W, the "reciprocal rule")."""
    o, i = W.shape
    rep = i // s1_0.shape[1]
    s1 = np.repeat(s1_0 * np.exp(d1), rep, axis=1)
    zz = np.repeat(z, rep, axis=1)
    div = s1 * np.exp(d2) * np.exp(d3) * np.exp(d4)
    v = W / div
    c = np.clip(np.round(v) + zz, 0, 2**bits - 1)
    inside = (np.round(v) + zz >= 0) & (np.round(v) + zz <= 2**bits - 1)
    return s1 * (c - zz), c, np.where(inside, -s1 * v, 0.0)


_jit_weight = jax.jit(flexround_weight)  # bits traced: one compile per weight/group shape
_jit_grad = jax.jit(jax.grad(lambda w, th, grid, bits, G: jnp.sum(G * flexround_weight(w, th, grid, bits)[0]),
                             argnums=1))


@pytest.mark.parametrize("bits,gs,sym,s4", [(3, 16, False, True), (2, -1, False, True), (4, 16, True, False),
                                           (8, 16, False, False)])
def test_quantizer_matches_numpy_reference(bits, gs, sym, s4):
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((24, 64)) * 0.1).astype(np.float32)
    W[3] = 0.0  # an all-zero row takes the [-1, 1] grid
    theta, grid = flexround_init(jnp.asarray(W), bits, gs, sym, s4=s4)
    assert set(theta) == ({"d1", "d2", "d3", "d4"} if s4 else {"d1", "d2", "d3"})
    g = 64 if gs == -1 else gs
    s_ref, z_ref = _np_grid(W, bits, g, sym)
    np.testing.assert_allclose(np.asarray(grid["s1"]), s_ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grid["zero"]), z_ref)
    # random learned factors, large enough to move many weights by one or more levels
    theta = {k: jnp.asarray(rng.standard_normal(v.shape) * 0.3, jnp.float32) for k, v in theta.items()}
    w_hat, codes, s1 = _jit_weight(jnp.asarray(W), theta, grid, bits)
    t = {k: np.asarray(v, np.float64) for k, v in theta.items()}
    ref_w, ref_c, ref_grad = _np_flexround(W.astype(np.float64), t["d1"], t["d2"], t["d3"], t.get("d4", 0.0),
                                           np.asarray(grid["s1"], np.float64), z_ref, bits)
    # float32 vs float64 division: a value within ~1e-6 of a rounding tie may round the other way; the test data has
    # none at this seed in practice, allow at most 0.1% of the weights one level off.
    same = np.asarray(codes) == ref_c
    assert same.mean() >= 0.999, same.mean()
    assert np.abs(np.asarray(codes, np.float64) - ref_c).max() <= 1
    np.testing.assert_allclose(np.asarray(w_hat)[same], ref_w[same], rtol=1e-5, atol=1e-7)
    assert not np.array_equal(ref_c, np.clip(np.round(W / np.repeat(np.asarray(grid["s1"]), g, 1))
                                             + np.repeat(z_ref, g, 1), 0, 2**bits - 1))  # learning moved codes
    # stored form: codes are uint8 in [0, 2^b) and s1·(codes − z) is bit-for-bit Ŵ
    assert np.asarray(codes).dtype == np.uint8 and np.asarray(codes).max() <= 2**bits - 1
    z = np.repeat(np.asarray(grid["zero"]), g, 1)
    np.testing.assert_array_equal(np.repeat(np.asarray(s1), g, 1) * (np.asarray(codes, np.float32) - z),
                                  np.asarray(w_hat))
    # STE gradient w.r.t. Δ2 of <G, Ŵ>: G ⊙ dŴ/dΔ2 = −G·s1·W/div — proportional to |W| (the paper's reciprocal rule)
    G = rng.standard_normal(W.shape).astype(np.float32)
    grad = _jit_grad(jnp.asarray(W), theta, grid, bits, jnp.asarray(G))["d2"]
    np.testing.assert_allclose(np.asarray(grad)[same], (G * ref_grad)[same], rtol=1e-4, atol=1e-6)


def test_zero_steps_is_rtn_exactly(toy):
    x, w = _layer(1, d_out=128)
    for gs, sym in ((16, False), (-1, False), (16, True)):
        # S2 = s3 = s4 = 1 and s1 = the RTN grid: FlexRound's rounding is round-to-nearest, bit for bit
        r = flexround_quantize_weight(w, x, FlexRoundConfig(3, gs, sym=sym, iters=0), progress=False)
        ref = rtn_quantize_weight(w, None, RTNConfig(3, gs, sym))
        for k in ("weight", "codes", "scale", "zero", "g_idx"):
            np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(ref[k]), err_msg=f"{k} gs={gs} sym={sym}")
        assert r["perm"] is None and r["loss"] == r["loss_rtn"] and r["beyond_nearest"] == 0
    model, params, batch = toy
    q, rep = flexround(params, model, batch, FlexRoundConfig(3, 16, iters=0, s4=True), progress=False)
    q_rtn, rep_rtn = rtn(params, model, batch, RTNConfig(3, 16), progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(q_rtn)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for p, r in rep["layers"].items():
        np.testing.assert_array_equal(np.asarray(r["codes"]), np.asarray(rep_rtn["layers"][p]["codes"]))
        if p.startswith("layer_0/"):  # later blocks: RTN measures on the float stream, FlexRound on the quantized one
            np.testing.assert_allclose(r["error"], rep_rtn["layers"][p]["error"], rtol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_single_layer_output_error_below_rtn(bits):
    x, w = _layer(1, d_out=128)
    err = lambda wq: float(np.mean((x @ w - x @ np.asarray(wq)) ** 2))
    cfg = FlexRoundConfig(bits, 16, iters=300, lr=3e-3, batch_size=512)  # the reference lr; full-batch steps
    r = flexround_quantize_weight(w, x, cfg, progress=False)
    e_rtn, e_fr = err(rtn_quantize_weight(w, None, RTNConfig(bits, 16))["weight"]), err(r["weight"])
    # Learning the rounding on the layer's own inputs. The STE dynamics are chaotic (rounding flips back and forth
    # until the cosine schedule freezes them), so the end point varies from layer to layer, and any change of
    # floating-point arithmetic (another backend) acts like another seed: over six random 64x128 layers (seeds 0-5)
    # this setting gave ratios 0.67-0.85 at W4 and 0.57-0.68 at W3 (with s4: 0.69-0.76 / 0.58-0.71; narrower 64x24
    # layers vary more, up to ~1.0 at W4). Demand at least 10% lower output error than RTN.
    assert e_fr < 0.9 * e_rtn, (bits, e_fr, e_rtn)
    assert r["loss"] < 0.9 * r["loss_rtn"]
    # codes, learned grid and zero points reproduce the weight exactly (the folded, stored form)
    s = np.asarray(r["scale"])[:, r["g_idx"]].T
    z = np.asarray(r["zero"])[:, r["g_idx"]].T
    np.testing.assert_array_equal(s * (np.asarray(r["codes"], np.float32) - z), np.asarray(r["weight"]))
    s_rtn = rtn_quantize_weight(w, None, RTNConfig(bits, 16))["scale"]
    assert not np.allclose(np.asarray(r["scale"]), np.asarray(s_rtn))  # s1 learned
    # the paper's qualitative claim: unlike AdaRound's up-or-down choice, element-wise division lets some weights move
    # beyond both neighbouring points of their grid (measured 0.4-0.7% at W3, 1.2-1.4% at W4, seeds 0-3)
    assert 0.001 < r["beyond_nearest"] < 0.1, r["beyond_nearest"]


@pytest.fixture(scope="module")
def toy():
    return toy_bert(hidden=64, inter=128)  # one shape for all toy tests: the jitted steps compile once


@pytest.fixture(scope="module")
def toy_run(toy):
    model, params, batch = toy
    cfg = FlexRoundConfig(3, 16, iters=100, lr=3e-3, batch_size=4, s4=True)  # s4: the paper's conv form, too
    snapshot = jax.tree_util.tree_map(lambda a: np.array(a, copy=True), params)
    q, rep = flexround(params, model, batch, cfg, progress=False)
    return model, params, batch, snapshot, q, rep


def test_toy_bert_blockwise_below_rtn(toy_run):
    model, params, batch, snapshot, q, rep = toy_run
    # inputs never modified
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(snapshot)):
        np.testing.assert_array_equal(np.asarray(a), b)
    f = np.asarray(model.forward(params, batch))
    err = lambda p: float(np.mean((np.asarray(model.forward(p, batch)) - f) ** 2))
    e_rtn = err(rtn(params, model, None, RTNConfig(3, 16), progress=False)[0])
    e_fr = err(q)
    # Calibrated on the batch it is measured on, block reconstruction removes most of RTN's error on the random toy
    # model (measured 1.5-4.5% of RTN's at 100-200 steps, W3/W4; block objectives 3-9% of RTN's): demand at least a
    # 5x reduction of the output error and 2x of every block's objective.
    assert e_fr < 0.2 * e_rtn, (e_fr, e_rtn)
    for bp, b in rep["blocks"].items():
        assert b["loss"] < 0.5 * b["loss_rtn"], (bp, b)
    assert set(rep["layers"]) == {f"layer_{i}/{n}/kernel" for i in range(2) for n in (
        "attention/query", "attention/key", "attention/value", "attention/attention_output", "intermediate", "output")}
    for r in rep["layers"].values():
        assert r["perm"] is None and 0 <= r["error"] < 1
    assert all(0 <= r["beyond_nearest"] < 0.05 for r in rep["layers"].values())


def test_export_round_trip(toy_run, tmp_path):
    model, params, batch, _, q, rep = toy_run
    for p, r in rep["layers"].items():
        # float32 scales: the packed codes and the dequantized kernel are exactly the report's
        ql = pack_layer(r, scale_dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(dequantize(ql.q, jnp.float32)), np.asarray(r["weight"]))
        codes = unpack_bits(ql.q.packed, 3, ql.q.shape[-1])
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(r["codes"]))
    tree = quantized_tree(q, rep)
    save_quantized(tmp_path / "fr.safetensors", tree)
    loaded = materialize(load_quantized(tmp_path / "fr.safetensors"))
    flat_l, flat_q = flatten(loaded), flatten(q)
    assert set(flat_l) == set(flat_q)
    for p, v in flat_q.items():
        if p in rep["layers"]:
            # default float16 scales: every weight s·(c − z) moves by at most 2^-11 relative (|c − z| <= 7 at W3)
            tol = 7 * 2.0**-11 * float(np.max(np.asarray(rep["layers"][p]["scale"])))
            np.testing.assert_allclose(np.asarray(flat_l[p]), np.asarray(v), rtol=0, atol=tol, err_msg=p)
        else:
            np.testing.assert_array_equal(np.asarray(flat_l[p]), np.asarray(v), err_msg=p)


def test_bad_config_rejected_before_work(toy):
    x, w = _layer(0, n=16)
    model, params, batch = toy

    def no_embed(*a):
        raise AssertionError("work started")

    import dataclasses

    lazy = dataclasses.replace(model, embed=no_embed)
    for cfg, match in ((FlexRoundConfig(bits=1), "bits"), (FlexRoundConfig(bits=9), "bits"),
                       (FlexRoundConfig(group_size=0), "group_size"), (FlexRoundConfig(iters=-1), "iters"),
                       (FlexRoundConfig(lr=0.0), "lr"), (FlexRoundConfig(lr=float("nan")), "lr"),
                       (FlexRoundConfig(batch_size=0), "batch_size"), (FlexRoundConfig(iters=2.5), "iters"),
                       (FlexRoundConfig(4, 48), "divisible")):  # 64 input features, groups of 48
        with pytest.raises(ValueError, match=match):
            flexround(params, lazy, batch, cfg, progress=False)
    with pytest.raises(ValueError, match="divisible"):
        flexround_quantize_weight(w, x, FlexRoundConfig(4, 48), progress=False)
    with pytest.raises(ValueError, match="input features"):
        flexround_quantize_weight(w, x[:, :32], FlexRoundConfig(4, 16), progress=False)


def test_dtype_and_inputs_preserved():
    x, w = _layer(1, d_out=128)
    x0, w0 = x.copy(), w.copy()
    r = flexround_quantize_weight(w, x, FlexRoundConfig(4, 16, iters=0), progress=False)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    rb = flexround_quantize_weight(jnp.asarray(w, jnp.bfloat16), x, FlexRoundConfig(4, 16, iters=0), progress=False)
    assert rb["weight"].dtype == jnp.bfloat16 and r["weight"].dtype == jnp.float32
    # the W[out, in] layout gives the transposed result
    ro = flexround_quantize_weight(w.T, x, FlexRoundConfig(4, 16, iters=0), kernel_layout=False, progress=False)
    np.testing.assert_array_equal(np.asarray(ro["weight"]), np.asarray(r["weight"]).T)


def test_sharded_equals_single_device(mesh_2d):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, w = _layer(1, d_out=128)
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh_2d, P("data", None)))
    ws = jax.device_put(jnp.asarray(w), NamedSharding(mesh_2d, P(None, "model")))
    # initial grid, rounding and folding: identical
    cfg = FlexRoundConfig(3, 16, iters=0)
    a, b = flexround_quantize_weight(ws, xs, cfg, progress=False), flexround_quantize_weight(w, x, cfg, progress=False)
    for k in ("weight", "codes", "scale", "zero"):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # training: the sharded reductions sum in another order, and the STE dynamics amplify last-bit differences of
    # the gradients into a few different rounding decisions over the steps; demand >= 98% identical codes after 30
    # steps and the same objective within 2%.
    cfg = FlexRoundConfig(3, 16, iters=30, lr=3e-3, batch_size=512)
    a, b = flexround_quantize_weight(ws, xs, cfg, progress=False), flexround_quantize_weight(w, x, cfg, progress=False)
    same = np.asarray(a["codes"]) == np.asarray(b["codes"])
    assert same.mean() >= 0.98, same.mean()
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=0.02)


@pytest.mark.slow
def test_minilm_w3_beats_rtn():
    from jaxmodels.models.bert import load_minilm
    from quant.ptq.evaluate import embed_batches, embedding_metrics
    from quant.ptq.minilm import bert_block_model, calibration_sentences, evaluation_sentences

    emb = load_minilm(max_length=32)
    model = bert_block_model(emb)
    calib = emb.tokenizer(calibration_sentences(8))
    ev = [emb.tokenizer(evaluation_sentences(32))]
    e_float = embed_batches(model, emb.params, ev)
    cos = lambda p: embedding_metrics(e_float, embed_batches(model, p, ev))["cosine"]
    c_rtn = cos(rtn(emb.params, model, None, RTNConfig(3, 128), progress=False)[0])
    q, rep = flexround(emb.params, model, calib, FlexRoundConfig(3, 128, iters=16, lr=3e-3, batch_size=4),
                       progress=False)
    c_fr = cos(q)
    # 32 held-out sentences. Measured RTN 0.828 -> FlexRound 0.902 (8 calibration sentences, 16 steps / block; on
    # 64 held-out sentences 0.831 -> 0.904, 0.909 at 24 steps); in the colab's quick setting (32 sentences) 200
    # steps reach 0.944 vs GPTQ act-order 0.910 and AWQ 0.909. Demand +0.04 over RTN.
    assert c_fr > c_rtn + 0.04, (c_fr, c_rtn)
    assert all(b["loss"] < b["loss_rtn"] for b in rep["blocks"].values()), rep["blocks"]
