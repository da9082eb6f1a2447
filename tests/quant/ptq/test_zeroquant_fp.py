"""ZeroQuant-FP (FP4 weights with GPTQ, FP8 per-token activations, power-of-two scales M1/M2) and LoRC.

NumPy references (pow2 mappings, GPTQ on the FP4 grid, FP8 activation fake-quant, LoRC via numpy SVD), invariants
(degenerate settings reduce to RTN / quant.formats / exact W, error monotone in the rank), the paper's FP4 -> FP8
cast claim checked with ml_dtypes, sharded == single device, and the real all-MiniLM-L6-v2 (slow).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from quant.formats import FloatFormat, IntFormat, round_trip
from quant.ptq.gptq import hessian_from_inputs
from quant.ptq.lorc import lorc, lorc_bits_per_weight, lorc_factors, lorc_weight
from quant.ptq.rtn import RTNConfig, rtn
from quant.ptq.zeroquant_fp import (ZeroQuantFPConfig, embed_a8, forward_a8, fp_act_quant, pow2_exponent_range,
                                    pow2_scales, zeroquant_fp, zeroquant_fp_weight)

from .toy import toy_bert

F4 = ml_dtypes.float4_e2m1fn
F8 = ml_dtypes.float8_e4m3fn
_round_trip = jax.jit(round_trip, static_argnums=1)  # one compile per format instead of one per eager op


def _layer(seed=0, n=256, d_in=64, d_out=24):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in)).astype(np.float32) / np.sqrt(d_in)
    x = rng.standard_normal((n, d_in)).astype(np.float32) @ (np.eye(d_in, dtype=np.float32) + mix)
    x[:, :3] *= 8.0  # a few large input channels, as real activations
    w = rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.1  # Flax kernel [in, out]
    return x, w


@pytest.fixture(scope="module")
def toy():
    return toy_bert(inter=32)  # every kernel 32x32: one GPTQ compile per grid


def _cfg(**kw):
    base = dict(group_size=16, block_size=32)
    base.update(kw)
    return ZeroQuantFPConfig(**base)


# ----------------------------------------------------------------------------------------------------- pow2 scales

def test_pow2_exponent_range_matches_ml_dtypes():
    q = np.arange(16, dtype=np.uint8).view(F4).astype(np.float64)  # all 16 E2M1 values
    exact = [k for k in range(-14, 12)
             if np.array_equal((q * 2.0**k).astype(F8).astype(np.float64), q * 2.0**k)]
    # the shifts for which every E2M1 value times 2^k is an E4M3 value form exactly [k_min, k_max]
    assert pow2_exponent_range("e2m1", "e4m3") == (min(exact), max(exact)) == (-8, 6)
    ex5 = [k for k in range(-40, 40) if np.array_equal((q * 2.0**k).astype(ml_dtypes.float8_e5m2)
                                                       .astype(np.float64), q * 2.0**k)]
    assert pow2_exponent_range("e2m1", "e5m2") == (min(ex5), max(ex5))
    with pytest.raises(ValueError, match="mantissa"):
        pow2_exponent_range("e4m3", "e5m2")


def test_pow2_scales_numpy_reference():
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(-12, 3, size=(16, 12))).astype(np.float32)
    s[0, :4] = [0.25, 1.0, 2.0**-9, 2.0**-9 * (1 + 2.0**-23)]  # exact powers of two and one ulp above
    s[1] = s[1, 0] * 2.0 ** -np.arange(12)  # ratios to the row max that are exact powers of two
    s64 = s.astype(np.float64)
    # M1: Ŝ = 2^ceil(log2 S)
    m1, k1 = pow2_scales(s, "m1")
    np.testing.assert_array_equal(np.asarray(m1), 2.0 ** np.ceil(np.log2(s64)))
    np.testing.assert_array_equal(np.asarray(k1), np.ceil(np.log2(s64)))
    # M2: Ŝ = S_max 2^ceil(log2(S / S_max)), S_max = row max
    smax = s64.max(1, keepdims=True)
    ref2 = smax * 2.0 ** np.ceil(np.log2(s64 / smax))
    m2, k2 = pow2_scales(s, "m2")
    np.testing.assert_array_equal(np.asarray(m2), ref2.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(k2), np.ceil(np.log2(s64 / smax)))
    for got in (np.asarray(m1, np.float64), np.asarray(m2, np.float64)):
        assert np.all(got >= s64) and np.all(got < 2 * s64)  # rounded up by less than 2x: nothing is clipped
    assert np.all(np.frexp(np.asarray(m1))[0] == 0.5)  # exact powers of two
    ratio = np.asarray(m2, np.float64) / smax
    assert np.all(np.frexp(ratio)[0] == 0.5) and np.all(ratio <= 1)
    # M2 with one group per output channel: Ŝ = S_max = S (plain per-channel scales)
    np.testing.assert_array_equal(np.asarray(pow2_scales(s[:, :1], "m2")[0]), s[:, :1])
    # explicit anchor and clamped exponents; jit gives the same
    a = np.full((16, 1), 2.0, np.float32)
    m2a, k2a = jax.jit(pow2_scales, static_argnums=(1, 3))(s, "m2", a, (-8, 6))
    ka = np.clip(np.ceil(np.log2(s64 / 2.0)), -8, 6)
    np.testing.assert_array_equal(np.asarray(k2a), ka)
    np.testing.assert_array_equal(np.asarray(m2a), (2.0 * 2.0**ka).astype(np.float32))
    with pytest.raises(ValueError, match="pow2"):
        pow2_scales(s, "m3")


# ----------------------------------------------------------------------------------------------------- weights

def _np_gptq_fp4(W, H, gs, bs, pow2, percdamp=0.01, k_range=(-8, 6)):
    """NumPy float64 transcription of IST-DASLab/gptq ``fasterquant`` (W[out, in]) with the ZeroQuant-FP quantizer:
    S = max|w_group| / 6 (M1/M2 power of two), q = S · E2M1(clip(w / S, -6, 6)) via ml_dtypes."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    C = W.shape[1]
    anchor = np.abs(W).max(1) / 6.0

    def params(block):
        s = np.abs(block).max(1) / 6.0
        if pow2 == "m1":
            s = 2.0 ** np.clip(np.ceil(np.log2(s)), *k_range)
        elif pow2 == "m2":
            s = anchor * 2.0 ** np.clip(np.ceil(np.log2(s / anchor)), *k_range)
        return s

    H += percdamp * np.mean(np.diag(H)) * np.eye(C)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        W1, Err1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1))
        for i in range(i2 - i1):
            if (i1 + i) % gs == 0:
                s = params(W[:, i1 + i:i1 + i + gs])  # W as at the block start (the reference's semantics)
            w, d = W1[:, i], Hinv[i1 + i, i1 + i]
            q = s * np.clip(w / s, -6, 6).astype(F4).astype(np.float64)
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, Hinv[i1 + i, i1 + i:i2])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


@pytest.mark.parametrize("pow2", [None, "m1", "m2"])
def test_gptq_fp4_matches_numpy_reference(pow2):
    x, w = _layer(1)
    H = np.asarray(hessian_from_inputs(x))
    got = np.asarray(zeroquant_fp_weight(w, H, _cfg(pow2=pow2))["weight"])  # g16, lazy blocks of 32
    ref = _np_gptq_fp4(w.T, H, 16, 32, pow2).T
    # float32 JAX vs float64 NumPy (measured: 100% identical on CPU): a rounding tie, or TF32 matmuls on a GPU, can
    # flip one FP4 level in rare elements and the flip then propagates through GPTQ's updates; demand >= 97%
    # identical elements and the rest within one FP4 step of the largest group (2 · max|w| / 6 ~ 0.1).
    same = np.isclose(got, ref, rtol=1e-5, atol=1e-6)
    assert same.mean() >= 0.97, same.mean()
    assert np.abs(got - ref).max() < 0.15


def test_degenerate_settings_reduce_to_rtn_and_formats():
    x, w = _layer(2)
    for pow2 in (None, "m1", "m2"):
        r = zeroquant_fp_weight(w, None, _cfg(algorithm="rtn", pow2=pow2))
        # With H = I the inverse-Hessian factor is diagonal: no error feedback, so GPTQ on the FP4 grid == RTN.
        g = zeroquant_fp_weight(w, np.eye(64, dtype=np.float32), _cfg(pow2=pow2))
        np.testing.assert_array_equal(np.asarray(g["weight"]), np.asarray(r["weight"]))
        np.testing.assert_array_equal(np.asarray(g["codes"]), np.asarray(r["codes"]))
        if pow2 in (None, "m1"):  # quant.formats' FP4 group round trip (its pow2_scale rounds up like M1)
            fmt = FloatFormat("e2m1", granularity="group", group_size=16, pow2_scale=pow2 == "m1")
            np.testing.assert_array_equal(np.asarray(r["weight"]), np.asarray(_round_trip(jnp.asarray(w), fmt)))


def test_fp4_times_pow2_scale_is_exact_fp8():
    """The paper's claim: with power-of-two scales the FP4 -> FP8 cast is an exponent shift (exact)."""
    x, w = _layer(3)
    w = w * np.repeat(np.exp([0.0, -3.0, -6.0, -9.0]), 16)[:, None].astype(np.float32)  # 4 groups over 4 decades
    H = np.asarray(hessian_from_inputs(x))
    for pow2 in ("m1", "m2"):
        for algo in ("rtn", "gptq"):
            r = zeroquant_fp_weight(w, H, _cfg(pow2=pow2, algorithm=algo, act_order=algo == "gptq"))
            k = np.asarray(r["exponent"])
            q = np.asarray(r["codes"]).T.view(F4).astype(np.float64)  # FP4 values [out, in] from the bit patterns
            v = q * 2.0 ** k[:, r["g_idx"]]  # the FP8 weights
            np.testing.assert_array_equal(v.astype(F8).astype(np.float64), v)  # exact in E4M3 (ml_dtypes)
            assert r["cast_exact"] is True
            scale = np.asarray(r["scale"], np.float64)
            base = 1.0 if pow2 == "m1" else np.asarray(r["anchor"], np.float64)[:, None]
            np.testing.assert_array_equal(scale, base * 2.0**k)
            if pow2 == "m1":
                assert np.all(np.frexp(scale)[0] == 0.5)  # exact powers of two
            # deployment: FP8 weights times the per-channel S_max (M2) / nothing (M1) is the fake-quant weight
            recon = (v * (1.0 if pow2 == "m1" else np.asarray(r["anchor"], np.float64)[:, None])).T
            np.testing.assert_allclose(np.asarray(r["weight"], np.float64), recon, rtol=1e-7, atol=0)
    # without the exponent clamp, groups 2^9 below their row maximum underflow the E4M3 cast
    r = zeroquant_fp_weight(w, None, _cfg(pow2="m2", algorithm="rtn", exact_cast=False))
    assert r["cast_exact"] is False and np.asarray(r["exponent"]).min() < -8


def test_gptq_fp4_beats_rtn_fp4_and_m2_beats_m1():
    x, w = _layer(4)
    H = hessian_from_inputs(x)
    err = lambda r: float(np.mean((x @ w - x @ np.asarray(r["weight"])) ** 2))
    e = {}
    for pow2 in (None, "m1", "m2"):
        e[("rtn", pow2)] = err(zeroquant_fp_weight(w, None, _cfg(algorithm="rtn", pow2=pow2)))
        for ao in (False, True):
            e[("gptq", pow2, ao)] = err(zeroquant_fp_weight(w, H, _cfg(pow2=pow2, act_order=ao)))
            # GPTQ minimizes exactly this proxy greedily on the same FP4 grid: it must beat RTN (by > 5% here;
            # measured 0.25-0.31x RTN's error)
            assert e[("gptq", pow2, ao)] < 0.95 * e[("rtn", pow2)], e
    # M2 keeps each channel's largest group scale exact, M1 rounds every scale up to 2x: measured 20-28% lower error
    assert e[("rtn", "m2")] < e[("rtn", "m1")] and e[("gptq", "m2", False)] < e[("gptq", "m1", False)], e


def test_act_quant_numpy_reference_and_forward(toy):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 7, 32)) * np.exp(rng.uniform(-4, 4, (3, 7, 1)))).astype(np.float32)
    x[0, 0] = 0.0
    s = np.abs(x).max(-1, keepdims=True) / np.float32(448)
    s = np.where(s > 0, s, np.float32(1))
    ref = (x / s).astype(F8).astype(np.float32) * s  # per-token E4M3 (ml_dtypes), all in float32
    # XLA may evaluate max/448 as max·(1/448): the scale can differ by an ulp, so rtol 3e-7; a wrong FP8 level
    # would be off by >= 2^-4 relative
    np.testing.assert_allclose(np.asarray(fp_act_quant(jnp.asarray(x))), ref, rtol=3e-7, atol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(fp_act_quant)(jnp.asarray(x))), ref, rtol=3e-7, atol=0)
    st = np.abs(x).max() / np.float32(448)
    np.testing.assert_allclose(np.asarray(fp_act_quant(jnp.asarray(x), granularity="tensor")),
                               (x / st).astype(F8).astype(np.float32) * st, rtol=3e-7, atol=0)
    g = jax.grad(lambda v: fp_act_quant(v).sum())(jnp.asarray(x))  # straight-through
    np.testing.assert_array_equal(np.asarray(g), 1.0)
    model, params, batch = toy
    # no activation format: exactly model.forward; E4M3 per token: a small perturbation
    f = np.asarray(model.forward(params, batch))
    np.testing.assert_allclose(np.asarray(forward_a8(model, params, batch, None)), f, rtol=1e-6, atol=1e-6)
    fa = embed_a8(model, params, [batch])
    cos = np.sum(f * fa, 1) / np.linalg.norm(fa, axis=1)
    assert 0.99 < cos.min() and np.abs(fa - f).max() > 0, cos.min()


@pytest.fixture(scope="module")
def toy_zq(toy):
    """ZeroQuant-FP (GPTQ, act-order, g16, M2, FP8 per token) and its RTN-FP4 counterpart on the toy BERT."""
    model, params, batch = toy
    before = jax.tree_util.tree_map(np.array, params)
    cfg = _cfg(act_order=True)
    q, rep = zeroquant_fp(params, model, batch, cfg, progress=False)
    q_rtn, rep_rtn = zeroquant_fp(params, model, None, dataclasses.replace(cfg, algorithm="rtn"), progress=False)
    return before, q, rep, q_rtn, rep_rtn


def test_zeroquant_fp_toy_bert_and_config_validation(toy, toy_zq):
    model, params, batch = toy
    before, q, rep, q_rtn, rep_rtn = toy_zq
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, params))
    assert len(rep["layers"]) == 12 and rep["cast_exact"] is True and rep_rtn["cast_exact"] is True
    f = np.asarray(model.forward(params, batch))
    err = lambda p: float(np.mean((embed_a8(model, p, [batch]) - f) ** 2))
    # W4A8 on the calibration batch: GPTQ on the FP4 grid must reduce the output error of RTN-FP4
    assert err(q) < err(q_rtn), (err(q), err(q_rtn))
    for p, r in rep["layers"].items():
        assert 0 < r["error"] < 0.1, (p, r["error"])  # relative output error of each FP4 linear on X̂
    np.testing.assert_array_equal(np.asarray(q["embeddings"]["norm"]["scale"]),
                                  np.asarray(params["embeddings"]["norm"]["scale"]))
    bad = [dict(pow2="m3"), dict(weight_format="int4"), dict(act_format="e9m9"), dict(act_granularity="row"),
           dict(algorithm="awq"), dict(group_size=0), dict(block_size=0), dict(percdamp=0.0),
           dict(weight_format="e4m3", act_format="e5m2"), dict(group_size=-1, static_groups=True)]
    for kw in bad:
        with pytest.raises(ValueError):
            zeroquant_fp(params, model, batch, _cfg(**kw), progress=False)
    with pytest.raises(ValueError, match="divisible"):  # hidden 32: rejected before any block runs
        zeroquant_fp(params, model, batch, _cfg(group_size=24), progress=False)
    with pytest.raises(ValueError, match="calibration"):
        zeroquant_fp(params, model, None, _cfg(), progress=False)
    with pytest.raises(ValueError, match="granularity"):
        fp_act_quant(jnp.ones((2, 4)), granularity="channel")


def test_sharded_equals_single_device(mesh_2d):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, w = _layer(6)
    H = hessian_from_inputs(x)
    ws = jax.device_put(jnp.asarray(w), NamedSharding(mesh_2d, P(None, "model")))
    Hs = jax.device_put(H, NamedSharding(mesh_2d, P("model", None)))
    cfg = _cfg(act_order=True)
    a, b = zeroquant_fp_weight(ws, Hs, cfg), zeroquant_fp_weight(w, H, cfg)
    for key in ("weight", "codes", "scale", "exponent", "anchor"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh_2d, P("data", None)))
    np.testing.assert_array_equal(np.asarray(fp_act_quant(xs)), np.asarray(fp_act_quant(jnp.asarray(x))))
    wq = zeroquant_fp_weight(w, None, _cfg(algorithm="rtn"))["weight"]
    wqs = jax.device_put(wq, NamedSharding(mesh_2d, P(None, "model")))
    # same SVD problem; the sharded input is gathered by XLA, so agreement is to float32 rounding
    np.testing.assert_allclose(np.asarray(lorc_weight(ws, wqs, 4)), np.asarray(lorc_weight(w, wq, 4)),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- LoRC

def _np_int8_cols(a):
    s = np.abs(a).max(0, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.round(a / s), -128, 127) * s


def test_lorc_numpy_reference_rank_and_full_rank():
    _, w = _layer(7)  # [64, 24], the shape of the sharded test: the SVD compiles once
    wq = np.asarray(_round_trip(jnp.asarray(w), IntFormat(3, granularity="group", group_size=16)))
    E = w.astype(np.float64) - wq
    U, S, Vt = np.linalg.svd(E, full_matrices=False)
    r = 5
    Uh, Vh = U[:, :r] * np.sqrt(S[:r]), Vt[:r].T * np.sqrt(S[:r])
    # float factors: Ŵ + Û V̂ᵀ (the SVD's sign ambiguity cancels in the product); float32 vs float64
    np.testing.assert_allclose(np.asarray(lorc_weight(w, wq, r, None)), wq + Uh @ Vh.T, rtol=0, atol=2e-6)
    # int8 per-column factors: a float32/float64 difference can flip a rounding tie in a rare element, so compare
    # the corrections in relative Frobenius norm (one flipped level changes it by ~1/127 of a column's max)
    ref = _np_int8_cols(Uh) @ _np_int8_cols(Vh).T
    got = np.asarray(lorc_weight(w, wq, r), np.float64) - wq
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3
    Ujx, Vjx = lorc_factors(w, wq, r)
    np.testing.assert_allclose(np.abs(np.asarray(Ujx)).max(0), np.abs(Uh).max(0), rtol=1e-4)
    # error non-increasing in the rank and equal to the Eckart-Young tail sqrt(Σ_{i>r} σ_i²); zero at full rank
    errs = [np.linalg.norm(w - np.asarray(lorc_weight(w, wq, k, None))) for k in range(1, 25)]  # one compile
    assert np.all(np.diff(errs) <= 1e-6), errs
    tail = [np.sqrt(np.sum(S[k:] ** 2)) for k in range(1, 25)]
    np.testing.assert_allclose(errs, tail, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lorc_weight(w, wq, 24, None)), w, rtol=0, atol=2e-6)
    jitted = jax.jit(lorc_weight, static_argnums=(2, 3))
    np.testing.assert_allclose(np.asarray(jitted(w, wq, r, None)), np.asarray(lorc_weight(w, wq, r, None)),
                               atol=1e-7)


def test_lorc_on_any_method_storage_and_validation(toy, toy_zq):
    model, params, batch = toy
    before = jax.tree_util.tree_map(np.array, params)
    qs = {"rtn_int3": rtn(params, model, None, RTNConfig(3, 16), progress=False)[0],
          "zeroquant_fp_gptq": toy_zq[1], "zeroquant_fp_rtn": toy_zq[3]}
    f = np.asarray(model.forward(params, batch))
    for name, q in qs.items():
        q0 = jax.tree_util.tree_map(np.array, q)
        out, rep = lorc(params, q, 8, progress=False)
        jax.tree_util.tree_map(np.testing.assert_array_equal, q0, jax.tree_util.tree_map(np.array, q))
        assert len(rep["layers"]) == 12, name  # every quantized kernel; embeddings, norms, biases untouched
        for p, r in rep["layers"].items():
            # the rank-8 correction removes the top of the error spectrum: each kernel's error must drop
            assert r["error_after"] < r["error_before"], (name, p, r)
        np.testing.assert_array_equal(np.asarray(out["layer_0"]["attention"]["query"]["bias"]),
                                      np.asarray(q["layer_0"]["attention"]["query"]["bias"]))
        if "rtn" in name:
            # RTN's error is unstructured: removing its top singular directions also lowers the output error.
            # (GPTQ's Ŵ already minimizes ‖X(W − Ŵ)‖, so a smaller ‖W − Ŵ‖_F need not lower the output error of
            # the toy model, measured +3%; only the weight error is asserted for it.)
            e = lambda p: float(np.mean((np.asarray(model.forward(p, batch)) - f) ** 2))
            assert e(out) < e(q), (name, e(out), e(q))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, params))
    # storage: r (m + n) 8 bits + one fp16 scale per rank component of each factor
    assert lorc_bits_per_weight((384, 1536), 8) == pytest.approx((8 * 1920 * 8 + 16 * 16) / (384 * 1536))
    assert lorc_bits_per_weight((384, 1536), 8, None) == pytest.approx(8 * 1920 * 16 / (384 * 1536))
    _, rep = lorc(params, qs["rtn_int3"], 8, progress=False)
    # every toy kernel is 32x32: (8·64·8 bits of factors + 16 fp16 scales) / 1024 weights
    assert rep["bits_per_weight"] == pytest.approx((8 * 64 * 8 + 16 * 16) / 1024)
    for bad in (0, -1, 2.0, True, 33):  # 33 > min(32, 32): rejected before any SVD
        with pytest.raises(ValueError):
            lorc(params, qs["rtn_int3"], bad, progress=False)
    with pytest.raises(ValueError):
        lorc(params, {"other": 1}, 4, progress=False)


# ----------------------------------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
    from jaxmodels.models.bert import load_minilm
    from quant.ptq.evaluate import embed_batches
    from quant.ptq.minilm import bert_block_model, calibration_sentences, evaluation_sentences

    emb = load_minilm(max_length=32)
    model = bert_block_model(emb)
    # calibration and evaluation batches of one shape [32, 32]: the W4A8 block function compiles once
    calib = emb.tokenizer(calibration_sentences(32))
    ev = [emb.tokenizer(evaluation_sentences(32))]
    assert calib["input_ids"].shape == ev[0]["input_ids"].shape
    return model, emb.params, calib, ev, embed_batches(model, emb.params, ev)


@pytest.mark.slow
def test_minilm_w4a8_zeroquant_fp_and_lorc(minilm):
    from quant.ptq.evaluate import embed_batches, embedding_metrics

    model, params, calib, ev, e_float = minilm
    cos = lambda e: embedding_metrics(e_float, e)["cosine"]
    cfg = ZeroQuantFPConfig(group_size=128, pow2="m2")  # W4 (FP4 E2M1 g128, M2 scales) A8 (FP8 E4M3 per token)
    q_zq, rep = zeroquant_fp(params, model, calib, cfg, progress=False)
    q_fp4, _ = zeroquant_fp(params, model, None, dataclasses.replace(cfg, algorithm="rtn"), progress=False)
    q_int4, _ = rtn(params, model, None, RTNConfig(4, 128), progress=False)
    c = {"zeroquant_fp_w4a8": cos(embed_a8(model, q_zq, ev)), "rtn_fp4_w4a8": cos(embed_a8(model, q_fp4, ev)),
         "rtn_int4_w4a16": cos(embed_batches(model, q_int4, ev))}
    print("\nMiniLM embedding cosine:", {k: round(v, 4) for k, v in c.items()})
    assert rep["cast_exact"] is True  # every FP4 weight of the model casts to FP8 with a pure exponent shift
    # measured (32 calibration / 32 held-out sentences): ZeroQuant-FP 0.971 > INT4 RTN 0.958 (W4A16) > RTN-FP4 M2
    # 0.957 (64 / 64: 0.975, 0.960, 0.957; 24 calibration sentences: 0.966); GPTQ's error feedback must beat both
    # RTN baselines (by > 0.005) even with FP8 activations on top
    assert c["zeroquant_fp_w4a8"] > c["rtn_fp4_w4a8"] + 0.005, c
    assert c["zeroquant_fp_w4a8"] > c["rtn_int4_w4a16"] + 0.005, c
    # (LoRC on the MiniLM, RTN W3 g128 + rank 8 > RTN W3 g128, is asserted on the PTQ colab's table, which computes
    # both rows anyway: tests/quant/ptq/test_colab_ptq.py)
