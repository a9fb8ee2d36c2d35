"""Split a labelled dataset among federated clients: IID, or label-skewed with a Dirichlet prior.

Dirichlet partitioning (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"):
for every class, draw the clients' shares from Dir(alpha, ..., alpha) and deal that class's samples
out accordingly. Small alpha → each client sees few classes; large alpha → close to IID.
"""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients:
        raise ValueError(
            f"cannot give {num_clients} clients at least one of {len(labels)} samples each"
        )
    return labels


def iid_partition(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle sample indices ``[N]`` and cut them into ``num_clients`` near-equal parts."""
    labels = _check(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: class ``c``'s samples go to clients in proportions ~ Dir(alpha).

    Redraws (up to 1,000 times) until every client holds at least ``min_size`` samples.
    Returns one sorted index array per client; together they are disjoint and cover ``[N]``.
    """
    labels = _check(labels, num_clients)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ValueError(
            f"min_size={min_size} x {num_clients} clients exceeds {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(1000):
        draws = []  # per class: (its samples shuffled, the cut points between clients)
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in members:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            sizes += np.diff(cuts, prepend=0, append=len(idx))
            draws.append((idx, cuts))
        if sizes.min() < min_size:  # checked before any per-client array is built
            continue
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx, cuts in draws:
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        return [np.sort(np.concatenate(p)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every client {min_size} samples; raise alpha or lower min_size"
    )


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 = every client has the global class mix; near 1 = clients see disjoint classes.
    """
    labels = np.asarray(labels)
    classes, global_counts = np.unique(labels, return_counts=True)
    p_global = global_counts / global_counts.sum()
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        counts = np.array([(labels[part] == c).sum() for c in classes], dtype=float)
        distances.append(0.5 * np.abs(counts / counts.sum() - p_global).sum())
    return float(np.mean(distances))


def make_partition(
    labels: np.ndarray, num_clients: int, kind: str, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """``kind`` "iid" or "dirichlet" (with ``alpha``): the client index arrays."""
    if kind == "iid":
        return iid_partition(labels, num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    raise ValueError(f"unknown partition {kind!r}; expected 'iid' or 'dirichlet'")
