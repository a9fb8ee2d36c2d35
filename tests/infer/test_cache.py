import functools
import logging
import threading
import time

import diskcache
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pimoe.bench.cache import zipf_trace
from pimoe.infer import (
    FIFOCache,
    InferenceCache,
    LFUCache,
    LRUCache,
    TinyLFUCache,
    TTLCache,
    belady_hits,
    make_key,
    make_policy,
    simulate_hits,
)
from pimoe.infer.disk import CacheKeyError
from pimoe.privacy.crypto import generate_key


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _fill(cache, keys: str) -> None:
    for k in keys:
        cache.put(k, k)


# ---------------------------------------------------------------- policies: eviction order


def test_fifo_ignores_uses() -> None:
    c = FIFOCache(3)
    _fill(c, "abc")
    c.get("a")
    c.put("d", "d")
    assert sorted(c.keys()) == ["b", "c", "d"] and c.evictions == 1


def test_lru_evicts_least_recently_used() -> None:
    c = LRUCache(3)
    _fill(c, "abc")
    c.get("a")
    c.put("d", "d")
    assert sorted(c.keys()) == ["a", "c", "d"]
    c.put("c", "c2")  # an update is a use: order a, d, c
    c.put("e", "e")
    assert sorted(c.keys()) == ["c", "d", "e"]


def test_lfu_evicts_least_frequent_then_least_recent() -> None:
    c = LFUCache(3)
    _fill(c, "abc")
    c.put("d", "d")  # all counts 1: the least recent (a) goes
    assert sorted(c.keys()) == ["b", "c", "d"]
    c.get("b"), c.get("c")
    c.put("e", "e")  # d is the only count-1 entry
    assert sorted(c.keys()) == ["b", "c", "e"]
    c.get("e")  # b, c, e all at 2; b least recently used
    c.put("f", "f")
    assert sorted(c.keys()) == ["c", "e", "f"]
    c.put("g", "g")  # f (count 1) goes before any count-2 entry
    assert sorted(c.keys()) == ["c", "e", "g"]


@pytest.mark.parametrize("history", [False, True])
def test_lfu_history_keeps_counts_of_evicted_keys(history: bool) -> None:
    c = LFUCache(2, keep_history=history)
    c.put("a", 1), c.get("a")  # a: 2
    c.put("b", 1), c.get("b"), c.get("b")  # b: 3
    c.put("c", 1)  # evicts a
    c.put("a", 1)  # evicts c; a re-enters with 3 (history) or 1
    c.put("d", 1)
    assert ("a" in c, "b" in c) == ((True, False) if history else (False, True))


def test_tinylfu_admission_keeps_the_frequent_main_entry() -> None:
    for cls, gone, kept in ((TinyLFUCache, "c", "b"), (LRUCache, "b", "c")):
        cache = cls(3)
        _fill(cache, "abc")  # TinyLFU: window [c], probation [a, b]
        for _ in range(3):
            cache.get("a")
        cache.put("d", "d")  # TinyLFU: candidate c (freq 1) loses to probation victim b (freq 1)
        assert gone not in cache and kept in cache, cls
    cache.get("d")
    cache.put("e", "e")  # candidate d (freq 2) beats b (freq 1)
    assert sorted(cache.keys()) == ["a", "d", "e"]


def test_tinylfu_resists_a_scan() -> None:
    c = TinyLFUCache(50)
    for _ in range(5):
        for k in range(40):
            c.get(k) if k in c else c.put(k, k)
    for k in range(1000, 1300):  # one-hit wonders
        c.put(k, k)
    assert sum(k in c for k in range(40)) >= 39
    lru = LRUCache(50)
    simulate_hits(lru, list(range(40)) * 5 + list(range(1000, 1300)))
    assert sum(k in lru for k in range(40)) == 0


def test_ttl_expiry_with_fake_clock_and_lru_among_live() -> None:
    clock = FakeClock()
    c = TTLCache(2, ttl_s=5, timer=clock)
    c.put("a", 1)
    clock.now = 2
    c.put("b", 2)
    clock.now = 4.9
    assert c.get("a") == 1 and c.get("b") == 2
    clock.now = 5.0
    assert "a" not in c and c.get("b") == 2 and c.expirations == 1
    c.put("a", 3)  # lifetime restarts at 5
    c.get("b")
    c.put("c", 4)  # full: LRU among live evicts a
    assert sorted(c.keys()) == ["b", "c"] and c.evictions == 1
    clock.now = 7.0
    assert c.keys() == ["c"] and len(c) == 1 and c.expirations == 2


def test_byte_bound_is_respected_by_every_policy() -> None:
    gen = torch.Generator().manual_seed(0)
    for policy in ("fifo", "lru", "lfu", "tinylfu"):
        c = make_policy(policy, 100, max_bytes=4000)
        for i in torch.randint(0, 60, (400,), generator=gen).tolist():
            key = i % 30
            if c.get(key) is None:
                c.put(key, torch.zeros(1 + 17 * i, dtype=torch.uint8))
            assert c.bytes <= 4000
            assert c.bytes == sum(c._data[k].nbytes for k in c)
        assert c.evictions > 0


def test_lfu_and_tinylfu_beat_lru_on_zipf() -> None:
    trace = zipf_trace(num_keys=1000, num_requests=10_000, skew=0.9, seed=1)
    hits = {
        name: simulate_hits(make_policy(name, 50), trace)
        for name in ("fifo", "lru", "lfu", "tinylfu")
    }
    assert hits["fifo"] < hits["lru"] < hits["lfu"]
    assert hits["lru"] < hits["tinylfu"]
    assert max(hits.values()) <= belady_hits(trace, 50)


def _brute_force_optimum(trace: tuple[int, ...], capacity: int) -> int:
    @functools.cache
    def best(i: int, state: frozenset) -> int:
        if i == len(trace):
            return 0
        key = trace[i]
        if key in state:
            return 1 + best(i + 1, state)
        options = [best(i + 1, state)]  # bypass
        if len(state) < capacity:
            options.append(best(i + 1, state | {key}))
        else:
            options += [best(i + 1, (state - {old}) | {key}) for old in state]
        return max(options)

    return best(0, frozenset())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12), st.integers(1, 3))
def test_belady_equals_brute_force_optimum(trace: list[int], capacity: int) -> None:
    assert belady_hits(trace, capacity) == _brute_force_optimum(tuple(trace), capacity)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=200), st.integers(1, 8))
def test_no_policy_beats_belady(trace: list[int], capacity: int) -> None:
    bound = belady_hits(trace, capacity)
    for policy in ("fifo", "lru", "lfu", "tinylfu"):
        assert simulate_hits(make_policy(policy, capacity), trace) <= bound
    assert simulate_hits(LFUCache(capacity, keep_history=True), trace) <= bound


# ---------------------------------------------------------------- InferenceCache


def test_stats_and_get_or_compute() -> None:
    c = InferenceCache(max_size=2)
    calls = []
    assert c.get("x") is None
    v = c.get_or_compute("x", lambda: calls.append(1) or torch.ones(3))
    assert torch.equal(c.get_or_compute("x", lambda: calls.append(1)), v) and len(calls) == 1
    s = c.stats
    assert (s.hits, s.misses, s.entries, s.bytes, s.hit_rate) == (1, 2, 1, 12, pytest.approx(1 / 3))
    assert "x" in c and len(c) == 1


def test_values_are_copied_in_and_out() -> None:
    c = InferenceCache()
    t = torch.zeros(3)
    c.put("k", {"out": (t, [t])})
    t.add_(1)
    got = c.get("k")
    assert torch.equal(got["out"][0], torch.zeros(3))
    got["out"][1][0].add_(5)
    assert torch.equal(c.get("k")["out"][1][0], torch.zeros(3))
    aliasing = InferenceCache(copy_values=False)
    aliasing.put("k", t)
    assert aliasing.get("k").data_ptr() == aliasing.get("k").data_ptr()
    w = torch.ones(2, requires_grad=True)
    c.put("g", w * 2)
    assert c.get("g").grad_fn is None and not c.get("g").requires_grad


def test_inference_cache_ttl_uses_injected_clock() -> None:
    clock = FakeClock()
    c = InferenceCache(policy="ttl", ttl_s=1.0, timer=clock)
    c.put("a", torch.ones(1))
    clock.now = 0.5
    assert torch.equal(c.get("a"), torch.ones(1))
    clock.now = 1.0
    assert c.get("a") is None and c.stats.expirations == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "arc"}, "unknown cache policy"),
        ({"max_size": 0}, "max_size"),
        ({"max_size": -3}, "max_size"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"policy": "ttl"}, "needs ttl_s"),
        ({"policy": "ttl", "ttl_s": -1}, "ttl_s"),
        ({"policy": "lru", "ttl_s": 5}, "only used by policy='ttl'"),
        ({"encrypt_key": b"k" * 32}, "needs disk_path"),
    ],
)
def test_bad_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InferenceCache(**kwargs)


def test_bad_values_and_keys(tmp_path) -> None:
    c = InferenceCache(max_bytes=100)
    with pytest.raises(ValueError, match="exceeds max_bytes=100"):
        c.put("big", torch.zeros(26))
    with pytest.raises(ValueError, match="exceeds max_bytes"):
        c.get_or_compute("big", lambda: torch.zeros(26))
    assert "big" not in c
    with pytest.raises(TypeError, match="hashable"):
        c.put(["a"], torch.zeros(1))
    with pytest.raises(ValueError, match="encrypt_key must be 32"):
        InferenceCache(disk_path=tmp_path / "d", encrypt_key=b"short")
    with InferenceCache(disk_path=tmp_path / "d") as disk:
        with pytest.raises(TypeError, match="disk tier stores"):
            disk.put("obj", object())
        with pytest.raises(TypeError, match="str or bytes keys"):
            disk.put(3, torch.zeros(1))


def test_thread_safety_and_single_computation() -> None:
    c = InferenceCache(max_size=64)
    calls: dict[int, int] = {}
    guard = threading.Lock()

    def compute(k: int) -> torch.Tensor:
        with guard:
            calls[k] = calls.get(k, 0) + 1
        time.sleep(0.002)
        return torch.full((4,), float(k))

    errors: list[BaseException] = []
    start = threading.Barrier(8)  # all threads begin together

    def worker(seed: int) -> None:
        start.wait()
        try:
            for i in range(200):
                k = (i * 7 + seed) % 20
                assert c.get_or_compute(f"k{k}", functools.partial(compute, k))[0].item() == k
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert calls == {k: 1 for k in range(20)}
    s = c.stats
    assert s.hits + s.misses == 8 * 200 and s.misses == 20 and s.entries == 20


def test_failed_computation_is_raised_to_waiters_and_not_stored() -> None:
    c = InferenceCache()
    started, gate = threading.Event(), threading.Event()
    seen: list[str] = []

    def boom() -> None:
        started.set()
        gate.wait()
        raise RuntimeError("model failed")

    def call(fn) -> None:
        try:
            c.get_or_compute("k", fn)
        except RuntimeError as exc:
            seen.append(str(exc))

    owner = threading.Thread(target=call, args=(boom,))
    owner.start()
    started.wait()
    waiter = threading.Thread(target=call, args=(lambda: seen.append("recomputed"),))
    waiter.start()
    deadline = time.monotonic() + 5
    while c.stats.hits < 1 and time.monotonic() < deadline:  # the waiter is registered on "k"
        time.sleep(0.001)
    gate.set()
    owner.join(), waiter.join()
    assert seen == ["model failed", "model failed"] and "k" not in c


def test_disk_tier_persists_across_instances(tmp_path) -> None:
    value = {
        "logits": torch.randn(2, 3),
        "ids": (torch.arange(4), [torch.ones(1, dtype=torch.bfloat16)]),
    }
    with InferenceCache(max_size=1, disk_path=tmp_path) as c:
        c.put("a", value)
        c.put("b", torch.ones(1))  # evicts a from memory; still on disk
        assert len(c) == 1 and c.stats.evictions == 1
        assert torch.equal(c.get("a")["logits"], value["logits"]) and c.stats.disk_hits == 1
    with InferenceCache(disk_path=tmp_path) as again:
        assert "a" in again and len(again) == 0
        got = again.get("a")
        assert (
            torch.equal(got["ids"][1][0], value["ids"][1][0])
            and got["ids"][1][0].dtype == torch.bfloat16
        )
        again.get("a")
        assert (again.stats.disk_hits, again.stats.hits, len(again)) == (1, 2, 1)
        again.clear()
    with InferenceCache(disk_path=tmp_path) as cleared:
        assert "a" not in cleared


def test_corrupt_disk_entries_are_dropped_and_recomputed(tmp_path) -> None:
    with InferenceCache(disk_path=tmp_path) as c:
        c.put("garbage", torch.ones(2))
        c.put("bad-payload", torch.ones(2))
    with diskcache.Cache(str(tmp_path)) as raw:
        raw.set("garbage", b"\x00not a cache entry at all")
        payload = b"not a torch file"
        raw.set(
            "bad-payload", b"\x00" + xxhash.xxh3_64(b"bad-payload\x00" + payload).digest() + payload
        )
    with InferenceCache(disk_path=tmp_path) as c:
        for key in ("garbage", "bad-payload"):
            got = c.get_or_compute(key, lambda: torch.zeros(2))
            assert torch.equal(got, torch.zeros(2))
        s = c.stats
        assert (s.corrupt_entries, s.integrity_failures, s.misses, s.disk_hits) == (2, 0, 2, 0)
    with InferenceCache(disk_path=tmp_path) as c:  # the recomputed values replaced the bad entries
        assert torch.equal(c.get("garbage"), torch.zeros(2)) and c.stats.disk_hits == 1


def test_encrypted_entries_fail_closed(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    key = generate_key()
    events: list[tuple[str, dict]] = []
    secret = torch.arange(64, dtype=torch.int64)
    with InferenceCache(disk_path=tmp_path, encrypt_key=key) as c:
        c.put("a", secret)
        c.put("b", torch.ones(2))
        c.put("c", torch.ones(2))
    with diskcache.Cache(str(tmp_path)) as raw:
        blob = raw.get("a")
        assert secret.numpy().tobytes() not in blob
        raw.set("a", blob[:-1] + bytes([blob[-1] ^ 1]))  # flip one tag bit
        raw.set("b", raw.get("c"))  # c's entry swapped under key b
    with InferenceCache(
        disk_path=tmp_path, encrypt_key=key, audit=lambda e, f: events.append((e, dict(f)))
    ) as c:
        with caplog.at_level(logging.WARNING, logger="pimoe.infer.cache"):
            assert c.get("a") is None and c.get("b") is None
        assert torch.equal(c.get("c"), torch.ones(2))
        assert (c.stats.integrity_failures, c.stats.misses, c.stats.disk_hits) == (2, 2, 1)
        assert "a" not in c
    records = [r for r in caplog.records if r.name == "pimoe.infer.cache"]
    assert len(records) == 2 and "failed authentication" in records[0].getMessage()
    assert [(e, f["key"]) for e, f in events] == [
        ("cache.integrity_failure", "a"),
        ("cache.integrity_failure", "b"),
    ]
    with pytest.raises(CacheKeyError, match="another encrypt_key"):  # see test_disk_open.py
        InferenceCache(disk_path=tmp_path, encrypt_key=generate_key())
    with InferenceCache(disk_path=tmp_path, encrypt_key=key) as c:
        assert torch.equal(c.get("c"), torch.ones(2))


# ---------------------------------------------------------------- keys


def test_make_key_properties() -> None:
    x = torch.arange(6, dtype=torch.float32)
    assert make_key(x) == make_key(x.clone()) == make_key(torch.arange(6.0))
    assert len(make_key(x)) == 32
    variants = [
        make_key(x),
        make_key(x.double()),
        make_key(x.reshape(2, 3)),
        make_key(x + 1),
        make_key(x, namespace="model-v2"),
        make_key(x, 1),
        make_key(x, "1"),
        make_key([x]),
        make_key((x,)),
        make_key(x.to(torch.bfloat16)),
        make_key(torch.tensor([], dtype=torch.float32)),
    ]
    assert len(set(variants)) == len(variants)
    m = torch.arange(6.0).reshape(3, 2)
    assert make_key(m.t()) == make_key(m.t().contiguous())  # layout does not matter, values do
    assert make_key(x.requires_grad_()) == make_key(torch.arange(6.0))
    assert make_key("prompt", {"temperature": 0.0}) == make_key("prompt", {"temperature": 0.0})
