"""Client data for federated simulations (NumPy, seeded): partitions of a labelled dataset over clients, padded
client-stacked arrays, a multi-domain (feature-shift) digits benchmark and heterogeneous participation probabilities.

A *partition* is a list of ``C`` disjoint integer index arrays into the dataset; :func:`client_data` packs one into
a :class:`ClientData` of fixed shape (each client's real examples first, then zero padding with ``mask`` False), so
that every client has the same array shapes and local training is one vmapped program.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["ClientData", "MultiDomainDigits", "DOMAINS", "partition_iid", "partition_dirichlet", "client_data",
           "label_distribution", "participation_probabilities", "domain_transform", "multi_domain_digits"]


class ClientData(NamedTuple):
    """Padded per-client data, client axis first: ``x [C, N, ...]``, ``y [C, N]`` (int32), ``mask [C, N]`` (bool,
    True on the client's real examples, which come first), ``counts [C]`` (int32, real examples per client)."""
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    counts: np.ndarray


def _check_labels(labels, method: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{method}: `labels` must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{method}: `labels` must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"{method}: `labels` must be non-negative class ids, got min {labels.min()}")
    return labels


def _check_n_clients(n_clients, n: int, method: str) -> int:
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"{method}: n_clients must be a positive integer, got {n_clients!r}")
    if n_clients > n:
        raise ValueError(f"{method}: {n_clients} clients for {n} examples; every client needs at least one")
    return int(n_clients)


def partition_iid(labels, n_clients: int, *, seed: int) -> list[np.ndarray]:
    """IID partition: a random permutation of all indices cut into ``n_clients`` near-equal parts (sizes differ by
    at most one). Disjoint and covering every example."""
    labels = _check_labels(labels, "partition_iid")
    n_clients = _check_n_clients(n_clients, labels.size, "partition_iid")
    perm = np.random.default_rng(seed).permutation(labels.size)
    return [np.sort(p) for p in np.array_split(perm, n_clients)]


def partition_dirichlet(labels, n_clients: int, *, alpha: float, seed: int, min_size: int | None = None,
                        max_tries: int = 1000) -> list[np.ndarray]:
    """Dirichlet label skew (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification"; the "hetero-dir" rule of FedLab's ``hetero_dir_partition``,
    fedlab/utils/dataset/functional.py, transcribed): for every class ``k``, shuffle its indices, draw
    ``p_k ~ Dir_C(α)``, zero the share of clients already holding ``≥ N / C`` examples (FedLab's balancing),
    renormalize, and cut the class at ``floor(cumsum(p_k) · N_k)``. Redrawn until every client has ``min_size``
    examples (default: the number of classes, FedLab's default); ``ValueError`` after ``max_tries`` draws.
    Small α gives each client few classes; α → ∞ approaches IID. Returns ``n_clients`` disjoint sorted index
    arrays covering every example. Seeded with ``numpy.random.default_rng(seed)`` (not FedLab's global RNG).
    """
    labels = _check_labels(labels, "partition_dirichlet")
    n = labels.size
    n_clients = _check_n_clients(n_clients, n, "partition_dirichlet")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"partition_dirichlet: alpha must be a positive finite number, got {alpha}")
    classes = np.unique(labels)
    min_size = len(classes) if min_size is None else int(min_size)
    if min_size < 0 or min_size * n_clients > n:
        raise ValueError(f"partition_dirichlet: min_size={min_size} for {n_clients} clients needs "
                         f"{min_size * n_clients} examples, have {n}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for k in classes:
            idx_k = np.flatnonzero(labels == k)
            rng.shuffle(idx_k)
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            p = p * np.array([len(part) < n / n_clients for part in parts])
            total = p.sum()
            if not total > 0:  # every share zeroed or underflowed: split among the clients below N / C
                p = np.array([len(part) < n / n_clients for part in parts], np.float64)
                total = p.sum()
            cuts = (np.cumsum(p / total) * len(idx_k)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx_k, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [np.sort(np.asarray(part, np.int64)) for part in parts]
    raise ValueError(f"partition_dirichlet: no draw in {max_tries} gave every client >= {min_size} examples "
                     f"(alpha={alpha}, {n_clients} clients); lower min_size or raise alpha")


def client_data(x, y, parts: Sequence[np.ndarray], *, size: int | None = None) -> ClientData:
    """Pack a partition into a padded :class:`ClientData`: client ``i`` holds ``x[parts[i]]`` first (in the order of
    ``parts[i]``) then zeros up to ``size`` (default: the largest part). ``x``: ``[n, ...]``; ``y``: ``[n]``."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape or y.ndim != 1:
        raise ValueError(f"client_data: x {x.shape} and y {y.shape} must share the leading dimension (y 1-D)")
    parts = [np.asarray(p) for p in parts]
    if not parts:
        raise ValueError("client_data: `parts` is empty")
    for i, p in enumerate(parts):
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise ValueError(f"client_data: parts[{i}] must be a 1-D integer index array, got {p.dtype} {p.shape}")
        if p.size and (p.min() < 0 or p.max() >= len(y)):
            raise ValueError(f"client_data: parts[{i}] indexes outside [0, {len(y)})")
    counts = np.array([p.size for p in parts], np.int32)
    size = int(counts.max()) if size is None else int(size)
    if size < counts.max() or size < 1:
        raise ValueError(f"client_data: size={size} is smaller than the largest part ({counts.max()}) or < 1")
    cx = np.zeros((len(parts), size) + x.shape[1:], x.dtype)
    cy = np.zeros((len(parts), size), np.int32)
    mask = np.zeros((len(parts), size), bool)
    for i, p in enumerate(parts):
        cx[i, :p.size], cy[i, :p.size], mask[i, :p.size] = x[p], y[p], True
    return ClientData(cx, cy, mask, counts)


def label_distribution(data: ClientData, n_classes: int | None = None) -> np.ndarray:
    """``[C, K]`` float32: each client's fraction of real examples per class (rows of empty clients are 0)."""
    y, mask = np.asarray(data.y), np.asarray(data.mask, bool)
    k = int(y[mask].max()) + 1 if n_classes is None else int(n_classes)
    hist = np.stack([np.bincount(y[i][mask[i]], minlength=k)[:k] for i in range(y.shape[0])]).astype(np.float64)
    return (hist / np.maximum(hist.sum(1, keepdims=True), 1)).astype(np.float32)


def participation_probabilities(label_dist, *, alpha: float = 0.1, mean: float = 0.1, min_prob: float = 0.02,
                                seed: int) -> np.ndarray:
    """Heterogeneous participation probabilities correlated with the clients' data, as FedAU's experiments draw
    them (Wang & Ji 2024; ``data_participation_each_node`` in github.com/IBM/fedau util/util.py, transcribed)::

        m ~ Dir_K(α · 1)  (one draw),   p_i = max(min_prob, K · mean · Σ_k q_ik m_k)

    with ``q_i`` client i's label distribution (``label_dist`` ``[C, K]``, e.g. :func:`label_distribution`; or a
    :class:`ClientData`). So clients rich in the "favoured" classes participate often and the others rarely, and
    FedAvg over the participants is biased towards those classes. Clipped to 1 as well (the reference does not
    need to: with its defaults K · mean = 1). Returns float32 ``[C]``."""
    if isinstance(label_dist, ClientData):
        label_dist = label_distribution(label_dist)
    q = np.asarray(label_dist, np.float64)
    if q.ndim != 2 or np.any(q < 0) or not np.all(np.isfinite(q)):
        raise ValueError(f"participation_probabilities: label_dist must be a non-negative [C, K] array, got {q.shape}")
    for name, v in (("alpha", alpha), ("mean", mean)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"participation_probabilities: {name} must be positive, got {v}")
    if not 0 <= min_prob <= 1:
        raise ValueError(f"participation_probabilities: min_prob must be in [0, 1], got {min_prob}")
    m = np.random.default_rng(seed).dirichlet(np.full(q.shape[1], float(alpha)))
    p = np.maximum(min_prob, q @ m * mean * q.shape[1])
    return np.minimum(p, 1.0).astype(np.float32)


DOMAINS = ("identity", "invert", "rotate90", "noise")


def domain_transform(x: np.ndarray, domain: str, *, seed: int = 0, noise_std: float = 0.3) -> np.ndarray:
    """One feature-shift domain applied to digits in [0, 1] (``[n, 64]`` or ``[n, 8, 8, 1]``, same shape back):
    ``identity``; ``invert`` (``1 - x``); ``rotate90`` (the 8x8 image turned by 90° counter-clockwise); ``noise``
    (additive Gaussian noise of std ``noise_std``, fixed by ``seed``, clipped to [0, 1])."""
    x = np.asarray(x, np.float32)
    if domain == "identity":
        return x.copy()
    if domain == "invert":
        return 1.0 - x
    if domain == "rotate90":
        img = x.reshape(-1, 8, 8)
        return np.rot90(img, 1, axes=(1, 2)).reshape(x.shape).copy()
    if domain == "noise":
        noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
        return np.clip(x + noise_std * noise, 0.0, 1.0)
    raise ValueError(f"domain_transform: unknown domain {domain!r}; expected one of {DOMAINS}")


class MultiDomainDigits(NamedTuple):
    """:func:`multi_domain_digits`'s result: ``train`` (one client per row), ``test_x [D, n_test, ...]`` /
    ``test_y [n_test]`` (the same test digits under each domain), ``domains`` (names) and ``client_domain [C]``
    (the domain index of each client)."""
    train: ClientData
    test_x: np.ndarray
    test_y: np.ndarray
    domains: tuple[str, ...]
    client_domain: np.ndarray


def multi_domain_digits(n_clients: int = 4, *, domains: Sequence[str] = DOMAINS, seed: int = 0,
                        test_fraction: float = 0.25, images: bool = False,
                        noise_std: float = 0.3) -> MultiDomainDigits:
    """Feature-shift federated digits (as FedBN / FedWon's multi-domain setting, on scikit-learn's digits): client
    ``i`` belongs to domain ``i mod D``; the training digits are split IID over the clients (disjoint) and each
    client's digits are transformed by its domain (:func:`domain_transform`); the held-out digits are given under
    every domain for per-domain accuracy. ``n_clients`` must be a multiple of ``len(domains)`` (one domain per
    client when equal, else the clients of a domain split its share)."""
    from jaxmodels.datasets import load_digits_split

    domains = tuple(domains)
    if not domains:
        raise ValueError("multi_domain_digits: `domains` is empty")
    for d in domains:
        if d not in DOMAINS:
            raise ValueError(f"multi_domain_digits: unknown domain {d!r}; expected some of {DOMAINS}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1 \
            or n_clients % len(domains):
        raise ValueError(f"multi_domain_digits: n_clients={n_clients!r} must be a positive multiple of the "
                         f"{len(domains)} domains")
    split = load_digits_split(test_fraction=test_fraction, seed=seed, images=images)
    parts = partition_iid(split.y_train, n_clients, seed=seed)
    client_domain = np.arange(n_clients) % len(domains)
    x = split.x_train.copy()
    for i, p in enumerate(parts):
        x[p] = domain_transform(split.x_train[p], domains[client_domain[i]], seed=seed * 1009 + i,
                                noise_std=noise_std)
    test_x = np.stack([domain_transform(split.x_test, d, seed=seed * 1009 + 7919 + j, noise_std=noise_std)
                       for j, d in enumerate(domains)])
    return MultiDomainDigits(client_data(x, split.y_train, parts), test_x, split.y_test, domains,
                             client_domain.astype(np.int32))
