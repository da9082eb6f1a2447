"""FedWon and its baselines for multi-domain (feature-shift) federated learning.

FedWon (Zhuang & Lyu, "FedWon: Triumphing Multi-domain Federated Learning Without Normalization", ICLR 2024)
removes every normalization layer, reparameterizes each convolution with scaled weight standardization
(:class:`jaxmodels.layers.ScaledWSConv`, ``W_hat = gamma * g * (W - mu) / (sigma sqrt(N))``, N = fan-in) and
aggregates with plain FedAvg (:func:`merging.federated.fedavg`). :class:`DomainCNN` (a small CNN) and
:class:`DomainMLP` come in the three forms the paper compares: ``norm="bn"`` (conv/dense + BatchNorm: FedAvg+BN and
FedBN), ``norm="scaled_ws"`` (FedWon) and ``norm="none"`` (plain layers, the ablation).

FedWon's paper and its reviews describe WSConv from NF-ResNets / NFNets used as is, together with NFNets' adaptive
gradient clipping for local training (``optax.adaptive_grad_clip``; its threshold is not sourced here, and the claim
test trains without it). FedWon's own code was not found.

FedBN (Li, Jiang, Zhang, Kamp & Dou, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021, Algorithm 1): every parameter is averaged as in FedAvg EXCEPT the BatchNorm layers'
(affine parameters and statistics), which each client keeps::

    θ_{t+1}[l] = Σ_i w_i θ_i[l] / Σ_i w_i      for every non-BN leaf l (FedAvg)
    θ_i[l]     stays client i's own            for every BN leaf l (path matching ``local``)

:func:`fedbn` is that rule in the package's form (the new global tree; its BN leaves are the server's, unchanged,
since FedBN's server has no use for them); :func:`fedbn_client_params` builds each client's next starting model
(global shared layers + its own BN leaves). Because :func:`merging.federated.run_federated` starts every client
from the one global model, FedBN's persistent per-client layers need their own round loop, :func:`run_fedbn`, which
reuses the harness's ``local_update`` (vmapped over per-client starting models).

BatchNorm statistics at test time: local training (the harness's ``apply_fn(params, x)``) runs BatchNorm in train
mode, on batch statistics, and only the parameters are communicated. :func:`bn_statistics` computes the statistics
a BN model normalizes with at test time from data (a train-mode pass at momentum 0): FedBN's client ``i`` uses its
own data's statistics under its own model; FedAvg+BN's global model uses the client-weighted mean of the clients'
statistics under the global model (what FedAvg's averaged running statistics estimate).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.layers.weight_standardization import NF_GAINS, ScaledWSConv, ScaledWSDense
from jaxmodels.tree import map_with_path
from merging.federated.clients import validate_rule_inputs
from merging.federated.fedavg import weighted_client_mean
from merging.federated.harness import check_client_data
from merging.federated.partitions import ClientData

PyTree = Any

__all__ = ["DomainCNN", "DomainMLP", "fedbn", "fedbn_client_params", "run_fedbn", "bn_statistics", "FEDBN_LOCAL"]

#: FedBN's default local-leaf pattern: the paths of BatchNorm layers (Flax's auto-names ``BatchNorm_k``, or names
#: with ``bn``).
FEDBN_LOCAL = r"BatchNorm|bn"


class DomainCNN(nn.Module):
    """A small CNN for 8x8 (or larger) images ``[B, H, W, C]``: ``len(widths)`` blocks of 3x3 conv -> norm -> relu,
    a 2x2 average pool after each block but the last, a global average pool and a Dense head.

    ``norm``: ``"bn"`` (``nn.Conv`` without bias + ``nn.BatchNorm``; ``__call__(x, train)``), ``"scaled_ws"``
    (FedWon: :class:`jaxmodels.layers.ScaledWSConv` with the ReLU gain, no normalization) or ``"none"`` (plain
    ``nn.Conv``). Parameter paths: ``conv{k}``, ``bn{k}`` (BN only), ``head``."""

    widths: tuple[int, ...] = (16, 32)
    num_classes: int = 10
    norm: str = "scaled_ws"
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in ("bn", "scaled_ws", "none"):
            raise ValueError(f"DomainCNN: norm must be 'bn', 'scaled_ws' or 'none', got {self.norm!r}")
        if x.ndim != 4:
            raise ValueError(f"DomainCNN expects images [B, H, W, C], got shape {x.shape}")
        for k, w in enumerate(self.widths):
            if self.norm == "scaled_ws":
                x = ScaledWSConv(w, (3, 3), gamma=NF_GAINS["relu"], name=f"conv{k}")(x)
            elif self.norm == "bn":
                x = nn.Conv(w, (3, 3), use_bias=False, name=f"conv{k}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name=f"bn{k}")(x)
            else:
                x = nn.Conv(w, (3, 3), name=f"conv{k}")(x)
            x = nn.relu(x)
            if k < len(self.widths) - 1:
                x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


class DomainMLP(nn.Module):
    """An MLP on flattened inputs ``[B, ...]``: ``len(widths)`` blocks of dense -> norm -> relu and a Dense head.
    ``norm`` as :class:`DomainCNN`'s (``"scaled_ws"``: :class:`jaxmodels.layers.ScaledWSDense` with the ReLU gain).
    Parameter paths: ``dense{k}``, ``bn{k}`` (BN only), ``head``."""

    widths: tuple[int, ...] = (64, 64)
    num_classes: int = 10
    norm: str = "scaled_ws"
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in ("bn", "scaled_ws", "none"):
            raise ValueError(f"DomainMLP: norm must be 'bn', 'scaled_ws' or 'none', got {self.norm!r}")
        x = x.reshape(x.shape[0], -1)
        for k, w in enumerate(self.widths):
            if self.norm == "scaled_ws":
                x = ScaledWSDense(w, gamma=NF_GAINS["relu"], name=f"dense{k}")(x)
            elif self.norm == "bn":
                x = nn.Dense(w, use_bias=False, name=f"dense{k}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name=f"bn{k}")(x)
            else:
                x = nn.Dense(w, name=f"dense{k}")(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="head")(x)


_weighted_client_mean = jax.jit(weighted_client_mean)


def _local_mask(tree: PyTree, local: str) -> PyTree:
    pat = re.compile(local)
    return map_with_path(lambda path, _: bool(pat.search(path)), tree)


def fedbn(global_params: PyTree, client_params: PyTree, *, weights: Any = None, local: str = FEDBN_LOCAL,
          check_finite: bool = True) -> PyTree:
    """FedBN's server step (module docstring): the weighted mean ``Σ_i w_i θ_i / Σ_i w_i`` of every leaf whose path
    does NOT match ``local`` (a regex, default BatchNorm layers), and ``global_params``' own value for the leaves
    that do (each client keeps those: :func:`fedbn_client_params`). ``weights``: ``[C]`` non-negative, None =
    uniform; a zero total returns ``global_params``. Float32, each leaf in its own dtype; jittable. Raises if no
    leaf matches ``local`` (that would be plain FedAvg)."""
    _, w = validate_rule_inputs(global_params, client_params, weights, "fedbn", check_finite)
    mask = _local_mask(global_params, local)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"fedbn: no leaf path matches local={local!r}; FedBN keeps the BatchNorm leaves local "
                         "(use fedavg for a model without them)")
    mean = _weighted_client_mean(global_params, client_params, w)
    return jax.tree.map(lambda m, g, a: g if m else a, mask, global_params, mean)


def fedbn_client_params(global_params: PyTree, client_params: PyTree, *, local: str = FEDBN_LOCAL) -> PyTree:
    """Each client's starting model for FedBN's next round, client-stacked: the global leaves broadcast to every
    client, except the leaves matching ``local``, which are the client's own (from ``client_params``)."""
    n = jax.tree.leaves(client_params)[0].shape[0]
    mask = _local_mask(global_params, local)
    return jax.tree.map(lambda m, g, c: c if m else jnp.broadcast_to(g[None], (n,) + g.shape).astype(c.dtype),
                        mask, global_params, client_params)


def _keep_nonparticipants(prev: PyTree, new: PyTree, participated: jax.Array) -> PyTree:
    def leaf(p, c):
        keep = participated.reshape((-1,) + (1,) * (c.ndim - 1))
        return jnp.where(keep, c, p)
    return jax.tree.map(leaf, prev, new)


def run_fedbn(params: PyTree, data: ClientData, local_update: Callable, *, rounds: int, seed: int,
              local: str = FEDBN_LOCAL, participation: Any = None, weighting: str = "counts",
              eval_fn: Callable | None = None, eval_every: int = 1) -> tuple[PyTree, PyTree, list[dict]]:
    """FedBN rounds (module docstring), the counterpart of :func:`merging.federated.run_federated` for a rule whose
    clients keep layers of their own: in round ``t`` client ``i`` trains from :func:`fedbn_client_params` (shared
    layers from θ_t, its own BN layers) with the harness's ``local_update`` (:func:`make_local_update`; called on
    one client at a time, vmapped over the clients), then :func:`fedbn` aggregates the shared layers. A client that
    does not participate (``participation``: ``[C]`` Bernoulli probabilities, as ``run_federated``'s) keeps its
    previous model. Returns ``(global_params, client_params, history)``; ``eval_fn(global_params,
    client_params) -> {name: value}`` runs every ``eval_every`` rounds and after the last. Deterministic under
    ``seed``: round keys are ``fold_in(PRNGKey(seed), t)``, split into participation and training keys."""
    method = "run_fedbn"
    n = check_client_data(data, method)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"{method}: rounds must be a positive integer, got {rounds!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"{method}: eval_every must be a positive integer, got {eval_every!r}")
    if weighting not in ("counts", "uniform"):
        raise ValueError(f"{method}: weighting must be 'counts' or 'uniform', got {weighting!r}")
    if not callable(local_update):
        raise TypeError(f"{method}: local_update must be callable")
    probs = np.ones(n, np.float32) if participation is None else np.asarray(participation, np.float32)
    if probs.shape != (n,) or not np.all((probs >= 0) & (probs <= 1)):
        raise ValueError(f"{method}: participation must be [{n}] probabilities in [0, 1], got {participation!r}")
    if not any(jax.tree.leaves(_local_mask(params, local))):
        raise ValueError(f"{method}: no leaf path matches local={local!r}")
    counts = np.asarray(data.counts, np.float32)
    obj_w = jnp.asarray(counts if weighting == "counts" else np.ones(n, np.float32))
    # one client per call: x [C, 1, N, ...] etc., vmapped over the leading axis
    per_client = ClientData(*(jnp.asarray(a)[:, None] for a in data))

    def train_one(start, d, key):
        return jax.tree.map(lambda a: a[0], local_update(start, d, key))

    @jax.jit
    def one_round(global_params, clients, r, base_key, probs):
        k_part, k_train = jax.random.split(jax.random.fold_in(base_key, r))
        part = jax.random.uniform(k_part, (n,)) < probs
        start = fedbn_client_params(global_params, clients, local=local)
        trained = jax.vmap(train_one)(start, per_client, jax.random.split(k_train, n))
        trained = _keep_nonparticipants(clients, trained, part)
        w = part.astype(jnp.float32) * obj_w
        mean = weighted_client_mean(global_params, trained, w)
        mask = _local_mask(global_params, local)
        new_global = jax.tree.map(lambda m, g, a: g if m else a, mask, global_params, mean)
        return new_global, trained, jnp.sum(part.astype(jnp.int32))

    clients = jax.tree.map(lambda g: jnp.broadcast_to(jnp.asarray(g)[None], (n,) + jnp.shape(g)), params)
    base_key = jax.random.PRNGKey(int(seed))
    history: list[dict] = []
    for r in range(1, rounds + 1):
        params, clients, k = one_round(params, clients, jnp.asarray(r, jnp.int32), base_key, jnp.asarray(probs))
        row = {"round": r, "participants": k}
        if eval_fn is not None and (r % eval_every == 0 or r == rounds):
            row.update({name: float(v) for name, v in jax.device_get(eval_fn(params, clients)).items()})
        history.append(row)
    for row in history:
        row["participants"] = int(row["participants"])
    return params, clients, history


def bn_statistics(model: nn.Module, params: PyTree, x: jax.Array, *args, example_mask: jax.Array | None = None,
                  **kwargs) -> PyTree:
    """The ``batch_stats``-shaped tree of ``x``'s own statistics in every ``nn.BatchNorm`` of ``model``: the mean
    and biased variance (float32) of each layer's input over its non-feature axes, in one train-mode pass
    (``model.apply({"params": params, "batch_stats": ...}, x, *args, train=True, **kwargs)``), i.e. what that layer
    normalizes with in training. ``example_mask [N]``: only the examples of ``x [N, ...]`` where it is nonzero count
    (padding excluded: ``Σ w h / max(Σ w, 1)``), as FedTiny's clients need. Jittable. Raises for a model without
    BatchNorm."""
    got: dict[tuple, dict[str, jax.Array]] = {}
    n = x.shape[0]
    w = None if example_mask is None else jnp.asarray(example_mask, jnp.float32)

    def intercept(next_fun, a, kw, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.BatchNorm):
            h = (a[0] if a else kw["x"]).astype(jnp.float32)
            feat = tuple(ax % h.ndim for ax in ((mod.axis,) if isinstance(mod.axis, int) else mod.axis))
            red = tuple(i for i in range(h.ndim) if i not in feat)
            shape = tuple(h.shape[ax] for ax in feat)
            if w is None:
                mu = h.mean(red, keepdims=True)
                var = jnp.square(h - mu).mean(red)
            else:
                wb = jnp.broadcast_to(w.reshape((n,) + (1,) * (h.ndim - 1)), h.shape)
                tot = jnp.maximum(wb.sum(red, keepdims=True), 1.0)
                mu = (wb * h).sum(red, keepdims=True) / tot
                var = (wb * jnp.square(h - mu)).sum(red, keepdims=True) / tot
            got[tuple(str(p) for p in mod.path)] = {"mean": mu.reshape(shape), "var": var.reshape(shape)}
        return next_fun(*a, **kw)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], *args, **kwargs))
    if "batch_stats" not in shapes:
        raise ValueError("bn_statistics: the model has no BatchNorm statistics ('batch_stats')")
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["batch_stats"])
    with nn.intercept_methods(intercept):
        model.apply({"params": params, "batch_stats": stats}, x, *args, train=True, mutable=["batch_stats"], **kwargs)
    out: dict = {}
    for path, leaf in got.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out
