"""The serving benchmark: trace, metrics parsing, and a tiny real run over loopback HTTP."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

pytest.importorskip("uvicorn")

from pimoe.bench.serve import MODES, ServeBenchConfig, _mean_batch_size, prompts_and_trace, run


def test_trace_is_seeded_and_repeats() -> None:
    cfg = ServeBenchConfig(num_requests=400, num_prompts=50)
    pool, trace = prompts_and_trace(cfg)
    assert (pool, trace) == prompts_and_trace(cfg)
    assert len(pool) == 50 and all(cfg.min_len <= len(p) <= cfg.max_len for p in pool)
    assert all(0 <= t < 256 for p in pool for t in p)
    assert len(trace) == 400 and len(set(trace)) < 50  # Zipf: popular prompts repeat


def test_mean_batch_size_from_metrics() -> None:
    text = 'pimoe_batch_size_count{model="lm"} 4.0\npimoe_batch_size_sum{model="lm"} 10.0\n'
    assert _mean_batch_size(text) == 2.5
    assert _mean_batch_size("") == 0.0


@pytest.mark.slow
def test_tiny_run_over_http() -> None:
    cfg = ServeBenchConfig(num_requests=24, concurrency=4, num_prompts=10, warmup_requests=4)
    result = run(cfg, Console(file=io.StringIO()))
    json.dumps(result)
    assert set(result["modes"]) == set(MODES)
    for r in result["modes"].values():
        assert r["errors"] == 0 and r["requests"] == 24 and r["p99_ms"] >= r["p50_ms"] > 0
    assert result["modes"]["one_by_one"]["mean_batch_size"] == 1.0
    base = result["modes"]["one_by_one"]["throughput_rps"]
    for mode in ("batching", "batching_cache"):
        assert result[f"throughput_ratio_{mode}"] == pytest.approx(
            result["modes"][mode]["throughput_rps"] / base
        )
