"""What the inference cache stores: the ``MISSING`` sentinel and a map over the tensors of a value
(tensors, or tuples/lists/dicts of them; anything else passes through)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

MISSING = object()


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in ``value``, rebuilding tuples, lists and dicts (as plain ones)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


__all__ = ["MISSING", "map_tensors"]
