"""Formats pinned to independent sources: FP8 specials against ml_dtypes, OCP MX against torchao, NF4 against
bitsandbytes (tests/data/quant_reference.npz, made by scripts/make_quant_reference.py), and the one integer grid
against the formulas it replaced."""

import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import quant
from quant import formats as F
from quant.ptq import _common as C

REF = np.load(pathlib.Path(__file__).parents[1] / "data" / "quant_reference.npz")
FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
NAN_CODES = {"e4m3": (0x7F, 0xFF), "e5m2": (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF)}


# ----------------------------------------------------------------------------------------------------- FP8 specials

@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_all_256_codes_decode_and_reencode_like_ml_dtypes(name):
    dt = FP8[name]
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(dt).astype(np.float32)
    ours = np.asarray(F.float_decode(jnp.asarray(codes), name))
    np.testing.assert_array_equal(ours, ref)  # NaN where ml_dtypes has NaN, +-inf (e5m2), every finite value
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(ref))
    # re-encoding the decoded values gives ml_dtypes' cast of them (NaN payload codes collapse to the canonical NaN)
    np.testing.assert_array_equal(np.asarray(F.float_encode(jnp.asarray(ref), name)), ref.astype(dt).view(np.uint8))


@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_special_inputs_match_ml_dtypes_and_packed_equals_round_trip(name):
    dt, fmax = FP8[name], F.float_max(name)
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e6, -1e6, fmax, -fmax, 500.0, 1e-9, 3.3, -2.1e-3],
                 np.float32)
    finite = np.isfinite(x)
    # the documented rule: non-finite values as ml_dtypes' cast; finite values saturate at +-max
    want = np.where(finite, np.clip(x, -fmax, fmax), x).astype(dt)
    fmt = quant.FloatFormat(name, scaled=False)
    qp = quant.compute_qparams(x, fmt)
    codes = np.asarray(quant.encode(x, fmt, qp))
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(codes[~nan], want.view(np.uint8)[~nan])
    assert np.isin(codes[nan], NAN_CODES[name]).all()  # (the sign of a NaN is not portable through arithmetic)
    rt = np.asarray(quant.round_trip(x, fmt))
    np.testing.assert_array_equal(rt, want.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(x[None], fmt)))[0], rt)
    # the same under jit
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: quant.dequantize(quant.quantize(a, fmt)))(x[None]))[0],
                                  rt)


@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_scaled_block_ignores_specials_in_its_scale(name):
    w = np.array(jax.random.normal(jax.random.key(0), (32, 4)), np.float32)
    bad = w.copy()
    bad[3, 0], bad[5, 1], bad[7, 1] = np.nan, np.inf, -np.inf
    fmt = quant.FloatFormat(name, granularity="channel")
    clean = np.where(np.isfinite(bad), bad, 0.0)
    np.testing.assert_array_equal(np.asarray(quant.compute_qparams(bad, fmt).scale),
                                  np.asarray(quant.compute_qparams(clean, fmt).scale))
    y = np.asarray(quant.dequantize(quant.quantize(bad, fmt)))
    np.testing.assert_array_equal(y, np.asarray(quant.round_trip(bad, fmt)))
    fin = np.isfinite(bad)
    np.testing.assert_array_equal(y[fin], np.asarray(quant.round_trip(clean, fmt))[fin])
    assert np.isnan(y[3, 0])
    if name == "e5m2":
        assert y[5, 1] == np.inf and y[7, 1] == -np.inf
    else:  # e4m3fn has no inf: NaN, as ml_dtypes
        assert np.isnan(y[5, 1]) and np.isnan(y[7, 1])


NO_NAN_FORMATS = [quant.FP6_E3M2, quant.FP6_E2M3, quant.FloatFormat("e2m1", granularity="channel"),
                  quant.FloatFormat("e2m1", scaled=False, granularity="channel"), quant.IntFormat(4), quant.IntFormat(3, symmetric=False),
                  quant.NF4Format(group_size=8), quant.TERNARY, quant.BINARY]


@pytest.mark.parametrize("fmt,special", [(f, np.nan) for f in NO_NAN_FORMATS] + [(NO_NAN_FORMATS[2], np.inf),
                                                                               (NO_NAN_FORMATS[4], -np.inf)],
                         ids=lambda v: f"{type(v).__name__}{v.bits}" if hasattr(v, "bits") else str(v))
def test_formats_without_nan_refuse_non_finite_and_poison_the_block_under_jit(fmt, special):
    w = np.array(jax.random.normal(jax.random.key(1), (16, 4)), np.float32)
    w[2, 1] = special
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.quantize(w, fmt)
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.round_trip(w, fmt)
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.encode(w, fmt, quant.compute_qparams(np.zeros_like(w), fmt))
    y, rt, scale = jax.jit(lambda a: (quant.dequantize(quant.quantize(a, fmt)), quant.round_trip(a, fmt),
                                      quant.compute_qparams(a, fmt).scale))(w)
    y = np.asarray(y)
    np.testing.assert_array_equal(y, np.asarray(rt))
    block = np.broadcast_to(np.isnan(np.asarray(quant.expand(scale, w.shape))), w.shape)
    assert block[2, 1] and np.isnan(y[block]).all()  # the block of the bad element is NaN, never a silent value
    clean = w.copy(); clean[2, 1] = 0.0
    np.testing.assert_array_equal(y[~block], np.asarray(quant.round_trip(clean, fmt))[~block])
    assert np.shape(scale) == np.shape(quant.compute_qparams(clean, fmt).scale)  # the stored layout is unchanged


# ----------------------------------------------------------------------------------------------------- MX

MX_ELEMS = ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"]


@pytest.mark.parametrize("elem", MX_ELEMS)
def test_mx_bit_for_bit_against_torchao(elem):
    x = REF["mx_x"]  # [24, 64], blocks of 32 along the last axis (torchao's layout)
    fmt = quant.MXFormat(elem, in_axis=-1, out_axis=-2)
    qp = quant.compute_qparams(x, fmt)
    np.testing.assert_array_equal(np.asarray(qp.scale), REF[f"mx_{elem}_scale"])
    ok = np.repeat(REF[f"mx_{elem}_scale"] != 255, 32, axis=1)  # element codes of a NaN-scale block are moot
    np.testing.assert_array_equal(np.asarray(quant.encode(x, fmt, qp))[ok], REF[f"mx_{elem}_codes"][ok])
    qa = quant.quantize(x, fmt)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), REF[f"mx_{elem}_deq"])
    np.testing.assert_array_equal(np.asarray(quant.round_trip(x, fmt)), REF[f"mx_{elem}_deq"])
    assert qa.scale.dtype == jnp.uint8


@pytest.mark.parametrize("elem", ["e4m3", "e3m2", "e2m1"])
def test_mx_kernel_layout_storage_fake_quant_and_jit(elem):
    w = jax.random.normal(jax.random.key(2), (64, 16), jnp.float32)  # Dense [in, out]: blocks along in
    fmt = quant.MXFormat(elem)
    qa = quant.quantize(w, fmt)
    assert qa.scale.shape == (2, 16)
    assert qa.bits_per_element == fmt.bits + 8 / 32  # element bits + one E8M0 byte per 32
    ref = quant.round_trip(w.T, quant.MXFormat(elem, in_axis=-1, out_axis=-2)).T
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), np.asarray(ref))
    f = jax.jit(lambda a: quant.fake_quant(a, fmt))
    np.testing.assert_array_equal(np.asarray(f(w)), np.asarray(ref))
    g = np.asarray(jax.grad(lambda a: jnp.sum(quant.fake_quant(a, fmt) * 3.0))(w))
    lo, hi = quant.representable_range(fmt, quant.compute_qparams(w, fmt), w.shape)  # +-max_elem * X
    inside = (np.asarray(w) >= np.asarray(lo)) & (np.asarray(w) <= np.asarray(hi))
    assert 0 < (~inside).sum() < 0.05 * w.size  # MX saturates the top of the binade: those get no gradient
    np.testing.assert_array_equal(g, np.where(inside, 3.0, 0.0).astype(np.float32))


def test_mx_is_not_the_pow2_round_up_mode():
    """OCP MX floors amax's exponent and saturates; FloatFormat(pow2_scale=True) rounds the scale up."""
    x = np.zeros((1, 32), np.float32)
    x[0, :3] = [7.0, 1.0, -1.5]
    mx = quant.MXFormat("e2m1", in_axis=-1, out_axis=-2)
    assert int(quant.compute_qparams(x, mx).scale[0, 0]) == 127  # X = 2^(floor(log2 7) - 2) = 1
    np.testing.assert_array_equal(np.asarray(quant.round_trip(x, mx))[0, :3], [6.0, 1.0, -1.5])  # 7 clips to 6
    up = quant.FloatFormat("e2m1", granularity="channel", pow2_scale=True, in_axis=-1, out_axis=-2)
    assert float(quant.compute_qparams(x, up).scale[0, 0]) == 2.0  # 2^ceil(log2(7/6))
    np.testing.assert_array_equal(np.asarray(quant.round_trip(x, up))[0, :3], [8.0, 1.0, -2.0])  # 3.5, -0.75: ties


def test_mx_e8m0_range_and_non_finite_blocks():
    x = np.zeros((4, 32), np.float32)
    x[0] = np.float32(2.0 ** -125) * np.linspace(-1, 1, 32, dtype=np.float32)  # e = -125 - 2 -> clamped to -127
    x[1, 3] = np.nan
    x[2, 5] = -np.inf
    x[3] = 3e38  # floor(log2) = 127, e = 125
    fmt = quant.MXFormat("e2m1", in_axis=-1, out_axis=-2)
    codes = np.asarray(quant.compute_qparams(x, fmt).scale)[:, 0]
    np.testing.assert_array_equal(codes, [0, 255, 255, 252])
    y = np.asarray(quant.dequantize(quant.quantize(x, fmt)))
    # the spec's X = 2^-127 (not torchao's 2^-126): +-2^-125 -> element 4 -> 4 * 2^-127
    assert y[0, 0] == -(2.0 ** -125) and y[0, -1] == 2.0 ** -125
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()  # a non-finite element makes its whole block NaN
    np.testing.assert_array_equal(y[3], np.float32(2.0 ** 125) * 6)  # 3e38 / 2^125 = 7.05 saturates at 6
    assert np.isnan(np.asarray(quant.e8m0_to_float(np.uint8(255)))) and float(quant.e8m0_to_float(np.uint8(127))) == 1


# ----------------------------------------------------------------------------------------------------- NF4

def test_nf4_levels_are_bitsandbytes_table():
    np.testing.assert_array_equal(quant.NF4_LEVELS, REF["nf4_table"])  # bitsandbytes get_4bit_type("nf4")
    np.testing.assert_allclose(quant.NF4_LEVELS, REF["nf4_normal_map"], rtol=0, atol=1e-7)  # create_normal_map


def test_nf4_quantize_matches_bitsandbytes_quantize_4bit():
    x = REF["nf4_x"]  # [8, 64]: bitsandbytes' 64-element blocks along the last axis
    fmt = quant.NF4Format(group_size=64, in_axis=-1, out_axis=-2)
    qp = quant.compute_qparams(x, fmt)
    np.testing.assert_array_equal(np.asarray(qp.scale)[:, 0], REF["nf4_absmax"])
    np.testing.assert_array_equal(np.asarray(quant.encode(x, fmt, qp)), REF["nf4_codes"])
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(x, fmt))), REF["nf4_deq"])


# ----------------------------------------------------------------------------------------------------- int grid

def _q(x, c):  # x / c as the IEEE quotient (quant.intgrid since 08962b3; XLA turned the constant division into x * (1/c))
    return x / jnp.full(jnp.shape(x), c, jnp.float32)


def _old_minmax_params(x, bits, sym):  # quant/ptq/_common.py at 0cb843d
    maxq = 2**bits - 1
    xmin = jnp.minimum(x.min(axis=1), 0.0)
    xmax = jnp.maximum(x.max(axis=1), 0.0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both0, -1.0, xmin)
    xmax = jnp.where(both0, 1.0, xmax)
    scale = _q(xmax - xmin, maxq)
    zero = jnp.full_like(scale, (maxq + 1) / 2) if sym else jnp.round(-xmin / scale)
    return scale, zero


def _old_awq(w, bits, gs, zero_point):  # quant/ptq/_common.py awq_grid / awq_pseudo_quantize at 0cb843d
    g = C.group_view(w, gs)
    if zero_point:
        mx, mn = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
        maxq = 2**bits - 1
        scale = _q(jnp.maximum(mx - mn, 1e-5), maxq)
        zero = jnp.clip(-jnp.round(mn / scale), 0, maxq)
        out = (jnp.clip(jnp.round(g / scale) + zero, 0, maxq) - zero) * scale
        return out.reshape(w.shape), scale[..., 0], zero[..., 0]
    mx = jnp.maximum(jnp.abs(g).max(-1, keepdims=True), 1e-5)
    qmax = 2 ** (bits - 1) - 1
    scale = _q(mx, qmax)
    return (jnp.clip(jnp.round(g / scale), -qmax - 1, qmax) * scale).reshape(w.shape), None, None


def _old_intformat(x, fmt):  # quant/formats.py compute_qparams (IntFormat) at 0cb843d
    c = fmt.clip_ratio
    safe = lambda s: jnp.where(s > jnp.finfo(jnp.float32).tiny, s, 1.0)  # noqa: E731
    pow2 = lambda s: jnp.exp2(jnp.ceil(jnp.log2(s)))  # noqa: E731
    if fmt.symmetric:
        s = safe(_q(c * F.reduce_stats(jnp.abs(x), fmt, jnp.max), 2 ** (fmt.bits - 1) - 1))
        return (pow2(s) if fmt.pow2_scale else s), None
    lo = jnp.minimum(c * F.reduce_stats(x, fmt, jnp.min), 0.0)
    hi = jnp.maximum(c * F.reduce_stats(x, fmt, jnp.max), 0.0)
    s = safe(_q(hi - lo, 2 ** fmt.bits - 1))
    s = pow2(s) if fmt.pow2_scale else s
    return s, jnp.clip(jnp.round(-lo / s), 0, 2 ** fmt.bits - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_one_int_grid_is_bit_identical_to_the_formulas_it_replaced(bits):
    w = np.array(jax.random.normal(jax.random.key(bits), (24, 64)), np.float32)
    w[3] = 0.0  # all-zero row / groups
    w[5] = np.abs(w[5])  # all-positive row: min > 0 (AWQ's range does not contain 0)
    w[7, :16] = 0.0
    for sym in (False, True):
        for new, old in zip(C.minmax_params(jnp.asarray(w), bits, sym), _old_minmax_params(jnp.asarray(w), bits, sym)):
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    for zp in (True, False):
        out, s, z = _old_awq(jnp.asarray(w), bits, 16, zp)
        np.testing.assert_array_equal(np.asarray(C.awq_pseudo_quantize(jnp.asarray(w), bits, 16, zp)), np.asarray(out))
        if zp:
            ns, nz = C.awq_grid(jnp.asarray(w), bits, 16)
            np.testing.assert_array_equal(np.asarray(ns), np.asarray(s))
            np.testing.assert_array_equal(np.asarray(nz), np.asarray(z))
    for fmt in (quant.IntFormat(bits), quant.IntFormat(bits, symmetric=False, granularity="group", group_size=8),
                quant.IntFormat(bits, symmetric=False, pow2_scale=True, clip_ratio=0.9),
                quant.IntFormat(bits, pow2_scale=True, granularity="tensor")):
        qp = quant.compute_qparams(w, fmt)
        s, z = _old_intformat(jnp.asarray(w), fmt)
        np.testing.assert_array_equal(np.asarray(qp.scale), np.asarray(s))
        if z is not None:
            np.testing.assert_array_equal(np.asarray(qp.zero), np.asarray(z))


def test_two_symmetric_int_grids_are_named_apart():
    """GPTQ offset grid (rtn/gptq sym=True): s = 2 amax / (2^b - 1), z = 2^(b-1), +amax clips to 7/7.5 amax at 4
    bits; absmax grid (IntFormat(symmetric=True)): s = amax / (2^(b-1) - 1), +-amax exact."""
    row = jnp.asarray([[1.5, -0.3, 0.7, 0.0]])
    s, z = C.minmax_params(row, 4, True)
    np.testing.assert_allclose(np.asarray(s), [2 * 1.5 / 15], rtol=1e-7)
    assert float(z[0]) == 8.0
    np.testing.assert_allclose(float(C.qdq(row, s[:, None], z[:, None], 15)[0, 0]), 7 / 7.5 * 1.5, rtol=1e-6)
    fmt = quant.IntFormat(4, granularity="tensor")
    np.testing.assert_allclose(float(quant.compute_qparams(row, fmt).scale[0, 0]), 1.5 / 7, rtol=1e-7)
    assert float(quant.round_trip(row, fmt)[0, 0]) == 1.5
