"""A tiny random post-LN BERT (the MiniLM architecture at toy size) as a BlockModel, for fast PTQ tests."""

import jax
import jax.numpy as jnp
import numpy as np


def toy_bert(seed=0, hidden=32, layers=2, heads=4, inter=64, vocab=64, n=16, t=12):
    from jaxmodels.models.bert import BertConfig, BertEncoder

    from quant.ptq.minilm import bert_block_model

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=t)
    enc = BertEncoder(cfg)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, t)).astype(np.int32)
    lens = rng.integers(t // 2, t + 1, size=n)
    am = (np.arange(t)[None, :] < lens[:, None]).astype(np.int32)
    ids = ids * am
    batch = {"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids)}
    params = enc.init(jax.random.PRNGKey(seed), jnp.asarray(ids), jnp.asarray(am))["params"]
    # real activations have a few large channels: give the LayerNorm scales outliers
    params = jax.tree_util.tree_map(lambda x: x, params)
    for name in ["embeddings"] + [f"layer_{i}" for i in range(layers)]:
        norms = [params[name]["norm"]] if name == "embeddings" else [params[name]["attention_norm"],
                                                                      params[name]["output_norm"]]
        for nm in norms:
            s = np.ones(hidden, np.float32)
            s[:2] = 6.0
            nm["scale"] = jnp.asarray(s)
    return bert_block_model(enc), params, batch
