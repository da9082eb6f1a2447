"""Federated and decentralized weight averaging: a simulation harness and the aggregation rules built on it.

The convention (every module here follows it)
    **Client-stacked trees.** ``C`` clients' models are one pytree with a leading client axis on every leaf (leaf
    shape ``[C, ...]``): :func:`stack_clients` / :func:`unstack_clients` / :func:`num_clients` /
    :func:`broadcast_clients`, and :func:`shard_clients` (``NamedSharding`` ``P("data")`` on the client axis when
    ``C`` is a multiple of the mesh's data axis, else replicated) so that 8 devices simulate 8 client groups at once.

    **Aggregation rules**, one module per method, pure and jittable::

        rule(global_params, client_params, *, weights=None, **hparams) -> new_global_params

    ``global_params`` is the server model θ_t (a plain tree); ``client_params`` the client-stacked tree of the
    clients' models after local training (models, not deltas: rules compute ``Δ_i = θ_i - θ_t`` when they need
    it); ``weights`` a ``[C]`` array of non-negative aggregation weights, ``0`` = the client did not participate,
    ``None`` = uniform. A zero total weight (nobody participated) returns ``global_params`` unchanged. Every leaf is
    computed in float32 and returned in its own dtype. Checks run first (:func:`validate_rule_inputs`: client
    trees match the global tree's paths/shapes/dtypes, the first differing path named; weights of shape ``[C]``,
    finite, non-negative; NaN/Inf rejected; skipped for tracers under ``jit``). Randomized rules take an explicit
    ``key`` (per-leaf streams via ``merging._common.leaf_key``). Extra outputs (scores, selected clients) come in a
    NamedTuple only where the method needs them, as its docstring says. The baseline is :func:`fedavg`
    (``Σ w_i θ_i / Σ w_i``, McMahan et al. 2017).

    **Stateful server rules** keep optax's style: a NamedTuple state and pure ``init_fn`` / ``update_fn``, bundled
    as a :class:`ServerRule` ``(init, update)`` with ``init(global_params, n_clients) -> state`` and
    ``update(global_params, client_params, state, *, participated, weights=None) -> (new_global, state)``
    (:mod:`merging.federated.fedau`). :func:`run_federated` accepts either kind as its ``aggregate``.

    **Data** (:mod:`merging.federated.partitions`, NumPy, seeded): partitions are lists of index arrays
    (:func:`partition_iid`, :func:`partition_dirichlet` label skew after Hsu et al. 2019 / FedLab), packed into a
    padded :class:`ClientData` ``(x [C, N, ...], y [C, N], mask [C, N], counts [C])`` by :func:`client_data`;
    :func:`multi_domain_digits` (feature shift) and :func:`participation_probabilities` (FedAU's heterogeneous,
    data-correlated participation).

    **Harness** (:mod:`merging.federated.harness`): :func:`make_local_update` (``local_steps`` optax steps per
    client from a fresh optimizer state, vmapped over clients, jitted once, sharded over the data axis) and
    :func:`run_federated` (participation sampling, local update, aggregation with ``participated * counts``
    weights, evaluation, a history printable by :func:`format_table`), and :func:`run_gossip` (decentralized:
    every node trains from its own model, ``local_update(..., stacked=True)``, then ``gossip_step``).
    Deterministic under a seed.

    **Decentralized** (gossip) averaging (:mod:`merging.federated.gossip`) has no server: client-stacked trees go in
    and out, ``gossip_step(client_params, W)`` with a mixing matrix ``W`` (:func:`mixing_matrix`).

    **Post-hoc calibration** (:mod:`merging.federated.ccvr`): CCVR (Luo et al. 2021) pools the clients' per-class
    feature means/covariances, samples virtual features and re-trains the classifier head.

    **Distributed pruning** (:mod:`merging.federated.fedtiny`): FedTiny (Huang et al. 2023) selects a coarse sparse
    candidate by the clients' losses under re-estimated BatchNorm statistics (:func:`adaptive_bn_selection`), then
    prunes and regrows one layer at a time from the clients' top-K gradients (:func:`prune_and_regrow`,
    :func:`run_fedtiny`), each layer keeping its weight count.
"""

from merging.federated.clients import (broadcast_clients, client_shapes, client_sharding, num_clients, shard_clients,
                                       stack_clients, unstack_clients, validate_rule_inputs)
from merging.federated.fedavg import fedavg, weighted_client_mean
from merging.federated.partitions import (DOMAINS, ClientData, MultiDomainDigits, client_data, domain_transform,
                                          label_distribution, multi_domain_digits, partition_dirichlet,
                                          partition_iid, participation_probabilities)
from merging.federated.harness import (FederatedResult, ServerRule, check_client_data, format_table,
                                       make_local_update, run_federated, run_gossip)
from merging.federated.fedau import FedAUState, fedau, fedau_init, fedau_step, fedau_update, fedau_weights
from merging.federated.dp import clip_client_deltas, dp_fedavg
from merging.federated.gossip import (TARGETS, check_mixing_matrix, complete_graph, gossip_step, layer_variances,
                                      metropolis_hastings, mixing_matrix, neighbor_average, random_regular_graph,
                                      rescale_to_variance, ring_graph)
from merging.federated.robust import (coordinate_median, krum, krum_scores, multi_krum, pairwise_sq_distances,
                                      trimmed_mean)
from merging.federated.flag import FlagSubspace, flag_aggregator, flag_subspace
from merging.federated.fedwon import (FEDBN_LOCAL, DomainCNN, DomainMLP, bn_statistics, fedbn, fedbn_client_params,
                                      run_fedbn)
from merging.federated.ccvr import (FeatureStats, VirtualFeatures, aggregate_feature_stats, calibrate_head,
                                    client_feature_stats, sample_virtual_features)
from merging.federated.fedtiny import (PRUNABLE, BNSelection, FedTinyResult, adaptive_bn_selection,
                                       aggregate_bn_statistics, apply_masks, client_bn_statistics, client_topk,
                                       decay_fraction, layer_densities, magnitude_masks, masked_bn_statistics,
                                       prunable_paths, prune_and_regrow, run_fedtiny)

__all__ = [
    "broadcast_clients", "client_shapes", "client_sharding", "num_clients", "shard_clients", "stack_clients",
    "unstack_clients", "validate_rule_inputs", "fedavg", "weighted_client_mean",
    "DOMAINS", "ClientData", "MultiDomainDigits", "client_data", "domain_transform", "label_distribution",
    "multi_domain_digits", "partition_dirichlet", "partition_iid", "participation_probabilities",
    "FederatedResult", "ServerRule", "check_client_data", "format_table", "make_local_update", "run_federated",
    "run_gossip",
    "FedAUState", "fedau", "fedau_init", "fedau_step", "fedau_update", "fedau_weights",
    "dp_fedavg", "clip_client_deltas",
    "coordinate_median", "trimmed_mean", "krum", "multi_krum", "krum_scores", "pairwise_sq_distances",
    "flag_aggregator", "flag_subspace", "FlagSubspace",
    "FeatureStats", "VirtualFeatures", "aggregate_feature_stats", "calibrate_head", "client_feature_stats",
    "sample_virtual_features",
    "FEDBN_LOCAL", "DomainCNN", "DomainMLP", "bn_statistics", "fedbn", "fedbn_client_params", "run_fedbn",
    "gossip_step", "mixing_matrix", "metropolis_hastings", "neighbor_average", "ring_graph", "complete_graph",
    "random_regular_graph", "check_mixing_matrix", "layer_variances", "rescale_to_variance", "TARGETS",
    "BNSelection", "FedTinyResult", "PRUNABLE", "prunable_paths", "magnitude_masks", "layer_densities", "apply_masks",
    "masked_bn_statistics", "client_bn_statistics", "aggregate_bn_statistics", "adaptive_bn_selection",
    "decay_fraction", "client_topk", "prune_and_regrow", "run_fedtiny",
]
