"""Polyhistor-Lite: the generated per-task adapters against a NumPy transcription (decomposed hypernetworks,
Kronecker layer-wise scaling kernels), invariants, validation, jit + 8-device sharding, and the claim (shared
hypernetworks match per-task adapters with a fraction of the parameters) on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.adapters import merge
from jaxmodels.adapters.polyhistor import (PolyhistorConfig, init_polyhistor, polyhistor_merge,
                                           polyhistor_num_params, polyhistor_weights)
from jaxmodels.models.mlp import MLP_RULES_TP
from jaxmodels.sharding import shard
from tests.jaxmodels.adapters import papers_helpers as H


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    params = {"Dense_0": {"kernel": f(8, 12), "bias": f(12)}, "Dense_1": {"kernel": f(12, 4), "bias": f(4)}}
    cfg = PolyhistorConfig(n_tasks=3, template=4, rank=2, embed=3, hidden=2, target=r"^Dense_[01]$")
    hp = init_polyhistor(jax.random.PRNGKey(0), params, cfg)
    hp = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), hp)
    return params, hp, rng


def generated_numpy(hp, m, t):
    """Polyhistor-Lite's adapter of layer m, task t: templates from the two hypernetworks, then S ⊗ template."""
    h = {k: np.asarray(v, np.float64) for k, v in hp["hyper"].items()}
    e, g = np.asarray(hp["task_embed"][t], np.float64), np.asarray(hp["layers"][m]["embed"], np.float64)
    D = np.tensordot(e, h["down_task"], 1) @ np.tensordot(g, h["down_layer"], 1)
    U = (np.tensordot(e, h["up_task"], 1) @ np.tensordot(g, h["up_layer"], 1)).T
    sd, su = (np.asarray(hp["layers"][m][k], np.float64) for k in ("scale_down", "scale_up"))
    down = np.concatenate([s * D for s in sd], 0)  # block i of rows = S_i D
    up = np.concatenate([s * U for s in su], 1)
    return down, up


def test_generated_adapters_match_numpy():
    params, hp, rng = _setup()
    x = rng.standard_normal((5, 8))
    for t in range(3):
        merged = jax.jit(polyhistor_merge)(params, hp, t)
        for m in ("Dense_0", "Dense_1"):
            down, up = generated_numpy(hp, m, t)
            W = np.asarray(params[m]["kernel"], np.float64)
            np.testing.assert_allclose(merged[m]["kernel"], W + down @ up / 2, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(polyhistor_weights(hp, m, t)[0], down, rtol=1e-5, atol=1e-5)
        xin = x @ np.asarray(merged["Dense_0"]["kernel"], np.float64)
        assert xin.shape == (5, 12)
    np.testing.assert_array_equal(merged["Dense_0"]["bias"], params["Dense_0"]["bias"])
    # fresh init: every task is the base model (the up hypernetwork starts at zero)
    fresh = init_polyhistor(jax.random.PRNGKey(1), params, PolyhistorConfig(n_tasks=2, template=4,
                                                                             target=r"^Dense_[01]$"))
    jax.tree.map(np.testing.assert_array_equal, polyhistor_merge(params, fresh, 1), params)
    # the count: T k + L k + hypernetworks + scaling kernels (a_l + b_l)
    assert polyhistor_num_params(hp) == 3 * 3 + 2 * 3 + 2 * (3 * 4 * 2 + 3 * 2 * 2) + (2 + 3) + (3 + 1)


def test_validation():
    params, hp, _ = _setup()
    with pytest.raises(ValueError, match="rank"):
        PolyhistorConfig(rank=0)
    with pytest.raises(ValueError, match="multiple of template"):
        init_polyhistor(jax.random.PRNGKey(0), params, PolyhistorConfig(template=5, target="Dense_0"))
    with pytest.raises(ValueError, match="selects no"):
        init_polyhistor(jax.random.PRNGKey(0), params, PolyhistorConfig(target="nothing"))
    with pytest.raises(ValueError, match="out of range"):
        polyhistor_merge(params, hp, 3)
    bad = {**hp, "task_embed": hp["task_embed"].at[0, 0].set(jnp.nan)}
    with pytest.raises(ValueError, match="non-finite.*task_embed"):
        polyhistor_merge(params, bad, 0)
    with pytest.raises(ValueError, match="has no kernel"):
        polyhistor_merge({"Dense_0": params["Dense_0"]}, hp, 0)


def test_jit_sharded_equals_single_device(mesh_2d):
    params, hp, _ = _setup()
    ref = jax.vmap(lambda t: polyhistor_merge(params, hp, t))(jnp.arange(3))
    sp = shard(params, MLP_RULES_TP, mesh_2d)
    out = jax.jit(jax.vmap(lambda t, p: polyhistor_merge(p, hp, t), in_axes=(0, None)))(jnp.arange(3), sp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5), out, ref)


def _tasks(x):
    im = x.reshape(-1, 8, 8)
    return jnp.stack([im[:, :, ::-1], im[:, ::-1, :], jnp.transpose(im, (0, 2, 1))], 1).reshape(-1, 3, 64)


@pytest.mark.slow
def test_claim_shared_hypernetworks_match_per_task_adapters_with_fewer_parameters():
    """Polyhistor's claim on digits: three tasks (digits mirrored, flipped upside down, transposed) on the frozen
    pre-trained MLP; Polyhistor-Lite (template 32, so 2-entry scaling kernels per side, rank 4, embeddings 4, inner
    size 4; Dense_0 / Dense_1) against one LoRA per task (rank 4, same layers), all trained jointly (250 Adam
    steps). Measured: Polyhistor-Lite 0.84 mean test accuracy with 1180 parameters, per-task LoRAs 0.90 with 3072,
    the base 0.31 (exploratory: template 64, i.e. no scaling, 0.93 with 2200). Asserted: within 0.08 of the
    per-task LoRAs with < 40% of their parameters and far above the base. The paper's "~10% of the parameters" is
    against other multi-task methods at 4 dense tasks on Swin; at 3 small tasks the shared part dominates."""
    base = H.base_params()
    xo, yo, _, yt = H.digits()
    X, Xt = _tasks(xo), _tasks(H.digits()[2])
    layers = ("Dense_0", "Dense_1")
    hp = init_polyhistor(jax.random.PRNGKey(0), base, PolyhistorConfig(n_tasks=3, template=32, rank=4, embed=4,
                                                                       hidden=4, target=r"^Dense_[01]$"))
    loras, cfg = zip(*(H.lora_init(base, layers, 4, seed=s) for s in range(3)))
    cfg = cfg[0]

    def loss(p, xb, yb):
        lp = sum(H.xent(H.MODEL.apply({"params": polyhistor_merge(base, p["poly"], t)}, xb[:, t]), yb)
                 for t in range(3))
        ll = sum(H.xent(H.MODEL.apply({"params": merge(base, p["lora"][t], cfg)}, xb[:, t]), yb) for t in range(3))
        return lp + ll

    tr, _ = H.fit(loss, {"poly": hp, "lora": list(loras)}, X, yo, 250, 1e-2)
    acc_p = np.mean([H.accuracy(polyhistor_merge(base, tr["poly"], t), Xt[:, t], yt) for t in range(3)])
    acc_l = np.mean([H.accuracy(merge(base, tr["lora"][t], cfg), Xt[:, t], yt) for t in range(3)])
    acc_b = np.mean([H.accuracy(base, Xt[:, t], yt) for t in range(3)])
    n_p, n_l = polyhistor_num_params(hp), H.num_params(loras)
    assert n_p < 0.4 * n_l, (n_p, n_l)
    assert acc_p > acc_l - 0.08 and acc_p > acc_b + 0.3, (acc_p, acc_l, acc_b)
