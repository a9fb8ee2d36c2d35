"""Per-client norm bounding: each client's change from the global model is clipped to an L2 bound.

In plain aggregation the server clips every accepted update itself (:func:`clip_change`), so a
scaled update moves the model no more than an honest one could. Under secure or homomorphic
aggregation the server cannot see single updates: honest clients clip before masking /
encrypting, and the server checks what the sum allows (:func:`aggregate_problem`): the masked
weight slot must equal the sum of the declared example counts, and the norm of the summed
weighted change may not exceed ``bound`` times that weight (the triangle inequality holds for
any set of clipped updates). A client that skips the clip is caught only when its excess pushes
the sum past that limit, and then the whole round is dropped: the server cannot tell who it was.
"""

from __future__ import annotations

import numpy as np

from pimoe.federated.checks import update_norm


def clip_change(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray], bound: float
) -> dict[str, np.ndarray]:
    """``reference + (update - reference) * min(1, bound / ||update - reference||)``, same dtypes and shapes."""
    if not bound > 0:
        raise ValueError(f"the norm bound must be > 0, got {bound}")
    norm = update_norm(update, reference)
    if norm <= bound:
        return update
    factor = bound / norm
    return {
        k: (
            reference[k].astype(np.float64) + factor * (a.astype(np.float64) - reference[k])
        ).astype(a.dtype)
        for k, a in update.items()
    }


def aggregate_problem(
    total: np.ndarray, declared_weight: float, bound: float, slack: float = 1e-6
) -> str | None:
    """Why the summed weighted change ``total [D + 1]`` (last slot: summed weight) cannot be right, or None.

    ``declared_weight``: the sum of the example counts the clients announced in the clear;
    ``bound``: each client's clip bound (0 = not bounded); ``slack``: allowed absolute error per
    value (fixed-point or CKKS rounding).
    """
    if total.ndim != 1 or total.size < 2 or not np.isfinite(total).all():
        return "the aggregate is not a finite vector"
    if (
        not declared_weight > 0
        or abs(total[-1] - declared_weight) > slack * max(1.0, declared_weight) + slack
    ):
        return f"the summed weight {total[-1]:.6g} differs from the declared example counts {declared_weight:.6g}"
    norm = float(np.linalg.norm(total[:-1]))
    limit = bound * declared_weight + slack * total.size**0.5
    if bound > 0 and norm > limit:
        return f"the summed change has norm {norm:.4g} > {limit:.4g} = bound x declared examples: a client did not clip"
    return None
