"""Typed reads of Flower records: what a message carries, checked as it is read.

A ``RecordDict`` maps names to array, metric or config records, and a record's values are
unions (``int | float | str | bytes | list[...]``). Replies come from other machines, so a value
of the wrong kind is the sender's error: these readers raise ``KeyError`` (missing) or
``TypeError`` (wrong kind), which the strategies and handlers turn into a rejected reply.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

#: Largest ``num-examples`` a reply may declare: exact as a float, and a sum of thousands of them
#: stays finite (float counts such as 1e308 overflow the sum of weights and zero the average).
MAX_EXAMPLES = 2**53


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


def example_count(content: RecordDict) -> int:
    """The ``num-examples`` metric of a reply: a whole number in [1, :data:`MAX_EXAMPLES`]
    (``KeyError`` if missing, ``TypeError`` if not a number, ``ValueError`` otherwise)."""
    value = as_float(metrics(content)["num-examples"])
    if not (math.isfinite(value) and 1 <= value <= MAX_EXAMPLES and value == int(value)):
        raise ValueError(f"num-examples must be a whole number in [1, 2**53], got {value}")
    return int(value)


def uniform_replies(replies: list[Message]) -> list[Message]:
    """``replies`` (each already passing :func:`example_count`) with their contents rebuilt to
    what Flower's aggregation takes from all of them without raising
    ``InconsistentMessageReplies`` (which ends the run): the ``arrays`` record when present, and
    one metric record with ``num-examples`` as an int and the other metrics every reply carries
    as a finite number. Extra records, list metrics and metrics only some replies send are left
    out."""
    scalars = [
        {
            k: v
            for k, v in metrics(m.content).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for m in replies
    ]
    common = set.intersection(*(set(s) for s in scalars)) if scalars else set()
    for m, values in zip(replies, scalars):
        record: dict[str, Any] = {k: values[k] for k in sorted(common)}
        record["num-examples"] = example_count(m.content)
        content: dict[str, Any] = {"metrics": MetricRecord(record)}
        if "arrays" in m.content.array_records:
            content["arrays"] = arrays(m.content)
        m.content = RecordDict(content)
    return replies
