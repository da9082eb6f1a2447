"""Train the tiny Llama-family decoder the tests and ``colabs/llm_ptq.py`` quantize, on the bundled corpus.

    .venv/bin/python scripts/train_tiny_decoder.py [--out tests/data/tiny_decoder] [--steps 800]

1. Tokenizer: a byte-level BPE of 512 tokens (``jaxmodels.text.train_bpe_tokenizer``) trained on the train split of
   ``jaxmodels.text`` (``pydoc_data.topics``), saved as ``tokenizer.json``.
2. Model: ``jaxmodels.models.llama.Llama`` with hidden 128 (one AWQ/GPTQ group of 128 per input row of q/k/v/o,
   gate, up), 3 layers, 4 query heads sharing 2 key/value heads (GQA, head_dim 32), SwiGLU intermediate 256 (two
   groups of 128 for down_proj), tied embeddings, RoPE theta 10000, RMSNorm eps 1e-5.
3. Training: next-token cross-entropy on windows of 128 tokens at uniformly random offsets of the train stream,
   batch 32, AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, warmup min(100, steps/10) steps then
   cosine to 10 %, global-norm clip 1.0) through ``jaxmodels.train.make_train_step``; the validation perplexity
   (``jaxmodels.perplexity.evaluate_perplexity``, windows of 128) is measured every 100 steps and the best
   checkpoint is kept (the train split is ~157k tokens: the committed run, 800 steps, was best at step 500 with
   validation perplexity 12.36, then overfit: train loss 1.25, validation 13.56 at step 800).
4. Saved with ``jaxmodels.models.save_pretrained`` in bfloat16 (the folder stays near 1 MB; transformers loads
   it) plus ``tokenizer.json`` and ``training.json`` (the settings, the per-eval perplexities, the unigram baseline
   and the versions).

Seeds are fixed (init ``PRNGKey(0)``, batch offsets ``default_rng(0)``); on another machine or JAX version the
trained weights differ in their last bits, which no test depends on (they read the committed files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxmodels import text  # noqa: E402
from jaxmodels.models.llama import Llama, LlamaConfig  # noqa: E402
from jaxmodels.perplexity import evaluate_perplexity  # noqa: E402
from jaxmodels.train import init_train_state, make_train_step  # noqa: E402

CONFIG = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 0,
}
SEQ_LEN, BATCH, LR = 128, 32, 3e-3


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab: int) -> float:
    """Perplexity of the add-one-smoothed unigram distribution of ``train_ids`` on ``eval_ids``: the baseline a
    language model that learned anything beats."""
    p = (np.bincount(train_ids, minlength=vocab) + 1.0) / (len(train_ids) + vocab)
    return float(np.exp(-np.mean(np.log(p[eval_ids]))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tiny_decoder"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()

    tok = text.train_bpe_tokenizer(text.load_corpus("train"), CONFIG["vocab_size"])
    train_ids = text.corpus_tokens(tok, "train")
    val_ids = text.corpus_tokens(tok, "validation")
    uni = unigram_perplexity(train_ids, val_ids, CONFIG["vocab_size"])
    print(f"tokens: train {len(train_ids)}, validation {len(val_ids)}; unigram validation perplexity {uni:.2f}")

    cfg = LlamaConfig.from_hf_dict(CONFIG)
    model = Llama(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
    warmup = min(100, args.steps // 10)
    sched = optax.warmup_cosine_decay_schedule(0.0, LR, warmup, args.steps, LR * 0.1)
    decay = lambda p: jax.tree_util.tree_map(lambda x: x.ndim == 2, p)  # noqa: E731  (no decay on norm scales)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay))
    state = init_train_state(params, tx)
    step = make_train_step(lambda p, x: model.apply({"params": p}, x), tx)
    rng = np.random.default_rng(0)
    history, best = [], (float("inf"), None, 0)
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        off = rng.integers(0, len(train_ids) - SEQ_LEN - 1, size=BATCH)
        win = train_ids[off[:, None] + np.arange(SEQ_LEN + 1)]
        state, m = step(state, jnp.asarray(win[:, :-1]), jnp.asarray(win[:, 1:]))
        if i % args.eval_every == 0 or i == args.steps:
            ppl = evaluate_perplexity(model, state.params, val_ids, SEQ_LEN, batch_size=16, progress=False)
            history.append({"step": i, "train_loss": float(m["loss"]), "validation_ppl": ppl})
            print(f"step {i:5d}  train loss {float(m['loss']):.3f}  validation ppl {ppl:.2f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if ppl < best[0]:
                best = (ppl, jax.tree_util.tree_map(np.asarray, state.params), i)

    from jaxmodels.models.pretrained import save_pretrained

    params_bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), best[1])
    save_pretrained(args.out, model, params_bf16, overwrite=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    ppl_bf16 = evaluate_perplexity(model, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params_bf16),
                                   val_ids, SEQ_LEN, batch_size=16, progress=False)
    import flax
    import tokenizers

    info = {"config": CONFIG, "seq_len": SEQ_LEN, "batch_size": BATCH, "lr": LR, "warmup": warmup,
            "steps": args.steps, "best_step": best[2], "validation_ppl_float32": best[0],
            "validation_ppl_bfloat16": ppl_bf16, "unigram_validation_ppl": uni, "history": history,
            "tokens": {"train": int(len(train_ids)), "validation": int(len(val_ids))},
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                         "optax": optax.__version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__}}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"best step {best[2]}: validation ppl {best[0]:.2f} (bf16 {ppl_bf16:.2f}) vs unigram {uni:.2f}; "
          f"saved {args.out}")


if __name__ == "__main__":
    main()
