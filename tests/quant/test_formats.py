"""Formats, packing and QuantizedArray: bit-exactness against ml_dtypes, idempotence, error bounds, round trips."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import quant
from quant import formats as F

ALL_FORMATS = [
    quant.IntFormat(2), quant.IntFormat(3, symmetric=False), quant.IntFormat(4, granularity="group", group_size=8),
    quant.IntFormat(5, granularity="input_channel"), quant.IntFormat(6, granularity="tensor", pow2_scale=True),
    quant.IntFormat(7, symmetric=False, granularity="group", group_size=4), quant.IntFormat(8, clip_ratio=0.9),
    quant.FP8_E4M3, quant.FP8_E5M2, quant.FP6_E3M2, quant.FP6_E2M3,
    quant.FloatFormat("e2m1", granularity="group", group_size=8), quant.NF4Format(group_size=8),
    quant.TERNARY, quant.BINARY,
]


def _w(shape=(32, 24), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("name", sorted(F.FLOAT_SPECS))
def test_float_rounding_bit_exact_with_ml_dtypes(name):
    dt = getattr(ml_dtypes, F.FLOAT_SPECS[name][2])
    fmax = F.float_max(name)
    assert fmax == float(ml_dtypes.finfo(dt).max)
    rng = np.random.default_rng(0)
    # wide dynamic range incl. subnormals, exact ties (all representable values and midpoints) and zeros
    allv = np.arange(2 ** (1 + sum(F.FLOAT_SPECS[name][:2])), dtype=np.uint8).view(dt).astype(np.float32)
    allv = np.sort(allv[np.isfinite(allv)])
    mids = (allv[1:] + allv[:-1]) / 2
    v = np.concatenate([rng.standard_normal(20000) * fmax * np.exp2(rng.integers(-12, 1, 20000)), allv, mids,
                        [0.0, -0.0]]).astype(np.float32)
    v = np.clip(v, -fmax, fmax)
    ours = np.asarray(F.round_to_float(v, name))
    ref = v.astype(dt).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)
    # the float32-arithmetic path (used where XLA has no native convert) is bit-exact too
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: F.round_to_float_generic(a, name))(v)), ref)
    # bit patterns: our encoder matches ml_dtypes' storage, and decodes back exactly
    codes = np.asarray(F.float_encode(jnp.asarray(ours), name))
    np.testing.assert_array_equal(codes, v.astype(dt).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(F.float_decode(jnp.asarray(codes), name)), ref)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f"{type(f).__name__}{f.bits}")
def test_round_trip_idempotent_and_packed_equals_fake(fmt):
    w = _w()
    qp = quant.compute_qparams(w, fmt)
    y = quant.round_trip(w, fmt, qp)
    # idempotence with the same parameters: quantized values are grid points
    np.testing.assert_array_equal(np.asarray(quant.round_trip(y, fmt, qp)), np.asarray(y))
    qa = quant.quantize(w, fmt)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), np.asarray(y))
    # decode(encode) is the identity on values
    np.testing.assert_array_equal(np.asarray(quant.decode(quant.encode(w, fmt, qp), fmt, qp)), np.asarray(y))
    # measured storage: packed codes + params
    n_codes = np.asarray(qa.packed).size
    assert n_codes == 32 * quant.packed_last_dim(24, fmt.bits)
    assert qa.nbytes == n_codes + qa.scale.size * 4 + (0 if qa.zero is None else qa.zero.size)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_error_bound_and_reference(bits, symmetric):
    w = _w((64, 16), seed=bits)
    fmt = quant.IntFormat(bits, symmetric=symmetric, granularity="group", group_size=16)
    qp = quant.compute_qparams(w, fmt)
    s = np.asarray(quant.expand(qp.scale, w.shape))
    y = np.asarray(quant.round_trip(w, fmt, qp))
    lo, hi = map(np.asarray, quant.representable_range(fmt, qp, w.shape))
    # s * qmax may sit 1 float32 ulp below max|x|: widen the range by a relative 1e-6
    inside = (np.asarray(w) >= lo - 1e-6 * np.abs(lo)) & (np.asarray(w) <= hi + 1e-6 * np.abs(hi))
    err = np.abs(np.asarray(w) - y)
    # |x - q(x)| <= s/2 inside the range (+ relative 1e-6 slack for the float32 division)
    assert np.all(err[inside] <= (s / 2 * (1 + 1e-6))[inside])
    if symmetric:
        assert inside.all()  # absmax scaling clips nothing
    else:  # the rounded zero point can shift the grid by < s/2, so extremes may fall up to s/2 outside
        assert np.all(err <= s * (1 + 1e-6))
    # independent NumPy reference of the paper equations (per group of 16 input rows, per output column)
    wn = np.asarray(w).reshape(4, 16, 16)
    if symmetric:
        sr = np.abs(wn).max(1, keepdims=True) / (2 ** (bits - 1) - 1)
        ref = np.clip(np.round(wn / sr), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * sr
    else:
        lo_, hi_ = np.minimum(wn.min(1, keepdims=True), 0), np.maximum(wn.max(1, keepdims=True), 0)
        sr = (hi_ - lo_) / (2 ** bits - 1)
        z = np.round(-lo_ / sr)
        ref = (np.clip(np.round(wn / sr) + z, 0, 2 ** bits - 1) - z) * sr
    # float32 rounding of x/s may flip a tie: allow one step on at most a few elements
    diff = np.abs(ref.reshape(64, 16) - y)
    assert np.mean(diff > 1e-6) < 0.01 and np.all(diff <= s * (1 + 1e-5))


def test_granularity_shapes_and_axes():
    w = _w((16, 12))
    shapes = {
        quant.IntFormat(4, granularity="tensor"): (1, 1),
        quant.IntFormat(4, granularity="channel"): (1, 12),
        quant.IntFormat(4, granularity="group", group_size=4): (4, 12),
        quant.IntFormat(4, granularity="input_channel"): (16, 1),
        quant.IntFormat(4, granularity="input_channel", group_size=3): (16, 4),
        quant.IntFormat(4, granularity="channel", in_axis=-1, out_axis=0): (16, 1),
    }
    for fmt, shape in shapes.items():
        assert quant.compute_qparams(w, fmt).scale.shape == shape, fmt
    conv = _w((3, 3, 8, 4))
    assert quant.compute_qparams(conv, quant.IntFormat(4, granularity="group", group_size=4)).scale.shape == (3, 3, 2, 4)
    assert quant.compute_qparams(conv, quant.IntFormat(4)).scale.shape == (1, 1, 1, 4)
    # per-input-channel isolates an outlier input row: other rows keep their small scale
    w2 = np.asarray(w).copy(); w2[3] *= 100
    err_ic = np.abs(quant.round_trip(w2, quant.IntFormat(4, granularity="input_channel")) - w2)
    err_oc = np.abs(quant.round_trip(w2, quant.IntFormat(4, granularity="channel")) - w2)
    keep = np.arange(16) != 3
    assert err_ic[keep].mean() < 0.2 * err_oc[keep].mean()


def test_pow2_scale_and_clip_ratio():
    w = _w()
    s = np.asarray(quant.compute_qparams(w, quant.IntFormat(4, pow2_scale=True)).scale)
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
    s_full = np.asarray(quant.compute_qparams(w, quant.IntFormat(4)).scale)
    assert np.all(s >= s_full)  # rounded up: range never shrinks
    s_clip = np.asarray(quant.compute_qparams(w, quant.IntFormat(4, clip_ratio=0.5)).scale)
    np.testing.assert_allclose(s_clip, 0.5 * s_full, rtol=1e-6)


def test_special_formats():
    w = _w()
    y = np.asarray(quant.round_trip(w, quant.TERNARY))
    g = float(np.mean(np.abs(np.asarray(w))))
    np.testing.assert_allclose(np.unique(np.round(y / g, 5)), [-1, 0, 1])
    ref = np.clip(np.round(np.asarray(w) / (g + 1e-8)), -1, 1) * g
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    yb = np.asarray(quant.round_trip(w, quant.BINARY))
    np.testing.assert_allclose(np.abs(yb), np.broadcast_to(np.abs(np.asarray(w)).mean(0, keepdims=True), yb.shape),
                               rtol=1e-6)
    # NF4: each element maps to its nearest level
    fmt = quant.NF4Format(group_size=8)
    s = np.asarray(quant.expand(quant.compute_qparams(w, fmt).scale, w.shape))
    yn = np.asarray(quant.round_trip(w, fmt)) / s
    idx = np.argmin(np.abs(np.asarray(w)[..., None] / s[..., None] - quant.NF4_LEVELS), -1)
    np.testing.assert_allclose(yn, quant.NF4_LEVELS[idx], atol=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trip_every_width(bits):
    rng = np.random.default_rng(bits)
    for n in (5, 24):
        codes = rng.integers(0, 2 ** bits, (3, n), dtype=np.uint8)
        packed = quant.pack_bits(codes, bits)
        assert packed.shape == (3, quant.packed_last_dim(n, bits)) and packed.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(quant.unpack_bits(packed, bits, n)), codes)


def test_int4_nibble_layout():
    packed = np.asarray(quant.pack_bits(np.array([[1, 2, 15, 0]], np.uint8), 4))
    np.testing.assert_array_equal(packed, [[0x21, 0x0F, 0, 0]])  # code 2k in the low nibble; rows pad to 8 codes
    np.testing.assert_array_equal(np.asarray(quant.pack_bits(np.array([[1, 0, 0, 0, 0, 0, 0, 7]], np.uint8), 3)),
                                  [[1, 0, 0b11100000]])


_roundtrip = jax.jit(lambda c, bits, n: quant.unpack_bits(quant.pack_bits(c, bits), bits, n), static_argnums=(1, 2))


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(1, 8), n=st.sampled_from([3, 40]), seed=st.integers(0, 2 ** 16))
def test_packing_property(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, (2, n), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(_roundtrip(codes, bits, n)), codes)


def test_quantized_array_is_pytree_and_measured_size():
    w = _w((64, 128))
    qa = quant.quantize(w, quant.IntFormat(4, granularity="group", group_size=32))
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 2
    qa2 = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(np.asarray(qa2.dequantize()), np.asarray(qa.dequantize()))
    assert qa.packed.nbytes == 64 * 128 // 2  # two int4 per byte
    assert abs(qa.bits_per_element - (4 + 32 / 32)) < 1e-9  # 4 bits + one f32 scale per 32
    out = jax.jit(lambda q: quant.dequantize(q))(qa)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qa.dequantize()))
    tree = {"embed": {"embedding": w}, "Dense_0": {"kernel": w, "bias": w[0]}}
    qt = quant.quantize_tree(tree, [(r"embed", None), (r"kernel$", quant.IntFormat(4))])
    assert quant.is_quantized(qt["Dense_0"]["kernel"]) and not quant.is_quantized(qt["embed"]["embedding"])
    assert qt["Dense_0"]["bias"] is tree["Dense_0"]["bias"]
    back = quant.dequantize_tree(qt)
    assert back["Dense_0"]["kernel"].shape == w.shape
    assert "Dense_0/kernel/packed" in __import__("jaxmodels").flatten(qt)


def test_invalid_formats_rejected():
    with pytest.raises(ValueError, match="bits"):
        quant.IntFormat(9)
    with pytest.raises(ValueError, match="group_size"):
        quant.IntFormat(4, granularity="group")
    with pytest.raises(ValueError, match="granularity"):
        quant.IntFormat(4, granularity="row")
    with pytest.raises(ValueError, match="clip_ratio"):
        quant.IntFormat(4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="name"):
        quant.FloatFormat("e6m1")
    with pytest.raises(ValueError, match="divisible"):
        quant.compute_qparams(_w((10, 4)), quant.IntFormat(4, granularity="group", group_size=4))


def test_sharded_equals_unsharded(mesh_2d):
    from jax.sharding import NamedSharding, PartitionSpec as P
    w = _w((64, 32))
    fmt = quant.IntFormat(4, granularity="group", group_size=8)
    ws = jax.device_put(w, NamedSharding(mesh_2d, P("data", "model")))
    f = jax.jit(lambda x: quant.dequantize(quant.quantize(x, fmt)))
    np.testing.assert_array_equal(np.asarray(f(ws)), np.asarray(f(w)))
    g = jax.jit(lambda x: quant.fake_quant(x, quant.FP8_E4M3))
    np.testing.assert_array_equal(np.asarray(g(ws)), np.asarray(g(w)))
    qa = jax.jit(lambda x: quant.quantize(x, fmt))(ws)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), np.asarray(f(w)))
