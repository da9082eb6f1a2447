"""A small training utility: a jitted, sharded train step for any linen ``apply_fn`` and Optax transform."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.sharding import DATA, rules_to_shardings

PyTree = Any

__all__ = ["TrainState", "synchronize_on_cpu_mesh", "make_train_step", "softmax_cross_entropy", "accuracy", "init_train_state"]


class TrainState(NamedTuple):
    """What :func:`make_train_step`'s step carries: ``step`` (int32 counter), ``params``, the optimizer's
    ``opt_state`` and ``model_state`` (non-trained variables such as BatchNorm ``batch_stats``; None if the model has
    none)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree = None  # non-trained variables, e.g. BatchNorm ``batch_stats`` (None if the model has none)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy ``mean(argmax(logits, -1) == labels)`` for ``logits [..., classes]`` and integer ``labels [...]``
    (a float scalar)."""
    return (jnp.argmax(logits, -1) == labels).mean()


def init_train_state(params: PyTree, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                     rules=None, model_state: PyTree = None) -> TrainState:
    """Place ``params`` (and ``model_state``, e.g. ``batch_stats``) with ``rules`` on ``mesh`` (if given) and
    initialize the optimizer state; the optimizer state inherits the parameters' sharding because ``tx.init`` is
    jitted on sharded params."""
    if mesh is not None:
        params = jax.device_put(params, rules_to_shardings(params, rules or [], mesh))
        if model_state is not None:
            model_state = jax.device_put(model_state, rules_to_shardings(model_state, rules or [], mesh))
    opt_state = jax.jit(tx.init)(params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, model_state)


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    mesh: Mesh | None = None,
    rules=None,
    donate: bool = True,
    has_model_state: bool = False,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Return ``step(state, x, y) -> (state, metrics)``, jitted.

    ``apply_fn(params, x)`` returns logits (wrap ``model.apply`` as ``lambda p, x: model.apply({"params": p}, x)``).
    With ``has_model_state=True`` it is ``apply_fn(params, model_state, x) -> (logits, new_model_state)`` (BatchNorm:
    ``lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])``
    followed by ``(logits, upd["batch_stats"])``) and ``state.model_state`` is carried along, not differentiated.
    With a ``mesh``, the batch is sharded over the ``data`` axis and parameters / optimizer state keep the sharding
    the ``rules`` give them (data parallel when the rules replicate everything, tensor parallel over ``model``
    otherwise); XLA inserts the gradient all-reduce.
    """

    def step(state: TrainState, x, y):
        def loss_of(p):
            if has_model_state:
                logits, model_state = apply_fn(p, state.model_state, x)
            else:
                logits, model_state = apply_fn(p, x), state.model_state
            return loss_fn(logits, y), (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": accuracy(logits, y)}
        return TrainState(state.step + 1, params, opt_state, model_state), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())

    def batch_sharding(ndim):
        return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))

    def sharded_step(state, x, y):
        x = jax.lax.with_sharding_constraint(x, batch_sharding(x.ndim))
        y = jax.lax.with_sharding_constraint(y, batch_sharding(y.ndim))
        return step(state, x, y)

    jitted = jax.jit(sharded_step, donate_argnums=(0,) if donate else ())
    return synchronize_on_cpu_mesh(jitted, mesh)


def synchronize_on_cpu_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Wait for each call's result when ``mesh`` spans several CPU devices.

    XLA's CPU backend runs the virtual devices of ``--xla_force_host_platform_device_count`` as threads of one pool;
    with asynchronous dispatch, the next step's participants can occupy the pool while one participant of the
    previous step's all-reduce has not started, and the rendezvous aborts the process after 40 s (seen on 2-core
    machines). Blocking on every step keeps at most one collective program in flight. GPU/TPU meshes are untouched.
    """
    devices = mesh.devices.flat
    if mesh.size <= 1 or not all(d.platform == "cpu" for d in devices):
        return fn

    def synchronized(*args, **kwargs):
        return jax.block_until_ready(fn(*args, **kwargs))

    synchronized.lower = fn.lower  # keep the jitted function's AOT interface
    return synchronized
