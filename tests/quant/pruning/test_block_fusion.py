"""FuseGPT and FoldGPT on the trained tiny decoder (tests/data/tiny_decoder, 3 blocks): Macro Influence against a
NumPy transcription on the model's own blocks, the fusion group windows, invariants (untrained fusion = plain
removal; shared blocks hold one array), sharding, validation, and the papers' claims at this scale (fusing the
removed block into its neighbours, or gating + sharing + norm re-adaptation, recovers perplexity over plain block
removal at the same removed count / the same number of distinct block weights)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis.sublayers import remove_blocks
from quant.pruning.block_fusion import (FoldGPTConfig, FuseGPTConfig, block_gates, foldgpt, fuse_group, fusegpt,
                                        macro_influence, share_groups, unique_param_count)

from tests.tiny_decoder import SEQ, tiny_decoder


@pytest.fixture(scope="module")
def decoder():
    model, params, calib, test = tiny_decoder(16)
    batches = [{"input_ids": calib[i:i + 4]} for i in range(0, 16, 4)]  # 4 batches of 4 windows
    return model, params, batches, test


_PPL = {}


def _ppl(model, params, test, key):
    from jaxmodels.perplexity import evaluate_perplexity

    if key not in _PPL:
        _PPL[key] = evaluate_perplexity(model, params, test, SEQ, batch_size=16, progress=False)
    return _PPL[key]


def _final_hidden_np(model, params, ids, skip=None):
    """h_L from the model's own LlamaBlock module (one jitted block: the tiny decoder has no sliding window)."""
    from jaxmodels.models.llama import LlamaBlock

    block = jax.jit(LlamaBlock(model.config, 0).apply)
    h = jnp.asarray(params["embed_tokens"]["embedding"])[ids]
    for i in range(model.config.num_hidden_layers):
        if i != skip:
            h = block({"params": params[f"layers_{i}"]}, h)
    return np.asarray(h, np.float64)


def test_macro_influence_matches_numpy_reference_and_shards(decoder, mesh):
    model, params, batches, _ = decoder
    ids = batches[0]["input_ids"]
    full = _final_hidden_np(model, params, ids)
    ref = []
    for i in range(3):
        h = _final_hidden_np(model, params, ids, skip=i)
        ref.append(1 - ((full * h).sum(-1) / (np.linalg.norm(full, axis=-1) * np.linalg.norm(h, axis=-1))).mean())
    mi = macro_influence(params, model, batches[0])
    np.testing.assert_allclose(mi, ref, atol=2e-6)
    two = np.concatenate([ids, batches[1]["input_ids"]])  # 8 windows, one per device
    sharded = macro_influence(jax.device_put(params, NamedSharding(mesh, P())), model,
                              {"input_ids": jax.device_put(two, NamedSharding(mesh, P("data", None)))})
    np.testing.assert_allclose(sharded, macro_influence(params, model, batches[:2]), atol=1e-5)


def test_fuse_group_windows_and_sharing_groups():
    # the reference's window (run_fusion.py), computed by hand for 32 layers and group size 8
    assert fuse_group(0, 32, 8) == list(range(0, 8))
    assert fuse_group(1, 32, 8) == list(range(0, 8))  # 1 - 1 - 3 < 0
    assert fuse_group(5, 32, 8) == list(range(1, 9))  # 5 - 1 - 3 .. 5 + 3
    assert fuse_group(28, 32, 8) == list(range(24, 32))  # 28 + 3 = 31 is still inside
    assert fuse_group(29, 32, 8) == list(range(24, 32))  # 29 + 3 > 31: the last 8
    assert fuse_group(2, 3, 8) == [0, 1, 2]  # capped at L
    assert share_groups([0, 2, 3, 5], 2, importance=[1.0, 0.2, 0.9, 0.7, 0.1, 0.8]) == [([0, 2], 0), ([3, 5], 5)]
    assert share_groups([0, 1, 2], 2) == [([0, 1], 0), ([2], 2)]
    with pytest.raises(ValueError, match="group_size"):
        fuse_group(0, 3, 1)
    with pytest.raises(ValueError, match="out of range"):
        fuse_group(3, 3, 2)
    with pytest.raises(ValueError, match="group_size"):
        share_groups([0], 0)
    for bad in (dict(n_remove=-1), dict(group_size=1), dict(loss="l1"), dict(lr=float("nan")), dict(epochs=0)):
        with pytest.raises(ValueError):
            FuseGPTConfig(**bad)
    for bad in (dict(group_size=0), dict(polar=-1.0), dict(beta=float("inf")), dict(gate_steps=1.5)):
        with pytest.raises(ValueError):
            FoldGPTConfig(**bad)


def test_fusegpt_recovers_over_plain_block_removal(decoder):
    model, params, batches, test = decoder
    snap = jax.tree_util.tree_map(np.array, params)
    small, p2, rep = fusegpt(params, model, batches, FuseGPTConfig(1, rank=16, epochs=5, lr=1e-3, lr_coef=2e-2))
    # Macro Influence (measured 0.877 / 0.357 / 0.217): block 2 goes, fused into blocks 0 and 1
    assert rep["removed"] == [2] and rep["steps"][0]["group"] == [0, 1, 2]
    assert int(np.argmin(rep["influence"])) == 2
    assert rep["steps"][0]["loss_last"] < 0.85 * rep["steps"][0]["loss_first"]  # measured 0.142 -> 0.103
    assert small.config.num_hidden_layers == 2 and sorted(p2) == ["embed_tokens", "layers_0", "layers_1", "norm"]
    plain_m, plain_p = remove_blocks(model, params, [2])
    # untrained fusion (learning rates 0: B = V = 0) is exactly the plain removal
    _, p0, _ = fusegpt(params, model, batches, FuseGPTConfig(1, rank=16, epochs=1, lr=0.0, lr_coef=0.0))
    for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(plain_p)):
        np.testing.assert_array_equal(a, b)
    ppl = {"fused": _ppl(small, p2, test, "fused"), "plain": _ppl(plain_m, plain_p, test, "plain1")}
    # measured: plain removal of block 2 19.97, FuseGPT 18.52 (-7.3%; dense 11.62; rank 128 / 10 epochs: 18.42)
    assert ppl["fused"] < 0.95 * ppl["plain"], ppl
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(snap)):  # input not modified
        np.testing.assert_array_equal(a, b)


def test_foldgpt_gates_sharing_and_recovery(decoder):
    model, params, batches, test = decoder
    cfg = FoldGPTConfig(1, gate_steps=20, polar=0.05, gate_lr=0.1, epochs=5, lr=2e-2)
    g = block_gates(params, model, batches, cfg)
    # measured gates 0.905 / 0.894 / 0.801: the learned ranking removes block 2 (as Macro Influence and LLM-Drop)
    assert int(np.argmin(g)) == 2 and np.all((g >= 0) & (g <= 1))
    one = foldgpt(params, model, batches, dataclasses_replace(cfg, group_size=1), gates=g)
    two = foldgpt(params, model, batches, cfg, gates=g)
    assert one.report["removed"] == two.report["removed"] == [2]
    assert two.report["groups"] == [([0, 1], 0)]
    l0, l1 = two.params["layers_0"], two.params["layers_1"]
    assert l0["self_attn"]["q_proj"]["kernel"] is l1["self_attn"]["q_proj"]["kernel"]  # one array, shared
    assert not np.array_equal(l0["input_layernorm"]["scale"], l1["input_layernorm"]["scale"])  # own norms
    plain1_m, plain1_p = remove_blocks(model, params, [2])
    plain2_m, plain2_p = remove_blocks(model, params, [1, 2])
    d = model.config.hidden_size
    # the shared 2-block model stores one block's weights plus the second block's two norms
    assert two.report["unique_params"] == unique_param_count(plain2_p) + 2 * d
    ppl = {"fold1": _ppl(one.model, one.params, test, "fold1"), "fold2": _ppl(two.model, two.params, test, "fold2"),
           "plain1": _ppl(plain1_m, plain1_p, test, "plain1"), "plain2": _ppl(plain2_m, plain2_p, test, "plain2")}
    # measured: removing block 2 19.97 -> FoldGPT (no sharing, norms re-adapted) 18.39; one block's weights left:
    # plain removal of blocks 1, 2 70.18 -> FoldGPT (blocks 0, 1 sharing block 0's weights) 56.27
    assert ppl["fold1"] < 0.96 * ppl["plain1"], ppl
    assert ppl["fold2"] < 0.9 * ppl["plain2"], ppl
    with pytest.raises(ValueError, match="gates"):
        foldgpt(params, model, batches, cfg, gates=np.ones(2))
    with pytest.raises(ValueError, match="cannot remove"):
        foldgpt(params, model, batches, FoldGPTConfig(3))
    with pytest.raises(ValueError, match="cannot remove"):
        fusegpt(params, model, batches, FuseGPTConfig(3))


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
