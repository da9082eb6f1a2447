"""What Matters in Transformers (He et al., 2024) on the trained tiny decoder (tests/data/tiny_decoder: Llama family,
3 blocks): the redundancy scores against a NumPy transcription on the model's own captured intermediates, the
drop procedures, exactness of the reduced models, sharding, validation, and the paper's claim (attention
sublayers are more redundant than MLPs; dropping the most redundant attention costs less perplexity than dropping
as many MLPs or random sublayers)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis.sublayers import (KeptSublayers, drop_sublayer_params, gated_apply, remove_blocks,
                                          residual_stream, sublayer_apply, sublayer_forward)
from quant.pruning.redundancy import (LayerDropConfig, RedundancyScores, layer_drop, random_drops, redundancy_scores,
                                      select_drops)

from tests.tiny_decoder import SEQ, tiny_decoder


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder(16)  # 16 calibration windows, 16 held-out windows of 128 tokens


def _captured(model, params, ids):
    """h_l, h_l + a_l and h_{l+1} of every block, from the model's own forward (flax capture_intermediates)."""
    _, st = model.apply({"params": params}, ids, capture_intermediates=True, mutable=["intermediates"])
    it = st["intermediates"]
    h = [np.asarray(it["embed_tokens"]["__call__"][0], np.float64)]
    mids = []
    for i in range(model.config.num_hidden_layers):
        a = np.asarray(it[f"layers_{i}"]["self_attn"]["__call__"][0][0], np.float64)
        mids.append(h[-1] + a)
        h.append(np.asarray(it[f"layers_{i}"]["__call__"][0], np.float64))
    return h, mids


def _np_cos(x, y):
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


def test_scores_match_numpy_reference(decoder):
    model, params, calib, _ = decoder
    ids = calib[:4]
    h, mid = _captured(model, params, ids)
    ref_block = [1 - _np_cos(h[i], h[i + 1]).mean() for i in range(3)]
    ref_attn = [1 - _np_cos(h[i], mid[i]).mean() for i in range(3)]
    ref_mlp = [1 - _np_cos(mid[i], h[i + 1]).mean() for i in range(3)]
    sc = redundancy_scores(params, model, {"input_ids": ids})
    np.testing.assert_allclose(sc.block, ref_block, atol=2e-6)
    np.testing.assert_allclose(sc.attn, ref_attn, atol=2e-6)
    np.testing.assert_allclose(sc.mlp, ref_mlp, atol=2e-6)
    # a list of batches averages over all their tokens; padding weighs 0
    two = redundancy_scores(params, model, [{"input_ids": ids}, {"input_ids": ids}])
    np.testing.assert_allclose(two.attn, sc.attn, atol=2e-6)
    am = np.ones(ids.shape, np.int32)
    am[:, 100:] = 0
    pad = redundancy_scores(params, model, {"input_ids": ids, "attention_mask": am})
    h, mid = _captured(model, params, ids)  # causal: the first 100 tokens do not see the padded ones
    np.testing.assert_allclose(pad.attn, [1 - _np_cos(h[i], mid[i])[:, :100].mean() for i in range(3)], atol=2e-6)


def test_no_drop_is_exact_and_reduced_models_run(decoder):
    model, params, calib, _ = decoder
    ids = calib[:2, :64]
    ref = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    q, rep = layer_drop(params, model, {"input_ids": calib[:4]}, LayerDropConfig(0, "joint"))
    assert rep["keep"] == KeptSublayers.full(3) and rep["dropped"] == [] and q.keys() == params.keys()
    np.testing.assert_array_equal(sublayer_forward(model, q, ids)[0], ref)  # dropping nothing: the logits exactly
    # Block Drop: the reduced params lack the block, run it, and equal the renumbered plain 2-block model
    q, rep = layer_drop(params, model, {"input_ids": calib[:4]}, LayerDropConfig(1, "block"))
    assert rep["blocks"] == [2] and "layers_2" not in q
    small, p2 = remove_blocks(model, params, rep["blocks"])
    assert small.config.num_hidden_layers == 2 and sorted(p2) == ["embed_tokens", "layers_0", "layers_1", "norm"]
    out = sublayer_forward(model, q, ids, keep=rep["keep"])[0]
    np.testing.assert_allclose(out, jax.jit(small.apply)({"params": p2}, ids), atol=1e-5)
    # a gate of 0 is the same model as the dropped sublayer (the gated forward is the program compiled above)
    gates = np.stack([rep["keep"].attn, rep["keep"].mlp], 1).astype(np.float32)
    np.testing.assert_allclose(sublayer_forward(model, params, ids, gates=gates)[0], out, atol=1e-5)
    np.testing.assert_array_equal(sublayer_apply(model, rep["keep"]) is sublayer_apply(model, rep["keep"]), True)
    # Attention Drop: only that block's attention sub-trees go
    keep = KeptSublayers.without(3, attn=[1])
    q = drop_sublayer_params(params, model, keep)
    assert sorted(q["layers_1"]) == ["mlp", "post_attention_layernorm"] and sorted(params["layers_1"]) != sorted(
        q["layers_1"])
    s = residual_stream(model, q, ids, keep=keep)
    assert float(jnp.abs(s.attn[1]).max()) == 0.0
    np.testing.assert_allclose(s.hidden[-1], s.hidden[0] + s.attn.sum(0) + s.mlp.sum(0), atol=1e-4)


def test_select_drops_rankings_and_validation():
    sc = RedundancyScores(jnp.array([0.7, 0.3, 0.2]), jnp.array([0.15, 0.19, 0.07]), jnp.array([0.66, 0.16, 0.17]))
    assert select_drops(sc, 1, "block") == KeptSublayers.without(3, blocks=[2])
    assert select_drops(sc, 2, "attn") == KeptSublayers((False, True, False), (True,) * 3)
    assert select_drops(sc, 2, "mlp") == KeptSublayers((True,) * 3, (True, False, False))
    # joint: the six scores ranked together: attn2 0.07 < attn0 0.15 < mlp1 0.16 < mlp2 0.17 < attn1 0.19 < ...
    assert select_drops(sc, 3, "joint") == KeptSublayers((False, True, False), (True, False, True))
    tie = RedundancyScores(jnp.zeros(2), jnp.array([0.1, 0.1]), jnp.array([0.1, 0.1]))
    assert select_drops(tie, 1, "joint") == KeptSublayers((False, True), (True, True))  # ties: attention first
    k = random_drops(3, 4, "joint", seed=1)
    assert k.num_dropped == 4 and random_drops(3, 4, "joint", seed=1) == k
    with pytest.raises(ValueError, match="target"):
        select_drops(sc, 1, "heads")
    with pytest.raises(ValueError, match="n must be"):
        select_drops(sc, 3, "block")  # cannot drop every block
    with pytest.raises(ValueError, match="n must be"):
        select_drops(sc, 7, "joint")
    with pytest.raises(ValueError, match="NaN"):
        select_drops(RedundancyScores(jnp.zeros(3), jnp.array([0.1, np.nan, 0.2]), jnp.zeros(3)), 1, "attn")
    with pytest.raises(ValueError, match="target"):
        LayerDropConfig(1, "all")
    with pytest.raises(ValueError, match="non-negative"):
        LayerDropConfig(-1)
    with pytest.raises(ValueError, match="out of range"):
        KeptSublayers.without(3, attn=[3])


def test_input_validation(decoder):
    model, params, calib, _ = decoder
    ids = calib[:2, :16]
    with pytest.raises(ValueError, match=r"lie in \[0, 512\)"):
        redundancy_scores(params, model, {"input_ids": ids + 512})
    with pytest.raises(ValueError, match="integer"):
        redundancy_scores(params, model, {"input_ids": ids.astype(np.float32)})
    with pytest.raises(ValueError, match="attention_mask shape"):
        redundancy_scores(params, model, {"input_ids": ids, "attention_mask": np.ones((2, 15))})
    with pytest.raises(ValueError, match="no calibration"):
        redundancy_scores(params, model, [])
    with pytest.raises(ValueError, match="gates"):
        sublayer_forward(model, params, ids, gates=np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        sublayer_forward(model, params, ids, gates=np.full((3, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="entries"):
        sublayer_forward(model, params, ids, keep=KeptSublayers.full(2))
    with pytest.raises(ValueError, match="not a Llama"):
        redundancy_scores(params, object(), {"input_ids": ids})


def test_sharded_scores_equal_single_device(decoder, mesh):
    model, params, calib, _ = decoder
    single = redundancy_scores(params, model, {"input_ids": calib})
    ids = jax.device_put(calib, NamedSharding(mesh, P("data", None)))
    sharded = redundancy_scores(jax.device_put(params, NamedSharding(mesh, P())), model, {"input_ids": ids})
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_is_more_redundant_and_cheaper_to_drop(decoder):
    from jaxmodels.perplexity import evaluate_perplexity

    model, params, calib, test = decoder
    sc = redundancy_scores(params, model, {"input_ids": calib})
    # measured S (16 calibration windows of 128 tokens): attention 0.155 / 0.192 / 0.073, MLP 0.660 / 0.160 / 0.169,
    # block 0.725 / 0.301 / 0.217: the attention sublayers are the more redundant ones (mean 0.140 vs 0.330)
    assert float(sc.attn.mean()) < 0.6 * float(sc.mlp.mean()), sc
    fn = gated_apply(model)  # one compiled program for every drop structure

    def ppl(keep):
        g = np.stack([keep.attn, keep.mlp], 1).astype(np.float32)
        return evaluate_perplexity(fn, (params, g), test, SEQ, batch_size=16, progress=False)

    dense = ppl(KeptSublayers.full(3))
    res = {(t, n): ppl(select_drops(sc, n, t)) for t in ("attn", "mlp", "joint") for n in (1, 2)}
    rand = {n: np.median([ppl(random_drops(3, n, "joint", seed=s)) for s in range(5)]) for n in (1, 2)}
    # measured: dense 11.62; drop 1: attention 14.45, MLP 20.20, joint 14.45 (= attention 2), random median 37.8;
    # drop 2: attention 23.80, MLP 37.01, joint 23.80, random median 54.6
    assert abs(dense - 11.62) < 0.01, dense
    for n in (1, 2):
        assert dense < res["attn", n] < 0.8 * res["mlp", n], res
        assert res["attn", n] < 0.7 * rand[n], (res, rand)
        assert res["joint", n] <= res["attn", n] + 1e-9, res
