"""Cache policies vs Belady's MIN (the offline optimum) on seeded Zipf traces, and the cost of a
hit, a miss and a disk hit (plain and AES-GCM encrypted) of ``InferenceCache``.

Hit rates replay each trace through the bare policy classes (get, put on a miss; unit-size
entries); Belady's MIN with bypass on the same trace bounds what any policy can reach. Costs are
per operation on 4 KB tensor values, medians of interleaved rounds.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from pimoe.bench.printing import print_table
from pimoe.bench.timing import interleaved_medians, run_header
from pimoe.infer import InferenceCache, belady_hits, make_key, make_policy, simulate_hits
from pimoe.infer.policies import Cache, LFUCache
from pimoe.io import atomic_write_text
from pimoe.privacy.crypto import generate_key

POLICIES: dict[str, Callable[[int], Cache]] = {
    "fifo": lambda n: make_policy("fifo", n),
    "lru": lambda n: make_policy("lru", n),
    "lfu": lambda n: make_policy("lfu", n),
    "lfu_perfect": lambda n: LFUCache(n, keep_history=True),
    "tinylfu": lambda n: make_policy("tinylfu", n),
}


@dataclass
class CacheBenchConfig:
    """Traces (by default 5,000 keys / 30,000 requests) and timing sizes."""

    num_keys: int = 5000
    num_requests: int = 30_000
    skews: list[float] = field(default_factory=lambda: [0.8, 1.0, 1.2])
    sizes: list[int] = field(default_factory=lambda: [50, 300])
    shift_every: int | None = 10_000
    value_bytes: int = 4096
    timing_keys: int = 200
    rounds: int = 7
    seed: int = 0


def zipf_trace(
    num_keys: int, num_requests: int, skew: float, seed: int, shift_every: int | None = None
) -> list[int]:
    """Requests drawn i.i.d. with P(rank r) ~ r**-skew over ``num_keys`` keys, seeded.

    With ``shift_every``, the rank-to-key mapping is reshuffled every that many requests
    (popularity changes; frequencies learned earlier go stale).
    """
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_keys + 1, dtype=np.float64) ** -skew
    ranks = rng.choice(num_keys, size=num_requests, p=p / p.sum())
    if shift_every is None:
        return ranks.tolist()
    keys = np.empty_like(ranks)
    for start in range(0, num_requests, shift_every):
        keys[start : start + shift_every] = rng.permutation(num_keys)[
            ranks[start : start + shift_every]
        ]
    return keys.tolist()


def hit_rates(cfg: CacheBenchConfig) -> list[dict]:
    """One row per (trace, cache size): each policy's hit rate and Belady's."""
    traces = {
        f"zipf {s}": zipf_trace(cfg.num_keys, cfg.num_requests, s, cfg.seed) for s in cfg.skews
    }
    if cfg.shift_every:
        traces[f"zipf 1.0, shift {cfg.shift_every}"] = zipf_trace(
            cfg.num_keys, cfg.num_requests, 1.0, cfg.seed, cfg.shift_every
        )
    rows = []
    for name, trace in traces.items():
        for size in cfg.sizes:
            row: dict = {"trace": name, "cache": size}
            row.update(
                {p: simulate_hits(make(size), trace) / len(trace) for p, make in POLICIES.items()}
            )
            row["belady"] = belady_hits(trace, size) / len(trace)
            rows.append(row)
    return rows


def _loop(fn: Callable[[str], object], keys: list[str]) -> Callable[[], None]:
    def run() -> None:
        for k in keys:
            fn(k)

    return run


def costs(cfg: CacheBenchConfig, folder: Path) -> dict[str, float]:
    """Microseconds per operation of InferenceCache (LRU) on ``value_bytes`` float32 tensors."""
    n = cfg.timing_keys
    keys = [f"k{i}" for i in range(n)]
    absent = [f"absent{i}" for i in range(n)]
    value = torch.randn(cfg.value_bytes // 4)
    warm = InferenceCache(max_size=n)
    warm_nocopy = InferenceCache(max_size=n, copy_values=False)
    churn = InferenceCache(
        max_size=n // 2
    )  # cycling over n keys: every get misses, every put evicts
    disk_plain = InferenceCache(
        max_size=1, disk_path=folder / "plain"
    )  # 1 entry: every get is a disk hit
    disk_sealed = InferenceCache(
        max_size=1, disk_path=folder / "sealed", encrypt_key=generate_key()
    )
    for c in (warm, warm_nocopy, disk_plain, disk_sealed):
        for k in keys:
            c.put(k, value)

    def miss_then_put(k: str) -> None:
        if churn.get(k) is None:
            churn.put(k, value)

    contenders = {
        "make_key": _loop(lambda k: make_key(value), keys),
        "memory_hit": _loop(warm.get, keys),
        "memory_hit_no_copy": _loop(warm_nocopy.get, keys),
        "memory_miss": _loop(warm.get, absent),
        "miss_then_put": _loop(miss_then_put, keys),
        "disk_hit": _loop(disk_plain.get, keys),
        "disk_hit_encrypted": _loop(disk_sealed.get, keys),
        "disk_put": _loop(lambda k: disk_plain.put(k, value), keys),
        "disk_put_encrypted": _loop(lambda k: disk_sealed.put(k, value), keys),
    }
    seconds = interleaved_medians(contenders, cfg.rounds)
    if disk_plain.stats.disk_hits < n or disk_sealed.stats.disk_hits < n:
        raise RuntimeError(
            "the disk-hit contenders were served from memory; the measurement is wrong"
        )
    for c in (disk_plain, disk_sealed):
        c.close()
    return {name: s / n * 1e6 for name, s in seconds.items()}


def run(cfg: CacheBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.manual_seed(cfg.seed)
    rows = hit_rates(cfg)
    with tempfile.TemporaryDirectory() as folder:
        cost_us = costs(cfg, Path(folder))
    result = {
        **run_header("cache", cfg),
        "hit_rates": rows,
        "cost_us": cost_us,
    }
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    print_table(
        console,
        "Hit rate per policy vs Belady's MIN (offline optimum), same trace",
        ("trace", "cache", "FIFO", "LRU", "LFU", "LFU perfect", "TinyLFU", "Belady"),
        [
            (r["trace"], str(r["cache"]), *(f"{r[p]:.3f}" for p in (*POLICIES, "belady")))
            for r in result["hit_rates"]
        ],
    )
    print_table(
        console,
        f"InferenceCache cost per operation, {result['config']['value_bytes']} B tensors (µs)",
        ("operation", "µs"),
        [(name, f"{us:.1f}") for name, us in result["cost_us"].items()],
        left=1,
    )


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/cache.py`` (and of ``pimoe bench cache``)."""
    cfg = CacheBenchConfig()
    if quick:
        cfg = CacheBenchConfig(
            num_requests=10_000, skews=[1.0], shift_every=None, timing_keys=100, rounds=3
        )
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
