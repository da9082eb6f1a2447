"""ScaLearn: the merged weights against a NumPy transcription of the paper's output rule (every variant), the
combine rule, validation, jit + 8-device sharding, and the transfer claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxmodels.adapters import init_lora, merge
from jaxmodels.adapters.scalearn import (VARIANTS, init_scalearn, scalearn_combine, scalearn_merge,
                                         scalearn_num_params)
from jaxmodels.adapters.lora import LoraConfig
from jaxmodels.sharding import shard
from tests.jaxmodels.adapters import papers_helpers as H


def _setup(K=3, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    params = {"Dense_0": {"kernel": f(12, 8), "bias": f(8)}, "Dense_1": {"kernel": f(8, 8), "bias": f(8)}}
    cfgs = [LoraConfig(rank=r, alpha=2.0, target=r"^Dense_[01]$") for r in (2, 3, 2)][:K]
    sources = []
    for k, c in enumerate(cfgs):
        s = init_lora(jax.random.PRNGKey(k), params, c)
        sources.append(jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), s))
    return params, sources, cfgs, rng


def layer_numpy(x, W, b, sources, cfgs, omega_l, name):
    """The paper's layer: h = W x + b + Σ_k ω_k ⊙ a_k(x), with a_k(x) = (alpha_k / r_k) x A_k B_k."""
    h = x @ W + b
    for k, (s, c) in enumerate(zip(sources, cfgs)):
        A, B = np.asarray(s[name]["lora_A"], np.float64), np.asarray(s[name]["lora_B"], np.float64)
        a = (c.alpha / A.shape[1]) * (x @ A @ B)
        h = h + np.broadcast_to(np.asarray(omega_l[k]).reshape(-1), (a.shape[-1],)) * a
    return h


def test_merge_matches_numpy_output_rule_every_variant():
    params, sources, cfgs, rng = _setup()
    x = rng.standard_normal((5, 12))
    for variant in VARIANTS:
        omega = init_scalearn(sources, variant)
        omega = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), omega)
        merged = scalearn_merge(params, sources, cfgs, omega)
        h = x
        for name in ("Dense_0", "Dense_1"):
            om = omega[name] if name in omega else omega["shared"]
            ref = layer_numpy(h, np.asarray(params[name]["kernel"], np.float64), np.asarray(params[name]["bias"]),
                              sources, cfgs, np.asarray(om), name)
            got = h @ np.asarray(merged[name]["kernel"], np.float64) + np.asarray(merged[name]["bias"])
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
            h = ref
    n = {v: scalearn_num_params(init_scalearn(sources, v)) for v in VARIANTS}
    assert n == {"scalearn": 3 * 8 * 2, "uniform": 3 * 2, "shared": 3 * 8, "uniform_shared": 3}
    # ω = 1/K: the average of the sources
    outs = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    np.testing.assert_allclose(scalearn_combine(outs, init_scalearn(sources, "uniform")["Dense_0"]),
                               np.asarray(outs).mean(0), rtol=1e-6, atol=1e-6)


def test_validation():
    params, sources, cfgs, _ = _setup()
    with pytest.raises(ValueError, match="variant"):
        init_scalearn(sources, "fusion")
    with pytest.raises(ValueError, match="different modules.*Dense_1"):
        init_scalearn([sources[0], {"Dense_0": sources[1]["Dense_0"]}])
    with pytest.raises(ValueError, match="3 configs for 2 sources"):
        scalearn_merge(params, sources[:2], cfgs, init_scalearn(sources[:2]))
    om = init_scalearn(sources)
    with pytest.raises(ValueError, match="omega for 'Dense_0' has shape"):
        scalearn_merge(params, sources, cfgs, {**om, "Dense_0": jnp.ones((2, 8))})
    with pytest.raises(ValueError, match="non-finite.*Dense_1"):
        scalearn_merge(params, sources, cfgs, {**om, "Dense_1": om["Dense_1"].at[0, 0].set(jnp.nan)})
    before = jax.tree.map(np.array, params)
    scalearn_merge(params, sources, cfgs, om)
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_jit_sharded_equals_single_device(mesh_2d):
    params, sources, cfgs, rng = _setup()
    omega = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32),
                         init_scalearn(sources, "scalearn"))
    ref = scalearn_merge(params, sources, cfgs, omega)
    rules = [(r"Dense_0/kernel$", P(None, "model")), (r"Dense_1/kernel$", P("model", None)),
             (r"lora_A$", P()), (r"lora_B$", P(None, "model")), (r"Dense_\d$", P(None, "model")), (r".*", P())]
    sp, ss = shard(params, rules, mesh_2d), [shard(s, rules, mesh_2d) for s in sources]
    so = shard(omega, rules, mesh_2d)
    out = jax.jit(lambda p, s, o: scalearn_merge(p, s, cfgs, o))(sp, ss, so)
    # rank-r products and a K-term sum: float32 rounding of the same sums
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5), out, ref)
    assert not out["Dense_0"]["kernel"].sharding.is_fully_replicated


@pytest.mark.slow
def test_claim_scaling_frozen_sources_transfers_with_few_parameters():
    """ScaLearn's claim (learning only the scaling of frozen source adapters transfers to a target task with a
    tiny number of parameters) on digits. Sources: two LoRAs (r = 4, the three Dense layers) trained on the
    mirrored digits of classes 0-4 and of 5-9 (each alone: ~0.5 test accuracy on all mirrored digits). Target:
    all mirrored digits, 200 training rows, only ω trained (200 Adam steps). Measured: ScaLearn (276 transfer
    parameters) 0.93, ScaLearnUniform++ (2 parameters) 0.77 (its ω = 1/2 start: 0.75), the base 0.41."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    cfg = H.lora_config(("Dense_0", "Dense_1", "Dense_2"), 4)
    src = (init_lora(jax.random.PRNGKey(1), base, cfg), init_lora(jax.random.PRNGKey(2), base, cfg))

    def src_loss(s, xb, yb):  # the two source trainings in one scan: independent adapters, summed losses
        lo = (yb < 5).astype(jnp.float32)
        out = 0.0
        for si, w in ((s[0], lo), (s[1], 1 - lo)):
            ls = optax.softmax_cross_entropy_with_integer_labels(H.MODEL.apply({"params": merge(base, si, cfg)}, xb), yb)
            out = out + (ls * w).sum() / jnp.maximum(w.sum(), 1)
        return out

    src, _ = H.fit(src_loss, src, x, y, 300, 1e-2)
    single = max(H.accuracy(merge(base, s, cfg), xt, yt) for s in src)
    om = {"full": init_scalearn(src, "scalearn"), "uniform_shared": init_scalearn(src, "uniform_shared")}
    assert scalearn_num_params(om["full"]) == 2 * (64 + 64 + 10) and scalearn_num_params(om["uniform_shared"]) == 2

    def tgt_loss(o, xb, yb):  # both variants in one scan (independent ω, summed losses)
        return sum(H.xent(H.MODEL.apply({"params": scalearn_merge(base, src, cfg, o[v])}, xb), yb) for v in o)

    o, _ = H.fit(tgt_loss, om, x[:200], y[:200], 200, 3e-2, batch=100)
    acc = {v: H.accuracy(scalearn_merge(base, src, cfg, o[v]), xt, yt) for v in o}
    assert acc["full"] > 0.9 and acc["full"] > single + 0.3, (acc, single)
    assert acc["uniform_shared"] > H.accuracy(base, xt, yt) + 0.2, acc
