"""InferenceCache's memory tier behaves as cachetools' caches do: stateful property tests against
cachetools (same operations, same contents after each), any hashable key, the MutableMapping
interface, and str/bytes keys for the disk tier."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pimoe.infer import InferenceCache

cachetools = pytest.importorskip("cachetools")

KEYS = st.one_of(
    st.integers(0, 6),
    st.sampled_from(["a", "b", b"a"]),
    st.tuples(st.integers(0, 1), st.booleans()),
)
TTL = 3.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MemoryTierAgainstCachetools(RuleBasedStateMachine):
    """Random sequences of mapping operations on both caches; the values returned and the keys
    held must agree after every step (TTL entries expire on a shared fake clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.ours: InferenceCache
        self.peer: Any

    @initialize(policy=st.sampled_from(["lru", "fifo", "lfu", "ttl"]), size=st.integers(1, 4))
    def build(self, policy: str, size: int) -> None:
        ttl = TTL if policy == "ttl" else None
        self.ours = InferenceCache(max_size=size, policy=policy, ttl_s=ttl, timer=self.clock)
        self.peer = {
            "lru": lambda: cachetools.LRUCache(size),
            "fifo": lambda: cachetools.FIFOCache(size),
            "lfu": lambda: cachetools.LFUCache(size),
            "ttl": lambda: cachetools.TTLCache(size, ttl=TTL, timer=self.clock),
        }[policy]()

    @rule(key=KEYS, value=st.integers())
    def set_item(self, key: Any, value: int) -> None:
        self.ours[key] = value
        self.peer[key] = value

    @rule(key=KEYS)
    def get(self, key: Any) -> None:
        assert self.ours.get(key) == self.peer.get(key)

    @rule(key=KEYS)
    def get_item(self, key: Any) -> None:
        assert _outcome(lambda: self.ours[key]) == _outcome(lambda: self.peer[key])

    @rule(key=KEYS)
    def delete(self, key: Any) -> None:
        def remove(cache: Any) -> None:
            del cache[key]

        assert _outcome(lambda: remove(self.ours)) == _outcome(lambda: remove(self.peer))

    @rule(key=KEYS, default=st.integers())
    def pop_and_setdefault(self, key: Any, default: int) -> None:
        assert self.ours.pop(key, None) == self.peer.pop(key, None)
        assert self.ours.setdefault(key, default) == self.peer.setdefault(key, default)

    @rule(seconds=st.integers(0, 2))
    def tick(self, seconds: int) -> None:
        self.clock.now += seconds

    @invariant()
    def same_keys(self) -> None:
        if not hasattr(self, "ours"):
            return
        if hasattr(self.peer, "expire"):
            self.peer.expire()
        assert set(self.ours) == set(self.peer)  # iteration does not count as a use
        assert len(self.ours) == len(self.peer)


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return ("value", fn())
    except KeyError:
        return ("KeyError", None)


TestMemoryTierAgainstCachetools = MemoryTierAgainstCachetools.TestCase
TestMemoryTierAgainstCachetools.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)


def test_mapping_interface_and_hashable_keys() -> None:
    cache = InferenceCache(max_size=8)
    assert isinstance(cache, MutableMapping)
    cache[3] = torch.ones(2)
    cache[(1, "x")] = torch.zeros(1)
    cache.update({b"k": 5})
    assert torch.equal(cache[3], torch.ones(2)) and 3 in cache and (1, "x") in cache
    assert sorted(map(repr, cache)) == sorted(map(repr, [3, (1, "x"), b"k"])) and len(cache) == 3
    with pytest.raises(KeyError):
        _ = cache[4]
    assert cache.pop(b"k") == 5 and b"k" not in cache
    del cache[3]
    with pytest.raises(KeyError):
        del cache[3]
    with pytest.raises(TypeError, match="hashable"):
        cache[[1, 2]] = 1  # type: ignore[index]
    assert cache.stats.misses == 1  # cache[4]


def test_disk_tier_takes_str_and_bytes_keys(tmp_path: Path) -> None:
    with InferenceCache(disk_path=tmp_path / "d") as cache:
        cache["k"] = torch.ones(1)
        cache[b"k"] = torch.zeros(1)
        with pytest.raises(TypeError, match="str or bytes keys"):
            cache[7] = torch.ones(1)
        with pytest.raises(TypeError, match="str or bytes keys"):
            _ = 7 in cache
    with InferenceCache(disk_path=tmp_path / "d") as reopened:  # the disk tier kept both, apart
        assert torch.equal(reopened["k"], torch.ones(1)) and torch.equal(
            reopened[b"k"], torch.zeros(1)
        )
        del reopened[b"k"]
    with InferenceCache(disk_path=tmp_path / "d") as again:
        assert b"k" not in again and "k" in again
