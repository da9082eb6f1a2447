"""Depth efficiency (Csordás et al., 2025) on the trained tiny decoder (tests/data/tiny_decoder, 3 blocks): the
contribution measures and skip effects against NumPy transcriptions on the model's own blocks, their invariants,
sharding, validation, and the paper's claim at this scale (later layers contribute less to the residual stream,
and skipping them changes the outputs less)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis.depth import layer_contributions, skip_effects

from tests.tiny_decoder import tiny_decoder


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder(8)[:3]


_BLOCKS = {}


def _block(c):
    """The model's own LlamaBlock with its attention output captured, jitted once (no sliding window here)."""
    from jaxmodels.models.llama import LlamaBlock

    if c not in _BLOCKS:
        _BLOCKS[c] = jax.jit(lambda p, h: LlamaBlock(c, 0).apply(p, h, capture_intermediates=True,
                                                                   mutable=["intermediates"]))
    return _BLOCKS[c]


def _blocks_np(model, params, ids, skip=None):
    """h_l, a_l, m_l (float64) by running the model's own LlamaBlock / attention modules, skipping block ``skip``;
    and the output distribution."""
    c = model.config
    h = jnp.asarray(params["embed_tokens"]["embedding"])[ids]
    hs, As, Ms = [np.asarray(h, np.float64)], [], []
    for i in range(c.num_hidden_layers):
        bp = params[f"layers_{i}"]
        if i == skip:
            out, mid = h, h
        else:
            out, cap = _block(c)({"params": bp}, h)
            mid = h + cap["intermediates"]["self_attn"]["__call__"][0][0]
        As.append(np.asarray(mid, np.float64) - hs[-1])
        Ms.append(np.asarray(out, np.float64) - np.asarray(mid, np.float64))
        hs.append(np.asarray(out, np.float64))
        h = out
    hf = np.asarray(h, np.float64)
    hf = hf / np.sqrt((hf * hf).mean(-1, keepdims=True) + c.rms_norm_eps) * np.asarray(params["norm"]["scale"])
    z = hf @ np.asarray(params["embed_tokens"]["embedding"], np.float64).T  # RMSNorm_f and the tied head
    p = np.exp(z - z.max(-1, keepdims=True))
    return hs, As, Ms, p / p.sum(-1, keepdims=True)


def _n(x):
    return np.linalg.norm(x, axis=-1)


def _c(x, y):
    return (x * y).sum(-1) / (np.maximum(_n(x), 1e-6) * np.maximum(_n(y), 1e-6))


def test_contributions_match_numpy_reference(decoder):
    model, params, calib = decoder
    ids = calib[:4]
    h, a, m, _ = _blocks_np(model, params, ids)
    c = layer_contributions(model, params, ids)
    L = 3
    ref = {
        "residual_norm": [_n(x).mean() for x in h], "attn_norm": [_n(x).mean() for x in a],
        "mlp_norm": [_n(x).mean() for x in m],
        "rel_attn": [(_n(a[i]) / _n(h[i])).mean() for i in range(L)],
        "rel_mlp": [(_n(m[i]) / _n(h[i] + a[i])).mean() for i in range(L)],
        "rel_layer": [(_n(a[i] + m[i]) / _n(h[i])).mean() for i in range(L)],
        "cos_attn": [_c(a[i], h[i]).mean() for i in range(L)],
        "cos_mlp": [_c(m[i], h[i] + a[i]).mean() for i in range(L)],
        "cos_layer": [_c(a[i] + m[i], h[i]).mean() for i in range(L)],
        "cos_io": [_c(h[i + 1], h[i]).mean() for i in range(L)],
    }
    for k, v in ref.items():
        np.testing.assert_allclose(getattr(c, k), v, rtol=2e-5, atol=2e-6, err_msg=k)
    # padding weighs 0 (causal: the first 64 tokens do not see the padded ones)
    am = np.ones(ids.shape, np.int32)
    am[:, 64:] = 0
    cp = layer_contributions(model, params, {"input_ids": ids, "attention_mask": am})
    np.testing.assert_allclose(cp.rel_layer, [(_n(a[i] + m[i]) / _n(h[i]))[:, :64].mean() for i in range(L)],
                               rtol=2e-5)


def test_skip_effects_match_numpy_reference(decoder):
    model, params, calib = decoder
    ids = calib[:2, :64]
    h, a, m, p = _blocks_np(model, params, ids)
    d0 = [h[i + 1] - h[i] for i in range(3)]
    e_mean = skip_effects(model, params, ids, no_skip_front=0, reduce="mean")
    e_max = skip_effects(model, params, ids, no_skip_front=0, reduce="max")
    for s in range(3):
        hs, _, _, ps = _blocks_np(model, params, ids, skip=s)
        rel = np.stack([_n(d0[i] - (hs[i + 1] - hs[i])) / np.maximum(_n(d0[i]), 1e-6) for i in range(3)])
        np.testing.assert_allclose(e_mean.future[s], rel.mean((1, 2)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(e_max.future[s], rel.max((1, 2)), rtol=1e-4, atol=1e-5)
        out = _n(ps - p)
        np.testing.assert_allclose(e_mean.output[s], out.mean(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(e_max.output[s], out.max(), rtol=1e-4, atol=1e-6)
        kl = (p * (np.log(p) - np.log(ps))).sum(-1).mean()
        np.testing.assert_allclose(e_mean.kl[s], kl, rtol=1e-3, atol=1e-5)
    # invariants: no effect on the layers before the skipped one, a full change of the skipped layer itself
    f = np.asarray(e_mean.future)
    assert np.all(f[np.tril_indices(3, -1)] == 0) and np.allclose(np.diag(f), 1.0)
    # the first token kept (the paper's no_skip_front=1): the sublayer parts, and sharding
    ea = skip_effects(model, params, ids, part="attn", reduce="mean")
    em = skip_effects(model, params, ids, part="mlp", reduce="mean")
    assert np.all(np.asarray(ea.kl) > 0) and np.all(np.asarray(em.kl) > 0)
    assert np.all(np.asarray(ea.kl) < np.asarray(e_mean.kl) * 1.5)


def test_later_layers_contribute_less_and_skipping_them_matters_less(decoder):
    model, params, calib = decoder
    c = layer_contributions(model, params, calib)
    e = skip_effects(model, params, calib, reduce="mean")
    # measured (8 windows of 128 tokens): rel_layer 4.40 / 1.07 / 0.86 (the embeddings are small, so layer 0 is
    # huge), cos(h_{l+1}, h_l) 0.27 / 0.69 / 0.79; skipping layer 0 / 1 / 2: KL 5.84 / 1.87 / 0.75, output change
    # 0.73 / 0.51 / 0.33; skipping layer 0 changes layer 1's contribution by 1.34x its size, layer 1 layer 2's by 0.92
    rl, kl, out = np.asarray(c.rel_layer), np.asarray(e.kl), np.asarray(e.output)
    assert rl[0] > rl[1] > rl[2], rl
    assert np.all(np.diff(np.asarray(c.cos_io)) > 0), c.cos_io
    assert kl[0] > 2 * kl[1] > 2 * kl[2] and kl[1] > 1.5 * kl[2], kl
    assert out[0] > out[1] > out[2], out
    assert float(e.future[0, 1]) > float(e.future[1, 2]), e.future


def test_sharded_contributions_equal_single_device(decoder, mesh):
    model, params, calib = decoder
    single = layer_contributions(model, params, calib)
    sharded = layer_contributions(model, jax.device_put(params, NamedSharding(mesh, P())),
                                  jax.device_put(calib, NamedSharding(mesh, P("data", None))))
    for k, a, b in zip(single._fields, single, sharded):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)


def test_validation(decoder):
    model, params, calib = decoder
    ids = calib[:1, :8]
    with pytest.raises(ValueError, match="part"):
        skip_effects(model, params, ids, part="heads")
    with pytest.raises(ValueError, match="reduce"):
        skip_effects(model, params, ids, reduce="median")
    with pytest.raises(ValueError, match="no_skip_front"):
        skip_effects(model, params, ids, no_skip_front=8)
    with pytest.raises(ValueError, match="input_ids"):
        layer_contributions(model, params, ids[0])
    with pytest.raises(ValueError, match="not a Llama"):
        from jaxmodels.models import MLP

        layer_contributions(MLP((4,)), params, ids)
