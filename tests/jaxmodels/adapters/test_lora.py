"""jaxmodels.adapters core: the unmerged interceptor forward equals the merged forward on GPT (tied embedding
LoRA, scanned layers, DoRA on Dense and on the tied embedding), ViT (conv patch embedding, LoRA and DoRA) and BERT;
DoRA's merged Conv / Embed weights equal a NumPy transcription of PEFT 0.21's torch-layout formulas; unmerge
inverts merge up to one float rounding;
LoRA training under jaxmodels.train.make_train_step changes only the adapters, sharded == single device; DoRA on a
vocab-sharded embedding and an out-sharded conv == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels import adapters as ad
from jaxmodels.models import GPT, MLP, MLP_RULES_TP, BertConfig, BertEncoder, ViT
from jaxmodels.train import init_train_state, make_train_step

TOK = jnp.arange(16).reshape(2, 8) % 50
GPT_KW = dict(vocab_size=50, max_len=8, width=16, depth=2, num_heads=2, mlp_dim=32)


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """float32 matmuls on every backend (GPUs default to TF32 for float32, far outside these tolerances)."""
    with jax.default_matmul_precision("float32"):
        yield


CASES = {
    "gpt_tied_embed": (GPT(**GPT_KW), TOK, ad.LoraConfig(rank=4, alpha=8, target=r"(query|value|fc1|embed)$")),
    "gpt_scanned": (GPT(**GPT_KW, scan_layers=True), TOK,
                    ad.LoraConfig(rank=4, alpha=8, target=r"(query|value|fc1)$", stacked="^layers/")),
    "gpt_dora_rslora": (GPT(**GPT_KW), TOK, ad.LoraConfig(rank=4, alpha=8, target=r"(query|fc2)$", use_dora=True,
                                                        use_rslora=True)),
    "vit_conv": (ViT(patch_size=2, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3), jnp.ones((2, 8, 8, 1)),
                 ad.LoraConfig(rank=2, target=r"(patch_embed|query)$")),
    "gpt_dora_tied_embed": (GPT(**GPT_KW), TOK, ad.LoraConfig(rank=4, alpha=8, target=r"(embed|value)$",
                                                            use_dora=True)),
    "vit_dora_conv": (ViT(patch_size=2, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3),
                      jnp.ones((2, 8, 8, 1)), ad.LoraConfig(rank=2, target=r"(patch_embed|query)$", use_dora=True)),
    "bert": (BertEncoder(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16)), TOK,
             ad.LoraConfig(rank=2, target=r"(query|value|word_embeddings)$", rank_pattern={"value$": 3})),
}


def _random_like(tree, seed, scale):
    """NumPy-filled arrays of ``tree``'s shapes (tests only: nothing to compile, unlike jax.random eagerly)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), tree)


def _params(model, x):
    return _random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], 0, 0.3)


def _perturbed(params, cfg):
    """Adapters with non-zero B: init_lora's structure (traced, not compiled), NumPy values."""
    return _random_like(jax.eval_shape(lambda p: ad.init_lora(jax.random.key(1), p, cfg), params), 1, 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_unmerged_equals_merged_and_unmerge(case):
    model, x, cfg = CASES[case]
    params = _params(model, x)
    lora = _perturbed(params, cfg)
    norms = ad.dora_norms(params, lora, cfg) if cfg.use_dora else None
    if cfg.use_dora:  # magnitudes near the column norms, as DoRA's init (m = ||W||_c) and training keep them
        for m, n in norms.items():
            node = functools.reduce(lambda d, k: d[k], m.split("/"), lora)
            node["lora_magnitude"] = n * jnp.linspace(0.9, 1.1, n.shape[-1])

    @jax.jit
    def run(params, lora):
        merged = ad.merge(params, lora, cfg)
        return (ad.apply(model, params, lora, cfg, x), model.apply({"params": merged}, x), merged,
                ad.unmerge(merged, lora, cfg, norms=norms))

    unmerged, merged_out, merged, back = run(params, lora)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params))]
    assert sum(d > 1e-3 for d in moved) == len(ad.adapter_modules(lora))  # each adapter changes its weight
    # the two forwards sum the same terms in a different order: float32 rounding of O(1) activations
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged_out), atol=1e-5, rtol=0)
    # unmerge(merge(W)): W + d rounded once, then - d rounded once: within one ulp of max(|W|, |W + d|)
    # (DoRA also rescales by m/n and back: a few ulps)
    for w, w2, wm in zip(jax.tree.leaves(params), jax.tree.leaves(back), jax.tree.leaves(merged)):
        w, w2, wm = np.asarray(w), np.asarray(w2), np.asarray(wm)
        ulps = 8 if cfg.use_dora else 1
        assert np.all(np.abs(w2 - w) <= ulps * np.spacing(np.maximum(np.abs(w), np.abs(wm)))), case


@pytest.mark.parametrize("case", ["gpt_dora_tied_embed", "vit_dora_conv"])
def test_dora_conv_embed_sharded_equals_single_device(case, mesh_2d):
    """DoRA on a vocab-sharded (tied) embedding and an out-channel-sharded conv, adapters on their base's split
    (adapter_rules): the jitted unmerged forward and the merge equal the single-device ones."""
    from jax.sharding import PartitionSpec as P

    from jaxmodels.models import GPT_RULES_TP, VIT_RULES_TP
    from jaxmodels.sharding import shard

    model, x, cfg = CASES[case]
    params = _params(model, x)
    lora = _perturbed(params, cfg)
    for m, n in ad.dora_norms(params, lora, cfg).items():
        functools.reduce(lambda d, k: d[k], m.split("/"), lora)["lora_magnitude"] = n * jnp.linspace(0.9, 1.1,
                                                                                                     n.shape[-1])
    rules = [(r"(^|/)embed/embedding$", P("model", None)), (r"(^|/)patch_embed/kernel$", P(None, None, None, "model")),
             *(GPT_RULES_TP if case.startswith("gpt") else VIT_RULES_TP)]
    rules = ad.adapter_rules(lora, params, rules, mesh_2d) + rules
    run = jax.jit(lambda p, a: (ad.apply(model, p, a, cfg, x), ad.merge(p, a, cfg)))
    want_out, want_merged = run(params, lora)
    ps, ls = shard(params, rules, mesh_2d), shard(lora, rules, mesh_2d)
    assert any(len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(ls))  # the adapters really are split
    got_out, got_merged = run(ps, ls)
    # the same math with the column norms and matmuls reduced across devices: float32 reassociation of O(1) values
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(got_merged), jax.tree.leaves(want_merged)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=0)


def _np_dora_conv_torch(w, a, b, mag, s):
    """PEFT's _DoraConvNdVariant.merge in torch layout: W_t [out, in, kh, kw], lora_A a conv [r, in, kh, kw],
    lora_B a 1x1 conv [out, r, 1, 1]; delta = (B.view(-1, r) @ A.view(r, -1)).reshape(W_t.shape) * s,
    n = ||W_t + delta|| over dims (1, 2, 3), W' = (m / n).view(-1, 1, 1, 1) * (W_t + delta)."""
    w_t = w.transpose(3, 2, 0, 1).astype(np.float64)
    a_t, b_t = a.transpose(3, 2, 0, 1).astype(np.float64), b.T.astype(np.float64)[:, :, None, None]
    r = a_t.shape[0]
    delta = (b_t.reshape(-1, r) @ a_t.reshape(r, -1)).reshape(w_t.shape) * s
    n = np.sqrt(((w_t + delta) ** 2).sum(axis=(1, 2, 3)))
    return ((mag / n).reshape(-1, 1, 1, 1) * (w_t + delta)).transpose(2, 3, 1, 0)  # back to [kh, kw, in, out]


def _np_dora_embed_torch(e, a, b, mag, s):
    """PEFT's DoraEmbeddingVariant.merge: E [vocab, d], lora_embedding_A [r, vocab], lora_embedding_B [d, r];
    delta = (B @ A).T * s [vocab, d]; n = ||(E + delta).T|| over dim 1 ([d]); E' = (m / n).view(1, -1) * (E + delta)."""
    e = e.astype(np.float64)
    delta = (b.T.astype(np.float64) @ a.T.astype(np.float64)).T * s
    n = np.linalg.norm((e + delta).T, axis=1)
    return (mag / n)[None, :] * (e + delta)


@pytest.mark.parametrize("case,module,leaf,ref", [
    ("vit_dora_conv", "patch_embed", "kernel", _np_dora_conv_torch),
    ("gpt_dora_tied_embed", "embed", "embedding", _np_dora_embed_torch),
])
def test_dora_conv_embed_merge_matches_peft_formula(case, module, leaf, ref):
    model, x, cfg = CASES[case]
    params = _params(model, x)
    lora = ad.init_lora(jax.random.key(2), params, cfg)
    w = np.asarray(params[module][leaf])
    mag = np.asarray(lora[module]["lora_magnitude"])
    axes = tuple(range(w.ndim - 1))
    np.testing.assert_allclose(mag, np.sqrt((w.astype(np.float64) ** 2).sum(axis=axes)), rtol=1e-6)  # m0 = ||W||_c
    assert mag.shape == (w.shape[-1],)
    lora = _perturbed(params, cfg)
    lora[module]["lora_magnitude"] = jnp.asarray(mag * np.linspace(0.8, 1.2, mag.size), jnp.float32)
    got = np.asarray(ad.merge(params, lora, cfg)[module][leaf])
    a, b = np.asarray(lora[module]["lora_A"]), np.asarray(lora[module]["lora_B"])
    want = ref(w, a, b, np.asarray(lora[module]["lora_magnitude"], np.float64), ad.scaling(cfg, module, a.shape[-1]))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)  # float32 merge against a float64 transcription


def test_dropout_and_bad_input():
    model, x, cfg = CASES["gpt_tied_embed"]
    params = _params(model, x)
    cfg_d = ad.LoraConfig(rank=4, alpha=8, target=r"(query|value)$", dropout=0.5)
    lora = ad.init_lora(jax.random.key(1), params, cfg_d)  # the real init: B = 0, A ~ U(+-1/sqrt(in))
    bound = 1 / np.sqrt(16)
    assert all(float(jnp.abs(v["lora_B"]).max()) == 0.0 and 0 < float(jnp.abs(v["lora_A"]).max()) <= bound
               for v in ad.adapter_modules(lora).values())
    lora = _perturbed(params, cfg_d)
    both = jax.jit(lambda p, l, rng: (ad.apply(model, p, l, cfg_d, x), ad.apply(model, p, l, cfg_d, x, rng=rng)))
    y0, y1 = both(params, lora, jax.random.key(3))
    _, y2 = both(params, lora, jax.random.key(4))
    assert float(jnp.abs(y0 - y1).max()) > 1e-4 and float(jnp.abs(y1 - y2).max()) > 1e-4  # dropout only with an rng
    vit, img, cfg_v = CASES["vit_dora_conv"]  # DoRA on a conv with dropout: the dropped input through the base conv
    cfg_v = ad.LoraConfig(rank=2, target=r"(patch_embed|query)$", use_dora=True, dropout=0.5)
    pv = _params(vit, img)
    lv = _perturbed(pv, cfg_v)
    v0, v1 = jax.jit(lambda p, l, rng: (ad.apply(vit, p, l, cfg_v, img), ad.apply(vit, p, l, cfg_v, img, rng=rng)))(
        pv, lv, jax.random.key(3))
    assert np.all(np.isfinite(np.asarray(v1))) and float(jnp.abs(v0 - v1).max()) > 1e-4
    with pytest.raises(ValueError, match="rank"):
        ad.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        ad.LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="selects no"):
        ad.init_lora(jax.random.key(0), params, ad.LoraConfig(target="nothing_here"))
    bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), lora)
    with pytest.raises(ValueError, match="NaN"):
        ad.merge(params, bad, cfg_d)


def test_train_step_only_adapters_sharded(mesh_2d):
    model = MLP(features=(16, 16), num_outputs=4)  # Dense_0 column-, Dense_1 row-parallel under MLP_RULES_TP
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 8)), jnp.float32)  # batch 8 divides "data"
    y = jnp.arange(8) % 4
    params = _params(model, x)
    cfg = ad.LoraConfig(rank=2, alpha=4, target=r"Dense_[01]$")
    lora0 = _perturbed(params, cfg)
    tx = optax.adam(1e-1)

    def apply_fn(lora, frozen, inputs):  # frozen base as model_state: carried, not differentiated
        return ad.apply(model, frozen, lora, cfg, inputs), frozen

    results = []
    for mesh in (None, mesh_2d):
        rules = ad.adapter_rules(lora0, params, MLP_RULES_TP, mesh_2d) + MLP_RULES_TP if mesh is not None else None
        state = init_train_state(lora0, tx, mesh, rules, model_state=params)
        step = make_train_step(apply_fn, tx, mesh=mesh, rules=rules, donate=False, has_model_state=True)
        losses = []
        for _ in range(3):
            state, metrics = step(state, x, y)
            losses.append(float(metrics["loss"]))
        assert losses[2] < losses[1] < losses[0], losses
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     state.model_state, params)  # the base did not move
        assert jax.tree.structure(state.params) == jax.tree.structure(lora0)
        if mesh is not None:  # adapters carry their base kernel's split
            spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
            assert spec(state.params["Dense_0"]["lora_B"]) == (None, "model")
            assert spec(state.params["Dense_1"]["lora_A"]) == ("model", None)
        results.append((losses, state.params))
    # sharded vs single device: the same math with reductions split across devices (float32 reassociation)
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), results[0][1],
                 results[1][1])
