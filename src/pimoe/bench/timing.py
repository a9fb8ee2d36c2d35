"""Interleaved timing: every contender runs once per round, so machine noise hits all alike."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch


def run_header(name: str, config: Any) -> dict[str, object]:
    """The fields every benchmark result starts with: its name, config (a dataclass) and machine."""
    return {
        "benchmark": name,
        "config": asdict(config),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def interleaved_medians(
    contenders: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contender over ``rounds`` interleaved rounds.

    Round ``r`` starts at contender ``r mod n`` and runs them all in turn, so each contender
    follows each other one equally often: load drift hits all alike, and so does what the one
    before leaves in the caches (two settings of one layer back to back: the second one would
    find part of the shared weights in L3)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        start_at = r % len(names)
        for name in names[start_at:] + names[:start_at]:
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def geomean(values: list[float]) -> float:
    """Geometric mean of positive values."""
    if not values:
        raise ValueError("geomean of an empty list")
    product = 1.0
    for v in values:
        product *= v
    return product ** (1.0 / len(values))


def load_average() -> float:
    """The machine's 1-minute load average (runnable processes; compare with ``os.cpu_count()``)."""
    return os.getloadavg()[0]
