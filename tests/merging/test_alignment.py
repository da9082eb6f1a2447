"""Singular-vector alignment of corresponding layers (Ito, Yamada & Kumagai): NumPy reference, invariants, sharding,
validation, and the paper's claim on digits MLPs trained from different seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from merging.alignment import (l2_distance_ratio, layer_singular_alignment, mean_singular_alignment,
                               singular_alignment)
from merging.lmc import loss_barrier
from merging.permutation import apply_permutation, identity_permutation, mlp_permutation_spec, weight_matching
from tests.merging.test_ste_permutation import digits_models

SPEC = mlp_permutation_spec(2)


def _np_alignment(wa, wb, k):
    """NumPy float64 transcription: M_ij = (u_iᴬ·u_jᴮ)(v_iᴬ·v_jᴮ) over the top k singular triplets."""
    wa = np.asarray(wa, np.float64).reshape(-1, wa.shape[-1])
    wb = np.asarray(wb, np.float64).reshape(-1, wb.shape[-1])
    ua, sa, vta = np.linalg.svd(wa, full_matrices=False)
    ub, sb, vtb = np.linalg.svd(wb, full_matrices=False)
    m = np.einsum("ri,rj->ij", ua[:, :k], ub[:, :k]) * np.einsum("ic,jc->ij", vta[:k], vtb[:k])
    a = np.diag(m)
    w = sa[:k] * sb[:k]
    return sa[:k], sb[:k], m, a, a.mean(), (w * a).sum() / w.sum()


def _spread_matrix(rng, shape):
    """A random matrix with well-separated singular values (the top-k singular vectors are then well defined)."""
    w = rng.normal(size=shape)
    u, _, vt = np.linalg.svd(w.reshape(-1, shape[-1]), full_matrices=False)
    s = 2.0 ** -np.arange(len(vt))
    return ((u * s) @ vt).reshape(shape).astype(np.float32)


def test_alignment_matches_numpy_reference():
    rng = np.random.default_rng(0)
    for shape, k in (((12, 8), 5), ((3, 3, 4, 6), 6), ((5, 9), 20)):  # Dense, Conv (HWIO), k clipped to the rank
        wa = _spread_matrix(rng, shape)
        wb = (wa + 0.3 * rng.normal(size=shape) * np.abs(wa).mean()).astype(np.float32)
        got = singular_alignment(jnp.asarray(wa), jnp.asarray(wb), top_k=k)
        sa, sb, m, a, score, wscore = _np_alignment(wa, wb, min(k, *(np.prod(shape[:-1]), shape[-1])))
        # float32 SVD vs float64 (well-separated spectrum: vectors accurate to ~1e-5)
        np.testing.assert_allclose(got.sigma_a, sa, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.sigma_b, sb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.cross, m, atol=2e-4)
        np.testing.assert_allclose(got.alignment, a, atol=2e-4)
        np.testing.assert_allclose(got.left_cos * got.right_cos, np.abs(a), atol=2e-4)
        np.testing.assert_allclose(float(got.score), score, atol=2e-4)
        np.testing.assert_allclose(float(got.weighted_score), wscore, atol=2e-4)
    # l2_distance_ratio against the NumPy formula
    ta = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    tb = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    tp = {"w": tb["w"][[2, 0, 3, 1]]}
    ref = np.linalg.norm(ta["w"] - tp["w"]) / np.linalg.norm(ta["w"] - tb["w"])
    np.testing.assert_allclose(l2_distance_ratio(ta, tb, tp), ref, rtol=1e-5)


def test_invariants_permutation_moves_vectors_not_values():
    rng = np.random.default_rng(1)
    a = {f"Dense_{i}": {"kernel": _spread_matrix(rng, s), "bias": rng.normal(size=s[1:]).astype(np.float32)}
         for i, s in enumerate([(6, 16), (16, 16), (16, 4)])}
    perm = {k: rng.permutation(len(v)) for k, v in identity_permutation(a, SPEC).items()}
    b = apply_permutation(a, SPEC, perm)
    before = layer_singular_alignment(a, b, top_k=4)
    assert list(before) == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    for r in before.values():  # a permutation leaves the singular values unchanged ...
        np.testing.assert_allclose(r.sigma_a, r.sigma_b, rtol=1e-5)
    # ... and moves the singular vectors: the hidden layers are no longer aligned
    assert max(float(before[k].score) for k in before) < 0.9
    aligned = apply_permutation(b, SPEC, weight_matching(a, b, SPEC, progress=False))
    for r in layer_singular_alignment(a, aligned, top_k=4).values():  # matching the copy aligns everything
        np.testing.assert_allclose(r.alignment, 1.0, atol=1e-5)
    assert mean_singular_alignment(a, a, top_k=4) == pytest.approx(1.0, abs=1e-5)
    # symmetric in the two models; l2 ratio 0 once the copy is matched back
    ab, ba = mean_singular_alignment(a, b, top_k=4), mean_singular_alignment(b, a, top_k=4)
    assert ab == pytest.approx(ba, abs=1e-5)
    assert l2_distance_ratio(a, b, aligned) == pytest.approx(0.0, abs=1e-6)


def test_alignment_jit_and_sharded_equal_single_device(mesh):
    rng = np.random.default_rng(2)
    wa, wb = _spread_matrix(rng, (16, 24)), _spread_matrix(rng, (16, 24))
    ref = singular_alignment(wa, wb, top_k=6)
    put = NamedSharding(mesh, P("data", None))
    sa, sb = jax.device_put(wa, put), jax.device_put(wb, put)
    got = jax.jit(lambda u, v: singular_alignment(u, v, top_k=6))(sa, sb)
    # the same SVD on gathered shards; products of singular vectors agree to float32 rounding
    for x, y in zip(got, ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    tree_a, tree_b = {"l": {"kernel": sa}}, {"l": {"kernel": sb}}
    np.testing.assert_allclose(mean_singular_alignment(tree_a, tree_b, top_k=6), float(ref.score), atol=1e-5)
    np.testing.assert_allclose(l2_distance_ratio(tree_a, tree_b, tree_a), 0.0, atol=1e-7)


def test_validation():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="top_k"):
        singular_alignment(w, w, top_k=0)
    with pytest.raises(ValueError, match="shapes differ"):
        singular_alignment(w, np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="ndim"):
        singular_alignment(np.ones(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="floating"):
        singular_alignment(np.ones((4, 3), np.int32), np.ones((4, 3), np.int32))
    bad = w.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        singular_alignment(w, bad)
    with pytest.raises(ValueError, match="at 'a/kernel'"):
        layer_singular_alignment({"a": {"kernel": w}}, {"a": {"kernel": bad}})
    with pytest.raises(ValueError, match="no leaf"):
        layer_singular_alignment({"a": {"bias": w[0]}}, {"a": {"bias": w[0]}})
    with pytest.raises(ValueError):
        layer_singular_alignment({"a": {"kernel": w}}, {"b": {"kernel": w}})
    with pytest.raises(ValueError, match="identical"):
        l2_distance_ratio({"w": w}, {"w": w}, {"w": w})


def test_weight_matching_aligns_top_singular_vectors_on_digits():
    """Ito et al.: weight matching barely shortens the L2 distance, yet aligns the singular vectors of the large
    singular values (not the small ones), and that is what removes the barrier."""
    _, (a, b, _), _, _, test_loss, _ = digits_models()
    b_wm = apply_permutation(b, SPEC, weight_matching(a, b, SPEC, progress=False))
    before = layer_singular_alignment(a, b, top_k=64)
    after = layer_singular_alignment(a, b_wm, top_k=64)
    top_before = np.mean(np.concatenate([np.asarray(r.alignment[:4]) for r in before.values()]))
    top_after = np.mean(np.concatenate([np.asarray(r.alignment[:4]) for r in after.values()]))
    tail_after = np.mean(np.concatenate([np.asarray(r.alignment[8:]) for r in after.values()]))  # small σ
    ratio = l2_distance_ratio(a, b, b_wm)
    naive, wm = loss_barrier(test_loss, a, b, progress=False), loss_barrier(test_loss, a, b_wm, progress=False)
    print(f"top-4 alignment {top_before:.3f} -> {top_after:.3f} (tail after {tail_after:.3f}); L2 ratio {ratio:.3f}; "
          f"barrier {naive:.3f} -> {wm:.3f}")
    assert abs(top_before) < 0.05 and top_after > 0.15  # the top singular vectors become aligned
    assert top_after > 5 * abs(tail_after)  # mainly those of the large singular values
    for k in after:  # the permutation changed the singular vectors only, not the singular values
        np.testing.assert_allclose(after[k].sigma_b, before[k].sigma_b, rtol=1e-4)
    assert ratio > 0.6  # the distance falls by less than 40% ...
    assert wm < 0.2 * naive  # ... while the barrier falls by more than 5x
