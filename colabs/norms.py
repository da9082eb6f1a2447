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
# [colab-link]: https://colab.research.google.com/github/weightlab/weightlab/blob/main/colabs/norms.ipynb
#
# # Where to put the norm: Post-LN, Pre-LN, Peri-LN and LayerNorm Scaling
#
# We train the GPT-style decoder of `jaxmodels.models.gpt` as a character-level language model on a text that
# ships with Python (the source of the standard library's `argparse` module) with four norm placements:
#
# | variant | block | paper |
# | --- | --- | --- |
# | Post-LN | `h = Norm(h + F(h))` | Vaswani et al. 2017 |
# | Pre-LN | `h = h + F(Norm(h))` | Xiong et al. 2020 |
# | Peri-LN | `h = h + Norm(F(Norm(h)))` | Kim et al. 2025 |
# | LN-Scaling | `h = h + F(Norm(h) / sqrt(l))` (Pre-LN, block l) | Sun et al. 2025, "The Curse of Depth" |
#
# at a few depths, and compare the loss curves and the norm of the hidden state after each block.
# Pre-LN's residual stream grows with depth (each block adds to it, nothing rescales it), which is what
# LayerNorm Scaling and Peri-LN's output norms are designed to damp.
#
# Runs as a script (`python colabs/norms.py [--quick] [--out DIR]`) and as a notebook.

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
import argparse
import inspect
import tempfile
import time

# --quick trains tiny models for a few steps: compiling them is most of the run, and XLA's LLVM optimization level
# 0 cuts that by a third at no cost here (the same numbers); the full run keeps the default.
if QUICK:
    jaxmodels.runtime.setup_devices(8, fast_compile=True)


import matplotlib.pyplot as plt
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxmodels.models import GPT
from jaxmodels.train import init_train_state, make_train_step

ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true")
ap.add_argument("--out", default=os.environ.get("WEIGHTLAB_COLAB_OUT"),
                help="folder for the plots (default: $WEIGHTLAB_COLAB_OUT, else a new temporary folder)")
args, _ = ap.parse_known_args()
QUICK = QUICK or args.quick
OUT = args.out or tempfile.mkdtemp(prefix="weightlab_norms_")
os.makedirs(OUT, exist_ok=True)
PROGRESS = os.environ.get("WEIGHTLAB_NO_PROGRESS", "0") != "1"
t_start = time.perf_counter()
print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, quick={QUICK}, plots -> {OUT}")

# %% [markdown]
# ## Data: `argparse.py`, character level

# %%
text = inspect.getsource(argparse)
chars = sorted(set(text))
ids = np.array([chars.index(c) for c in text], np.int32)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
SEQ = 32 if QUICK else 64
print(f"{len(text)} characters, vocabulary {len(chars)}, train {len(train_ids)}, validation {len(val_ids)}")


def batches(data, rng, batch):
    starts = rng.integers(0, len(data) - SEQ - 1, batch)
    w = np.stack([data[s:s + SEQ + 1] for s in starts])
    return w[:, :-1], w[:, 1:]


val_starts = np.arange(0, len(val_ids) - SEQ - 1, SEQ)[: 64 if QUICK else 256]
val_x = np.stack([val_ids[s:s + SEQ] for s in val_starts])
val_y = np.stack([val_ids[s + 1:s + SEQ + 1] for s in val_starts])

# %% [markdown]
# ## Train every placement at every depth
# Same data order, initialization seed, optimizer (AdamW, linear warm-up then cosine decay) for all runs.

# %%
VARIANTS = {
    "Post-LN": dict(placement="post"),
    "Pre-LN": dict(placement="pre"),
    "Peri-LN": dict(placement="peri"),
    "LN-Scaling": dict(placement="pre", ln_scaling=True),
}
DEPTHS = (2, 4) if QUICK else (4, 12, 24)
STEPS = 40 if QUICK else 800
BATCH = 16 if QUICK else 32
WIDTH = 32 if QUICK else 64
LR = 3e-3 if QUICK else 1e-3


def make_model(depth, variant):
    return GPT(vocab_size=len(chars), max_len=SEQ, width=WIDTH, depth=depth, num_heads=4, mlp_dim=4 * WIDTH,
               scan_layers=not QUICK, **VARIANTS[variant])  # scanned layers compile once for any depth


tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, LR, STEPS // 10, STEPS), weight_decay=0.01)
tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
jobs = [(d, v) for d in DEPTHS for v in VARIANTS]
models = {job: make_model(*job) for job in jobs}
# eager init: op by op it costs a fraction of compiling each init (every op is cached across the runs)
states = {job: init_train_state(m.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"], tx)
          for job, m in models.items()}
# Every run sees the same batches, so all runs advance in lockstep through ONE jitted step: one compile for all of
# them instead of one per run (XLA's fixed cost per program dominates at this size); each run's math is unchanged.
steps = {job: make_train_step(lambda p, x, m=m: m.apply({"params": p}, x), tx) for job, m in models.items()}
step_all = jax.jit(lambda sts, x, y: {job: steps[job].__wrapped__(sts[job], x, y) for job in sts},
                   donate_argnums=(0,))
rng = np.random.default_rng(0)
losses = {job: [] for job in jobs}
t0 = time.perf_counter()
for _ in tqdm(range(STEPS), disable=not PROGRESS, desc="steps (all runs)"):
    x, y = batches(train_ids, rng, BATCH)
    out = step_all(states, x, y)
    states = {job: st for job, (st, _) in out.items()}
    for job, (_, m) in out.items():
        losses[job].append(m["loss"])
train_time = time.perf_counter() - t0


def evaluate(model, p):  # validation loss and the per-block hidden-state norms (sown by every block) in one pass
    # (eager: one forward pass costs less than compiling it)
    logits, inter = model.apply({"params": p}, val_x, mutable=["intermediates"])
    val = optax.softmax_cross_entropy_with_integer_labels(logits, val_y).mean()
    inter = inter["intermediates"]
    if model.scan_layers:  # one entry per block along the scanned axis
        return float(val), np.asarray(inter["layers"]["hidden_norm"][0])
    return float(val), np.array([inter[f"block_{i}"]["hidden_norm"][0] for i in range(model.depth)])


results = {}
for job in jobs:
    val, norms = evaluate(models[job], states[job].params)
    results[job] = dict(losses=np.asarray(jax.device_get(losses[job])), val=val, norms=norms,
                        time=train_time / len(jobs))  # the lockstep training time, shared equally

# %% [markdown]
# ## Loss curves

# %%
def smooth(x, k):
    k = max(1, min(k, len(x)))
    return np.convolve(x, np.ones(k) / k, mode="valid")


fig, axes = plt.subplots(1, len(DEPTHS), figsize=(5 * len(DEPTHS), 3.5), squeeze=False)
for ax, depth in zip(axes[0], DEPTHS):
    for variant in VARIANTS:
        ax.plot(smooth(results[depth, variant]["losses"], STEPS // 20), label=variant)
    ax.set(title=f"depth {depth}", xlabel="step", ylabel="train loss (nats/char)")
    ax.legend()
fig.tight_layout()
loss_png = os.path.join(OUT, "norms_loss_curves.png")
fig.savefig(loss_png, dpi=80)
print("saved", loss_png)

# %% [markdown]
# ## Hidden-state norm after each block (mean L2 norm over tokens, after training)

# %%
fig, axes = plt.subplots(1, len(DEPTHS), figsize=(5 * len(DEPTHS), 3.5), squeeze=False)
for ax, depth in zip(axes[0], DEPTHS):
    for variant in VARIANTS:
        ax.plot(np.arange(1, depth + 1), results[depth, variant]["norms"], marker="o", label=variant)
    ax.set(title=f"depth {depth}", xlabel="layer", ylabel="||h_l||", yscale="log")
    ax.legend()
fig.tight_layout()
norm_png = os.path.join(OUT, "norms_hidden_norm.png")
fig.savefig(norm_png, dpi=80)
print("saved", norm_png)

# %% [markdown]
# ## Results
# `growth` = hidden-state norm after the last block / after the first block.

# %%
rows = [("depth", "variant", "final train", "val loss", "||h_1||", "||h_L||", "growth", "train [s]/run")]
for (depth, variant), r in results.items():
    tail = r["losses"][-max(1, STEPS // 10):].mean()
    rows.append((str(depth), variant, f"{tail:.3f}", f"{r['val']:.3f}", f"{r['norms'][0]:.2f}",
                 f"{r['norms'][-1]:.2f}", f"{r['norms'][-1] / r['norms'][0]:.2f}", f"{r['time']:.1f}"))
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
print("\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows))
deep = DEPTHS[-1]
growth = {v: results[deep, v]["norms"][-1] / results[deep, v]["norms"][0] for v in VARIANTS}
print(f"hidden-norm growth at depth {deep}: " + ", ".join(f"{v} {g:.2f}" for v, g in growth.items()))
print(f"LN-Scaling damps Pre-LN growth: {growth['LN-Scaling'] < growth['Pre-LN']}")
print(f"total wall time [s] {time.perf_counter() - t_start:.1f}")
