"""Shared fixtures for the adapter-paper claim tests (test_bone, test_eva, test_lift, test_mos, test_scalearn,
test_mhr): a small MLP pre-trained on scikit-learn's digits (cached once per process) and a fine-tuning task that
needs the hidden layers to change: the same digits mirrored left-right (the base's accuracy drops to ~chance).

Every fit is one jitted ``lax.scan`` of minibatch Adam steps (one compile per method), so a claim costs ~1 CPU s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels import adapters as ad
from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP

HIDDEN = (64, 64)
MODEL = MLP(features=HIDDEN, num_outputs=10)
BATCH = 128


def _mirror(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64).copy()


@functools.lru_cache(maxsize=None)
def digits():
    """(x_train, y_train, x_test, y_test) of the original digits, float32 / int32 jnp arrays."""
    s = load_digits_split()
    return tuple(jnp.asarray(a) for a in s)


@functools.lru_cache(maxsize=None)
def mirrored():
    """The fine-tuning task: the digits mirrored left-right."""
    s = load_digits_split()
    return jnp.asarray(_mirror(s.x_train)), jnp.asarray(s.y_train), jnp.asarray(_mirror(s.x_test)), \
        jnp.asarray(s.y_test)


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(MODEL.apply({"params": params}, x), -1) == y))


def batches(n: int, steps: int, batch: int = BATCH, seed: int = 0) -> np.ndarray:
    """``[steps, batch]`` row indices: consecutive slices of fixed permutations (epochs), the same every run."""
    rng = np.random.default_rng(seed)
    per = n // batch
    perms = [rng.permutation(n)[: per * batch].reshape(per, batch) for _ in range(-(-steps // per))]
    return np.concatenate(perms)[:steps]


def fit(loss_fn, init, x, y, steps: int, lr: float, batch: int = BATCH, tx=None, has_aux: bool = False):
    """Adam (or ``tx``) on ``loss_fn(trainable, xb, yb)`` over ``steps`` minibatches of ``batch`` rows of
    ``(x, y)``, one jitted scan: (trainable, per-step losses). ``has_aux``: ``loss_fn`` returns ``(loss, aux)``
    and the per-step ``aux`` (e.g. each arm's loss) is recorded instead."""
    tx = optax.adam(lr) if tx is None else tx
    idx = jnp.asarray(batches(x.shape[0], steps, batch))

    @jax.jit
    def run(p, x, y, idx):
        def body(carry, i):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn, has_aux=has_aux)(p, x[i], y[i])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss[1] if has_aux else loss
        (p, _), losses = jax.lax.scan(body, (p, tx.init(p)), idx)
        return p, losses

    p, losses = run(init, x, y, idx)
    return p, jax.tree.map(np.asarray, losses)


@functools.lru_cache(maxsize=None)
def base_params():
    """The MLP pre-trained on the original digits (300 Adam steps of 128 rows; test accuracy ~0.96)."""
    x, y, _, _ = digits()
    params = MODEL.init(jax.random.PRNGKey(0), x[:1])["params"]
    params, _ = fit(lambda p, xb, yb: xent(MODEL.apply({"params": p}, xb), yb), params, x, y, 300, 1e-2)
    return params


def with_head(params, head, name: str = "Dense_2"):
    """``params`` with the head layer replaced (the head is trained in every arm of the claims)."""
    out = dict(params)
    out[name] = head
    return out


def lora_config(layers, r: int, **kw):
    """weightlab's LoRA (:mod:`jaxmodels.adapters`) on the named modules, scale ``alpha / r = 1``."""
    return ad.LoraConfig(rank=r, alpha=float(r), target="^(" + "|".join(layers) + ")$", **kw)


def lora_init(params, layers, r: int, seed: int = 1):
    """(adapters, config): PEFT's default init (A kaiming-uniform, B = 0)."""
    cfg = lora_config(layers, r)
    return ad.init_lora(jax.random.PRNGKey(seed), params, cfg), cfg


def num_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def joint(txs: dict) -> optax.GradientTransformation:
    """One optax transform over ``{arm: params}`` applying ``txs[arm]`` to each arm: several independent
    trainings (summed losses) in one compiled scan."""
    def init(params):
        return {k: txs[k].init(params[k]) for k in txs}

    def update(updates, state, params=None):
        out = {k: txs[k].update(updates[k], state[k], None if params is None else params[k]) for k in txs}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    return optax.GradientTransformation(init, update)
