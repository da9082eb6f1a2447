"""SHERL: the early route against a NumPy transcription of the reference ``Sherl_Block``, stop-gradient on the
frozen outputs, validation, jit + 8-device sharding, and the accuracy / memory claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.adapters import init_lora, merge
from jaxmodels.adapters.sherl import init_sherl, sherl_fuse, sherl_num_params
from tests.jaxmodels.adapters import papers_helpers as H


def _setup(seed=0, B=8, gate=0.3):
    rng = np.random.default_rng(seed)
    sh = init_sherl(jax.random.PRNGKey(seed), [6, 5, 4], hidden=7, out_dim=4)
    sh = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), sh)
    sh["gate"] = jnp.array([gate], jnp.float32)
    feats = [jnp.asarray(rng.standard_normal((B, 3, d)), jnp.float32) for d in (6, 5, 4)]  # [batch, tokens, d]
    return sh, feats


def sherl_numpy(sh, feats):
    """Downsample -> Guidance (redundancy-divided, l1-normalised attention over the shallow outputs) -> fc_out +
    tanh(gate / 0.1) * last, per token (the reference Sherl_Block.forward)."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    lin = lambda p, x: x @ f(p["kernel"]) + f(p["bias"])  # noqa: E731
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    s = []
    for p, x in zip(sh["down"], feats):
        u = np.maximum(lin(p["fc1"], f(x)), 0)
        s.append((lin(p["fc2"], u) + u) * sig(lin(p["fc3"], u)))
    B, N, h = s[0].shape
    shallow = np.stack(s[:-1], 2).reshape(B * N, len(s) - 1, h)
    deep = s[-1].reshape(B * N, 1, h)
    nrm = shallow / (np.sqrt((shallow ** 2).sum(-1, keepdims=True)) + 1e-6)
    red = np.maximum(nrm @ nrm.transpose(0, 2, 1), 0).sum(-1, keepdims=True)
    att = np.maximum(lin(sh["attn"], shallow * deep), 0) / red
    att = att / (np.abs(att).sum(1, keepdims=True) + 1e-6)
    g = ((att * shallow).sum(1, keepdims=True) + deep).reshape(B, N, h)
    return lin(sh["out"], np.maximum(g, 0)) + np.tanh(f(sh["gate"])[0] / 0.1) * f(feats[-1])


def test_fuse_matches_numpy_reference():
    sh, feats = _setup()
    fuse = jax.jit(sherl_fuse)
    np.testing.assert_allclose(fuse(sh, feats), sherl_numpy(sh, feats), rtol=1e-4, atol=1e-4)
    # the init's gate is 0: the late layer sees only the fusion; no gradient reaches the frozen outputs
    fresh = init_sherl(jax.random.PRNGKey(0), [6, 5, 4], 7, 4)
    g = jax.jit(jax.grad(lambda fs, last: jnp.sum(sherl_fuse(fresh, fs, last) ** 2), argnums=(0, 1)))(feats, feats[-1])
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(g))
    np.testing.assert_array_equal(fuse(fresh, feats, feats[-1]), fuse(fresh, feats, 2 * feats[-1]))
    assert sherl_num_params(fresh) == sum(d * 7 + 7 + 2 * (7 * 7 + 7) for d in (6, 5, 4)) + 8 + 7 * 4 + 4 + 1


def test_validation():
    sh, feats = _setup()
    with pytest.raises(ValueError, match="at least two"):
        init_sherl(jax.random.PRNGKey(0), [6], 4, 4)
    with pytest.raises(ValueError, match="hidden"):
        init_sherl(jax.random.PRNGKey(0), [6, 5], 0, 4)
    with pytest.raises(ValueError, match="2 features for 3"):
        sherl_fuse(sh, feats[:2])
    with pytest.raises(ValueError, match="feature 1 has width"):
        sherl_fuse(sh, [feats[0], feats[0], feats[2]])
    with pytest.raises(ValueError, match="gate_t"):
        sherl_fuse(sh, feats, gate_t=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        sherl_fuse(sh, [feats[0].at[0, 0, 0].set(jnp.inf), *feats[1:]])


def test_jit_sharded_equals_single_device(mesh):
    sh, feats = _setup(B=16)
    fuse = jax.jit(sherl_fuse)
    ref = fuse(sh, feats)
    out = fuse(sh, [jax.device_put(f, NamedSharding(mesh, P("data"))) for f in feats])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # per-token math: reduction order only
    assert not out.sharding.is_fully_replicated


def _late(p, xt):
    h = jax.nn.relu(xt @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    return h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]


@pytest.mark.slow
def test_claim_early_fusion_late_tuning_matches_petl():
    """SHERL's claim (on-par accuracy with PETL, lower fine-tuning memory than backpropagating through the
    backbone) on the mirrored digits with the digits-pre-trained MLP. SHERL: early route over the frozen (input,
    Dense_0 output), hidden 32; late route: Dense_1 and the head fine-tuned. PETL: LoRA r = 4 on all three layers.
    150 Adam steps each (one scan). Measured: accuracy SHERL 0.955, LoRA 0.931 (base 0.41). Memory, measured once
    (not in the test: three extra compiles), as the temporary buffers of the compiled gradient step (XLA
    memory_analysis) at batch 1024: SHERL 2.72 MB, LoRA 1.17 MB, full FT 1.14 MB. The memory claim is NOT
    reproduced at this depth: one frozen layer before the late route saves less than the side route costs."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    cfg = H.lora_config(("Dense_0", "Dense_1", "Dense_2"), 4)

    def h0(xb):
        return jax.nn.relu(xb @ base["Dense_0"]["kernel"] + base["Dense_0"]["bias"])

    def sherl_loss(p, xb, yb):
        return H.xent(_late(p["late"], sherl_fuse(p["sherl"], [xb, h0(xb)], last=h0(xb))), yb)

    def lora_loss(p, xb, yb):
        return H.xent(H.MODEL.apply({"params": merge(base, p, cfg)}, xb), yb)

    arms = {"sherl": {"sherl": init_sherl(jax.random.PRNGKey(1), [64, 64], 32, 64),
                      "late": {k: base[k] for k in ("Dense_1", "Dense_2")}},
            "lora": init_lora(jax.random.PRNGKey(2), base, cfg)}
    p, _ = H.fit(lambda p, xb, yb: sherl_loss(p["sherl"], xb, yb) + lora_loss(p["lora"], xb, yb), arms,
                 x, y, 150, 1e-2)
    fwd = jax.jit(lambda p: _late(p["late"], sherl_fuse(p["sherl"], [xt, h0(xt)], last=h0(xt))))
    acc_s = float(jnp.mean(jnp.argmax(fwd(p["sherl"]), -1) == yt))
    acc_l = H.accuracy(merge(base, p["lora"], cfg), xt, yt)
    assert acc_s > acc_l - 0.03 and acc_s > H.accuracy(base, xt, yt) + 0.3, (acc_s, acc_l)
    # the memory half of the claim is NOT asserted (see the docstring); nor is parameter efficiency: the early
    # route (10.5k parameters) is larger than this whole 9k-parameter backbone
