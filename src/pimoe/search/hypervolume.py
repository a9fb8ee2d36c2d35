"""Pareto fronts and their exact hypervolume, all objectives minimized.

``optuna._hypervolume`` is private, so the hypervolume is computed here by slicing (HSO): sort
the points by the last objective and add, slab by slab, the (d-1)-dimensional hypervolume of the
points below the slab times its thickness. Exact in any dimension; O(n^(d-1) log n), plenty for
the tens of trials of a search.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _as_points(points: ArrayLike, name: str = "points") -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, d] with d >= 1, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def pareto_mask(points: ArrayLike) -> np.ndarray:
    """``points [n, d]`` (minimized) -> bool ``[n]``: True where no other point dominates it
    (is <= in every objective and < in one). Duplicates of a front point are all kept."""
    array = _as_points(points)
    mask = np.ones(len(array), dtype=bool)
    for i, p in enumerate(array):
        dominated = np.all(array <= p, axis=1) & np.any(array < p, axis=1)
        mask[i] = not dominated.any()
    return mask


def _slice_volume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of ``points [n, d]`` that all strictly dominate ``reference [d]``."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    order = np.argsort(points[:, -1], kind="stable")
    points = points[order]
    volume = 0.0
    for i in range(len(points)):
        upper = points[i + 1, -1] if i + 1 < len(points) else reference[-1]
        depth = upper - points[i, -1]
        if depth > 0:
            below = points[: i + 1, :-1]
            volume += depth * _slice_volume(below[pareto_mask(below)], reference[:-1])
    return volume


def hypervolume(points: ArrayLike, reference: ArrayLike) -> float:
    """Volume of the region dominated by ``points [n, d]`` and bounded by ``reference [d]``.

    Points that do not strictly dominate ``reference`` in every objective contribute nothing.
    """
    array = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (array.shape[1],):
        raise ValueError(f"reference must have shape ({array.shape[1]},), got {ref.shape}")
    if not np.isfinite(ref).all():
        raise ValueError("reference contains NaN or infinite values")
    inside = array[np.all(array < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(_slice_volume(inside[pareto_mask(inside)], ref))


def normalize(points: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> np.ndarray:
    """Map each objective of ``points [n, d]`` from ``[lower, upper]`` to ``[0, 1]`` (a constant
    objective, ``upper == lower``, maps to 0)."""
    array = _as_points(points)
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (array - lo) / span


def shared_hypervolumes(point_sets: dict[str, ArrayLike], margin: float = 0.1) -> dict[str, float]:
    """Hypervolume of each set under one normalization, so the numbers compare.

    Each objective is min-max normalized over the union of all sets to ``[0, 1]``; the reference
    point is ``1 + margin`` in every objective (so the extreme points still count). Empty sets
    get 0. The result lies in ``[0, (1 + margin)^d]``.
    """
    arrays = {name: _as_points(points) for name, points in point_sets.items() if np.size(points)}
    if not arrays:
        raise ValueError("no points in any set")
    union = np.concatenate(list(arrays.values()))
    lower, upper = union.min(axis=0), union.max(axis=0)
    reference = np.full(union.shape[1], 1.0 + margin)
    return {
        name: hypervolume(normalize(arrays[name], lower, upper), reference)
        if name in arrays
        else 0.0
        for name in point_sets
    }
