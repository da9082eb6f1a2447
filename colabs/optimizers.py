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
# [colab-link]: https://colab.research.google.com/github/weightlab/weightlab/blob/main/colabs/optimizers.ipynb
#
# # Layer-aware optimizers: LAMB, LARS, AdamP/SGDP, LISA
#
# `jaxmodels.optim` implements optimizers that treat each layer differently, as Optax transforms:
#
# * **LAMB** (You et al. 2020) and **LARS** (You et al. 2017) rescale each layer's step by a trust ratio
#   ‖w‖/‖update‖, which keeps large-batch / large-learning-rate training stable;
# * **AdamP / SGDP** (Heo et al. 2021) remove the radial component of the update of scale-invariant weights
#   (weights followed by a normalization layer), which otherwise inflates their norm;
# * **LISA** (Pan et al. 2024) trains only γ randomly sampled middle layers per period and keeps optimizer state only
#   for them;
# * **GradNormLoRP** (Huang et al. 2025) weight-normalises each kernel per output channel and runs Adam on the
#   direction's gradient projected to rank r (GaLore), so its state for a kernel is low-rank (last section).
#
# We train one small model — a residual MLP with stacked (scanned) blocks and RMS normalization on scikit-learn's
# digits — with each of them and compare loss curves, test accuracy, the growth of a
# scale-invariant weight's norm, and optimizer-state memory. Runs as a script (`python colabs/optimizers.py
# [--quick]`) and as a notebook.

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
import tempfile
import time

# --quick trains tiny models for a few steps: compiling them is most of the run, and XLA's LLVM optimization level
# 0 cuts that by a third at no cost here (the same numbers); the full run keeps the default.
if QUICK:
    jaxmodels.runtime.setup_devices(8, fast_compile=True)

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jaxmodels
from jaxmodels import optim
from jaxmodels.datasets import load_digits_split
from jaxmodels.train import accuracy, init_train_state, make_train_step

t_start = time.perf_counter()
OUT = tempfile.mkdtemp(prefix="weightlab_optimizers_")  # the figures, when run as a script
print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, quick={QUICK}")

# %% [markdown]
# ## The model: embed → L stacked residual blocks (scan) → head
#
# The blocks live under `layers/` with a leading layer axis, the layout `nn.scan` produces, which is what LISA
# needs to keep state only for the active layers. Each block's first kernel `w1` is followed by RMS normalization of
# its output, so it is scale-invariant: the loss does not change when `w1` is scaled.

# %%
L, D, H = 6, 64, 128
data = load_digits_split(seed=0)


def init_params(key):
    k = jax.random.split(key, 4)
    n = jax.random.normal
    return {"embed": {"kernel": n(k[0], (64, D)) / 8.0, "bias": jnp.zeros(D)},
            "layers": {"w1": n(k[1], (L, D, H)) / np.sqrt(D), "scale": jnp.ones((L, H)),
                       "w2": n(k[2], (L, H, D)) / np.sqrt(H) / np.sqrt(L)},
            "head": {"kernel": n(k[3], (D, 10)) / np.sqrt(D), "bias": jnp.zeros(10)}}


def apply_fn(p, x):
    h = x @ p["embed"]["kernel"] + p["embed"]["bias"]

    def block(h, lp):
        z = h @ lp["w1"]
        z = z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + 1e-6) * lp["scale"]  # w1 is scale-invariant
        return h + jax.nn.relu(z) @ lp["w2"], None

    h, _ = jax.lax.scan(block, h, p["layers"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


params0 = init_params(jax.random.key(0))
print(f"{sum(x.size for x in jax.tree.leaves(params0)) / 1e3:.0f}k parameters; paths:",
      list(jaxmodels.flatten(params0)))

# %% [markdown]
# ## Train with each optimizer (same steps, batch, cosine schedule; learning rates set per family)
#
# SGD and LARS run at a large peak learning rate (0.5), SGD and SGDP at a moderate one (0.05), the Adam family at
# 3e-3 (LAMB 1e-2: its per-layer step is lr·‖w‖). Biases and norm scales are excluded from
# weight decay (and, for LAMB, from the trust ratio) with one path regex.

# %%
steps = 60 if QUICK else 600
batch = 256  # divisible by the 8 data shards
no_decay = r"(bias|scale)$"
sgd_lr = optax.warmup_cosine_decay_schedule(0.0, 0.5, steps // 10, steps)  # large: plain SGD diverges
small_lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, steps // 10, steps)
adam_lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps)
lamb_lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps)  # LAMB's step is relative to ‖w‖
optimizers = {
    "sgd@0.5": optax.sgd(sgd_lr, momentum=0.9),
    "lars@0.5": optim.lars(sgd_lr, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02, exclude=no_decay),
    "sgd@0.05": optax.sgd(small_lr, momentum=0.9),
    "sgdp@0.05": optim.sgdp(small_lr, momentum=0.9, weight_decay=1e-4),
    "adamw": optax.adamw(adam_lr, weight_decay=1e-4),
    "lamb": optim.lamb(lamb_lr, weight_decay=1e-4, exclude=no_decay, trust_ratio_on_undecayed=False),
    "adamp": optim.adamp(adam_lr, weight_decay=1e-4),
    "lisa": optim.lisa(adam_lr, gamma=2, interval=max(steps // 20, 1), weight_decay=1e-4),
}

# Single device here (sharded params/state are covered by the tests: pass mesh=jaxmodels.make_mesh() and
# rules=[(r".*", P())] to init_train_state / make_train_step for data parallelism).
mesh, rules = None, None
curves, results, norms, state_bytes = {}, {}, {}, {}


def train(name, tx):
    """Train ``params0`` with ``tx``; record the loss curve, ‖w1‖, test accuracy and optimizer-state bytes."""
    state = init_train_state(jax.tree.map(np.array, params0), tx, mesh, rules)  # copy: the step donates
    state_bytes[name] = jaxmodels.tree_bytes(state.opt_state)
    step_fn = make_train_step(apply_fn, tx, mesh=mesh, rules=rules)
    rng = np.random.default_rng(0)
    losses, w_norm = [], [float(jnp.linalg.norm(params0["layers"]["w1"]))]
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(data.x_train), batch)
        state, metrics = step_fn(state, data.x_train[idx], data.y_train[idx])
        losses.append(metrics["loss"])
        w_norm.append(jnp.linalg.norm(state.params["layers"]["w1"]))
    losses, w_norm = [float(v) for v in losses], [float(v) for v in w_norm]
    acc = float(accuracy(apply_fn(state.params, jnp.asarray(data.x_test)), jnp.asarray(data.y_test)))
    curves[name], norms[name] = np.asarray(losses), np.asarray(w_norm)
    results[name] = acc
    print(f"{name:9s} final train loss {np.mean(losses[-10:]):.4f}  test accuracy {acc:.3f}  "
          f"({time.perf_counter() - t0:.1f}s)")


for name, tx in optimizers.items():
    train(name, tx)

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
for name, c in curves.items():
    axes[0].plot(np.convolve(c, np.ones(5) / 5, mode="valid"), label=name)
    axes[1].plot(norms[name] / norms[name][0], label=name)
axes[0].set(yscale="log", xlabel="step", ylabel="train loss (smoothed)", title="training loss")
axes[1].set(xlabel="step", ylabel="‖w1‖ / ‖w1‖₀", title="norm of the scale-invariant kernel")
names = list(state_bytes)
axes[2].bar(names, [state_bytes[n] / state_bytes["adamw"] for n in names])
axes[2].set(ylabel="optimizer state / AdamW's", title="optimizer-state memory")
for ax in axes[:2]:
    ax.legend()
plt.tight_layout()
fig.savefig(os.path.join(OUT, "optimizers_curves.png"), dpi=80)  # shown inline in a notebook, a file as a script

# %% [markdown]
# ## Results
#
# AdamP/SGDP's projection keeps the scale-invariant kernel's norm from growing (compare with Adam/SGD), LAMB/LARS
# train stably at the large SGD learning rate, and LISA trains with a fraction of AdamW's optimizer state.

# %%
print("\n| optimizer | test accuracy | ‖w1‖ growth | state / AdamW |")
print("| --- | --- | --- | --- |")
for n in names:
    print(f"| {n} | {results[n]:.3f} | {norms[n][-1] / norms[n][0] - 1:+.3f} | "
          f"{state_bytes[n] / state_bytes['adamw']:.3f} |")
for n in names:
    print(f"RESULT {n} accuracy {results[n]:.4f} norm_growth {norms[n][-1] / norms[n][0] - 1:.4f} "
          f"state_ratio {state_bytes[n] / state_bytes['adamw']:.4f}")

# %% [markdown]
# ## GradNormLoRP: weight-normalised, low-rank optimizer state
#
# GradNormLoRP writes each selected kernel column-wise as w = δ v/‖v‖ and projects the gradient of the direction v
# onto its top-r singular vectors (recomputed every `update_proj_gap` steps); Adam runs on the r-dimensional
# projection and its step is projected back, the magnitudes δ get a full Adam. Per layer of the stack (the
# `layers/` leaves are per-layer matrices) the state is a projector plus two r × 128 moments instead of two
# 64 × 128 ones. Low-rank methods are run at a larger peak learning rate than AdamW (as in GaLore).

# %%
lowrank = r"(layers/w[12]|embed/kernel)$"
lowrank_lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps)
train("gradnorm_lorp", optim.gradnorm_lorp(lowrank_lr, rank=16, update_proj_gap=max(steps // 4, 1), weight_decay=1e-4,
                                           weight_norm=lowrank, project=lowrank))
fig, ax = plt.subplots(figsize=(6, 4))
for n in ("adamw", "gradnorm_lorp"):
    ax.plot(np.convolve(curves[n], np.ones(5) / 5, mode="valid"),
            label=f"{n} (state {state_bytes[n] / state_bytes['adamw']:.2f} of AdamW's)")
ax.set(yscale="log", xlabel="step", ylabel="train loss (smoothed)", title="AdamW vs GradNormLoRP (rank 16)")
ax.legend()
fig.savefig(os.path.join(OUT, "gradnorm_lorp_curve.png"), dpi=80)
print(f"LOWRANK gradnorm_lorp accuracy {results['gradnorm_lorp']:.4f} adamw_accuracy {results['adamw']:.4f} "
      f"state_ratio {state_bytes['gradnorm_lorp'] / state_bytes['adamw']:.4f}")
print(f"total time {time.perf_counter() - t_start:.1f}s")
