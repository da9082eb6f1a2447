"""Bone (block affine): the merge against a NumPy transcription of the paper's block equation, the exact
inverse, validation, jit + 8-device sharding, and the convergence claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmodels.adapters import merge as lora_merge
from jaxmodels.adapters.bone import BoneConfig, bone_init, bone_merge, bone_num_params, bone_unmerge
from jaxmodels.models.mlp import MLP_RULES_TP
from jaxmodels.sharding import shard
from tests.jaxmodels.adapters import papers_helpers as H


def bone_numpy(W, B):
    """The paper in PyTorch orientation ``W [d_out, d_in]``: for every b×b block, ``W_ij + W_ij B_i + B_i``."""
    b = B.shape[-1]
    out = W.astype(np.float64).copy()
    for i in range(W.shape[0] // b):
        for j in range(W.shape[1] // b):
            Wij = W[i * b:(i + 1) * b, j * b:(j + 1) * b].astype(np.float64)
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = Wij + Wij @ B[i] + B[i]
    return out


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"Dense_0": {"kernel": f(24, 16), "bias": f(16)}, "Conv_0": {"kernel": f(3, 3, 8, 16)},
            "Dense_1": {"kernel": f(16, 8), "bias": f(8)}}


def test_merge_matches_numpy_paper_equation():
    params = _tree()
    ad = bone_init(params, BoneConfig(8))
    assert set(ad) == {"Dense_0/kernel", "Conv_0/kernel", "Dense_1/kernel"}
    rng = np.random.default_rng(1)
    ad = {k: jnp.asarray(0.3 * rng.standard_normal(v.shape), jnp.float32) for k, v in ad.items()}
    before = jax.tree.map(np.array, params)
    merged = bone_merge(params, ad)
    for p in ad:
        mod, leaf = p.split("/")
        K = np.asarray(params[mod][leaf])
        W = K.reshape(-1, K.shape[-1]).T  # torch orientation
        ref = bone_numpy(W, np.asarray(ad[p], np.float64)).T.reshape(K.shape)
        np.testing.assert_allclose(np.asarray(merged[mod][leaf]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["Dense_0"]["bias"], params["Dense_0"]["bias"])
    jax.tree.map(np.testing.assert_array_equal, params, before)  # inputs not modified
    assert bone_num_params(ad) == 16 * 8 + 16 * 8 + 8 * 8


def test_zero_init_is_identity_and_unmerge_inverts():
    params = _tree()
    ad = bone_init(params, BoneConfig(8, include=r"Dense"))
    assert set(ad) == {"Dense_0/kernel", "Dense_1/kernel"}
    jax.tree.map(np.testing.assert_array_equal, bone_merge(params, ad), params)  # B = 0: exactly W
    rng = np.random.default_rng(2)
    ad = {k: jnp.asarray(0.2 * rng.standard_normal(v.shape), jnp.float32) for k, v in ad.items()}
    back = jax.jit(lambda p, a: bone_unmerge(bone_merge(p, a), a))(params, ad)  # one compile, not op by op
    # a b×b float32 solve per output block: rounding only (cond(I + B) is small at this scale)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), back, params)


def test_validation():
    params = _tree()
    with pytest.raises(ValueError, match="block_size"):
        BoneConfig(0)
    with pytest.raises(ValueError, match=r"Conv_0/kernel.*\[16, 16\] blocks"):
        bone_init(params, BoneConfig(16))
    with pytest.raises(ValueError, match="no floating kernel"):
        bone_init(params, BoneConfig(8, include="nothing"))
    ad = bone_init(params, BoneConfig(8))
    with pytest.raises(ValueError, match="block at 'Dense_1/kernel'"):
        bone_merge(params, {**ad, "Dense_1/kernel": jnp.zeros((3, 4, 4))})
    bad = dict(ad, **{"Dense_0/kernel": ad["Dense_0/kernel"].at[0, 0, 0].set(jnp.nan)})
    with pytest.raises(ValueError, match="non-finite.*Dense_0/kernel"):
        bone_merge(params, bad)
    with pytest.raises(ValueError, match="not a leaf"):
        bone_merge(params, {"Dense_9/kernel": ad["Dense_0/kernel"]})


def test_jit_sharded_equals_single_device(mesh_2d):
    params = {k: v for k, v in _tree().items() if k.startswith("Dense")}
    rng = np.random.default_rng(3)
    ad = {k: jnp.asarray(0.3 * rng.standard_normal(v.shape), jnp.float32)
          for k, v in bone_init(params, BoneConfig(8)).items()}
    ref = bone_merge(params, ad)
    sp = shard(params, MLP_RULES_TP, mesh_2d)
    # Dense_0's two output blocks split like its column-parallel kernel; Dense_1 has one block: replicated
    sad = shard(ad, [(r"Dense_0", P("model")), (r".*", P())], mesh_2d)
    out = jax.jit(bone_merge)(sp, sad)
    # the same products and sums; XLA may fuse / order the b-term reduction differently when sharded
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out, ref)
    assert not out["Dense_0"]["kernel"].sharding.is_fully_replicated


@pytest.mark.slow
def test_claim_bone_converges_faster_than_lora_at_equal_params():
    """Bone's claim (faster convergence than LoRA at equal trainable parameters) on the mirrored-digits task:
    Dense_0/Dense_1 (64×64) adapted, the head trained in both arms; Bone b = 8 and LoRA r = 4 both have 1024
    adapter parameters; 300 Adam steps of 128 rows at lr 1e-2.

    Measured (this seed): mean loss over the first 50 steps Bone 1.04 vs LoRA 1.69; mean loss over the last 50
    steps 0.072 vs 0.038; Bone's test accuracy 0.95 (the base on mirrored digits: 0.41). So the
    early-convergence half holds here; the "better final fit" half does not at this scale (LoRA ends lower),
    which the assertion records rather than hides."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    inc = r"Dense_[01]/kernel$"
    ad = bone_init(base, BoneConfig(8, include=inc))
    lora, cfg = H.lora_init(base, ("Dense_0", "Dense_1"), 4)
    assert bone_num_params(ad) == H.num_params(lora) == 1024

    def bone_loss(tr, xb, yb):
        return H.xent(H.MODEL.apply({"params": bone_merge(H.with_head(base, tr["head"]), tr["a"])}, xb), yb)

    def lora_loss(tr, xb, yb):
        return H.xent(H.MODEL.apply({"params": lora_merge(H.with_head(base, tr["head"]), tr["a"], cfg)}, xb), yb)

    def both(tr, xb, yb):  # both trainings in one scan: independent parameters, summed losses
        lb, ll = bone_loss(tr["bone"], xb, yb), lora_loss(tr["lora"], xb, yb)
        return lb + ll, (lb, ll)

    arms = {"bone": {"a": ad, "head": base["Dense_2"]}, "lora": {"a": lora, "head": base["Dense_2"]}}
    p, (lb, ll) = H.fit(both, arms, x, y, 300, 1e-2, has_aux=True)
    pb = p["bone"]
    assert lb[:50].mean() < 0.8 * ll[:50].mean(), (lb[:50].mean(), ll[:50].mean())
    acc_b = H.accuracy(bone_merge(H.with_head(base, pb["head"]), pb["a"]), xt, yt)
    acc_base = H.accuracy(base, xt, yt)
    assert acc_b > 0.9 > acc_base + 0.3, (acc_b, acc_base)
