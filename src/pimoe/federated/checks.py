"""Input checks on client updates before aggregation: a bad update is rejected, not averaged in.

An update is rejected when its arrays do not match the global model's names, shapes and floating
dtypes (an ``int64``, ``bool``, ``complex``, object or string array is rejected, whatever its
values), when it holds NaN or inf, or when the L2 norm of its change from the global model is more than
``norm_factor`` times the median change of the round (a scaled / poisoned update; ``norm_factor=0``
switches this test off). The norm test needs at least ``min_for_norm`` well-formed updates to have
a meaningful median.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rejection:
    """One rejected update: which client (node id) and why."""

    node_id: int
    reason: str


def _shape_problem(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    unknown = sorted(set(update) - set(reference))
    if unknown:
        return f"unknown arrays {unknown[:3]}"
    if not update:
        return "no arrays"
    for name, array in update.items():
        expected = reference[name]
        if (
            not isinstance(array, np.ndarray)
            or array.dtype != expected.dtype
            or expected.dtype.kind != "f"
        ):
            got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            return f"array {name!r} has dtype {got}, expected {expected.dtype}"
        if array.shape != expected.shape:
            return (
                f"array {name!r} has shape {tuple(array.shape)}, expected {tuple(expected.shape)}"
            )
        if not np.isfinite(array).all():
            return f"array {name!r} holds NaN or inf"
    return None


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over the arrays of ``update`` (float, as screened)."""
    total = sum(
        float(np.sum((a.astype(np.float64) - reference[k].astype(np.float64)) ** 2))
        for k, a in update.items()
    )
    return total**0.5


def screen_updates(
    updates: dict[int, dict[str, np.ndarray]],
    reference: dict[str, np.ndarray],
    norm_factor: float = 5.0,
    min_for_norm: int = 3,
) -> tuple[list[int], list[Rejection]]:
    """Split ``updates`` (node id → named arrays) into accepted node ids and rejections.

    ``reference`` is the global model the clients started from (name → array).
    """
    if norm_factor != 0 and not norm_factor > 1:
        raise ValueError(f"norm_factor must be > 1 (or 0: no norm test), got {norm_factor}")
    rejected: list[Rejection] = []
    well_formed: dict[int, float] = {}
    keysets = {}
    for node, update in updates.items():
        problem = _shape_problem(update, reference)
        if problem is None:
            well_formed[node] = update_norm(update, reference)
            keysets[node] = frozenset(update)
        else:
            rejected.append(Rejection(node, problem))
    if len(set(keysets.values())) > 1:  # all accepted updates must carry the same arrays
        common = max(set(keysets.values()), key=list(keysets.values()).count)
        for node in [n for n, k in keysets.items() if k != common]:
            rejected.append(
                Rejection(node, "carries a different set of arrays than the other clients")
            )
            del well_formed[node]
    if norm_factor and len(well_formed) >= min_for_norm:
        median = float(np.median(list(well_formed.values())))
        for node, norm in list(well_formed.items()):
            if norm > norm_factor * max(median, 1e-12):
                rejected.append(
                    Rejection(
                        node, f"update norm {norm:.3g} > {norm_factor:g} x median {median:.3g}"
                    )
                )
                del well_formed[node]
    return sorted(well_formed), rejected
