"""MoS: LoRA factors assembled from shard pools against a NumPy transcription (loops over rank vectors and
shards), the four differentiation strategies, validation, jit + 8-device sharding, and the parameter-efficiency
claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmodels.adapters import init_lora, merge
from jaxmodels.adapters.mos import MosConfig, init_mos, mos_lora, mos_num_params
from jaxmodels.sharding import shard
from tests.jaxmodels.adapters import papers_helpers as H


def _params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"Dense_0": {"kernel": f(8, 8), "bias": f(8)}, "Dense_1": {"kernel": f(8, 8), "bias": f(8)},
            "Dense_2": {"kernel": f(8, 4), "bias": f(4)}}, rng


def assemble_numpy(pub_a, pub_b, priv, ia, ib):
    """A's column i is the concatenation of shards I_A[i, 0..l-1] of [public ; private]; B's row i likewise."""
    pa = np.concatenate([pub_a] + ([priv["A"]] if priv is not None else []), 0)
    pb = np.concatenate([pub_b] + ([priv["B"]] if priv is not None else []), 0)
    r, l = ia.shape
    A = np.zeros((pa.shape[1] * l, r))
    B = np.zeros((r, pb.shape[1] * l))
    for i in range(r):
        for j in range(l):
            A[j * pa.shape[1]:(j + 1) * pa.shape[1], i] = pa[ia[i, j]]
            B[i, j * pb.shape[1]:(j + 1) * pb.shape[1]] = pb[ib[i, j]]
    return A, B


def test_assembly_and_merge_match_numpy():
    params, rng = _params()
    cfg = MosConfig(rank=3, alpha=6.0, target=r"^Dense_\d$", pool_size=5, private=2, shards_per_vector=2)
    mos = init_mos(jax.random.PRNGKey(0), params, cfg)
    assert set(mos["index"]) == {"8x8", "8x4"} and set(mos["index"]["8x8"]) == {"Dense_0", "Dense_1"}
    mos = {"pools": jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), mos["pools"]),
           "index": mos["index"]}
    lora, lcfg = mos_lora(mos, cfg)
    merged = merge(params, lora, lcfg)
    x = rng.standard_normal((4, 8))
    for g, layers in mos["index"].items():
        pool = {k: np.asarray(v) for k, v in mos["pools"][g]["shared"].items()}
        for m, idx in layers.items():
            priv = {k: np.asarray(v) for k, v in mos["pools"][g]["private"][m].items()}
            A, B = assemble_numpy(pool["A"], pool["B"], priv, np.asarray(idx["A"]), np.asarray(idx["B"]))
            np.testing.assert_array_equal(np.asarray(lora[m]["lora_A"]), A.astype(np.float32))
            np.testing.assert_array_equal(np.asarray(lora[m]["lora_B"]), B.astype(np.float32))
            W = np.asarray(params[m]["kernel"], np.float64)
            ref = x @ W + (6.0 / 3) * (x @ A @ B)  # the LoRA layer it defines: W + (alpha / r) A B
            np.testing.assert_allclose(x @ np.asarray(merged[m]["kernel"], np.float64), ref, rtol=1e-5, atol=1e-5)
    # pools only: 5 public + 2 private per layer, shard widths 4 (A, B of 8x8) and 4 / 2 (8x4)
    assert mos_num_params(mos) == (5 + 2 * 2) * (4 + 4) + (5 + 2) * (4 + 2)
    init = init_mos(jax.random.PRNGKey(0), params, cfg)
    jax.tree.map(np.testing.assert_array_equal, merge(params, *mos_lora(init, cfg)), params)  # B shards = 0


def test_differentiation_strategies():
    params, _ = _params()
    full = MosConfig(rank=3, target=r"^Dense_[01]$", pool_size=6, private=2, shards_per_vector=2)
    idx = init_mos(jax.random.PRNGKey(0), params, full)["index"]["8x8"]
    for m in idx:
        for f in ("A", "B"):
            v = np.asarray(idx[m][f]).reshape(-1)
            assert len(set(v)) == v.size  # distinct shards within a layer
            assert {6, 7} <= set(v)  # its private shards are used
    assert not np.array_equal(idx["Dense_0"]["A"], idx["Dense_1"]["A"])  # subset selection
    assert not np.array_equal(idx["Dense_0"]["A"], idx["Dense_0"]["B"])  # pair dissociation
    pure = MosConfig(rank=3, target=r"^Dense_[01]$", pool_size=6, private=0, shards_per_vector=1,
                     subset_selection=False, pair_dissociation=False)
    mos = init_mos(jax.random.PRNGKey(0), params, pure)
    idx = mos["index"]["8x8"]
    np.testing.assert_array_equal(idx["Dense_0"]["A"], idx["Dense_1"]["A"])
    np.testing.assert_array_equal(idx["Dense_0"]["A"], idx["Dense_0"]["B"])
    lora, _ = mos_lora(mos, pure)
    np.testing.assert_array_equal(lora["Dense_0"]["lora_A"], lora["Dense_1"]["lora_A"])  # pure sharing


def test_validation():
    params, _ = _params()
    with pytest.raises(ValueError, match="distinct shards"):
        MosConfig(rank=4, pool_size=4, private=1, shards_per_vector=2)
    with pytest.raises(ValueError, match="private"):
        MosConfig(private=-1)
    with pytest.raises(ValueError, match="not divisible"):
        init_mos(jax.random.PRNGKey(0), params, MosConfig(rank=1, target="Dense_2", shards_per_vector=3,
                                                          pool_size=4))
    with pytest.raises(ValueError, match="selects no"):
        init_mos(jax.random.PRNGKey(0), params, MosConfig(target="nothing"))
    bad = {**params, "Dense_0": {**params["Dense_0"], "bias": jnp.asarray(params["Dense_0"]["bias"]).at[1].set(jnp.nan)}}
    with pytest.raises(ValueError, match="non-finite.*Dense_0/bias"):
        init_mos(jax.random.PRNGKey(0), bad, MosConfig(rank=2, pool_size=4))


def test_jit_sharded_equals_single_device(mesh_2d):
    params, rng = _params()
    cfg = MosConfig(rank=2, target=r"^Dense_[01]$", pool_size=4, private=1, shards_per_vector=2)
    mos = init_mos(jax.random.PRNGKey(0), params, cfg)
    mos = {"pools": jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), mos["pools"]),
           "index": mos["index"]}
    run = jax.jit(lambda p, m: merge(p, *mos_lora(m, cfg)))
    ref = run(params, mos)
    rules = [(r"Dense_0/kernel$", P(None, "model")), (r"Dense_1/kernel$", P("model", None)), (r".*", P())]
    out = run(shard(params, rules, mesh_2d), {"pools": shard(mos["pools"], [(r".*", P(None, "model"))], mesh_2d),
                                              "index": mos["index"]})
    # gathers are exact; only the rank-r product A B may be summed in another order
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5), out, ref)


@pytest.mark.slow
def test_claim_mos_matches_lora_with_fewer_parameters():
    """MoS's claim (LoRA-level quality with far fewer parameters) on the mirrored-digits task, Dense_0/Dense_1
    adapted, 300 Adam steps at 1e-2, the three arms in one scan (independent parameters, summed losses).
    MoS rank 8 from 4-shard vectors (30 public + 2 private shards per layer: 1088 parameters) vs LoRA rank 8
    (2048) and LoRA rank 4 (1024). Measured: train loss MoS 0.030, LoRA-8 0.023, LoRA-4 0.054; test accuracy
    0.960 / 0.967 / 0.951. With two layers to share across, the savings are ~2x, not the paper's ~8x, and pure
    sharing (both layers the same vectors) is NOT worse here (0.026), so that half of the claim is not asserted."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    cfgs = {f"lora{r}": H.lora_config(("Dense_0", "Dense_1"), r) for r in (8, 4)}
    mcfg = MosConfig(rank=8, alpha=8.0, target=r"^Dense_[01]$", pool_size=30, private=2, shards_per_vector=4)
    mos = init_mos(jax.random.PRNGKey(2), base, mcfg)
    arms = {"mos": mos["pools"], **{n: init_lora(jax.random.PRNGKey(1), base, c) for n, c in cfgs.items()}}
    assert (mos_num_params(mos), H.num_params(arms["lora8"]), H.num_params(arms["lora4"])) == (1088, 2048, 1024)

    def arm_params(name, a):
        if name == "mos":
            return merge(base, *mos_lora({"pools": a, "index": mos["index"]}, mcfg))
        return merge(base, a, cfgs[name])

    def loss(arms, xb, yb):
        return sum(H.xent(H.MODEL.apply({"params": arm_params(n, a)}, xb), yb) for n, a in arms.items())

    p, _ = H.fit(loss, arms, x, y, 300, 1e-2)
    tl = {n: float(H.xent(H.MODEL.apply({"params": arm_params(n, p[n])}, x), y)) for n in arms}
    acc = {n: H.accuracy(arm_params(n, p[n]), xt, yt) for n in arms}
    assert tl["mos"] < 0.8 * tl["lora4"], tl
    assert acc["mos"] >= acc["lora8"] - 0.02 and acc["mos"] > acc["lora4"], acc
