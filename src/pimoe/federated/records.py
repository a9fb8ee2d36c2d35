"""Typed reads of Flower records: what a message carries, checked as it is read.

A ``RecordDict`` maps names to array, metric or config records, and a record's values are
unions (``int | float | str | bytes | list[...]``). Replies come from other machines, so a value
of the wrong kind is the sender's error: these readers raise ``KeyError`` (missing) or
``TypeError`` (wrong kind), which the strategies and handlers turn into a rejected reply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict


def config(content: RecordDict, name: str = "config") -> ConfigRecord:
    """The config record ``name`` of ``content``."""
    return content.config_records[name]


def metrics(content: RecordDict, name: str = "metrics") -> MetricRecord:
    """The metric record ``name`` of ``content``."""
    return content.metric_records[name]


def arrays(content: RecordDict, name: str = "arrays") -> ArrayRecord:
    """The array record ``name`` of ``content``."""
    return content.array_records[name]


def array(content: RecordDict, key: str, name: str = "arrays") -> np.ndarray:
    """Array ``key`` of the array record ``name`` as numpy."""
    return arrays(content, name)[key].numpy()


def as_int(value: object) -> int:
    """``value`` as an int (an int, or a float / str holding one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return int(value)


def as_float(value: object) -> float:
    """``value`` as a float (an int, float or str holding one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def as_list(value: object) -> list[Any]:
    """``value`` if it is a list."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def as_bytes(value: object) -> bytes:
    """``value`` if it is bytes."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def as_bytes_list(value: object) -> list[bytes]:
    """``value`` if it is a list of bytes."""
    items = as_list(value)
    if not all(isinstance(v, bytes) for v in items):
        raise TypeError("expected a list of bytes")
    return items
