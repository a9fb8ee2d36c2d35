"""Hit rates of a replacement policy on a key trace, and of Belady's MIN (the offline optimum)."""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

from pimoe.infer.policies import Cache

_MISSING = object()


def simulate_hits(cache: Cache, trace: Sequence[Hashable]) -> int:
    """Replay ``trace`` (get, and put on a miss) through ``cache``; return the number of hits."""
    hits = 0
    for key in trace:
        if cache.get(key, _MISSING) is _MISSING:
            cache.put(key, None)
        else:
            hits += 1
    return hits


def belady_hits(trace: Sequence[Hashable], capacity: int) -> int:
    """Hits of Belady's MIN with bypass, the offline optimum for unit-size entries. O(n log n).

    On a miss with a full cache, the key among the residents and the incoming one whose next use
    is farthest is not kept (the incoming one is bypassed if it is that key). No online policy,
    with or without admission control, can get more hits on the same trace.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    n = len(trace)
    next_use = [0] * n
    last: dict[Hashable, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(trace[i], n + i)  # never used again: beyond the trace, distinct
        last[trace[i]] = i
    resident: dict[Hashable, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, position of that use); stale entries skipped
    hits = 0
    for i, key in enumerate(trace):
        if key in resident:
            hits += 1
        elif len(resident) >= capacity:
            while -heap[0][0] != resident.get(trace[heap[0][1]]):
                heapq.heappop(heap)
            if next_use[i] >= -heap[0][0]:
                continue
            del resident[trace[heapq.heappop(heap)[1]]]
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i))
    return hits
