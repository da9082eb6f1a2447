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
# # Post-training quantization of a real sentence encoder
#
# all-MiniLM-L6-v2 (real weights, `jaxmodels.models.bert`): every linear layer quantized with RTN, GPTQ (with and
# without act-order), AWQ, RSQ, FlexRound, codebook (vector) quantization, RTN + LoRC and layer-wise mixed precision
# (LIM / ZD ranking, half a bit above the setting) at W4 g128, W3 g128 and W2 g64, calibrated on sentences from
# Python's stdlib docstrings and evaluated on held-out sentences from other modules: mean cosine similarity of the
# embeddings to the float model, and Spearman rank retention of all pairwise similarities. Then ZeroQuant-FP (FP4
# weights, FP8 activations), and export: a packed checkpoint, its size, and a model that runs from it with
# dequantize-on-the-fly.
# `python colabs/ptq.py --quick` runs a reduced version (fewer sentences, W4 and W3 only, the calibration-heavy
# FlexRound / codebook / plain GPTQ / ZD rows and ZeroQuant-FP left out: their own tests check them on MiniLM).

# %%
import os
import sys
import tempfile
import time

import jax
import matplotlib
import numpy as np

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxmodels.io import save_safetensors
from jaxmodels.models.bert import load_minilm
from quant.ptq.evaluate import embed_batches, embed_quantized, embedding_metrics, format_table, ptq_table, run_method
from quant.ptq.export import load_quantized, materialize, quantized_tree, save_quantized
from quant.ptq.minilm import bert_block_model, calibration_sentences, evaluation_sentences

QUICK = "--quick" in sys.argv
N_CAL, N_EVAL, MAX_LEN = (32, 48, 32) if QUICK else (128, 256, 128)
SETTINGS = ("W4 g128", "W3 g128") if QUICK else ("W4 g128", "W3 g128", "W2 g64")
METHODS = (("rtn", "gptq-ao", "awq", "rsq", "rtn+lorc", "mp-lim") if QUICK else
           ("rtn", "gptq", "gptq-ao", "awq", "rsq", "flexround", "codebook", "rtn+lorc", "mp-lim", "mp-zd"))
print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, quick={QUICK}")

# %%
embedder = load_minilm(max_length=MAX_LEN)
model = bert_block_model(embedder)
params = embedder.params
calib = embedder.tokenizer(calibration_sentences(N_CAL))
eval_sents = evaluation_sentences(N_EVAL)
eval_batches = [embedder.tokenizer(eval_sents[i:i + 64]) for i in range(0, N_EVAL, 64)]
print(f"{N_CAL} calibration sentences ({calib['input_ids'].shape}), {N_EVAL} held-out sentences")

# %% [markdown]
# ## The table

# %%
t0 = time.perf_counter()
rows = ptq_table(params, model, calib, eval_batches, methods=METHODS, settings=SETTINGS)
print(format_table(rows))
print(f"(total {time.perf_counter() - t0:.0f} s)")

# %% [markdown]
# ## Per-layer output error (relative ‖XW − XŴ‖² / ‖XW‖² on the calibration tokens) at the lowest setting

# %%
low = SETTINGS[-1]
fig, ax = plt.subplots(figsize=(10, 3.5))
for r in rows:
    if r["setting"] == low and r["layer_errors"]:  # (RTN + LoRC reports weight errors only)
        errs = r["layer_errors"]
        ax.semilogy(range(len(errs)), list(errs.values()), marker="o", ms=3, label=r["method"])
names = list(next(r for r in rows if r["setting"] == low)["layer_errors"])
ax.set_xticks(range(len(names)), [n.replace("/kernel", "").replace("attention/", "") for n in names],
              rotation=90, fontsize=6)
ax.set_ylabel("relative output error")
ax.set_title(f"all-MiniLM-L6-v2, {low}")
ax.legend()
fig.tight_layout()
out_dir = tempfile.mkdtemp()
fig.savefig(os.path.join(out_dir, "ptq_layer_errors.png"), dpi=100)

# %% [markdown]
# ## ZeroQuant-FP: W4A8 in floating point
# FP4 E2M1 weights (g128, GPTQ on the FP4 grid, M2 power-of-two scales so every FP4 weight casts exactly to FP8) and
# FP8 E4M3 per-token activations, against the same FP4 weights with float activations and INT4 RTN.

# %%
if not QUICK:
    e_float = embed_batches(model, params, eval_batches)
    for m in ("zeroquant-fp", "gptq-fp4"):
        q, rep = run_method(m, params, model, calib, 4, 128)
        print(f"{m:13s}", embedding_metrics(e_float, embed_quantized(model, q, rep, eval_batches)),
              "FP4->FP8 cast exact:", rep["cast_exact"])

# %% [markdown]
# ## Export: packed checkpoint, size on disk, and dequantize-on-the-fly inference

# %%
q, rep = run_method("gptq-ao", params, model, calib, 4, 128)
tree = quantized_tree(q, rep)
float_bytes = save_safetensors(os.path.join(out_dir, "float.safetensors"), params).stat().st_size
q_bytes = save_quantized(os.path.join(out_dir, "w4.safetensors"), tree)
loaded = load_quantized(os.path.join(out_dir, "w4.safetensors"))
fwd = jax.jit(lambda t, b: model.forward(materialize(t), b))  # dequantizes inside the jitted forward
e_loaded = np.concatenate([np.asarray(fwd(loaded, b)) for b in eval_batches])
e_q = embed_batches(model, q, eval_batches)
e_float = embed_batches(model, params, eval_batches)
print(f"float checkpoint {float_bytes / 2**20:.1f} MiB -> W4 g128 packed {q_bytes / 2**20:.1f} MiB "
      f"(x{float_bytes / q_bytes:.2f}; word embeddings stay float)")
print("loaded vs in-memory quantized:", embedding_metrics(e_q, e_loaded))
print("loaded vs float:", embedding_metrics(e_float, e_loaded))
assert embedding_metrics(e_q, e_loaded)["cosine"] > 0.999
assert q_bytes < float_bytes
