"""LoRA cost on a Llama-family decoder, against anchors measured in the same run.

    python bench/peft.py [--quick] [--rank 16] [--repeats 10]

Model: a Llama decoder built from ``LlamaConfig`` (hidden 512, MLP 1408, 4 layers, 8 query / 4 KV heads, vocab
8192, untied head: 20.2M float32 parameters; ``--quick``: hidden 256, 2 layers), batch 4 x 256 tokens. LoRA rank
``--rank`` (alpha = 2 rank) on the 7 projections of every block (q/k/v/o, gate/up/down), as in the papers.

Rows, each a ratio against its anchor (min over ``--repeats`` round-robin calls after compilation, so load from other
processes hits both alike):

* **train step**: one jitted Adam step of LoRA (``jaxmodels.adapters.apply``, gradients w.r.t. the adapters only)
  against the same step of full fine-tuning. Time ratio, and memory: the optimizer state + gradient bytes (measured
  from the leaves) and XLA's compiled peak estimate (``memory_analysis``: arguments + outputs + temporaries,
  minus donated/aliased bytes) of each step.
* **forward**: the unmerged adapter forward (``x W + s (x A) B`` at every adapted projection) against the merged
  forward (``W + s A B`` merged once, then the plain model): target <= 1.15x at r = 16 (issue 15). The merge itself
  is timed too (it runs once per checkpoint, not per batch).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench.timing import time_round_robin  # noqa: E402
from jaxmodels import adapters as ad  # noqa: E402
from jaxmodels.models.llama import Llama, LlamaConfig  # noqa: E402
from jaxmodels.tree import flatten, tree_bytes, unflatten  # noqa: E402

TARGET = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def peak_bytes(jitted, *args) -> int:
    """XLA's compiled memory estimate: arguments + outputs + temporaries, minus aliased (donated) bytes."""
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:  # a backend without the analysis
        return -1
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    hidden, layers = (256, 2) if args.quick else (512, 4)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.seq)
    model = Llama(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
    lcfg = ad.LoraConfig(rank=args.rank, alpha=2 * args.rank, target=TARGET)
    lora = ad.init_lora(jax.random.PRNGKey(1), params, lcfg)
    # B = 0 at init makes the adapter a no-op; give it a real update so the forward rows compare real work
    flat = flatten(lora)
    keys = dict(zip(flat, jax.random.split(jax.random.PRNGKey(2), len(flat))))
    lora = unflatten({k: 0.01 * jax.random.normal(keys[k], v.shape, v.dtype) if k.endswith("lora_B") else v
                      for k, v in flat.items()})
    n_params, n_lora = sum(v.size for v in jax.tree.leaves(params)), sum(v.size for v in jax.tree.leaves(lora))
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; Llama hidden {hidden}, {layers} layers, "
          f"{n_params / 1e6:.1f}M params; LoRA r={args.rank} on 7 projections x {layers} layers: "
          f"{n_lora / 1e6:.3f}M trainable ({100 * n_lora / n_params:.2f}%); batch {args.batch} x {args.seq} tokens")

    tx = optax.adam(1e-4)

    def nll(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def full_step(p, s):
        g = jax.grad(lambda p: nll(model.apply({"params": p}, x)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def lora_step(t, s):
        g = jax.grad(lambda t: nll(ad.apply(model, params, t, lcfg, x)))(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s

    full_jit, lora_jit = jax.jit(full_step), jax.jit(lora_step)
    s_full, s_lora = tx.init(params), tx.init(lora)
    merge_jit = jax.jit(lambda p, t: ad.merge(p, t, lcfg))
    merged = merge_jit(params, lora)
    fwd_merged = jax.jit(lambda p: model.apply({"params": p}, x))
    fwd_lora = jax.jit(lambda t: ad.apply(model, params, t, lcfg, x))
    np.testing.assert_allclose(np.asarray(fwd_lora(lora)), np.asarray(fwd_merged(merged)), atol=2e-3, rtol=2e-3)

    t = time_round_robin({
        "full step": (full_jit, (params, s_full)),
        "lora step": (lora_jit, (lora, s_lora)),
        "merged forward": (fwd_merged, (merged,)),
        "unmerged forward": (fwd_lora, (lora,)),
        "merge": (merge_jit, (params, lora)),
    }, args.repeats)
    state_full = tree_bytes(s_full) + tree_bytes(params)  # Adam moments + the gradient (same shapes as params)
    state_lora = tree_bytes(s_lora) + tree_bytes(lora)
    peak_full, peak_lora = peak_bytes(full_jit, params, s_full), peak_bytes(lora_jit, lora, s_lora)

    print("\n| row | ours | anchor | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| train step time: LoRA / full | {t['lora step'] * 1e3:.1f} ms | {t['full step'] * 1e3:.1f} ms | "
          f"{t['lora step'] / t['full step']:.3f} | < 1 |")
    print(f"| optimizer state + gradient bytes: LoRA / full | {state_lora} | {state_full} | "
          f"{state_lora / state_full:.4f} | ~ trainable fraction {n_lora / n_params:.4f} |")
    if peak_full > 0:
        print(f"| compiled step peak (XLA estimate): LoRA / full | {peak_lora} | {peak_full} | "
              f"{peak_lora / peak_full:.3f} | < 1 |")
    ratio = t["unmerged forward"] / t["merged forward"]
    print(f"| forward time: unmerged r={args.rank} / merged | {t['unmerged forward'] * 1e3:.1f} ms | "
          f"{t['merged forward'] * 1e3:.1f} ms | {ratio:.3f} | <= 1.15 {'ok' if ratio <= 1.15 else 'MISSED'} |")
    print(f"| merge W + s A B (once per checkpoint) / merged forward | {t['merge'] * 1e3:.1f} ms | "
          f"{t['merged forward'] * 1e3:.1f} ms | {t['merge'] / t['merged forward']:.3f} | |")


if __name__ == "__main__":
    main()
