"""TinyLFU's frequency sketch: a count-min sketch of 4-bit counters that ages by halving."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import cache

from pimoe.extras import require


class CountMinSketch:
    """Count-min sketch: 4 rows of ``4 * capacity`` (rounded up to a power of 2) counters that
    saturate at 15 (4-bit, as Caffeine's), all halved every ``10 * capacity`` additions."""

    ROWS = 4
    _SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)

    def __init__(self, capacity: int) -> None:
        self.width = 1 << max(
            4, (capacity - 1).bit_length() + 2
        )  # 16 counters per entry, as Caffeine
        self.table = [[0] * self.width for _ in range(self.ROWS)]
        self.sample_size = 10 * capacity
        self.additions = 0

    def _indices(self, key: Hashable) -> list[int]:
        if isinstance(key, str):
            h = _xxh3_64()(key.encode())
        elif isinstance(key, bytes):
            h = _xxh3_64()(key)
        else:
            h = hash(key) & 0xFFFFFFFFFFFFFFFF
        mask = self.width - 1
        return [((h * seed) & 0xFFFFFFFFFFFFFFFF) >> 40 & mask for seed in self._SEEDS]

    def add(self, key: Hashable) -> None:
        """Count one use of ``key``; halve every counter after ``sample_size`` additions."""
        for row, i in zip(self.table, self._indices(key)):
            if row[i] < 15:
                row[i] += 1
        self.additions += 1
        if self.additions >= self.sample_size:
            self.table = [[c >> 1 for c in row] for row in self.table]
            self.additions //= 2

    def estimate(self, key: Hashable) -> int:
        """Estimated (over-counted, never under-counted before halving) uses of ``key``."""
        return min(row[i] for row, i in zip(self.table, self._indices(key)))


@cache
def _xxh3_64() -> Callable[[bytes], int]:
    """xxhash's 64-bit xxh3 (str and bytes keys get the same sketch rows in every process, unlike
    ``hash``), imported on first use."""
    fn: Callable[[bytes], int] = require(
        "xxhash", "serve", "TinyLFU's sketch of str/bytes keys"
    ).xxh3_64_intdigest
    return fn
