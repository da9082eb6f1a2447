"""OCNN kernel orthogonality: the regularizer against a NumPy loop transcription of the paper's equation (padding,
stride, the authors' padding=1 / unsquared form), its link to the circular operator (‖𝒦𝒦ᵀ − I‖² = n²·L), singular
values (FFT vs explicit operator vs NumPy), the tree penalty, sharding, validation, and the claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis.orthogonality import (conv_conditioning, conv_orthogonality_loss, conv_singular_values,
                                              default_padding, matrix_orthogonality_loss, orthogonality_penalty)
from tests.jaxmodels.analysis.digits_cnn import apply_fn, trained_cnns


def np_conv_orth(kf, stride, padding=None, squared=True):
    """Wang et al. eq. 7 by loops: Z[a, b, y, x] = Σ_{c,h,w} pad(K)[a, c, yS + h, xS + w] · K[b, c, h, w]."""
    k = np.transpose(np.asarray(kf, np.float64), (3, 2, 0, 1))  # [M, C, kh, kw]
    m, _, kh, kw = k.shape
    p = ((kh - 1) // stride) * stride if padding is None else padding
    kp = np.pad(k, ((0, 0), (0, 0), (p, p), (p, p)))
    r = (kh + 2 * p - kh) // stride + 1
    z = np.zeros((m, m, r, r))
    for a in range(m):
        for b in range(m):
            for yy in range(r):
                for xx in range(r):
                    win = kp[a, :, yy * stride:yy * stride + kh, xx * stride:xx * stride + kw]
                    z[a, b, yy, xx] = np.sum(win * k[b])
    z[np.arange(m), np.arange(m), r // 2, r // 2] -= 1.0
    sq = np.sum(z ** 2)
    return sq if squared else np.sqrt(sq)


def np_operator(kf, n, stride=1, mode="circular"):
    """The layer as a matrix [n²C, n'²M] (row = image of one basis input), by loops over output pixels."""
    k = np.asarray(kf, np.float64)
    kh, kw, c, m = k.shape
    if mode == "circular":
        lo, out = (kh - 1) // 2, n
    else:  # XLA "SAME": pad total max((out-1)·S + k - n, 0), the smaller half on the left
        out = -(-n // stride)
        lo = max((out - 1) * stride + kh - n, 0) // 2
    op = np.zeros((n, n, c, out, out, m))
    for i in range(out):
        for j in range(out):
            for h in range(kh):
                for w in range(kw):
                    u, v = i * stride + h - lo, j * stride + w - lo
                    if mode == "circular":
                        u, v = u % n, v % n
                    elif not (0 <= u < n and 0 <= v < n):
                        continue
                    op[u, v, :, i, j, :] += k[h, w]
    return op.reshape(n * n * c, out * out * m)


@pytest.mark.parametrize("shape,stride,padding", [((3, 3, 3, 4), 1, None), ((3, 3, 3, 4), 2, None),
                                                  ((5, 5, 2, 3), 2, None), ((3, 3, 3, 4), 1, 1)])
def test_conv_loss_matches_numpy_transcription(shape, stride, padding):
    kf = np.random.default_rng(0).standard_normal(shape).astype(np.float32) / 3
    before = kf.copy()
    got = conv_orthogonality_loss(kf, stride, padding)
    np.testing.assert_allclose(float(got), np_conv_orth(kf, stride, padding), rtol=2e-6)
    np.testing.assert_allclose(float(conv_orthogonality_loss(kf, stride, padding, squared=False)),
                               np_conv_orth(kf, stride, padding, squared=False), rtol=2e-6)
    np.testing.assert_array_equal(kf, before)
    assert default_padding(3, 1) == 2 and default_padding(3, 2) == 2 and default_padding(5, 2) == 4


def test_invariants_delta_orthogonal_and_circular_operator_identity():
    r = np.random.default_rng(1)
    q, _ = np.linalg.qr(r.standard_normal((8, 8)))
    delta = np.zeros((3, 3, 8, 6), np.float32)
    delta[1, 1] = q[:, :6]  # orthonormal filters at the centre: an orthogonal (row-isometric) layer
    assert float(conv_orthogonality_loss(delta, 1)) < 1e-10
    assert float(conv_orthogonality_loss(delta, 2)) < 1e-10
    np.testing.assert_allclose(np.asarray(conv_singular_values(delta, (6, 6))), 1.0, atol=1e-6)
    c = conv_conditioning(delta, (6, 6))
    assert abs(float(c.condition_number) - 1) < 1e-5 and float(c.isometry_error) < 1e-6
    # Achour et al.: with circular padding, stride 1 and n >= 2k - 1, ‖𝒦𝒦ᵀ − I‖_F² = n² · L_orth(K)
    kf = (r.standard_normal((3, 3, 3, 4)) / 3).astype(np.float32)
    op = np_operator(kf, 5)  # 𝒦ᵀ
    lhs = np.sum((op.T @ op - np.eye(op.shape[1])) ** 2)
    np.testing.assert_allclose(lhs, 25 * float(conv_orthogonality_loss(kf, 1)), rtol=1e-5)
    # matrices: ‖WᵀW − I‖² on the smaller side, the reference's W Wᵀ on ties
    w = r.standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_allclose(float(matrix_orthogonality_loss(w)), np.sum((w.T @ w - np.eye(4)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(matrix_orthogonality_loss(w.T, squared=False)),
                               np.linalg.norm(w.T @ w - np.eye(4)), rtol=1e-5)


def test_singular_values_fft_and_explicit_match_numpy():
    kf = (np.random.default_rng(2).standard_normal((3, 3, 3, 4)) / 3).astype(np.float32)
    ref = np.linalg.svd(np_operator(kf, 6), compute_uv=False)
    np.testing.assert_allclose(np.asarray(conv_singular_values(kf, (6, 6))), ref, rtol=1e-4, atol=1e-5)
    ref2 = np.linalg.svd(np_operator(kf, 6, 2, "same"), compute_uv=False)
    np.testing.assert_allclose(np.asarray(conv_singular_values(kf, (6, 6), 2, "SAME")), ref2, rtol=1e-4, atol=1e-5)
    c = conv_conditioning(kf, (6, 6))
    np.testing.assert_allclose(float(c.condition_number), ref[0] / ref[-1], rtol=1e-4)


def test_penalty_over_a_tree_strides_and_kinds():
    r = np.random.default_rng(3)
    tree = {"a": {"kernel": r.standard_normal((3, 3, 2, 4)).astype(np.float32)},
            "down": {"kernel": r.standard_normal((3, 3, 4, 4)).astype(np.float32)},
            "short": {"kernel": r.standard_normal((1, 1, 4, 8)).astype(np.float32)},
            "head": {"kernel": r.standard_normal((8, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}
    got = orthogonality_penalty(tree, strides={"down": 2})
    want = (np_conv_orth(tree["a"]["kernel"], 1) + np_conv_orth(tree["down"]["kernel"], 2)
            + np.sum((tree["short"]["kernel"].reshape(4, 8) @ tree["short"]["kernel"].reshape(4, 8).T
                      - np.eye(4)) ** 2))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    w = tree["head"]["kernel"]
    np.testing.assert_allclose(float(orthogonality_penalty(tree, strides={"down": 2}, dense=True)),
                               want + np.sum((w.T @ w - np.eye(3)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(orthogonality_penalty(tree, include="^a/")), np_conv_orth(tree["a"]["kernel"], 1),
                               rtol=1e-5)


def test_jit_and_sharded_kernel_equal_single_device(mesh):
    kf = (np.random.default_rng(4).standard_normal((3, 3, 8, 16)) / 6).astype(np.float32)
    f = jax.jit(jax.value_and_grad(lambda k: conv_orthogonality_loss(k, 2)))
    v1, g1 = f(jnp.asarray(kf))
    ks = jax.device_put(jnp.asarray(kf), NamedSharding(mesh, P(None, None, None, "data")))
    v2, g2 = f(ks)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)  # reduction order only
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-5, atol=1e-6)


def test_validation_errors():
    k = np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="4-D"):
        conv_orthogonality_loss(np.ones((3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        conv_orthogonality_loss(np.full((3, 3, 2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="stride"):
        conv_orthogonality_loss(k, 0)
    with pytest.raises(ValueError, match="padding"):
        conv_orthogonality_loss(k, 1, -1)
    with pytest.raises(ValueError, match="padding must be"):
        conv_singular_values(k, (4, 4), padding="reflect")
    with pytest.raises(ValueError, match="exceeds"):
        conv_singular_values(np.ones((3, 3, 64, 4), np.float32), (16, 16), padding="SAME")
    with pytest.raises(ValueError, match="no kernel"):
        orthogonality_penalty({"Dense_0": {"kernel": np.ones((2, 2), np.float32)}})
    with pytest.raises(ValueError, match="strides"):
        orthogonality_penalty({"c": {"kernel": k}}, strides={"c": 0})


def test_claim_regularizer_lowers_orthogonality_error_and_improves_conditioning():
    """Wang et al.: training with λ·L_orth makes the conv layers near-orthogonal (here conv2, 32 -> 16 channels,
    its circular 8x8 operator) at a small cost in accuracy (λ trades accuracy for isometry, Achour et al.)."""
    d, p0, plain, reg = trained_cnns()
    k_plain, k_reg = plain["conv2"]["kernel"], reg["conv2"]["kernel"]
    e_plain, e_reg = float(conv_orthogonality_loss(k_plain)), float(conv_orthogonality_loss(k_reg))
    c_plain, c_reg = conv_conditioning(k_plain, (8, 8)), conv_conditioning(k_reg, (8, 8))
    acc = [float(np.mean(np.argmax(np.asarray(apply_fn(p, d.x_test)), -1) == d.y_test)) for p in (plain, reg)]
    # measured: L_orth 4822 vs 40, condition number 40.4 vs 6.3, isometry error 1.92 vs 0.47, accuracy 0.81 vs 0.57
    assert e_reg < 0.05 * e_plain, (e_plain, e_reg)
    assert float(c_reg.condition_number) < 0.5 * float(c_plain.condition_number), (c_plain, c_reg)
    assert float(c_reg.isometry_error) < 0.5 * float(c_plain.isometry_error), (c_plain, c_reg)
    assert acc[0] > 0.6 and acc[1] > 0.4, acc  # the regularized run still learns (chance 0.1)
