"""extract_lora against a NumPy transcription of mergekit's TaskVectorDecompositionTask.execute (mergekit
scripts/extract_lora.py: SVD of (W_ft - W_base) in torch layout, rank = min(max_rank, len(s)), sv_epsilon,
A = sqrt(S) Vh, B = U sqrt(S)); deltas compared (singular vectors have a sign freedom, their products do not)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import adapters as ad


def mergekit_execute(task_vector, max_rank, sv_epsilon=0.0, distribute_scale=True):
    u, s, vh = np.linalg.svd(task_vector.astype(np.float32), full_matrices=False)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(int((s > sv_epsilon).sum()), rank)
    if distribute_scale:
        a, b = np.diag(np.sqrt(s[:rank])) @ vh[:rank], u[:, :rank] @ np.diag(np.sqrt(s[:rank]))
    else:
        a, b = np.diag(s[:rank]) @ vh[:rank], u[:, :rank]
    return a, b


@pytest.fixture(scope="module")
def trees():
    rng = np.random.default_rng(0)
    base = {"embed": {"embedding": rng.normal(size=(40, 16))},
            "blk": {"q": {"kernel": rng.normal(size=(16, 24)), "bias": rng.normal(size=(24,))},
                    "o": {"kernel": rng.normal(size=(24, 16))}}}
    low = rng.normal(size=(16, 3)) @ rng.normal(size=(3, 24))  # a rank-3 fine-tune of q
    ft = {"embed": {"embedding": base["embed"]["embedding"] + 0.1 * rng.normal(size=(40, 16))},
          "blk": {"q": {"kernel": base["blk"]["q"]["kernel"] + low, "bias": base["blk"]["q"]["bias"]},
                  "o": {"kernel": base["blk"]["o"]["kernel"] + 0.05 * rng.normal(size=(24, 16))}}}
    f32 = lambda t: {k: f32(v) if isinstance(v, dict) else jnp.asarray(v, jnp.float32) for k, v in t.items()}
    return f32(base), f32(ft)


@pytest.mark.parametrize("kw", [dict(max_rank=4), dict(max_rank=8, sv_epsilon=0.2),
                                dict(max_rank=5, distribute_scale=False)])
def test_matches_mergekit(trees, kw):
    base, ft = trees
    lora, cfg = ad.extract_lora(base, ft, progress=False, **kw)
    for m, name in (("embed", "embedding"), ("blk/q", "kernel"), ("blk/o", "kernel")):
        get = lambda t: t[m.split("/")[0]] if "/" not in m else t["blk"][m.split("/")[1]]
        tv = np.asarray(get(ft)[name]) - np.asarray(get(base)[name])
        a_t, b_t = mergekit_execute(tv.T, **kw)
        leaves = get(lora)
        assert leaves["lora_A"].shape[-1] == a_t.shape[0], m
        s = ad.scaling(cfg, m, leaves["lora_A"].shape[-1])
        assert s == 1.0  # alpha = r per module, as mergekit's rank_pattern = alpha_pattern
        np.testing.assert_allclose(np.asarray(leaves["lora_A"]) @ np.asarray(leaves["lora_B"]), (b_t @ a_t).T,
                                   atol=2e-5, rtol=0)
    assert lora["blk"]["q"]["lora_A"].shape[-1] == (3 if "sv_epsilon" in kw else kw["max_rank"])


def test_energy_and_exact_recovery(trees):
    base, ft = trees
    lora, cfg = ad.extract_lora(base, ft, max_rank=16, energy=0.999, progress=False, target="blk/q")
    assert lora["blk"]["q"]["lora_A"].shape == (16, 3)  # the rank-3 delta holds all the energy
    merged = ad.merge(base, lora, cfg)
    np.testing.assert_allclose(np.asarray(merged["blk"]["q"]["kernel"]), np.asarray(ft["blk"]["q"]["kernel"]),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="energy"):
        ad.extract_lora(base, ft, energy=1.5)
    with pytest.raises(ValueError, match="differs"):
        ad.extract_lora(base, {"blk": ft["blk"]})
