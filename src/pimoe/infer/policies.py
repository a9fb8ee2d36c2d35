"""Replacement policies in the style of cachetools: the base class owns the mapping and the size
accounting; a policy only chooses the eviction victim and keeps its own order through hooks.

Hooks a policy overrides: ``_touch(key, new)`` after an insert (``new=True``) or a hit/update,
``_forget(key)`` after a removal, ``_victim()`` to name the key to evict, and ``_purge()`` run
before every operation (TTL expiry). Eviction runs before an insert, as in cachetools, so a new
key is always stored; TinyLFU's admission filter acts when a key leaves its window.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from pimoe.infer.sketch import CountMinSketch

_MISSING = object()


def value_nbytes(value: Any) -> int:
    """Bytes of a value: tensor ``nbytes`` (summed through tuples, lists and dict values), ``len``
    of bytes, ``sys.getsizeof`` of anything else."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(value_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(value_nbytes(v) for v in value.values())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return sys.getsizeof(value)


class Cache(ABC):
    """A bounded mapping: at most ``max_size`` entries and, if set, ``max_bytes`` bytes of values.

    Not thread-safe (``InferenceCache`` adds the lock). ``put`` of a value larger than
    ``max_bytes`` raises ValueError rather than silently storing nothing.
    """

    def __init__(
        self,
        max_size: int,
        max_bytes: int | None = None,
        getsizeof: Callable[[Any], int] = value_nbytes,
    ) -> None:
        if not isinstance(max_size, int) or max_size <= 0:
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.getsizeof = getsizeof
        self.bytes = 0
        self.evictions = 0
        self._data: dict[Hashable, Any] = {}
        self._sizes: dict[Hashable, int] = {}

    def __len__(self) -> int:
        self._purge()
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        self._purge()
        return key in self._data

    def __iter__(self) -> Iterator[Hashable]:
        """Live keys (a snapshot), in no particular order."""
        return iter(self.keys())

    def keys(self) -> list[Hashable]:
        """Live keys, in no particular order."""
        self._purge()
        return list(self._data)

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (counted as a use) or ``default``."""
        self._purge()
        if key not in self._data:
            return default
        self._touch(key, new=False)
        return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace ``key``, evicting as the policy chooses until the bounds hold."""
        self._purge()
        size = self.getsizeof(value)
        if self.max_bytes is not None and size > self.max_bytes:
            raise ValueError(
                f"value of {size} bytes exceeds max_bytes={self.max_bytes}; raise max_bytes or cache smaller values"
            )
        if key in self._data:
            self.bytes += size - self._sizes[key]
            self._data[key], self._sizes[key] = value, size
            self._update(key)
        else:
            while self._data and (
                len(self._data) >= self.max_size
                or (self.max_bytes is not None and self.bytes + size > self.max_bytes)
            ):
                self.evictions += 1
                self._remove(self._victim())
            self._data[key], self._sizes[key] = value, size
            self.bytes += size
            self._touch(key, new=True)
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            self.evictions += 1
            self._remove(self._victim())

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key`` and return its value (not counted as an eviction)."""
        self._purge()
        if key not in self._data:
            return default
        value = self._data[key]
        self._remove(key)
        return value

    def clear(self) -> None:
        """Remove every entry."""
        for key in list(self._data):
            self._remove(key)

    def _remove(self, key: Hashable) -> None:
        del self._data[key]
        self.bytes -= self._sizes.pop(key)
        self._forget(key)

    def _touch(self, key: Hashable, new: bool) -> None:  # noqa: B027  # a hook: no-op by default
        """Record an insert (``new``) or a use of ``key``."""

    def _update(self, key: Hashable) -> None:
        """Record a put of a resident ``key`` (by default, a use)."""
        self._touch(key, new=False)

    def _forget(self, key: Hashable) -> None:  # noqa: B027  # a hook: no-op by default
        """Drop ``key`` from the policy's bookkeeping."""

    @abstractmethod
    def _victim(self) -> Hashable:
        """The key to evict next."""

    def _purge(self) -> None:  # noqa: B027  # a hook: no-op by default
        """Drop entries that are no longer valid (expired)."""


class FIFOCache(Cache):
    """Evicts the oldest insert; a use does not change the order, a put of a resident key moves it
    to the back (as cachetools' ``FIFOCache``)."""

    def __init__(self, max_size: int, max_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(max_size, max_bytes, **kwargs)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def _touch(self, key: Hashable, new: bool) -> None:
        if new:
            self._order[key] = None

    def _update(
        self, key: Hashable
    ) -> None:  # a replaced value counts as a new insert, as in cachetools
        self._order.move_to_end(key)

    def _forget(self, key: Hashable) -> None:
        del self._order[key]

    def _victim(self) -> Hashable:
        return next(iter(self._order))


class LRUCache(FIFOCache):
    """Evicts the least recently used entry (a use or an update moves a key to the back)."""

    def _touch(self, key: Hashable, new: bool) -> None:
        self._order[key] = None
        self._order.move_to_end(key)


class TTLCache(LRUCache):
    """LRU among live entries; an entry expires ``ttl_s`` seconds after its last put.

    ``timer`` is the clock (``time.monotonic``; inject a fake one for deterministic tests).
    """

    def __init__(
        self,
        max_size: int,
        max_bytes: int | None = None,
        *,
        ttl_s: float,
        timer: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        if not ttl_s or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        super().__init__(max_size, max_bytes, **kwargs)
        self.ttl_s = float(ttl_s)
        self.timer = timer
        self.expirations = 0
        self._expires: OrderedDict[Hashable, float] = (
            OrderedDict()
        )  # insertion order = expiry order

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace ``key``; its lifetime restarts now."""
        super().put(key, value)
        self._expires[key] = self.timer() + self.ttl_s
        self._expires.move_to_end(key)

    def _forget(self, key: Hashable) -> None:
        super()._forget(key)
        self._expires.pop(key, None)

    def _purge(self) -> None:
        now = self.timer()
        while self._expires:
            key, deadline = next(iter(self._expires.items()))
            if deadline > now:
                break
            self.expirations += 1
            self._remove(key)


class LFUCache(Cache):
    """Evicts the least frequently used entry, the least recently used one among ties. O(1).

    By default counts live only while the entry is resident ("in-cache LFU"). With
    ``keep_history=True`` counts survive eviction ("perfect LFU": unbounded memory, one int per
    key ever seen), so a returning popular key re-enters with its old count.
    """

    def __init__(
        self,
        max_size: int,
        max_bytes: int | None = None,
        *,
        keep_history: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_size, max_bytes, **kwargs)
        self.keep_history = keep_history
        self._count: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}  # count -> keys, LRU first
        self._min = 0

    def _touch(self, key: Hashable, new: bool) -> None:
        if new:
            count = self._count.get(key, 0) + 1
            self._min = count if len(self._data) == 1 else min(self._min, count)
        else:
            count = self._count[key] + 1
            self._unbucket(key, count - 1)
        self._count[key] = count
        self._buckets.setdefault(count, OrderedDict())[key] = None

    def _unbucket(self, key: Hashable, count: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]

    def _forget(self, key: Hashable) -> None:
        self._unbucket(key, self._count[key] if self.keep_history else self._count.pop(key))

    def _victim(self) -> Hashable:
        while self._min not in self._buckets:  # counts only grow, so the minimum only moves up
            self._min += 1
        return next(iter(self._buckets[self._min]))


class TinyLFUCache(Cache):
    """W-TinyLFU (Einziger, Friedman & Manes 2017; Caffeine's policy), fixed-size variant.

    New keys enter a small LRU *window* (1% of ``max_size``). While the cache is not full, the
    window's overflow moves to the main segmented LRU; once it is full, the window's LRU entry
    duels the *probation* segment's LRU entry: the one with the higher estimated frequency stays
    (ties evict the newcomer). A hit in probation promotes to *protected* (80% of main);
    protected overflow demotes back to probation. Frequencies come from a count-min sketch (4
    rows, 4-bit saturating counters) updated on every use and insert, halved every
    ``10 * max_size`` updates so old popularity fades. Not included from Caffeine: the doorkeeper
    Bloom filter and hill-climbing of the window size. Segment sizes are in entries.
    """

    def __init__(self, max_size: int, max_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(max_size, max_bytes, **kwargs)
        self.window_size = max(1, max_size // 100)
        self.protected_size = max(0, int(0.8 * (max_size - self.window_size)))
        self._window: OrderedDict[Hashable, None] = OrderedDict()
        self._probation: OrderedDict[Hashable, None] = OrderedDict()
        self._protected: OrderedDict[Hashable, None] = OrderedDict()
        self.sketch = CountMinSketch(max_size)

    def _touch(self, key: Hashable, new: bool) -> None:
        self.sketch.add(key)
        if new:
            self._window[key] = None
            if len(self._window) > self.window_size:  # room in main (eviction ran first): no duel
                self._probation[self._window.popitem(last=False)[0]] = None
        elif key in self._window:
            self._window.move_to_end(key)
        elif key in self._protected:
            self._protected.move_to_end(key)
        else:
            del self._probation[key]
            self._protected[key] = None
            if len(self._protected) > self.protected_size:
                demoted, _ = self._protected.popitem(last=False)
                self._probation[demoted] = None

    def _forget(self, key: Hashable) -> None:
        for segment in (self._window, self._probation, self._protected):
            if segment.pop(key, _MISSING) is None:
                return

    def _main_victim(self) -> Hashable | None:
        for segment in (self._probation, self._protected):
            if segment:
                return next(iter(segment))
        return None

    def _victim(self) -> Hashable:
        main_victim = self._main_victim()
        if len(self._window) < self.window_size:
            return main_victim if main_victim is not None else next(iter(self._window))
        candidate = next(iter(self._window))
        if main_victim is None or self.sketch.estimate(candidate) <= self.sketch.estimate(
            main_victim
        ):
            return candidate
        del self._window[candidate]
        self._probation[candidate] = None
        return main_victim


POLICIES: dict[str, type[Cache]] = {
    "fifo": FIFOCache,
    "lru": LRUCache,
    "lfu": LFUCache,
    "ttl": TTLCache,
    "tinylfu": TinyLFUCache,
}


def make_policy(
    policy: str,
    max_size: int,
    max_bytes: int | None = None,
    *,
    ttl_s: float | None = None,
    timer: Callable[[], float] = time.monotonic,
    **kwargs: Any,
) -> Cache:
    """Build the cache class named ``policy`` ("fifo", "lru", "lfu", "ttl" or "tinylfu")."""
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {sorted(POLICIES)}")
    if policy == "ttl":
        if ttl_s is None:
            raise ValueError("policy='ttl' needs ttl_s (seconds an entry stays valid)")
        return TTLCache(max_size, max_bytes, ttl_s=ttl_s, timer=timer, **kwargs)
    if ttl_s is not None:
        raise ValueError(f"ttl_s is only used by policy='ttl', got policy={policy!r}")
    return POLICIES[policy](max_size, max_bytes, **kwargs)
