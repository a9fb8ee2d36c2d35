import json

import pytest

from pimoe.bench.cache import CacheBenchConfig
from pimoe.bench.cache import run as run_cache
from pimoe.bench.expert_parallel import EPBenchConfig
from pimoe.bench.expert_parallel import run as run_ep


def test_cache_benchmark_small_trace() -> None:
    cfg = CacheBenchConfig(
        num_keys=300,
        num_requests=3000,
        skews=[1.0],
        sizes=[20],
        shift_every=None,
        timing_keys=20,
        rounds=1,
    )
    result = run_cache(cfg)
    json.dumps(result)
    (row,) = result["hit_rates"]
    for policy in ("fifo", "lru", "lfu", "lfu_perfect", "tinylfu"):
        assert 0 < row[policy] <= row["belady"], policy  # nothing beats the offline optimum
    assert row["lru"] < row["lfu_perfect"]  # frequency wins on a stationary Zipf trace
    assert (
        0 < result["cost_us"]["memory_hit"] < result["cost_us"]["disk_hit"]
    )  # memory is the fast tier


def test_expert_parallel_benchmark_matches_single_process() -> None:
    pytest.importorskip("torch.distributed")
    cfg = EPBenchConfig(
        d_model=32, ffn_dim=64, num_experts=4, tokens_per_rank=64, processes=[1, 2], rounds=1
    )
    result = run_ep(cfg)
    assert result["max_abs_diff_vs_single_process"] < 1e-5
    json.dumps(result)
