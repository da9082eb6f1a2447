# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab][colab-badge]][colab-link]
#
# [colab-badge]: https://colab.research.google.com/assets/colab-badge.svg
# [colab-link]: https://colab.research.google.com/github/weightlab/weightlab/blob/main/colabs/qat.ipynb
#
# # Quantization-aware training: LSQ vs oscillation-free QAT on a ViT, and BitNet b1.58
#
# 1. Train a small ViT on scikit-learn's 8x8 digits in float32.
# 2. Fine-tune it with 4-, 3- and 2-bit weights two ways, both through `quant.qat` (no model edits):
#    the learnable-scale baseline **LSQ** (Esser et al. 2020) and **OFQ** (Liu et al. 2023): StatsQ (statistical
#    scale) + query-key reparameterization (QKR) + confidence-guided annealing (CGA, the last part of training).
#    We count weight oscillations (a level change opposite to the previous one; Nagel et al. 2022) along the way.
# 3. Train a small GPT decoder with BitNet b1.58 (ternary absmean weights, 8-bit per-token activations) vs float32.
#
# Runs as a script (`python colabs/qat.py [--quick] [--seed N]`) or a notebook. `--quick` only shrinks the step
# budgets. Every train step and every evaluation is compiled once: the bit-width is a traced argument of one jitted
# step per method (`quant.lsq` / `quant.statsq` accept a traced integer `bits`), so W4, W3 and W2 share it.

# %%
# Setup, the same first cell in every weightlab notebook. Outside a checkout (Colab) it clones WEIGHTLAB_REPO (a fork
# or a local path: the one thing to change) and installs it with its notebook extras when weightlab is not
# importable; then jaxmodels.runtime chooses the devices: on CPU only, 8 virtual devices so the sharded code paths
# really run; on a GPU or TPU runtime, the real devices, unchanged. Quick mode (the tests): `--quick` or
# WEIGHTLAB_QUICK=1.
WEIGHTLAB_REPO = "https://github.com/weightlab/weightlab"
import os
import subprocess
import sys

if "__file__" in globals():  # a script in a checkout: the repository root first (colabs/merging.py must not
    _here = os.path.dirname(os.path.abspath(__file__))  # shadow the `merging` package)
    REPO_ROOT = os.path.dirname(_here)
    sys.path = [REPO_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _here]
else:  # a notebook: its checkout (the kernel runs in colabs/ or the root), else a clone
    REPO_ROOT = next((d for d in (os.getcwd(), os.path.dirname(os.getcwd()))
                      if os.path.isfile(os.path.join(d, "jaxmodels", "runtime.py"))), None)
    if REPO_ROOT is None:
        REPO_ROOT = WEIGHTLAB_REPO if os.path.isdir(WEIGHTLAB_REPO) else os.path.abspath("weightlab")
        if not os.path.isdir(REPO_ROOT):
            subprocess.run(["git", "clone", "--depth", "1", WEIGHTLAB_REPO, REPO_ROOT], check=True)
    sys.path = [REPO_ROOT] + [p for p in sys.path if p != REPO_ROOT]
try:
    import jaxmodels.runtime
except ImportError:  # a dependency is missing: install the checkout with its notebook extras
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", REPO_ROOT + "[colab]"], check=True)
    import jaxmodels.runtime
PLATFORM = jaxmodels.runtime.setup_devices(8)
QUICK = jaxmodels.runtime.quick_mode()
print(f"weightlab from {REPO_ROOT}; platform {PLATFORM}; quick {QUICK}")

# %%
import re
import time


import jax
import jax.numpy as jnp
import numpy as np
import optax

import quant
from jaxmodels.datasets import load_digits_split
from jaxmodels.models.gpt import GPT
from jaxmodels.models.vit import ViT, VIT_CONFIGS
from jaxmodels.train import softmax_cross_entropy
from quant import oscillation, qat, statsq

SEED = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
t_start = time.perf_counter()
results: list[tuple[str, str]] = []
print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, quick={QUICK}")

# %% [markdown]
# ## 1. Float ViT on digits

# %%
data = load_digits_split(seed=0, images=True)
vit_cfg = dict(VIT_CONFIGS["digits"])
model = ViT(**vit_cfg)
# one jitted init (eagerly, every initializer compiles on its own); the RBG key compiles far less than threefry
params0 = jax.jit(model.init)(jax.random.key(SEED, impl="rbg"), jnp.zeros((1, 8, 8, 1)))["params"]
BATCH = 64 if QUICK else 128
QAT_BATCH = 32 if QUICK else 128
FP_STEPS = 200 if QUICK else 2000
QAT_STEPS = 30 if QUICK else 1000  # main QAT phase
CGA_STEPS = 15 if QUICK else 300  # OFQ: CGA phase appended; LSQ trains the same total number of steps
rng = np.random.default_rng(SEED)


def batches(n, batch=BATCH):
    for _ in range(n):
        idx = rng.integers(0, len(data.x_train), batch)
        yield data.x_train[idx], data.y_train[idx]


def test_accuracy(step, state, *args, batch=BATCH):
    """Test accuracy from the train step's own forward: ``step(*state, x, y, *args)`` returns the logits of its batch
    last; the update it computes is dropped. Test batches are padded to the train batch's shape, so no other
    program is compiled."""
    correct = 0
    for i in range(0, len(data.x_test), batch):
        x, y = data.x_test[i:i + batch], data.y_test[i:i + batch]
        pad = batch - len(x)
        logits = step(*state, np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]),
                      np.concatenate([y, np.zeros(pad, y.dtype)]), *args)[-1]
        correct += int((np.argmax(np.asarray(logits)[:len(x)], -1) == y).sum())
    return correct / len(data.x_test)


def loss_and_logits(apply, v, x, y):
    logits = apply(v, x)
    return softmax_cross_entropy(logits, y), logits


tx_fp = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 50, FP_STEPS), weight_decay=1e-4)


@jax.jit
def fp_step(p, opt, x, y):
    (loss, logits), g = jax.value_and_grad(
        lambda p: loss_and_logits(lambda p, x: model.apply({"params": p}, x), p, x, y), has_aux=True)(p)
    up, opt = tx_fp.update(g, opt, p)
    return optax.apply_updates(p, up), opt, loss, logits


p, opt = params0, tx_fp.init(params0)
for x, y in batches(FP_STEPS):
    p, opt, loss, _ = fp_step(p, opt, x, y)
fp_params = p
fp_acc = test_accuracy(fp_step, (fp_params, opt))
print(f"float ViT: test accuracy {fp_acc:.3f}  ({time.perf_counter() - t_start:.1f}s)")
results.append(("ViT fp32 accuracy", f"{fp_acc:.3f}"))

# %% [markdown]
# ## 2. 4/3/2-bit weight QAT: LSQ vs StatsQ + QKR + CGA
#
# Patch embedding and classifier head stay in float (common practice, and in OFQ). Every step we record the
# integer level of every quantized weight (for OFQ the QKR product `W_q W_kᵀ` replaces the query/key kernels)
# and count oscillations. The CGA phase freezes weights confidently inside a bin (`quant.statsq.cga_freeze`).
# Each method's config is a function of the bit-width; `make_qat` compiles its train step and its test evaluation
# once, with `bits` a traced int32, and `run_qat` trains one bit-width with them.

# %%
KEEP_FLOAT = (r"patch_embed|head", None)


COMMON = r"(value|out|fc1|fc2)/kernel$"  # layers both methods quantize the same way (OFQ replaces query/key by QKR)


def make_qat(config, optimizer):
    """``config(bits) -> QATConfig``, ``optimizer(bits) -> optax transform``; ``bits`` is traced inside the step."""
    def levels(v, bits):
        return {k: l for k, l in qat.weight_levels(config(bits), v).items() if re.search(COMMON, k)}

    @jax.jit
    def step(qv, opt, osc, x, y, bits):
        apply = qat.qat_apply(config(bits), model)
        (loss, logits), g = jax.value_and_grad(lambda v: loss_and_logits(apply, v, x, y), has_aux=True)(qv)
        up, opt = optimizer(bits).update(g, opt, qv)
        qv = optax.apply_updates(qv, up)
        return qv, opt, oscillation.oscillation_update(osc, levels(qv, bits)), loss, logits

    start = jax.jit(lambda qv, bits: oscillation.oscillation_init(levels(qv, bits)))
    return step, start


def run_qat(compiled, config, optimizer, bits):
    step, start = compiled
    qv = qat.qat_init(config(bits), model, fp_params, data.x_train[:QAT_BATCH])  # LSQ steps from the float weights
    opt = optimizer(bits).init(qv)
    b = jnp.int32(bits)
    osc = start(qv, b)
    for i, (x, y) in enumerate(batches(QAT_STEPS + CGA_STEPS, QAT_BATCH)):
        if i == QAT_STEPS:
            before = oscillation.oscillation_summary(osc)
        qv, opt, osc, loss, _ = step(qv, opt, osc, x, y, b)
    after = oscillation.oscillation_summary(osc)
    final = {"oscillations": after["oscillations"] - before["oscillations"], "flips": after["flips"] - before["flips"]}
    return test_accuracy(step, (qv, opt, osc), b, batch=QAT_BATCH), after, final


def qat_tx(total, cga=None):
    base = optax.adamw(optax.cosine_decay_schedule(5e-4, total), weight_decay=0.0)
    return base if cga is None else optax.chain(base, cga)


bits_list = (4, 3, 2)
table = []
total = QAT_STEPS + CGA_STEPS
lsq_cfg = lambda bits: qat.QATConfig(weights=(KEEP_FLOAT, (r"kernel$", qat.LSQW(bits))))
lsq_tx = lambda bits: qat_tx(total)
ofq_cfg = lambda bits: qat.QATConfig(weights=(KEEP_FLOAT, (r"kernel$", qat.StatsQW(bits))),
                                     qkr=qat.QKRConfig(r"attn$", bits, vit_cfg["num_heads"]))
ofq_tx = lambda bits: qat_tx(total, statsq.cga_freeze([(r"params/.*" + COMMON, bits)], boundary_range=0.005,
                                                      start_step=QAT_STEPS))
lsq_compiled, ofq_compiled = make_qat(lsq_cfg, lsq_tx), make_qat(ofq_cfg, ofq_tx)
for bits in bits_list:
    acc_lsq, osc_lsq, fin_lsq = run_qat(lsq_compiled, lsq_cfg, lsq_tx, bits)
    acc_ofq, osc_ofq, fin_ofq = run_qat(ofq_compiled, ofq_cfg, ofq_tx, bits)
    table.append((bits, acc_lsq, osc_lsq, fin_lsq, acc_ofq, osc_ofq, fin_ofq))
    print(f"W{bits}: LSQ acc {acc_lsq:.3f} oscillations {osc_lsq['oscillations']:5d} (last phase "
          f"{fin_lsq['oscillations']:4d})  |  StatsQ+QKR+CGA acc {acc_ofq:.3f} oscillations "
          f"{osc_ofq['oscillations']:5d} (last phase {fin_ofq['oscillations']:4d})   "
          f"({time.perf_counter() - t_start:.1f}s)")
    results.append((f"W{bits} LSQ acc / oscillations (total, last phase)",
                    f"{acc_lsq:.3f} / {osc_lsq['oscillations']}, {fin_lsq['oscillations']}"))
    results.append((f"W{bits} StatsQ+QKR+CGA acc / oscillations (total, last phase)",
                    f"{acc_ofq:.3f} / {osc_ofq['oscillations']}, {fin_ofq['oscillations']}"))

# %% [markdown]
# ## 3. BitNet b1.58 decoder vs float32
#
# BitLinear (Ma et al. 2024, "The Era of 1-bit LLMs"): weights `W_hat = mean|W| * clip(round(W / mean|W|), -1, 1)`,
# activations 8-bit absmax per token, straight-through gradients; embeddings and the (tied) head stay in float.
# Data (no network needed): the source code of two Python standard-library modules (~120k characters), character
# level; the last 10% is held out for validation.

# %%
import argparse  # noqa: E402
import inspect  # noqa: E402
import textwrap  # noqa: E402

text = inspect.getsource(argparse) + inspect.getsource(textwrap)
chars, ids = np.unique(np.array(list(text)), return_inverse=True)
chars, ids = list(chars), ids.astype(np.int32)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
SEQ = 64
gpt = GPT(vocab_size=len(chars), max_len=SEQ, width=64, depth=2, num_heads=4, mlp_dim=256)
gparams = jax.jit(gpt.init)(jax.random.key(SEED + 1, impl="rbg"), jnp.zeros((1, SEQ), jnp.int32))["params"]
LM_STEPS = 100 if QUICK else 2000
LM_BATCH = 16 if QUICK else 32


def lm_batch(src, n, r):
    starts = r.integers(0, len(src) - SEQ - 1, n)
    x = np.stack([src[s:s + SEQ] for s in starts])
    y = np.stack([src[s + 1:s + SEQ + 1] for s in starts])
    return x, y


def train_lm(apply):
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-2, 30, LM_STEPS), weight_decay=0.0)
    v = {"params": gparams, "quant": {}}
    opt = tx.init(v)

    def loss_fn(v, x, y):
        return softmax_cross_entropy(apply(v, x).reshape(-1, len(chars)), y.reshape(-1))

    @jax.jit
    def step(v, opt, x, y):
        loss, g = jax.value_and_grad(loss_fn)(v, x, y)
        up, opt = tx.update(g, opt, v)
        return optax.apply_updates(v, up), opt, loss

    r = np.random.default_rng(SEED)
    for _ in range(LM_STEPS):
        v, opt, loss = step(v, opt, *lm_batch(train_ids, LM_BATCH, r))
    # validation loss on 64 held-out windows, LM_BATCH at a time through the train step's own forward (its update
    # is dropped): the mean of equal-sized chunk means, and no second program compiled
    vx, vy = lm_batch(val_ids, 64, np.random.default_rng(SEED + 1))
    val = np.mean([float(step(v, opt, vx[i:i + LM_BATCH], vy[i:i + LM_BATCH])[2]) for i in range(0, 64, LM_BATCH)])
    return val / np.log(2), v["params"]  # bits per character


fp_lm, _ = train_lm(lambda v, x: gpt.apply({"params": v["params"]}, x))
bitnet_cfg = qat.QATConfig(weights=((r"embed|head", None), (r"kernel$", qat.FakeQuantW(quant.TERNARY, ste="identity"))),
                           activations=((r"attn|mlp", qat.DynamicActQ(8)),))
bitnet_lm, bitnet_params = train_lm(qat.qat_apply(bitnet_cfg, gpt))
print(f"char LM validation bits/char: fp32 {fp_lm:.3f}   BitNet b1.58 {bitnet_lm:.3f}   "
      f"({time.perf_counter() - t_start:.1f}s)")
results.append(("GPT fp32 val bits/char", f"{fp_lm:.3f}"))
results.append(("GPT BitNet b1.58 val bits/char", f"{bitnet_lm:.3f}"))

# Stored size of the trained ternary decoder: real 2-bit packing via QuantizedArray (one jitted pass).
packed = jax.jit(lambda p: quant.quantize_tree(p, [(r"embed", None), (r"kernel$", quant.TERNARY)]))(bitnet_params)
flat_fp = sum(np.asarray(l).nbytes for l in jax.tree_util.tree_leaves(bitnet_params))
flat_q = sum(l.nbytes if quant.is_quantized(l) else np.asarray(l).nbytes
             for l in jax.tree_util.tree_leaves(packed, is_leaf=quant.is_quantized))
print(f"decoder bytes: fp32 {flat_fp}  ternary-packed kernels {flat_q}")
results.append(("GPT bytes fp32 -> packed ternary", f"{flat_fp} -> {flat_q}"))

# %%
print("\n| result | value |\n| --- | --- |")
for k, v in results:
    print(f"| {k} | {v} |")
print(f"total time {time.perf_counter() - t_start:.1f}s")
