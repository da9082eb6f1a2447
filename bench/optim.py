"""Step time and optimizer-state memory of the jaxmodels.optim optimizers relative to optax.adamw, same model, same run.

Model: a character-level decoder with L stacked (``lax.scan``) pre-norm residual MLP blocks, ~2.4M parameters
(embeddings + head always trained; the stacked ``layers/*`` are what LISA samples). For each optimizer we time
(a) the full jitted train step (forward + backward + update) and (b) the jitted ``tx.update`` alone, both as the
minimum over round-robin repeats after compilation, and report ratios against optax.adamw measured in the same process.

    python bench/optim.py [--quick]

Targets (issue 4): LAMB <= 1.1x, AdamP/SGDP <= 1.3x (full step), LISA state memory ~ (gamma+always)/(L+always).
GradNormLoRP (rank 64 on the stacked block kernels and the input projection) is timed on an ordinary step (its state
advanced one step: the SVD refresh runs once every ``update_proj_gap`` = 200 steps); the refresh step is printed
separately.
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
from jaxmodels.optim import adamp, gradnorm_lorp, lamb, lars, lisa, sgd_ef21, sgdp  # noqa: E402
from jaxmodels.tree import flatten, tree_bytes  # noqa: E402
from tests.jaxmodels.optim.helpers import tiny_decoder  # noqa: E402  (the decoder of the LISA/GradNormLoRP tests)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    repeats = 5 if args.quick else 20
    L, gamma = 8, 2
    lowrank = r"(layers/w[12]|embed/proj)$"
    params, apply = tiny_decoder(96, C=16, E=32, D=256, H=1024, L=L)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    f = flatten(params)
    per_layer = sum(v[0].size for k, v in f.items() if k.startswith("layers/"))
    always = sum(v.size for k, v in f.items() if not k.startswith("layers/"))
    rng = np.random.default_rng(0)
    ctx = jnp.asarray(rng.integers(0, 96, (args.batch, 16)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 96, (args.batch,)), jnp.int32)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; model {n_params / 1e6:.2f}M params "
          f"(L={L} stacked layers of {per_layer / 1e3:.0f}k, {always / 1e3:.0f}k always trained), batch {args.batch}")

    optimizers = {
        "adamw": optax.adamw(1e-3, weight_decay=1e-4),
        "lamb": lamb(1e-3, weight_decay=1e-4),
        "lars": lars(0.1, weight_decay=1e-4),
        "adamp": adamp(1e-3, weight_decay=1e-4),
        "sgdp": sgdp(0.1, momentum=0.9, weight_decay=1e-4),
        f"lisa(g={gamma}/L={L})": lisa(1e-3, gamma=gamma, interval=50),
        "sgd_ef21(top-1%)": sgd_ef21(0.1, ratio=0.01),
        "gradnorm_lorp r64": gradnorm_lorp(1e-3, rank=64, weight_decay=1e-4, weight_norm=lowrank, project=lowrank),
    }
    warm = {"gradnorm_lorp r64"}  # time an ordinary step: advance the state past the count-0 SVD refresh

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, ctx), y).mean()

    grads = jax.jit(jax.grad(loss_fn))(params)
    steps, updates, mems = {}, {}, {}
    def make(tx):
        @jax.jit
        def step(p, s):
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step, jax.jit(tx.update)

    refresh = {}
    for name, tx in optimizers.items():
        state = jax.jit(tx.init)(params)
        step, update = make(tx)
        if name in warm:
            refresh[name] = (update, (grads, state, params))
            state = update(grads, state, params)[1]
        steps[name] = (step, (params, state))
        updates[name] = (update, (grads, state, params))
        mems[name] = tree_bytes(state)
    t_step, t_upd = time_round_robin(steps, repeats), time_round_robin(updates, repeats)
    rows = [(k, t_step[k], t_upd[k], mems[k]) for k in optimizers]
    _, t_step0, t_upd0, mem0 = rows[0]
    print(f"{'optimizer':18s} {'step ms':>9s} {'x adamw':>8s} {'update ms':>10s} {'x adamw':>8s} "
          f"{'state MB':>9s} {'x adamw':>8s}")
    for name, ts, tu, mem in rows:
        print(f"{name:18s} {1e3 * ts:9.2f} {ts / t_step0:8.2f} {1e3 * tu:10.2f} {tu / t_upd0:8.2f} "
              f"{mem / 2**20:9.2f} {mem / mem0:8.3f}")
    if refresh:
        t_ref = time_round_robin(refresh, repeats)
        for name, t in t_ref.items():
            print(f"{name}: SVD-refresh update {1e3 * t:.2f} ms = {t / t_upd0:.2f}x adamw's update "
                  f"(once every update_proj_gap steps)")
    print(f"LISA expected state ratio (gamma*layer + always)/(L*layer + always) = "
          f"{(gamma * per_layer + always) / (L * per_layer + always):.3f}")


if __name__ == "__main__":
    main()
