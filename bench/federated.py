"""Federated simulation speed: rounds per second of ``merging.federated.run_federated`` with 8 and 64 simulated
clients, against an anchor measured in the same run.

    python bench/federated.py [--quick] [--repeats 5] [--rounds 10]

Model: an MLP 64-32-10 on scikit-learn's digits (1347 training images split IID over the clients). One round: every
client takes ``local_steps=5`` SGD steps on minibatches of 16 of its own examples (vmapped over clients, the
client axis sharded over the devices when the client count is a multiple of them), then the server aggregates
(FedAvg, and FedAU with its per-client participation statistics); participation Bernoulli(0.5) per client.

Anchor: the same arithmetic done centrally, i.e. one jitted program of 5 SGD steps on one batch of C x 16 examples
(what the round's local training would cost as a single large-batch step, without per-client models and without
aggregation). Each row prints rounds/s and the round time as a multiple of the anchor of the same client count
(min over ``--repeats`` round-robin calls of ``--rounds`` rounds, after compilation; contention only adds time).
It prints; it asserts nothing.
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
from jaxmodels.datasets import load_digits_split  # noqa: E402
from jaxmodels.models import MLP  # noqa: E402
from merging.federated import client_data, fedau, fedavg, make_local_update, partition_iid, run_federated  # noqa: E402

LOCAL_STEPS, BATCH = 5, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    rounds = 3 if args.quick else args.rounds
    d = load_digits_split()
    model = MLP(features=(32,))
    params = model.init(jax.random.PRNGKey(0), d.x_train[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    tx = optax.sgd(0.1)
    lu = make_local_update(apply, tx, local_steps=LOCAL_STEPS, batch_size=BATCH)
    au = fedau()
    print(f"JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
          f"MLP 64-32-10, {LOCAL_STEPS} local steps of batch {BATCH}, {rounds} rounds per call, best of {repeats}")

    def central(n_clients):
        x = jnp.asarray(np.resize(d.x_train, (n_clients * BATCH, 64)))
        y = jnp.asarray(np.resize(d.y_train, (n_clients * BATCH,)))

        @jax.jit
        def steps(p):
            def one(carry, _):
                p, s = carry
                g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(apply(q, x), y).mean())(p)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None
            return jax.lax.scan(one, (p, tx.init(p)), None, length=LOCAL_STEPS)[0][0]

        def run(p):  # `rounds` calls, as run_federated makes `rounds` round calls
            for _ in range(rounds):
                p = steps(p)
            return p

        return run

    fns, rows = {}, []
    for n in (8, 64):
        data = client_data(d.x_train, d.y_train, partition_iid(d.y_train, n, seed=0))
        probs = np.full(n, 0.5)
        fns[f"anchor C={n}"] = (central(n), (params,))
        for name, rule in (("fedavg", fedavg), ("fedau", au)):
            def fed(p, data=data, probs=probs, rule=rule):
                return run_federated(p, data, lu, rule, rounds=rounds, seed=0, participation=probs,
                                     progress=False).params
            fns[f"{name} C={n}"] = (fed, (params,))
            rows.append((name, n))
    best = time_round_robin(fns, repeats)
    print(f"{'rule':8s} {'clients':>7s} {'rounds/s':>9s} {'ms/round':>9s} {'x anchor':>9s}")
    for name, n in rows:
        t = best[f"{name} C={n}"] / rounds
        anchor = best[f"anchor C={n}"] / rounds
        print(f"{name:8s} {n:7d} {1 / t:9.1f} {1e3 * t:9.2f} {t / anchor:9.2f}")
    for n in (8, 64):
        print(f"anchor C={n}: {1e3 * best[f'anchor C={n}'] / rounds:.2f} ms per {LOCAL_STEPS} central steps of "
              f"batch {n * BATCH}")


if __name__ == "__main__":
    main()
