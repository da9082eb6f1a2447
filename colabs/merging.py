# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab][colab-badge]][colab-link]
#
# [colab-badge]: https://colab.research.google.com/assets/colab-badge.svg
# [colab-link]: https://colab.research.google.com/github/weightlab/weightlab/blob/main/colabs/merging.ipynb
#
# # Model merging on a real small benchmark
#
# One MLP is pre-trained on scikit-learn's handwritten digits and fine-tuned into three **task experts**, each on
# a transformed version of the digits (rotated by 90°, mirrored, inverted intensities). Every merging method of
# weightlab, data-free (`merging.registry`) and data-aware (Fisher, RegMean, RegMean++, greedy soup, AdaMerging,
# aTLAS, Twin-Merging), merges the experts into one model; the table reports per-task and average test accuracy.
#
# A second experiment trains two MLPs from different random seeds and measures the **loss barrier** on the linear
# path between them before and after Git Re-Basin alignment (weight matching and activation matching), and merges
# them with **PLeaS** at several target widths.
#
# At the end the notebook checks, from the numbers it just computed, which of the papers' qualitative claims
# (orderings) this small benchmark reproduces and which it does not. Runs as a script
# (`python colabs/merging.py [--quick]`) or in Colab.

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

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import merging  # noqa: E402, F401  (registers the data-free methods)
from jaxmodels.datasets import load_digits_split  # noqa: E402
from jaxmodels.models import MLP  # noqa: E402
from jaxmodels.train import init_train_state, make_train_step, softmax_cross_entropy  # noqa: E402
from merging import registry  # noqa: E402
from merging.adamerging import adamerging, entropy  # noqa: E402
from merging.atlas import atlas  # noqa: E402
from merging.fisher import diagonal_fisher, fisher_merge  # noqa: E402
from merging.greedy_soup import greedy_soup  # noqa: E402
from merging.linear import uniform_soup  # noqa: E402
from merging.lmc import interpolate, interpolation_path  # noqa: E402
from merging.permutation import (activation_matching, apply_permutation, mlp_permutation_spec,  # noqa: E402
                                 weight_matching)
from merging.pleas import pleas_mlp  # noqa: E402
from merging.regmean import regmean_from_data, regmean_plusplus  # noqa: E402
from merging.twin_merging import twin_apply, twin_merging  # noqa: E402

OUT = os.environ.get("WEIGHTLAB_COLAB_OUT") or tempfile.mkdtemp(prefix="weightlab_merging_")
os.makedirs(OUT, exist_ok=True)
t_start = time.perf_counter()
_last = [time.perf_counter()]
timings: list[tuple[str, float]] = []


def lap(name):
    now = time.perf_counter()
    timings.append((name, now - _last[0]))
    _last[0] = now


print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, quick={QUICK}")

# %% [markdown]
# ## 1. Data: digits and three transformed tasks
#
# The training split is divided into a training part and a small labeled **validation** part (used by the methods
# that need labeled or unlabeled held-out data: Fisher, RegMean, greedy soup, aTLAS, the Twin-Merging router).
# AdaMerging uses the *unlabeled test inputs*, as in the paper (test-time adaptation).

# %%
data = load_digits_split(seed=0)
n_val = 300
x_tr, y_tr = data.x_train[n_val:], data.y_train[n_val:]
x_val, y_val = data.x_train[:n_val], data.y_train[:n_val]
x_te, y_te = data.x_test, data.y_test


def _img(f):
    return lambda x: f(x.reshape(-1, 8, 8)).reshape(-1, 64).copy()


TASKS = {
    "rot90": _img(lambda im: np.rot90(im, 1, axes=(1, 2))),
    "mirror": _img(lambda im: im[:, :, ::-1]),
    "invert": lambda x: 1.0 - x,
}
task_names = list(TASKS)
K = len(task_names)
split = {t: {s: (f(x), y) for s, (x, y) in {"train": (x_tr, y_tr), "val": (x_val, y_val),
                                            "test": (x_te, y_te)}.items()} for t, f in TASKS.items()}

# %% [markdown]
# ## 2. Pre-train a base MLP on the original digits, fine-tune one expert per task

# %%
model = MLP(features=(128, 128), num_outputs=10)
apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
apply_jit = jax.jit(apply_fn)


_train_steps = {}  # one compiled step per (model, steps, lr): fine-tuning every expert reuses it


def train(params, x, y, steps, lr, seed, fn=None):
    fn = fn or apply_fn
    if (fn, steps, lr) not in _train_steps:
        tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
        _train_steps[fn, steps, lr] = (tx, make_train_step(fn, tx))
    tx, step = _train_steps[fn, steps, lr]
    state = init_train_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 64)
        state, _ = step(state, x[idx], y[idx])
    return state.params


def accuracy(params, x, y):
    return float((np.argmax(apply_jit(params, x), -1) == y).mean())


def task_accs(params, which="test"):
    return [accuracy(params, *split[t][which]) for t in task_names]


pre_steps, ft_steps = (400, 400) if QUICK else (1500, 1200)
init = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
base = train(init, x_tr, y_tr, pre_steps, 3e-3, seed=0)
experts = [train(base, *split[t]["train"], ft_steps, 3e-3, seed=1 + k) for k, t in enumerate(task_names)]
lap("pre-train + fine-tune")
print("base accuracy on the original digits:", round(accuracy(base, x_te, y_te), 4))

rows: list[tuple[str, list[float]]] = []  # (method, per-task test accuracies)
rows.append(("pre-trained base", task_accs(base)))
rows.append(("experts (each on its own task)", [task_accs(e)[k] for k, e in enumerate(experts)]))

# %% [markdown]
# ## 3. Data-free methods from the registry
#
# Every registered method runs with its mergekit default hyper-parameters, `weights=1` per model, `density=0.5`
# where the method sparsifies, and a fixed `jax.random` key when it is stochastic. Task arithmetic and TIES also get
# their scaling `λ` chosen on the validation split (as in both papers). Two-model methods (SLERP, WiSE-FT, ...)
# interpolate halfway between the base and the uniform soup of the experts (labelled as such).

# %%
def val_avg(p):
    return float(np.mean(task_accs(p, "val")))


soup = uniform_soup(experts)
key = jax.random.key(0)
data_free_names = []
# --quick runs the methods the claim checks below need plus a few representatives (every compiled merge costs
# seconds on a small CPU); the full run covers the whole registry.
QUICK_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "model_stock", "breadcrumbs")
for name in [n for n in registry.available() if not QUICK or n in QUICK_METHODS]:
    m = registry.get(name)
    kw = {}
    if "weight" in m.per_model:
        kw["weights"] = 1.0
    if "density" in m.per_model:
        kw["density"] = 0.5
    if m.stochastic:
        kw["key"] = key
    label = name
    try:
        merged = m(base, experts, **kw)
    except Exception as e:  # noqa: BLE001 - pairwise or special-purpose methods
        try:
            merged = m(base, [soup], **kw)
            label = f"{name} (base -> uniform soup)"
        except Exception as e2:  # noqa: BLE001
            print(f"  {name}: not applicable here ({type(e).__name__}: {str(e).splitlines()[0][:90]}; "
                  f"{type(e2).__name__}: {str(e2).splitlines()[0][:90]})")
            continue
    rows.append((label, task_accs(merged)))
    data_free_names.append(label)

lambdas = [0.3, 0.5, 0.7, 1.0]
if "task_arithmetic" in registry.available():
    ta = registry.get("task_arithmetic")
    best_l = max(lambdas, key=lambda l: val_avg(ta(base, experts, weights=l)))
    rows.append((f"task_arithmetic (λ={best_l} on val)", task_accs(ta(base, experts, weights=best_l))))
if "ties" in registry.available():
    ties = registry.get("ties")
    cands = [(d, l) for d in ((0.5,) if QUICK else (0.2, 0.5)) for l in lambdas + [1.5, 2.0]]
    best_dl = max(cands, key=lambda c: val_avg(ties(base, experts, density=c[0], weights=1.0, lambda_=c[1])))
    rows.append((f"ties (density={best_dl[0]}, λ={best_dl[1]} on val)",
                 task_accs(ties(base, experts, density=best_dl[0], weights=1.0, lambda_=best_dl[1]))))
lap("data-free methods")

# %% [markdown]
# ## 4. Data-aware methods

# %%
val_batches = [[split[t]["val"]] for t in task_names]  # one (x, y) batch of 300 per task
val_x = [[split[t]["val"][0]] for t in task_names]

# Fisher merging (Matena & Raffel): empirical diagonal Fisher of each expert on its own validation data.
fishers = [diagonal_fisher(apply_fn, e, vb, progress=False) for e, vb in zip(experts, val_batches)]
rows.append(("fisher merging", task_accs(fisher_merge(base, experts, fishers).params)))
lap("fisher")

# RegMean (Jin et al.) and RegMean++ on the experts' own validation inputs, α = 0.9 as in the paper.
rows.append(("regmean (α=0.9)", task_accs(regmean_from_data(base, experts, apply_fn, val_x, alpha=0.9,
                                                            progress=False).params)))
lap("regmean")
rows.append(("regmean++ (α=0.9)", task_accs(regmean_plusplus(base, experts, apply_fn, val_x, alpha=0.9,
                                                              progress=False).params)))
lap("regmean++")

# Greedy soup (Wortsman et al.): ingredients = base + experts, held-out score = mean validation accuracy.
gs = greedy_soup(None, [base] + experts, val_avg, progress=False)
rows.append((f"greedy soup (kept {len(gs.info['selected'])}/{K + 1})", task_accs(gs.params)))
lap("greedy soup")

# AdaMerging (Yang et al.): entropy minimization on unlabeled test batches.
ada_steps = 60 if QUICK else 300
test_x = [[split[t]["test"][0][i:i + 150] for i in range(0, len(x_te), 150)] for t in task_names]
for gran in ("task", "layer"):
    res = adamerging(base, experts, apply_fn, test_x, granularity=gran, steps=ada_steps, learning_rate=1e-2,
                     progress=False)
    rows.append((f"adamerging ({gran}-wise)", task_accs(res.params)))
    lam = np.concatenate([np.ravel(v) for v in res.info["coefficients"].values()])
    ent = [float(np.mean(res.info["losses"][:5])), float(np.mean(res.info["losses"][-5:]))]
    print(f"adamerging {gran}-wise: mean λ {lam.mean():.3f} (init 0.3), entropy objective {ent[0]:.3f} -> {ent[1]:.3f}")
    base_ent = sum(float(entropy(apply_jit(base, xs[0]))) for xs in test_x)
    print(f"  (entropy objective of the pre-trained base itself: {base_ent:.3f})")
lap("adamerging")

# aTLAS (Zhang et al.): one coefficient per parameter block per task vector, 64 labeled validation examples per task.
few = [[(split[t]["val"][0][:64], split[t]["val"][1][:64])] for t in task_names]
at = atlas(base, experts, apply_fn, few, steps=ada_steps, learning_rate=2e-2, progress=False)
rows.append(("atlas (64 labels/task)", task_accs(at.params)))
lap("atlas")

# Twin-Merging (Lu et al.): shared = uniform soup, exclusive = rank-16 SVD of (expert − shared), router on val inputs.
tw = twin_merging(base, experts, apply_fn, val_x, rank=16, steps=200 if QUICK else 500, progress=False)
twin_fn = jax.jit(lambda x: twin_apply(apply_fn, tw, x))
rows.append(("twin-merging (rank 16, routed)",
             [float((np.argmax(twin_fn(split[t]["test"][0]), -1) == y_te).mean()) for t in task_names]))
lap("twin-merging")

# %% [markdown]
# ## 5. The table

# %%
w = max(len(r[0]) for r in rows)
header = f"{'method':<{w}}  " + "  ".join(f"{t:>7}" for t in task_names) + "  average"
print(header)
print("-" * len(header))
table = {}
for name, accs in rows:
    table[name] = float(np.mean(accs))
    print(f"{name:<{w}}  " + "  ".join(f"{a:7.4f}" for a in accs) + f"  {np.mean(accs):7.4f}")

fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1))
ax.barh([r[0] for r in rows][::-1], [table[r[0]] for r in rows][::-1], color="tab:blue")
ax.set_xlabel("average test accuracy over the 3 tasks")
ax.set_xlim(0, 1)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "merging_table.png"), dpi=100)
plt.close(fig)

# %% [markdown]
# ## 6. Git Re-Basin: two MLPs from different seeds, loss barrier before and after alignment
#
# Both models are trained on the original digits from different initializations and data orders. The barrier is
# `max_t L((1−t)θ_A + tθ_B) − ((1−t)L(θ_A) + tL(θ_B))` on the test loss.

# %%
wide = MLP(features=(256, 256), num_outputs=10)
wide_apply = lambda p, x: wide.apply({"params": p}, x)  # noqa: E731
wide_jit = jax.jit(wide_apply)


def train_wide(seed, steps):
    p = wide.init(jax.random.key(100 + seed), jnp.zeros((1, 64)))["params"]
    return train(p, x_tr, y_tr, steps, 3e-3, seed=100 + seed, fn=wide_apply)


seed_steps = 600 if QUICK else 2000
pa, pb = train_wide(0, seed_steps), train_wide(1, seed_steps)
lap("train two seeds")
spec = mlp_permutation_spec(2)
t0 = time.perf_counter()
perm_w = weight_matching(pa, pb, spec, progress=False)
wm_time = time.perf_counter() - t0
pb_w = apply_permutation(pb, spec, perm_w)
perm_a = activation_matching(pa, pb, wide_apply, [x_tr[:512], x_tr[512:]], {"P_0": "Dense_0", "P_1": "Dense_1"},
                             activation=jax.nn.relu, progress=False)
pb_a = apply_permutation(pb, spec, perm_a)
# permuting must not change B's function
np.testing.assert_allclose(wide_jit(pb_w, x_te), wide_jit(pb, x_te), rtol=1e-4, atol=1e-4)


def test_loss(p):
    return float(softmax_cross_entropy(wide_jit(p, x_te), y_te))


candidates = {"naive": pb, "weight matching": pb_w, "activation matching": pb_a}
paths = {name: interpolation_path(test_loss, pa, q, num_points=11 if QUICK else 21, progress=False)
         for name, q in candidates.items()}
for name, q in candidates.items():
    path = paths[name]
    mid_acc = float((np.argmax(wide_jit(interpolate(pa, q, jnp.float32(0.5)), x_te), -1) == y_te).mean())
    print(f"{name:>20}: loss barrier {path.barrier:.4f}   midpoint test acc {mid_acc:.4f}")
acc_a, acc_b = (np.mean(np.argmax(wide_jit(p, x_te), -1) == y_te) for p in (pa, pb))
print(f"weight matching took {wm_time:.2f} s; endpoint test accuracies {acc_a:.4f} / {acc_b:.4f}")
assert paths["weight matching"].barrier < paths["naive"].barrier, "alignment did not lower the barrier"
assert paths["activation matching"].barrier < paths["naive"].barrier, "alignment did not lower the barrier"
lap("re-basin + barriers")

fig, ax = plt.subplots(figsize=(6, 4))
for name, path in paths.items():
    ax.plot(path.ts, path.values, marker="o", label=f"{name} (barrier {path.barrier:.3f})")
ax.set_xlabel("t  (θ = (1-t) θ_A + t θ_B)")
ax.set_ylabel("test loss")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "rebasin_barrier.png"), dpi=100)
plt.close(fig)

# %% [markdown]
# ## 7. PLeaS: merging the two seeds at a target width
#
# Width ratio 1.0 is a merged model of the original size; 2.0 keeps both networks side by side (the logit ensemble).

# %%
pleas_acc = {}
for r in ((1.0, 1.5, 2.0) if QUICK else (1.0, 1.25, 1.5, 1.75, 2.0)):
    res = pleas_mlp(None, [pa, pb], [x_tr[:500], x_tr[500:1000]], width_ratio=r)
    merged_model = MLP(features=res.info["widths"], num_outputs=10)
    pleas_acc[r] = float((np.argmax(merged_model.apply({"params": res.params}, x_te), -1) == y_te).mean())
    print(f"PLeaS width ratio {r:4.2f}: widths {res.info['widths']}, test acc {pleas_acc[r]:.4f}")
wm_avg_acc = float((np.argmax(wide_jit(interpolate(pa, pb_w, jnp.float32(0.5)), x_te), -1) == y_te).mean())
print(f"weight-matching average (same size as ratio 1.0): test acc {wm_avg_acc:.4f}")
lap("pleas")

# %% [markdown]
# ## 8. Which of the papers' orderings does this benchmark reproduce?
#
# Each line compares two numbers computed above; nothing is hard-coded. The claims that hold at this scale are
# **asserted** (in `--quick` mode too, so the test fails if one stops holding); the others are printed with a ✗.
# Where the measured gap is within what a different float reduction order can move (a few test images), the
# assertion is the weaker "not worse by more than `tol`" and says so.
#
# Measured in `--quick` mode (3 tasks, 8x8 digits, 128-unit MLPs; average test accuracy over the tasks):
#
# * hold and asserted: Fisher 0.486 > uniform average 0.268; RegMean 0.872 > Fisher 0.486 and > average;
#   AdaMerging layer-wise 0.292 > task-wise 0.194; Twin-Merging 0.927 > best static merge 0.875; greedy soup
#   0.483 ≥ uniform soup 0.268; Re-Basin barriers 0.029 (weight matching) and 0.026 (activation matching) < naive
#   0.389; PLeaS at width 1.0 0.982 ≥ the weight-matching average 0.967.
# * hold by less than the noise, asserted as "not worse by more than 1 point": RegMean++ 0.875 vs RegMean 0.872
#   (the first layer is identical; only two deeper layers can differ), PLeaS width 2.0 0.984 vs 1.0 0.982 (both
#   near the endpoints' 0.98).
# * do **not** hold here: TIES 0.352 vs task arithmetic 0.434 (λ tuned on validation for both). The experts are fully
#   fine-tuned on input transformations (rotation, mirror, inversion) that need nearly disjoint first-layer
#   features, so their task vectors barely interfere in sign and trimming half of each removes signal rather than
#   noise. AdaMerging task-wise 0.194 vs task arithmetic 0.434: entropy minimization drives λ to ~0.04 because the
#   pre-trained base is *confidently wrong* on the transformed digits (entropy 0.64, accuracy 0.18), so low entropy
#   is not a proxy for accuracy here (the paper's ViTs start from a zero-shot model that is roughly calibrated on
#   the tasks). aTLAS 0.428 vs task arithmetic 0.434: a tie within noise with 64 labels and 60 steps per task.

# %%
def find(prefix):
    for name in table:
        if name.startswith(prefix):
            return table[name]
    return None


# (claim, a, b, assert?): the claim is a > b (or a >= b when the text says ">="); assert=None: reported only;
# assert=tol (a float): asserted as a >= b - tol (a gap within noise); assert=True: asserted strictly.
claims = [
    ("TIES > task arithmetic (Yadav et al.)", find("ties (density"), find("task_arithmetic (λ"), None),
    ("Fisher merging > uniform average (Matena & Raffel)", table["fisher merging"], find("linear"), True),
    ("RegMean > Fisher merging (Jin et al.)", table["regmean (α=0.9)"], table["fisher merging"], True),
    ("RegMean > uniform average (Jin et al.)", table["regmean (α=0.9)"], find("linear"), True),
    ("RegMean++ > RegMean (Nguyen et al.)", table["regmean++ (α=0.9)"], table["regmean (α=0.9)"], 0.01),
    ("AdaMerging layer-wise > task-wise (Yang et al.)", table["adamerging (layer-wise)"],
     table["adamerging (task-wise)"], True),
    ("AdaMerging task-wise > task arithmetic (Yang et al.)", table["adamerging (task-wise)"],
     find("task_arithmetic (λ"), None),
    ("aTLAS > task arithmetic (Zhang et al.)", table["atlas (64 labels/task)"], find("task_arithmetic (λ"), None),
    ("Twin-Merging > best static merge (Lu et al.)", table["twin-merging (rank 16, routed)"],
     max(v for k, v in table.items() if not k.startswith(("twin", "experts"))), True),
    ("greedy soup >= uniform soup (Wortsman et al.)", table[[k for k in table if k.startswith("greedy")][0]],
     find("linear"), True),
    ("Re-Basin: weight-matched barrier < naive barrier (Ainsworth et al.)", -paths["weight matching"].barrier,
     -paths["naive"].barrier, True),
    ("Re-Basin: activation-matched barrier < naive barrier (Ainsworth et al.)", -paths["activation matching"].barrier,
     -paths["naive"].barrier, True),
    ("PLeaS wider (2.0) > narrower (1.0) (Nasery et al.)", pleas_acc[2.0], pleas_acc[1.0], 0.01),
    ("PLeaS (1.0) >= weight-matching average (Nasery et al.)", pleas_acc[1.0], wm_avg_acc, True),
]
n_ok, failed, n_asserted = 0, [], 0
for text, a, b, check in claims:
    if a is None or b is None:
        print(f"  ?  {text}: a method is missing from the registry")
        if check is not None:
            failed.append(f"{text}: missing")
        continue
    ok = a > b if ">=" not in text else a >= b
    n_ok += ok
    note = "" if check is None else (" [asserted]" if check is True else f" [asserted: not worse by > {check}]")
    print(f"  {'✓' if ok else '✗'}  {text}: {a:.4f} vs {b:.4f}{note}")
    if check is not None:
        n_asserted += 1
        if not (ok if check is True else a >= b - check):
            failed.append(f"{text}: {a:.4f} vs {b:.4f}")
print(f"{n_ok}/{len(claims)} orderings reproduced")
print(f"asserted claims: {n_asserted - len(failed)}/{n_asserted} hold")
assert not failed, "paper claims that held at this scale no longer do: " + "; ".join(failed)
print(f"plots saved in {OUT}")
print("time per section [s]: " + ", ".join(f"{n} {t:.1f}" for n, t in timings))
print(f"total wall time {time.perf_counter() - t_start:.1f} s")
